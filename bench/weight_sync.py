"""Weight sync: seconds to push the trainer's weights into the running vLLM engine, as a function
of model size (the tiny VLM and random-init larger configs of the same architecture), two ways:

  whole      the trainer's state dict copied whole, then `VLLMEngine.sync_weights` (one reload, then
             the prefix- and encoder-cache reset): the path of a driver that holds a full copy;
  bucketed   the trainer's parameters streamed in buckets of whole layers (`rollout.sync.buckets`,
             `--bucket-mb`), each reloaded on arrival, the caches reset once at the end: the path of
             `PolicyWorker.push_weights`, where no process holds the whole model.

    python -m bench.weight_sync [--sizes tiny,h256-l8,h512-l8,h1024-l12] [--repeats 3] [--bucket-mb 16]

Each size runs in its own child process (engine start, one HF copy of the weights as the trainer
holds them, `--repeats` timed syncs of each kind). Weight values do not change the cost.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import best_time, fmt, fmt_ratio, ratio, throughput, write_result
from bench.scratch import default_scratch, run_child, tiny_model
from model.load import load_vlm
from model.tiny import TinySpec
from rollout import make_engine
from rollout.sync import buckets
from rollout.types import EngineConfig
from training.atomic import write_json

# name -> TinySpec overrides; head_dim stays 64 (a size vLLM's CPU attention supports)
SIZES: dict[str, dict] = {
    "tiny": {},
    "h256-l8": dict(hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=4, num_kv_heads=2),
    "h512-l8": dict(hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8, num_kv_heads=2),
    "h1024-l12": dict(hidden_size=1024, intermediate_size=4096, num_layers=12, num_heads=16, num_kv_heads=4),
}


def build(scratch: Path, name: str) -> Path:
    """The model folder of a named size (built once under scratch/models/)."""
    return tiny_model(scratch, spec=TinySpec(**SIZES[name]), name=name)


def measure(model: str, *, repeats: int, bucket_mb: float = 16.0) -> dict:
    """Start a vLLM engine on `model`, then time syncs from an HF copy of it, whole and bucketed. For
    scale, also time the HF backend's sync (`load_state_dict` into a second HF copy: a memory copy)
    and keep the engine's start time (what a sync by restarting the engine would cost at least)."""
    engine = make_engine(model, EngineConfig(backend="vllm"), seed=0)
    try:
        hf, _ = load_vlm(model)

        def whole() -> None:   # the driver gathers a full copy, the engine reloads it at once
            engine.sync_weights({k: v.detach().clone() for k, v in hf.state_dict().items()})

        def bucketed() -> int:
            n = 0
            for bucket in buckets(((k, v.detach()) for k, v in hf.state_dict().items()), int(bucket_mb * 2**20)):
                engine.load_weights(bucket)
                n += 1
            engine.finish_sync()
            return n

        state = hf.state_dict()
        n_params = sum(v.numel() for v in state.values())
        n_bytes = sum(v.numel() * v.element_size() for v in state.values())
        whole()   # warm-up
        n_buckets = bucketed()
        times = {"whole": [], "bucketed": []}
        for _ in range(repeats):
            for name, fn in (("whole", whole), ("bucketed", bucketed)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        start_s = engine.start_seconds
    finally:
        engine.close()
    copy = {k: v.detach().clone() for k, v in state.items()}
    hf_s = best_time(lambda: hf.load_state_dict(copy), repeats)
    best = min(times["whole"])
    return {"params": n_params, "mib": n_bytes / 2**20, "seconds": best, "seconds_all": times["whole"],
            "bucketed_seconds": min(times["bucketed"]), "bucketed_all": times["bucketed"], "buckets": n_buckets,
            "bucket_mb": bucket_mb, "mib_per_s": throughput(n_bytes / 2**20, best), "engine_start_s": start_s,
            "hf_load_state_dict_s": hf_s, "in_process": True}


def headline(per_size: dict[str, dict]) -> list[str]:
    return [f"{name:<10} {fmt(m['params'] / 1e6, 'M params')}: {fmt(m['seconds'], 's')} per whole sync "
            f"({fmt(m['mib_per_s'], 'MiB/s')}), {fmt(m['bucketed_seconds'], 's')} bucketed ({m['buckets']} buckets); "
            f"engine start {fmt(m['engine_start_s'], 's')}, HF load_state_dict {fmt(m['hf_load_state_dict_s'], 's')}"
            for name, m in per_size.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=16.0, help="bucket size of the bucketed sync")
    p.add_argument("--model", help="child mode: one model folder")
    p.add_argument("--scratch", default=None)
    p.add_argument("--timeout", type=float, default=300, help="seconds per size")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.model:
        write_json(args.json, measure(args.model, repeats=args.repeats, bucket_mb=args.bucket_mb))
        return 0

    scratch = Path(args.scratch) if args.scratch else default_scratch()
    per_size, errors = {}, {}
    for name in [s for s in args.sizes.split(",") if s]:
        try:
            model = build(scratch, name)
            per_size[name] = run_child("bench.weight_sync", ["--model", str(model), "--repeats", str(args.repeats),
                                                             "--bucket-mb", str(args.bucket_mb)], timeout=args.timeout)
            print(headline({name: per_size[name]})[0], flush=True)
        except Exception as e:  # noqa: BLE001  (one size failing must not hide the others)
            errors[name] = str(e)
            print(f"{name} FAILED: {e}", flush=True)
    ratios = {f"vllm sync / HF load_state_dict [{k}]": ratio(m["seconds"], m["hf_load_state_dict_s"])
              for k, m in per_size.items()}
    ratios.update({f"bucketed / whole sync [{k}]": ratio(m["bucketed_seconds"], m["seconds"]) for k, m in per_size.items()})
    ratios.update({f"engine restart / vllm sync [{k}]": ratio(m["engine_start_s"], m["seconds"]) for k, m in per_size.items()})
    result = {"config": {"repeats": args.repeats, "sizes": {k: SIZES[k] for k in per_size}, "backend": "vllm (in-process, CPU)"},
              "metrics": {"sizes": per_size, "errors": errors}, "ratios": ratios,
              "headline": headline(per_size) + [f"{k} FAILED: {v.splitlines()[0]}" for k, v in errors.items()]}
    result["summary"] = [f"{k:<10} {fmt(m['params'] / 1e6, 'M')}: sync {fmt(m['seconds'], 's')} ({fmt(m['mib_per_s'], 'MiB/s')}), "
                         f"bucketed {fmt_ratio(ratio(m['bucketed_seconds'], m['seconds']))} whole, "
                         f"{fmt_ratio(ratio(m['seconds'], m['hf_load_state_dict_s']))} HF load_state_dict, "
                         f"{fmt_ratio(ratio(m['seconds'], m['engine_start_s']))} an engine restart"
                         for k, m in per_size.items()] + result["headline"][len(per_size):]
    print(f"-> {write_result('weight_sync', result, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
