"""Weight sync: seconds to push the trainer's weights into the running vLLM engine, as a function
of model size (the tiny VLM and random-init larger configs of the same architecture), four ways:

  whole      the trainer's state dict copied whole, then `VLLMEngine.sync_weights` with
             `sync_method: reload` (one reload, then the prefix- and encoder-cache reset): the path of a
             driver that holds a full copy;
  bucketed   the trainer's parameters streamed in buckets of whole layers (`rollout.sync.buckets`,
             `--bucket-mb`), each reloaded on arrival (`reload`), the caches reset once at the end: the
             path of `PolicyWorker.push_weights`, where no process holds the whole model;
  layerwise  the same buckets into an engine with `sync_method: layerwise` (loaded in place within
             one vLLM weight update per sync, each layer processed once);
  transfer   `sync_method: transfer`: vLLM's weight-transfer API, the trainer broadcasting the same
             stream in `--bucket-mb` buffers over a gloo group (this process the sender, the
             in-process engine the receiver; the group set up and torn down inside every sync).

layerwise and transfer are printed as ratios to bucketed (`reload`).

    python -m bench.weight_sync [--sizes tiny,h256-l8,h512-l8,h1024-l12] [--repeats 3] [--bucket-mb 16]

Each size runs in its own child process (one engine per sync method, all in-process and alive
together so the repeats interleave; one HF copy of the weights as the trainer holds them;
`--repeats` timed syncs of each kind). Weight values do not change the cost.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import best_time, fmt, fmt_ratio, ratio, throughput, write_result
from bench.scratch import default_scratch, run_child, tiny_model
from model.load import load_vlm
from model.lora import full_param_meta, full_params
from model.tiny import TinySpec
from rollout import make_engine
from rollout.sync import buckets
from rollout.types import EngineConfig
from training.atomic import write_json
from training.distributed import free_port

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
    """Start a vLLM engine per sync method on `model`, then time syncs from an HF copy of it. For
    scale, also time the HF backend's sync (`load_state_dict` into a second HF copy: a memory copy)
    and keep the engine's start time (what a sync by restarting the engine would cost at least)."""
    engines = {m: make_engine(model, EngineConfig(backend="vllm", sync_method=m), seed=0)
               for m in ("reload", "layerwise", "transfer")}
    try:
        hf, _ = load_vlm(model)

        def whole() -> None:   # the driver gathers a full copy, the engine reloads it at once
            engines["reload"].sync_weights({k: v.detach().clone() for k, v in hf.state_dict().items()})

        def bucketed(method: str = "reload") -> int:
            n = 0
            for bucket in buckets(((k, v.detach()) for k, v in hf.state_dict().items()), int(bucket_mb * 2**20)):
                engines[method].load_weights(bucket)
                n += 1
            engines[method].finish_sync()
            return n

        def transfer() -> None:   # the same stream, through vLLM's weight-transfer API
            from rollout import vllm_sync  # vLLM: loaded by the engines already

            source = vllm_sync.ParamSource(full_param_meta(hf), lambda: full_params(hf))
            vllm_sync.send_weights(source, vllm_sync.ReplicaClient.of([engines["transfer"]]), rank=0,
                                   address="127.0.0.1", port=free_port(), bucket_bytes=int(bucket_mb * 2**20),
                                   backend=vllm_sync.GLOO)

        state = hf.state_dict()
        n_params = sum(v.numel() for v in state.values())
        n_bytes = sum(v.numel() * v.element_size() for v in state.values())
        runs = {"whole": whole, "bucketed": bucketed, "layerwise": lambda: bucketed("layerwise"), "transfer": transfer}
        n_buckets = bucketed()
        for fn in runs.values():   # warm-up
            fn()
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        start_s = engines["reload"].start_seconds
    finally:
        for e in engines.values():
            e.close()
    copy = {k: v.detach().clone() for k, v in state.items()}
    hf_s = best_time(lambda: hf.load_state_dict(copy), repeats)
    best = min(times["whole"])
    return {"params": n_params, "mib": n_bytes / 2**20, "seconds": best, "seconds_all": times["whole"],
            "bucketed_seconds": min(times["bucketed"]), "bucketed_all": times["bucketed"], "buckets": n_buckets,
            "layerwise_seconds": min(times["layerwise"]), "layerwise_all": times["layerwise"],
            "transfer_seconds": min(times["transfer"]), "transfer_all": times["transfer"],
            "bucket_mb": bucket_mb, "mib_per_s": throughput(n_bytes / 2**20, best), "engine_start_s": start_s,
            "hf_load_state_dict_s": hf_s, "in_process": True}


def headline(per_size: dict[str, dict]) -> list[str]:
    return [f"{name:<10} {fmt(m['params'] / 1e6, 'M params')}: {fmt(m['seconds'], 's')} per whole sync "
            f"({fmt(m['mib_per_s'], 'MiB/s')}), {fmt(m['bucketed_seconds'], 's')} bucketed ({m['buckets']} buckets), "
            f"{fmt(m['layerwise_seconds'], 's')} layerwise, {fmt(m['transfer_seconds'], 's')} transfer; "
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
    for way in ("layerwise", "transfer"):
        ratios.update({f"{way} / bucketed reload [{k}]": ratio(m[f"{way}_seconds"], m["bucketed_seconds"])
                       for k, m in per_size.items()})
    ratios.update({f"engine restart / vllm sync [{k}]": ratio(m["engine_start_s"], m["seconds"]) for k, m in per_size.items()})
    result = {"config": {"repeats": args.repeats, "sizes": {k: SIZES[k] for k in per_size}, "backend": "vllm (in-process, CPU)"},
              "metrics": {"sizes": per_size, "errors": errors}, "ratios": ratios,
              "headline": headline(per_size) + [f"{k} FAILED: {v.splitlines()[0]}" for k, v in errors.items()]}
    result["summary"] = [f"{k:<10} {fmt(m['params'] / 1e6, 'M')}: sync {fmt(m['seconds'], 's')} ({fmt(m['mib_per_s'], 'MiB/s')}), "
                         f"bucketed {fmt_ratio(ratio(m['bucketed_seconds'], m['seconds']))} whole, "
                         f"layerwise {fmt_ratio(ratio(m['layerwise_seconds'], m['bucketed_seconds']))} and "
                         f"transfer {fmt_ratio(ratio(m['transfer_seconds'], m['bucketed_seconds']))} bucketed, "
                         f"{fmt_ratio(ratio(m['seconds'], m['hf_load_state_dict_s']))} HF load_state_dict, "
                         f"{fmt_ratio(ratio(m['seconds'], m['engine_start_s']))} an engine restart"
                         for k, m in per_size.items()] + result["headline"][len(per_size):]
    print(f"-> {write_result('weight_sync', result, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
