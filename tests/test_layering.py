"""The pure-math layer (rl.algos, verifiers) imports no ray, vllm or torch.distributed."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = ["rl/algos", "verifiers"]
FORBIDDEN = ("ray", "vllm", "torch.distributed")


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]  # from torch import distributed
    return names


@pytest.mark.parametrize("path", sorted(p for d in PURE for p in (ROOT / d).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_modules_import_nothing_forbidden(path):
    bad = [n for n in _imports(path) if _forbidden(n)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_pure_math_loads_nothing_forbidden():
    # `import torch` itself loads parts of torch.distributed, so the baseline is taken after it: what
    # rl.algos and verifiers bring in on top must hold no ray, vllm or torch.distributed module.
    probe = ("import sys, torch; base = set(sys.modules); import rl.algos, verifiers; "
             "new = set(sys.modules) - base; "
             "print(*sorted(m for m in new if m.split('.')[0] in ('ray', 'vllm') or m.startswith('torch.distributed')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "", f"importing rl.algos / verifiers loaded: {out.stdout}"
