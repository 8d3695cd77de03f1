"""The packages form layers that import only downward, with no import cycle, function-local imports
included; the pure-math layer (rl.algos, verifiers) imports no ray, vllm or torch.distributed."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A package may import packages of lower layers, never of its own layer or above.
LAYERS = (
    ("verifiers", "training"),   # pure answer checks; config loader, atomic writes, run logs, optimizer
    ("model",),                  # loading, encoding, heads, log-probs, the tiny VLM
    ("records",),                # JSONL records, validation, mixtures
    ("synth",),                  # the synthetic task suite
    ("rollout",),                # generation engines, the rollout batch of sequences
    ("rewards",),                # the hybrid reward, the reward model, held-out scoring
    ("rl",),                     # pure RL math (rl.algos), the driver and its workers
    ("recipe",),                 # SFT, filter, RFT, pipeline, report, the CLI
)
PACKAGES = tuple(p for layer in LAYERS for p in layer)
PURE = ["rl/algos", "verifiers"]
FORBIDDEN = ("ray", "vllm", "torch.distributed")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_targets(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, function-local ones included; `from a import b`
    names the module a.b where b is a module of the tree, else a."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (root / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (root / Path(*sub.split(".")) / "__init__.py").is_file()
                out.append((node.lineno, sub if is_module else node.module))
    return out


def layering_violations(root: Path, layers=LAYERS) -> list[str]:
    """Imports of a package of the same or a higher layer, as `file:line: a -> b`."""
    rank = {p: i for i, layer in enumerate(layers) for p in layer}
    bad = []
    for pkg in rank:
        for path in sorted((root / pkg).rglob("*.py")):
            for line, target in import_targets(path, root):
                other = target.split(".")[0]
                if other in rank and other != pkg and rank[other] >= rank[pkg]:
                    bad.append(f"{path.relative_to(root)}:{line}: {pkg} -> {other}")
    return bad


def import_cycles(root: Path, packages=PACKAGES) -> list[list[str]]:
    """Cycles in the graph of modules of `packages`, one per strongly connected component."""
    graph: dict[str, set[str]] = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            graph[module_name(path, root)] = set()
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            src = module_name(path, root)
            for _, target in import_targets(path, root):
                if target in graph and target != src:
                    graph[src].add(target)
    # Tarjan's strongly connected components
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_packages_import_only_downward():
    assert layering_violations(ROOT) == []


def test_no_import_cycle_between_modules():
    assert import_cycles(ROOT) == []


def test_every_package_is_in_a_layer():
    top = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert top <= set(PACKAGES), f"packages missing from LAYERS: {sorted(top - set(PACKAGES))}"


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The two checks on a small tree with one upward import (model -> rl) and one cycle."""
    for pkg, files in {"model": {"a.py": "import rl.b\n", "c.py": "def f():\n    from model import d\n"},
                       "rl": {"b.py": "from model import a\n"},
                       "verifiers": {"x.py": "from training import y\n"}, "training": {"y.py": ""}}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    (tmp_path / "model" / "d.py").write_text("import model.c\n")
    layers = (("verifiers", "training"), ("model",), ("rl",))
    assert sorted(layering_violations(tmp_path, layers)) == ["model/a.py:1: model -> rl",
                                                           "verifiers/x.py:1: verifiers -> training"]
    cycles = import_cycles(tmp_path, ("model", "rl", "verifiers", "training"))
    assert sorted(cycles) == [["model.a", "rl.b"], ["model.c", "model.d"]]


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
