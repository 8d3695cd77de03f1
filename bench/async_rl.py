"""Async rollouts against synchronous ones: the same RL run with `rollout.async` off, then on (Ray
workers, so the engine and the trainers run in processes of their own), back to back; steps per
second after the first step and the training reward over the run, as ratios async / sync.

    python -m bench.async_rl --policy DIR --data FILE [--algo grpo,ppo --steps 12 --prompts 8 --n 8
                             --max-tokens 48 --backend hf]

Each algorithm in `--algo` runs both ways. On a 2-core machine GRPO (an actor and an engine) can
give each process a core; PPO adds the critic, which updates beside the actor in sync mode already,
so an async PPO step has no idle core to overlap the rollout with.

Steps per second come from the metrics' timestamps (the first step, which starts the workers and
never overlaps, is left out). The same prompts in the same order reach both runs; the async one
samples each step but the first after a checkpoint with the weights of one step before.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch

from bench.common import fmt, fmt_ratio, ratio, write_result
from rewards.config import PoolConfig, RewardConfig
from rl.config import PPOConfig, RayConfig, RLConfig, RolloutConfig
from rl.driver import fit
from training.optim import OptimConfig


def run(cfg: RLConfig, out: Path, *, async_: bool) -> dict:
    """One run; its steps per second (first step left out), mean training reward, mean response
    tokens per step and how often the rollout was taken ahead."""
    cfg = dataclasses.replace(cfg, out=str(out), rollout=dataclasses.replace(cfg.rollout, async_=async_))
    fit(cfg, resume=False, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/all/total" in r]
    span = rows[-1]["time"] - rows[0]["time"]
    rewards = [r["reward/all/total"] for r in rows]
    return {"steps": len(rows), "steps_per_s": (len(rows) - 1) / span if span > 0 else None,
            "reward_mean": sum(rewards) / len(rewards), "reward_curve": rewards,
            "reward_last_half": sum(rewards[len(rewards) // 2:]) / max(1, len(rewards) - len(rewards) // 2),
            "policy_lag_frac": sum(r.get("rollout/policy_lag", 0.0) for r in rows) / len(rows),
            "rollout_s": sum(r.get("time/rollout", 0.0) for r in rows) / len(rows),
            "update_s": sum(r.get("time/update", 0.0) for r in rows) / len(rows)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="the SFT model both runs start from")
    p.add_argument("--data", required=True, help="prompt records (JSONL)")
    p.add_argument("--algo", default="grpo,ppo", help="comma-separated: grpo, ppo (each runs sync and async)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", default=None, help="run folders (default: a temp folder)")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out or tempfile.mkdtemp(prefix="vlrl-async-"))
    algos = [a for a in args.algo.split(",") if a]
    if not algos or set(algos) - {"grpo", "ppo"}:
        p.error(f"--algo: grpo and/or ppo, got {args.algo!r}")
    metrics, ratios, headline = {}, {}, []
    for algo in algos:
        cfg = RLConfig(algo=algo, policy=args.policy, data=args.data, steps=args.steps, prompts_per_step=args.prompts,
                       rollout=RolloutConfig(backend=args.backend, n=args.n, max_tokens=args.max_tokens),
                       reward=RewardConfig(pool=PoolConfig(workers=0)),
                       ppo=PPOConfig(minibatches=1, micro_batch_size=16),
                       actor_optim=OptimConfig(lr=args.lr, warmup_steps=0, schedule="constant"),
                       save_every=0, ray=RayConfig(enabled=True, timeout_s=900))
        sync = run(cfg, out / algo / "sync", async_=False)
        asyn = run(cfg, out / algo / "async", async_=True)
        metrics[algo] = {"sync": sync, "async": asyn}
        ratios[f"async/sync steps per second [{algo}]"] = ratio(asyn["steps_per_s"], sync["steps_per_s"])
        ratios[f"async/sync training reward (mean over the run) [{algo}]"] = ratio(asyn["reward_mean"], sync["reward_mean"])
        headline += [f"{algo} {name:<5} {fmt(m['steps_per_s'], 'steps/s')}, reward {m['reward_mean']:.3f} (last half "
                     f"{m['reward_last_half']:.3f}), rollout {fmt(m['rollout_s'], 's')}, update {fmt(m['update_s'], 's')} "
                     f"per step, {m['policy_lag_frac']:.0%} of steps one behind"
                     for name, m in (("sync", sync), ("async", asyn))]
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "results_dir")},
              "metrics": metrics, "ratios": ratios, "headline": headline}
    print(f"-> {write_result('async_rl', result, args.results_dir)}")
    print("\n".join(headline))
    for k, v in ratios.items():
        print(f"ratio {k}: {fmt_ratio(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
