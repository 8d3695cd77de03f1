"""End to end against TRL: training wall time and samples until held-out counting accuracy reaches a
target, for vlrl (PPO with the shared critic; GRPO) and TRL's GRPOTrainer, from the same SFT
checkpoint, run back to back in one invocation.

    python -m bench.e2e_vs_trl --policy SFT_DIR --data rl.jsonl --heldout heldout.jsonl \
        [--target 0.75 | --gain 0.1] [--sampled-target 0.2] [--steps 32 --lr 5e-5 ...]

Long mode, time to target (what `make bench` runs): `--gain 0.1 --steps 320 --prompts-per-step 4
--eval-every 32 --eval-samples 0` sets the greedy target ten points above the starting model's
accuracy and reports, per system, the seconds and samples until it first reached it, until it
reached it for good (every later evaluation at or above it), and whether the gain held to the run's
last evaluation.

Two accuracies are measured at every evaluation: greedy (`rl.evaluate`, the project's eval) and
(unless `--eval-samples 0`) sampled (k samples per held-out prompt at the training temperature, scored by the reward: what RL
optimises). On the tiny VLM, a few thousand RL samples move the sampled accuracy steadily but
the greedy one only noisily (it first dips), so both targets are reported.

Held equal across systems: the starting model, the prompt pool, samples per prompt (n), prompts
per rollout batch, the sample budget, max response tokens, sampling temperature, the reward (the
project's hybrid reward: think-format gate + `counting` verifier, in-process), the optimizer
(AdamW, same lr and betas, constant schedule, grad-norm 1.0), two optimizer steps per rollout batch,
token-mean loss, no KL, one OpenMP thread per process, and the evaluation (`rl.evaluate`: greedy,
48 new tokens, every `--eval-every` rollout batches). Evaluation time is excluded from training
time; engine/model start-up is reported apart (`start_s`).

Not equal, by design of each system: TRL generates with transformers `generate` (its vLLM mode
needs a GPU server or colocated GPU engine), vlrl with vLLM (`vlrl-*`) or with the same HF
`generate` (`vlrl-grpo-hf`, the apples-to-apples run); PPO adds a critic and GAE; vlrl's PPO keeps
its recipe's positive-example LM loss (lm_coef 0.1), its GRPO runs without it, like TRL.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.common import fmt, fmt_ratio, held_to_end, ratio, samples_to_stay, samples_to_target, write_result
from bench.scratch import default_scratch, run_child
from model.load import load_vlm
from recipe.sampling import sample_and_score
from records import load_images, load_records
from rewards.config import PoolConfig, RewardConfig
from rewards.evaluate import judge, summarize
from rewards.hybrid import RewardInput, score_batch
from rewards.inputs import is_correct
from rl.config import PPOConfig, RLConfig, RolloutConfig
from rl.driver import fit
from rl.workers import PolicyWorker
from rollout.greedy import generate_greedy
from rollout.types import EngineConfig
from training.atomic import write_json
from training.optim import OptimConfig

T_PROCESS = time.perf_counter()
SYSTEMS = ("vlrl-ppo", "vlrl-grpo", "vlrl-grpo-hf", "trl-grpo")


@dataclass(frozen=True)
class Budget:
    """What every system gets: the same prompts, samples and optimisation settings."""

    steps: int = 32               # rollout batches
    prompts_per_step: int = 8
    n: int = 8                    # samples per prompt
    max_tokens: int = 32
    temperature: float = 0.7
    lr: float = 5e-5
    minibatches: int = 2          # optimizer steps per rollout batch
    eval_every: int = 4           # rollout batches between evaluations
    eval_samples: int = 2         # sampled accuracy: samples per held-out prompt (at `temperature`; 0: not measured)
    seed: int = 0

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.n


# ----------------------------------------------------------------------------- pure parts

def vlrl_curve(rows: list[dict], *, samples_per_step: int) -> list[dict]:
    """Learning curve from a vlrl run's metrics.jsonl rows: one point per eval row.

    Training seconds up to step s = wall time between consecutive step rows; a step that follows an
    evaluation (or is the first) counts its own stage times (`time/*`) instead, which leaves out the
    evaluation and the checkpoint written after it."""
    curve, seconds, last = [], 0.0, None
    for row in rows:
        if any(k.startswith("eval/") for k in row):
            acc = row.get("eval/counting/accuracy", row.get("eval/all/accuracy"))
            curve.append({"samples": row["step"] * samples_per_step, "seconds": seconds, "accuracy": acc})
            last = None
        elif any(k.startswith("time/") for k in row):
            seconds += sum(v for k, v in row.items() if k.startswith("time/")) if last is None else row["time"] - last
            last = row["time"]
    return curve


def sampled_accuracy(model_dir: str, records, *, k: int, temperature: float, max_tokens: int) -> float:
    """Share of correct samples (format gate + verifier, reward 1) over k samples per held-out
    prompt at the training temperature: the quantity RL optimises. HF backend, seed 0, for every
    system alike."""
    scored = sample_and_score(model_dir, records, k=k, engine=EngineConfig(backend="hf"), reward_cfg=RewardConfig(pool=PoolConfig(workers=0)),
                              max_tokens=max_tokens, temperature=temperature, seed=0, progress=False)
    flat = [is_correct(s.result) for group in scored for s in group]
    return sum(flat) / max(1, len(flat))


def exported(checkpoints: dict[int, Path], policy: str) -> dict[int, str]:
    """vlrl checkpoints (the actor's sharded state) as HF folders beside them (`<step>/hf`), which
    the sampled eval loads like TRL's saved models."""
    worker, out = None, {}
    for key, ckpt in checkpoints.items():
        hf = ckpt / "hf"
        if not (hf / "config.json").is_file():
            worker = worker or PolicyWorker(policy)
            worker.export_checkpoint(ckpt, "actor", hf)
        out[key] = str(hf)
    return out


def add_sampled(curve: list[dict], checkpoints: dict[int, str], records, b: "Budget") -> list[dict]:
    """Attach `sampled_accuracy` to the curve points whose checkpoint (by samples seen) was saved
    (None everywhere when `b.eval_samples` is 0)."""
    for point in curve:
        if not b.eval_samples:
            point["sampled_accuracy"] = None
            continue
        ckpt = checkpoints.get(point["samples"])
        point["sampled_accuracy"] = (sampled_accuracy(ckpt, records, k=b.eval_samples, temperature=b.temperature,
                                                      max_tokens=b.max_tokens) if ckpt else None)
    return curve


def compare(runs: dict[str, dict], targets: dict[str, float]) -> tuple[dict, dict]:
    """Per metric ('accuracy': greedy, 'sampled_accuracy') and system: the point where it first reached
    its target (or None), and for greedy accuracy also the point from which it stayed there to the end
    ('stay'); ratios of each vlrl system to TRL in training seconds per sample and, per metric, seconds
    and samples to reach the target (None when either did not reach it)."""
    reached = {m: {name: samples_to_target(r["curve"], t, key=m) for name, r in runs.items()} for m, t in targets.items()}
    reached["stay"] = {name: samples_to_stay(r["curve"], targets["accuracy"]) for name, r in runs.items()}
    ratios = {}
    trl = runs.get("trl-grpo")
    for name, r in runs.items():
        if name == "trl-grpo" or trl is None:
            continue
        ratios[f"{name}/trl seconds per sample"] = ratio(r["train_s"] / max(1, r["samples"]),
                                                         trl["train_s"] / max(1, trl["samples"]))
        for m, label in (*((m, f"target ({m})") for m in targets), ("stay", "stay at target (accuracy)")):
            hit, base = reached[m][name], reached[m]["trl-grpo"]
            ratios[f"{name}/trl seconds to {label}"] = ratio(hit and hit["seconds"], base and base["seconds"])
            ratios[f"{name}/trl samples to {label}"] = ratio(hit and hit["samples"], base and base["samples"])
    return reached, ratios


def e2e_targets(start: dict, *, target: float, gain: float | None, sampled_target: float | None) -> dict:
    """The greedy and sampled accuracies to reach: with a gain, the start's own plus the gain (time to
    target); else the absolute `target` (greedy) and `sampled_target` (default 0.2). A sampled
    target where the start's sampled accuracy was not measured is None."""
    greedy = target if gain is None else start["accuracy"] + gain
    if sampled_target is None:
        base = start.get("sampled_accuracy")
        sampled_target = 0.2 if gain is None else (None if base is None else base + gain)
    return {"accuracy": greedy, "sampled_accuracy": sampled_target}


def headline(runs: dict, reached: dict, targets: dict[str, float]) -> list[str]:
    """One line per system: throughput, where each target was reached, the curves' ends."""
    def at(hit):
        return f"{hit['samples']} samples/{fmt(hit['seconds'], 's')}" if hit else "not reached"

    first = next(iter(runs.values()))["curve"][0] if runs else {}
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    lines = [f"targets: greedy >= {pct(targets['accuracy'])} (start {pct(first.get('accuracy'))}), sampled >= "
             f"{pct(targets['sampled_accuracy'])} (start {pct(first.get('sampled_accuracy'))})"]
    for name, r in runs.items():
        end = r["curve"][-1]
        lines.append(f"{name:<12} {fmt(r['samples'] / max(1e-9, r['train_s']), 'samples/s')}; greedy "
                     f"{at(reached['accuracy'][name])} (for good {at(reached['stay'][name])}), sampled "
                     f"{at(reached['sampled_accuracy'][name]) if targets['sampled_accuracy'] is not None else 'not measured'}; "
                     f"end {fmt(end['accuracy'])}/{fmt(end.get('sampled_accuracy'))}")
    return lines


def ratio_lines(ratios: dict, systems: list[str]) -> list[str]:
    """One line of ratios to TRL per vlrl system: seconds per sample, then seconds and samples to
    each target, and to the greedy target for good ('-': a side did not reach it)."""
    def r(name, what):
        return fmt_ratio(ratios.get(f"{name}/trl {what}"))

    return [f"{name}/trl: s/sample {r(name, 'seconds per sample')}; to greedy target s {r(name, 'seconds to target (accuracy)')}"
            f" samples {r(name, 'samples to target (accuracy)')}; for good s {r(name, 'seconds to stay at target (accuracy)')}"
            f" samples {r(name, 'samples to stay at target (accuracy)')}; to sampled target s "
            f"{r(name, 'seconds to target (sampled_accuracy)')} samples {r(name, 'samples to target (sampled_accuracy)')}"
            for name in systems]


# ----------------------------------------------------------------------------- children

def run_vlrl(system: str, policy: str, data: str, heldout: str, out: Path, b: Budget) -> dict:
    """One vlrl run through the real driver (`rl.ppo.fit`); the curve comes from its metrics.jsonl."""
    algo = "ppo" if system == "vlrl-ppo" else "grpo"
    backend = "hf" if system.endswith("-hf") else "vllm"
    cfg = RLConfig(
        algo=algo, policy=policy, data=data, eval_data=heldout, out=str(out), steps=b.steps,
        prompts_per_step=b.prompts_per_step, seed=b.seed,
        rollout=RolloutConfig(backend=backend, n=b.n, max_tokens=b.max_tokens, temperature=b.temperature),
        reward=RewardConfig(pool=PoolConfig(workers=0)),
        ppo=PPOConfig(lam_alpha=1.0, minibatches=b.minibatches, lm_coef=0.1 if algo == "ppo" else 0.0),
        actor_optim=OptimConfig(lr=b.lr, warmup_steps=0, schedule="constant"),
        critic_optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"),
        save_every=b.eval_every, keep_checkpoints=10_000, eval_every=b.eval_every, eval_limit=0, log_samples=0)
    t0 = time.perf_counter()
    fit(cfg, resume=False, progress=False)
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    curve = vlrl_curve(rows, samples_per_step=b.samples_per_step)
    train_s = curve[-1]["seconds"] if curve else 0.0
    ckpts = {int(p.name.split("-")[1]) * b.samples_per_step: p for p in (out / "checkpoints").glob("step-*")}
    add_sampled(curve, exported(ckpts, policy), load_records(heldout, require="prompt"), b)
    eval_s = sum(r2["time"] - r1["time"] for r1, r2 in zip(rows, rows[1:]) if any(k.startswith("eval/") for k in r2))
    return {"curve": curve, "train_s": train_s, "samples": b.steps * b.samples_per_step,
            # start_s: engine and model start-up, checkpoints and the last save: neither training nor eval
            "start_s": max(0.0, total - train_s - eval_s), "rollout_backend": backend, "algo": algo}


def counting_reward(cfg):
    """The project's hybrid reward (format gate + task verifier) as a TRL reward function."""
    def reward(prompts, completions, answer, task, **_):
        texts = [_completion_text(c) for c in completions]
        inputs = [RewardInput(task=t, response=x, answer=a) for x, a, t in zip(texts, answer, task)]
        return [r.reward for r in score_batch(inputs, cfg)]

    reward.__name__ = "vlrl_hybrid_reward"
    return reward


def _completion_text(completion) -> str:
    """TRL hands conversational completions as [{'role': 'assistant', 'content': ...}]."""
    if isinstance(completion, str):
        return completion
    content = completion[0]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


def run_trl(policy: str, data: str, heldout: str, out: Path, b: Budget) -> dict:
    """TRL GRPOTrainer with the same model, reward, prompts and budget; evaluated by a callback."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer


    torch.manual_seed(b.seed)
    t0 = time.perf_counter()
    model, processor = load_vlm(policy, dtype="float32", train=True)
    records = load_records(data, require="prompt")
    eval_records = load_records(heldout, require="prompt")
    rows = [{"prompt": r.prompt_messages, "image": load_images(r)[0], "answer": r.answer, "task": r.task}
            for r in records]
    optim_steps_per_batch = b.minibatches
    args = GRPOConfig(
        output_dir=str(out), max_steps=b.steps * optim_steps_per_batch, seed=b.seed, use_cpu=True, bf16=False,
        per_device_train_batch_size=b.samples_per_step // optim_steps_per_batch, gradient_accumulation_steps=1,
        num_generations=b.n, generation_batch_size=b.samples_per_step, max_completion_length=b.max_tokens,
        temperature=b.temperature, top_p=1.0, learning_rate=b.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.98, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, num_iterations=1,
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group", use_vllm=False,
        logging_steps=optim_steps_per_batch, save_strategy="no", report_to="none", dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True)

    class EvalCurve(TrainerCallback):
        """Greedy held-out accuracy every `eval_every` rollout batches; its time is kept apart."""

        def __init__(self):
            self.curve, self.eval_s, self.t_begin, self.checkpoints = [], 0.0, None, {}

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            batches = state.global_step // optim_steps_per_batch
            if state.global_step % optim_steps_per_batch or (batches % b.eval_every and batches != b.steps):
                return
            t = time.perf_counter()
            train_s = t - self.t_begin - self.eval_s
            table = summarize(judge(eval_records, generate_greedy(model, processor, eval_records)))
            model.train()
            ckpt = out / "checkpoints" / f"step-{batches:06d}"
            model.save_pretrained(ckpt)
            processor.save_pretrained(ckpt)
            self.checkpoints[batches * b.samples_per_step] = str(ckpt)
            self.eval_s += time.perf_counter() - t
            self.curve.append({"samples": batches * b.samples_per_step, "seconds": train_s,
                               "accuracy": table["counting"]["accuracy"]})

    cb = EvalCurve()
    trainer = GRPOTrainer(model=model, reward_funcs=counting_reward(RewardConfig(pool=PoolConfig(workers=0))),
                          args=args, train_dataset=Dataset.from_list(rows), processing_class=processor, callbacks=[cb])
    start_s = time.perf_counter() - t0
    trainer.train()
    train_s = cb.curve[-1]["seconds"] if cb.curve else 0.0
    add_sampled(cb.curve, cb.checkpoints, eval_records, b)
    return {"curve": cb.curve, "train_s": train_s, "samples": b.steps * b.samples_per_step, "start_s": start_s,
            "rollout_backend": "hf (TRL, use_vllm=False)", "algo": "grpo"}


def start_point(policy: str, heldout: str, b: Budget) -> dict:
    """The shared first curve point: greedy and sampled held-out accuracy of the starting checkpoint."""
    model, processor = load_vlm(policy)
    records = load_records(heldout, require="prompt")
    greedy = summarize(judge(records, generate_greedy(model, processor, records)))["counting"]["accuracy"]
    sampled = (sampled_accuracy(policy, records, k=b.eval_samples, temperature=b.temperature, max_tokens=b.max_tokens)
               if b.eval_samples else None)
    return {"samples": 0, "seconds": 0.0, "accuracy": greedy, "sampled_accuracy": sampled}


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="the SFT checkpoint every system starts from")
    p.add_argument("--data", required=True, help="RL prompt records (counting)")
    p.add_argument("--heldout", required=True, help="held-out prompt records (counting)")
    p.add_argument("--target", type=float, default=0.75, help="greedy held-out accuracy to reach")
    p.add_argument("--gain", type=float, default=None,
                   help="time to target: the greedy target is the start's accuracy plus this (0.1: ten points above "
                        "the start; overrides --target); the result says whether each gain held to the end")
    p.add_argument("--sampled-target", type=float, default=None,
                   help="sampled held-out accuracy (at the training temperature) to reach (default: the start's "
                        "plus --gain, else 0.2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    p.add_argument("--out", default=None, help="run folders (default: a scratch folder)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per system")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--system", help=argparse.SUPPRESS)   # child mode
    p.add_argument("--json", help=argparse.SUPPRESS)
    for f in Budget.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    budget = Budget(**{k: getattr(args, k) for k in Budget.__dataclass_fields__})
    out = Path(args.out or default_scratch() / "e2e")

    if args.system:
        run_dir = out / args.system
        if args.system == "trl-grpo":
            r = run_trl(args.policy, args.data, args.heldout, run_dir, budget)
        else:
            r = run_vlrl(args.system, args.policy, args.data, args.heldout, run_dir, budget)
        write_json(args.json, {**r, "process_s": time.perf_counter() - T_PROCESS})
        return 0

    start = start_point(args.policy, args.heldout, budget)
    print(f"[e2e] start: greedy {fmt(start['accuracy'])}, sampled {fmt(start['sampled_accuracy'])}", flush=True)
    common = ["--policy", args.policy, "--data", args.data, "--heldout", args.heldout, "--out", str(out)]
    common += [a for k, v in asdict(budget).items() for a in (f"--{k.replace('_', '-')}", str(v))]
    runs, errors = {}, {}
    for system in [s for s in args.systems.split(",") if s]:
        try:
            r = run_child("bench.e2e_vs_trl", [*common, "--system", system], timeout=args.timeout,
                          log=out / f"{system}.log")
            r["curve"] = [start, *r["curve"]]
            runs[system] = r
            print(f"[e2e] {system}: {r['samples']} samples, {r['train_s']:.1f} s training, greedy "
                  f"{[round(c['accuracy'], 2) for c in r['curve']]}, sampled "
                  f"{[c.get('sampled_accuracy') and round(c['sampled_accuracy'], 2) for c in r['curve']]}", flush=True)
        except Exception as e:  # noqa: BLE001  (a system that fails is reported, the others still run)
            errors[system] = str(e)
            print(f"[e2e] {system} FAILED: {e}", flush=True)
    targets = e2e_targets(start, target=args.target, gain=args.gain, sampled_target=args.sampled_target)
    greedy_target = targets["accuracy"]
    reached, ratios = compare(runs, targets)
    reached["held_to_end"] = {name: held_to_end(r["curve"], greedy_target) for name, r in runs.items()}
    result = {"config": {**asdict(budget), "targets": targets, "policy": args.policy, "reward": "hybrid: format gate + counting",
                         "trl_use_vllm": False},
              "metrics": {"runs": runs, "reached": reached, "errors": errors}, "ratios": ratios,
              "headline": headline(runs, reached, targets) + [f"{s} FAILED: {e.splitlines()[0]}" for s, e in errors.items()]}
    if args.gain is not None:
        result["headline"].append(f"greedy target start + {args.gain:.2f} = {greedy_target:.3f}; held to the end: "
                                  + ", ".join(f"{k} {v}" for k, v in reached["held_to_end"].items()))
    result["summary"] = result["headline"] + ratio_lines(ratios, [s for s in runs if s != "trl-grpo"])
    print(f"-> {write_result('e2e_vs_trl', result, args.results_dir)}")
    print("\n".join(result["headline"]))
    for k, v in ratios.items():
        print(f"{k}: {fmt_ratio(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
