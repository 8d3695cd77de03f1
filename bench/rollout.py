"""Rollout throughput: tokens/s of the vLLM backend against the HF `generate` backend on the same
model, prompts, images, n and max tokens, plus each backend's engine start time and peak memory;
for an image batch and, given `--video-data`, a video batch (timestamped clips, as RL samples them);
with `--replicas M`, also M vLLM replicas (Ray actors, `rl.rollouts.Rollouts`) against one on the
image batch.

    python -m bench.rollout --model DIR --data FILE.jsonl [--video-data FILE.jsonl] [--prompts 32 --n 8 --max-tokens 48]
                            [--replicas 2]

Each backend runs in its own child process (`--backend vllm|hf`), so the peak resident memory of
one is not inflated by the other. Tokens are response tokens actually generated (EOS included),
not padding; one small warm-up call runs before the timed calls.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import fmt, fmt_ratio, peak_rss_mib, ratio, throughput, write_result
from bench.scratch import run_child
from model.load import load_processor
from records import VideoGeometry, load_records, media_counts
from rl.rollouts import Rollouts
from rollout import make_engine
from rollout.sequences import prompt_from_record
from rollout.types import EngineConfig, SamplingConfig
from training.atomic import write_json
from training.placement import start_ray_once

BACKENDS = ("vllm", "hf")
BATCHES = ("image", "video")


def measure(model: str, data: str, *, backend: str, prompts: int, n: int, max_tokens: int, repeats: int,
            dtype: str = "float32", temperature: float = 1.0, batch_kind: str = "image", replicas: int = 0) -> dict:
    """Start one engine (or `replicas` of them behind `Rollouts`), warm it up, time `repeats`
    generate calls over the same prompts: the first `prompts` records of `data` without videos
    (batch_kind "image") or with (batch_kind "video")."""
    records = [r for r in load_records(data, require="prompt") if bool(r.videos) == (batch_kind == "video")][:prompts]
    if not records:
        raise ValueError(f"{data} holds no {batch_kind} prompts")
    geometry = VideoGeometry.of(load_processor(model))
    batch = [prompt_from_record(r, geometry) for r in records]
    counts = [media_counts(r, geometry) for r in records]
    t0 = time.perf_counter()
    engine_cfg = EngineConfig(backend=backend, dtype=dtype, max_images_per_prompt=max(1, *(i for i, _ in counts)),
                              max_video_clips_per_prompt=max(0, *(c for _, c in counts)))
    if replicas:
        if replicas > 1:
            start_ray_once()
        engine = Rollouts(model, engine_cfg, replicas=replicas, use_ray=replicas > 1)
    else:
        engine = make_engine(model, engine_cfg, seed=0)
    start_s = time.perf_counter() - t0
    try:
        engine.generate(batch[:2], SamplingConfig(n=2, max_tokens=8, temperature=temperature, seed=1))
        runs = []
        for i in range(repeats):
            sampling = SamplingConfig(n=n, max_tokens=max_tokens, temperature=temperature, seed=100 + i)
            t1 = time.perf_counter()
            out = engine.generate(batch, sampling)
            seconds = time.perf_counter() - t1
            tokens = sum(len(c.token_ids) for group in out for c in group)
            runs.append({"seconds": seconds, "tokens": tokens, "tokens_per_s": throughput(tokens, seconds)})
    finally:
        engine.close()
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {"backend": backend, "batch": batch_kind, "replicas": replicas or 1, "engine_start_s": start_s, "runs": runs,
            "tokens_per_s": best["tokens_per_s"], "mean_response_tokens": best["tokens"] / (len(batch) * n),
            "peak_rss_mib": peak_rss_mib()}


def model_name(path: str) -> str:
    """A short name for a model folder: its own name, or its parent's for a run's `final/`."""
    p = Path(path)
    return p.parent.name if p.name in ("final", "hf") else p.name


def headline(name: str, per_backend: dict[str, dict], r: float | None, batch_kind: str = "image") -> list[str]:
    """Summary lines of one model and batch: tokens/s, start time and peak memory per backend, then the ratio."""
    lines = [f"{name} {batch_kind} batch: {b:<4} {fmt(m['tokens_per_s'], 'tok/s')}, "
             f"start {fmt(m['engine_start_s'], 's')}, peak RSS {fmt(m['peak_rss_mib'], 'MiB')}"
             for b, m in per_backend.items()]
    lines.append(f"{name} {batch_kind} batch: vllm/hf tokens/s {fmt_ratio(r)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, action="append",
                   help="HF model folder (the tiny VLM on CPU); repeat to compare several models")
    p.add_argument("--data", required=True, help="prompt records (JSONL); the first --prompts without videos are used")
    p.add_argument("--video-data", help="prompt records with videos (JSONL): also time a video batch of them")
    p.add_argument("--batch", choices=BATCHES, default="image", help="child mode: which batch to time")
    p.add_argument("--backend", choices=("both", *BACKENDS), default="both")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per backend; the fastest counts")
    p.add_argument("--dtype", default="float32", help="float32 (fast on CPU) | bfloat16 (GPU)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per backend child")
    p.add_argument("--replicas", type=int, default=0,
                   help="also time this many vLLM replicas against one on the image batch (the ratio of their tokens/s)")
    p.add_argument("--json", help="child mode (one --backend): write its measurement here")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    common = dict(prompts=args.prompts, n=args.n, max_tokens=args.max_tokens, repeats=args.repeats, dtype=args.dtype)

    if args.backend != "both":
        m = measure(args.model[0], args.data, backend=args.backend, batch_kind=args.batch, replicas=args.replicas, **common)
        write_json(args.json, m) if args.json else print(m)
        return 0

    batches = {"image": args.data, **({"video": args.video_data} if args.video_data else {})}
    metrics, ratios, lines = {}, {}, []
    for model in args.model:
        name = model_name(model)
        metrics[name] = {"model": model}
        for kind, data in batches.items():
            child = ["--model", model, "--data", data, "--prompts", str(args.prompts), "--n", str(args.n),
                     "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype,
                     "--batch", kind]
            per_backend = {b: run_child("bench.rollout", [*child, "--backend", b], timeout=args.timeout)
                           for b in BACKENDS}
            # the image batch keeps the result keys it always had; the video batch is named
            key = name if kind == "image" else f"{name}, video"
            metrics[name].update(per_backend if kind == "image" else {"video": per_backend})
            ratios[f"vllm/hf tokens_per_s [{key}]"] = ratio(per_backend["vllm"]["tokens_per_s"],
                                                            per_backend["hf"]["tokens_per_s"])
            lines += headline(name, per_backend, ratios[f"vllm/hf tokens_per_s [{key}]"], kind)
            print("\n".join(lines[-3:]), flush=True)
        if args.replicas > 1:
            child = ["--model", model, "--data", args.data, "--prompts", str(args.prompts), "--n", str(args.n),
                     "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype,
                     "--backend", "vllm"]
            reps = {m: run_child("bench.rollout", [*child, "--replicas", str(m)], timeout=args.timeout)
                    for m in (1, args.replicas)}
            metrics[name]["replicas"] = reps
            key = f"{args.replicas}/1 vllm replicas tokens_per_s [{name}]"
            ratios[key] = ratio(reps[args.replicas]["tokens_per_s"], reps[1]["tokens_per_s"])
            lines.append(f"{name}: {args.replicas} replicas {fmt(reps[args.replicas]['tokens_per_s'], 'tok/s')}, one "
                         f"{fmt(reps[1]['tokens_per_s'], 'tok/s')} ({fmt_ratio(ratios[key])})")
            print(lines[-1], flush=True)
    result = {"config": {**common, "models": args.model, "temperature": 1.0, "video_data": args.video_data,
                         "replicas": args.replicas},
              "metrics": metrics, "ratios": ratios, "headline": [line for line in lines if "vllm/hf" not in line]}
    print(f"-> {write_result('rollout', result, args.results_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
