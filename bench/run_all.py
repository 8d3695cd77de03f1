"""The CPU benchmark set (`make bench`): builds its inputs in a scratch folder, runs rollout,
train_step, weight_sync, e2e_vs_trl and async_rl one after the other (each in its own process), writes
bench/results/<name>.json and prints a one-screen summary with the ratios.

    python -m bench.run_all [--only rollout,train_step] [--scratch DIR] [--results-dir DIR]

Inputs: the tiny VLM (random init), the synthetic counting suite (seed 0; 400 held-out prompts), and
an early checkpoint of an SFT of the tiny VLM (`--sft-steps` of a `--sft-schedule`-step cosine
schedule) from which every system of e2e_vs_trl starts. Stopped there, the policy answers about 60%
of the held-out prompts greedily and samples varied answers, so RL can move its greedy accuracy
(the schedule's end reaches about 82%).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR, command_line, machine_info, summary_lines
from bench.scratch import REPO, default_scratch, sft_model, suite, tiny_model, video_suite
from model.tiny import SIZES
from training.atomic import write_json

BENCHES = ("rollout", "train_step", "weight_sync", "e2e_vs_trl", "async_rl")
# Time to target: 320 rollout batches of 4 prompts x 8 samples (10,240 samples) per system, greedy
# held-out accuracy every 32 batches; the sampled accuracy is not measured (it costs as much again).
TIMEOUTS = {"e2e_vs_trl": 3600}   # seconds; the others get --timeout
E2E_ARGS = "--gain 0.1 --steps 320 --prompts-per-step 4 --eval-every 32 --lr 5e-5 --eval-samples 0"


def bench_args(name: str, *, model: Path, sft: Path, data: dict[str, Path], scratch: Path, e2e: list[str]) -> list[str]:
    """Command-line arguments of one benchmark in the CPU set (sized for ~12 minutes in all).

    rollout runs three models: the random-init tiny VLM (responses mostly run to max tokens), the
    SFT checkpoint (short answers that stop at EOS: the RL workload) and the random-init `small`
    preset (where compute, not overhead, dominates), each on an image and a video batch."""
    if name == "rollout":
        small = tiny_model(scratch, spec=SIZES["small"], name="small")   # compute-bound: ~35M params
        models = [a for m in (model, sft, small) for a in ("--model", str(m))]
        return [*models, "--data", str(data["rl"]), "--video-data", str(video_suite(scratch)), "--prompts", "32",
                "--n", "8", "--max-tokens", "48", "--replicas", "2"]
    if name == "train_step":
        return ["--model", str(model), "--data", str(data["rl"]), "--prompts", "8", "--n", "8", "--response-tokens", "32"]
    if name == "weight_sync":
        return ["--scratch", str(scratch)]
    if name == "e2e_vs_trl":
        return ["--policy", str(sft), "--data", str(data["rl"]), "--heldout", str(data["heldout"]),
                "--out", str(scratch / "e2e"), *e2e]
    if name == "async_rl":
        return ["--policy", str(sft), "--data", str(data["rl"])]
    raise ValueError(f"unknown benchmark {name!r}; choose from {BENCHES}")


def run_bench(name: str, args: list[str], *, results_dir: Path, log: Path, timeout: float) -> dict:
    """Run `python -m bench.<name>`; return its results JSON, or a failure record."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *args, "--results-dir", str(results_dir)],
                                  cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        error = None if proc.returncode == 0 else f"exit {proc.returncode} (log: {log})"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s (log: {log})"
    seconds = time.perf_counter() - t0
    path = results_dir / f"{name}.json"
    if error is None and path.is_file():
        return {**json.loads(path.read_text()), "ok": True, "wall_s": seconds}
    return {"name": name, "ok": False, "error": error or f"no {path}", "wall_s": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {BENCHES}")
    p.add_argument("--scratch", default=None, help="inputs and logs (default $VLRL_BENCH_SCRATCH or a temp folder)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--sft-steps", type=int, default=150, help="e2e start: this step of the SFT schedule")
    p.add_argument("--sft-schedule", type=int, default=400, help="steps of the SFT's cosine schedule")
    p.add_argument("--e2e", default=E2E_ARGS,
                   help="e2e_vs_trl's budget and target (time to target: ten points above the start, greedy)")
    p.add_argument("--timeout", type=float, default=900, help=f"seconds per benchmark (but {TIMEOUTS})")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    scratch = Path(args.scratch) if args.scratch else default_scratch()
    results_dir = Path(args.results_dir)
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    print(f"[bench] inputs in {scratch}", flush=True)
    model = tiny_model(scratch)
    data = suite(scratch)
    sft = sft_model(scratch, model, data, steps=args.sft_schedule, take=args.sft_steps)
    print(f"[bench] inputs ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    results = []
    for name in [b for b in args.only.split(",") if b]:
        a = bench_args(name, model=model, sft=sft, data=data, scratch=scratch, e2e=args.e2e.split())
        r = run_bench(name, a, results_dir=results_dir, log=scratch / "logs" / f"{name}.log", timeout=TIMEOUTS.get(name, args.timeout))
        print(f"[bench] {name}: {'ok' if r['ok'] else 'FAILED'} in {r['wall_s']:.0f} s", flush=True)
        results.append(r)
    total = time.perf_counter() - t0
    machine = machine_info()
    lines = [f"vlrl benchmarks: {machine['cpu']}, {machine['cores']} cores, OMP_NUM_THREADS="
             f"{machine['env']['OMP_NUM_THREADS']}; total {total / 60:.1f} min", *summary_lines(results)]
    write_json(results_dir / "summary.json", {"machine": machine, "command": command_line(), "total_s": total,
                                              "benches": {r["name"]: {"ok": r["ok"], "wall_s": r["wall_s"]} for r in results},
                                              "summary": lines})
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
