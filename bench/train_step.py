"""Trainer throughput on a fixed batch: the actor's PPO update, the critic's value update and the
actor's log-prob pass (tokens/s), through the same workers the RL driver uses (`rl.workers`); then a
LoRA actor against a full one, each measured alone in a fresh process: update and log-prob speed,
trainer state (weights, gradients, Adam state) and peak RSS, as ratios LoRA / full. On a batch of
varied lengths: token-budget micro-batches against fixed-size ones (`--budget-rows`), and sequence
packing against padded micro-batches (`--pack-rows`).

    python -m bench.train_step --model DIR --data FILE.jsonl [--prompts 8 --n 8 --response-tokens 32]
                               [--lora-r 16 (0: no LoRA comparison)] [--budget-rows 8] [--pack-rows 8]

The batch is built like a rollout batch (`rollout.sequences.build_sequences`) from real prompts
with images and fixed-length random responses: speed does not depend on what the tokens say.
tokens/s counts every token of the forward/backward (prompt + response, no padding); the response
tokens/s (what the loss is taken over) is reported next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from bench.common import best_time, fmt, fmt_ratio, peak_rss_mib, ratio, throughput, write_result
from bench.scratch import run_child
from model.lora import LoRAConfig
from records import VideoGeometry, load_records
from rl.batch import RolloutBatch
from rl.config import PPOConfig
from rl.driver import minibatch_rows
from rl.workers import CriticWorker, PolicyWorker
from rollout.sequences import build_sequences, prompt_from_record, vision_token_ids
from rollout.types import Completion
from training.atomic import write_json
from training.distributed import rank_chunks
from training.optim import OptimConfig


def fixed_batch(processor, data: str, *, prompts: int, n: int, response_tokens: int, seed: int = 0,
                varied: bool = False) -> RolloutBatch:
    """A rollout-shaped batch: `prompts` records (their images and video clips) x `n` random
    responses of `response_tokens` tokens (`varied`: 1 to 2 x `response_tokens`, uniformly), with
    the RL fields the updates read (adv, returns, values, ...; old_logp is the caller's)."""
    records = load_records(data, require="prompt")[:prompts]
    geometry = VideoGeometry.of(processor)
    batch_prompts = [prompt_from_record(r, geometry) for r in records]
    g = torch.Generator().manual_seed(seed)
    banned = set(vision_token_ids(processor)) | set(processor.tokenizer.all_special_ids)
    allowed = torch.tensor([t for t in range(len(processor.tokenizer)) if t not in banned])

    def length() -> int:
        return int(torch.randint(1, 2 * response_tokens + 1, (1,), generator=g)) if varied else response_tokens
    completions = [[Completion(token_ids=allowed[torch.randint(len(allowed), (k,), generator=g)].tolist(),
                               logp=[0.0] * k, text="", finish_reason="length") for k in (length() for _ in range(n))]
                   for _ in batch_prompts]
    seq = build_sequences(processor, batch_prompts, completions)
    mask = seq.label_mask                                                           # (B, T)
    B, T = mask.shape
    return RolloutBatch(seq=seq, tasks=["counting"] * B, task_id=torch.zeros(B, dtype=torch.long),
                        scores=torch.zeros(B), correct=torch.rand(B, generator=g) > 0.5, kl_coef=torch.zeros(B),
                        adv=torch.randn(B, T, generator=g) * mask, returns=torch.rand(B, T, generator=g) * mask,
                        values=torch.zeros(B, T))


def measure(model: str, data: str, *, prompts: int, n: int, response_tokens: int, repeats: int,
            minibatches: int = 2, micro_batch_size: int = 32, dtype: str = "float32") -> dict:
    """Tokens/s of actor log-probs, actor update and critic update on one fixed batch."""
    optim = OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant")
    ppo = PPOConfig(minibatches=minibatches, micro_batch_size=micro_batch_size, lm_coef=0.1)
    actor = PolicyWorker(model, optim=optim, total_steps=10_000, dtype=dtype)
    batch = fixed_batch(actor.processor, data, prompts=prompts, n=n, response_tokens=response_tokens)
    B = batch.rows
    rows = minibatch_rows(list(range(B)), minibatches=minibatches, epochs=1, seed=0)
    batch.old_logp, _ = actor.logp(batch.seq, micro_batch_size=micro_batch_size)
    batch.ref_logp = batch.old_logp
    all_tokens = int(batch.seq.attention_mask.sum())
    resp_tokens = int(batch.mask.sum())

    def actor_update():
        actor.update(batch, ppo=ppo, kl_mode="reward", kl_kind="k3", minibatch_rows=rows)

    actor_update()  # warm-up: allocator, first optimizer state
    t_logp = best_time(lambda: actor.logp(batch.seq, micro_batch_size=micro_batch_size), repeats)
    t_actor = best_time(actor_update, repeats)
    n_params = sum(p.numel() for p in actor.model.parameters())
    actor = None  # frees the actor before the critic loads
    critic = CriticWorker(model, optim=optim, total_steps=10_000, dtype=dtype)

    def critic_update():
        critic.update(batch, ppo=ppo, minibatch_rows=rows)

    critic_update()
    t_critic = best_time(critic_update, repeats)
    out = {"batch_rows": B, "tokens": all_tokens, "response_tokens": resp_tokens, "params": n_params,
           "peak_rss_mib": peak_rss_mib()}
    for name, t in (("actor_logp", t_logp), ("actor_update", t_actor), ("critic_update", t_critic)):
        out[name] = {"seconds": t, "tokens_per_s": throughput(all_tokens, t),
                     "response_tokens_per_s": throughput(resp_tokens, t)}
    return out


def budget_vs_rows(model: str, data: str, *, prompts: int, n: int, response_tokens: int, repeats: int,
                   minibatches: int = 2, micro_batch_size: int = 8, dtype: str = "float32") -> dict:
    """Token-budget micro-batching against fixed-size ones on a batch of varied lengths (responses
    of 1 to 2x `response_tokens`, and whatever media the prompts hold): the actor's log-prob pass and
    update with `micro_batch_size` rows per forward, then with a budget of that many rows of the
    longest length (`ppo.max_tokens_per_micro_batch`: no pass larger than the fixed plan's largest,
    so the same bound on activation memory); passes, tokens computed (padding included), seconds."""
    optim = OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant")
    actor = PolicyWorker(model, optim=optim, total_steps=10_000, dtype=dtype)
    batch = fixed_batch(actor.processor, data, prompts=prompts, n=n, response_tokens=response_tokens, varied=True)
    lengths = batch.seq.lengths
    budget = micro_batch_size * max(lengths)   # the fixed plan's largest pass: the same bound on activations
    plans = {"rows": dict(micro_batch_size=micro_batch_size, max_tokens=0),
             "budget": dict(micro_batch_size=max(micro_batch_size, batch.rows), max_tokens=budget)}
    rows = minibatch_rows(list(range(batch.rows)), minibatches=minibatches, epochs=1, seed=0)
    batch.old_logp, _ = actor.logp(batch.seq, micro_batch_size=micro_batch_size)
    batch.ref_logp = batch.old_logp
    out: dict = {"batch_rows": batch.rows, "tokens": sum(lengths), "budget": budget}
    for name, kw in plans.items():
        ppo = PPOConfig(minibatches=minibatches, micro_batch_size=kw["micro_batch_size"],
                        max_tokens_per_micro_batch=kw["max_tokens"], lm_coef=0.1)
        chunks = [c for r in rows for c, _ in rank_chunks(r, rank=0, world=1, size=kw["micro_batch_size"],
                                                           lengths=lengths, max_tokens=kw["max_tokens"])]

        def update():
            actor.update(batch, ppo=ppo, kl_mode="reward", kl_kind="k3", minibatch_rows=rows)
        update()
        out[name] = {"update_passes": len(chunks),
                     "update_padded_tokens": sum(len(c) * max(lengths[i] for i in c) for c in chunks),
                     "actor_update_s": best_time(update, repeats),
                     "actor_logp_s": best_time(lambda: actor.logp(batch.seq, **kw), repeats)}
    return out


def packed_vs_padded(model: str, data: str, *, prompts: int, n: int, response_tokens: int, repeats: int,
                     minibatches: int = 2, micro_batch_size: int = 8, dtype: str = "float32") -> dict:
    """Sequence packing (`ppo.pack_sequences`) against padded micro-batches on a batch of varied
    lengths (as `budget_vs_rows`'s), with the same `micro_batch_size`-row micro-batches either way:
    the actor's log-prob pass and update and the critic's update; tokens computed (padding included
    for the padded plan) and seconds."""
    optim = OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant")
    actor = PolicyWorker(model, optim=optim, total_steps=10_000, dtype=dtype)
    batch = fixed_batch(actor.processor, data, prompts=prompts, n=n, response_tokens=response_tokens, varied=True)
    lengths = batch.seq.lengths
    rows = minibatch_rows(list(range(batch.rows)), minibatches=minibatches, epochs=1, seed=0)
    batch.old_logp, _ = actor.logp(batch.seq, micro_batch_size=micro_batch_size)
    batch.ref_logp = batch.old_logp
    chunks = [c for r in rows for c, _ in rank_chunks(r, rank=0, world=1, size=micro_batch_size)]
    out: dict = {"batch_rows": batch.rows, "tokens": sum(lengths), "micro_batch_size": micro_batch_size,
                 "update_tokens": {"padded": sum(len(c) * max(lengths[i] for i in c) for c in chunks),
                                   "packed": sum(lengths[i] for c in chunks for i in c)}}
    critic = CriticWorker(model, optim=optim, total_steps=10_000, dtype=dtype)
    for pack in (False, True):
        ppo = PPOConfig(minibatches=minibatches, micro_batch_size=micro_batch_size, lm_coef=0.1, pack_sequences=pack)

        def update():
            actor.update(batch, ppo=ppo, kl_mode="reward", kl_kind="k3", minibatch_rows=rows)

        def critic_update():
            critic.update(batch, ppo=ppo, minibatch_rows=rows)
        update()
        critic_update()
        out["packed" if pack else "padded"] = {
            "actor_update_s": best_time(update, repeats), "critic_update_s": best_time(critic_update, repeats),
            "actor_logp_s": best_time(lambda: actor.logp(batch.seq, micro_batch_size=micro_batch_size, pack=pack),
                                      repeats)}
    return out


def state_bytes(worker) -> dict[str, int]:
    """What a trainer holds between steps and during an update, in bytes: every weight, a gradient
    per trainable parameter (alive during the update) and the optimizer's state (AdamW: two moments
    per trainable parameter)."""
    params = list(worker.model.parameters())
    opt = sum(t.numel() * t.element_size() for st in worker.opt.state.values() for t in st.values()
              if isinstance(t, torch.Tensor))
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return {"weights": weights, "grads": grads, "optimizer": opt, "total": weights + grads + opt}


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_actor(model: str, data: str, *, lora: LoRAConfig | None, prompts: int, n: int, response_tokens: int,
                  repeats: int, minibatches: int = 2, micro_batch_size: int = 32, dtype: str = "float32") -> dict:
    """One actor (full, or LoRA with `lora`) alone: update and log-prob tokens/s on the fixed batch,
    parameters (all, trainable), trainer state bytes, this process's peak RSS (often reached while
    loading the model) and its resident memory's growth from the loaded model to after the updates
    (optimizer state, and what the allocator kept of gradients and activations)."""
    optim = OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant")
    ppo = PPOConfig(minibatches=minibatches, micro_batch_size=micro_batch_size, lm_coef=0.1)
    actor = PolicyWorker(model, optim=optim, total_steps=10_000, dtype=dtype, lora=lora)
    batch = fixed_batch(actor.processor, data, prompts=prompts, n=n, response_tokens=response_tokens)
    rss_loaded = rss_mib()
    rows = minibatch_rows(list(range(batch.rows)), minibatches=minibatches, epochs=1, seed=0)
    batch.old_logp, _ = actor.logp(batch.seq, micro_batch_size=micro_batch_size)
    batch.ref_logp = batch.old_logp
    tokens = int(batch.seq.attention_mask.sum())

    def update():
        actor.update(batch, ppo=ppo, kl_mode="reward", kl_kind="k3", minibatch_rows=rows)

    update()
    t_update = best_time(update, repeats)
    t_logp = best_time(lambda: actor.logp(batch.seq, micro_batch_size=micro_batch_size), repeats)
    ps = list(actor.model.parameters())
    return {"lora": None if lora is None else dataclasses.asdict(lora), "tokens": tokens,
            "params": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad),
            "state_bytes": state_bytes(actor), "peak_rss_mib": peak_rss_mib(),
            "rss_growth_mib": rss_mib() - rss_loaded,
            "actor_update": {"seconds": t_update, "tokens_per_s": throughput(tokens, t_update)},
            "actor_logp": {"seconds": t_logp, "tokens_per_s": throughput(tokens, t_logp)}}


def lora_vs_full(args: list[str], *, timeout: float = 900) -> dict:
    """`measure_actor` for a full and a LoRA actor, each in a fresh process (clean peak RSS), and
    their ratios (LoRA / full)."""
    full = run_child("bench.train_step", [*args, "--actor-only", "full"], timeout=timeout)
    lora = run_child("bench.train_step", [*args, "--actor-only", "lora"], timeout=timeout)
    return {"full": full, "lora": lora, "ratios": {
        "lora/full actor_update tokens/s": ratio(lora["actor_update"]["tokens_per_s"], full["actor_update"]["tokens_per_s"]),
        "lora/full actor_logp tokens/s": ratio(lora["actor_logp"]["tokens_per_s"], full["actor_logp"]["tokens_per_s"]),
        "lora/full trainable params": ratio(lora["trainable"], full["trainable"]),
        "lora/full trainer state bytes": ratio(lora["state_bytes"]["total"], full["state_bytes"]["total"]),
        "lora/full RSS growth in updates": ratio(lora["rss_growth_mib"], full["rss_growth_mib"]),
        "lora/full peak RSS": ratio(lora["peak_rss_mib"], full["peak_rss_mib"])}}


def headline(m: dict) -> list[str]:
    return [f"{name:<13} {fmt(m[name]['tokens_per_s'], 'tok/s')} ({fmt(m[name]['response_tokens_per_s'])} response "
            f"tok/s, {fmt(m[name]['seconds'], 's')} per batch of {m['batch_rows']} x {m['tokens'] // m['batch_rows']} tok)"
            for name in ("actor_logp", "actor_update", "critic_update")]


def lora_lines(c: dict) -> list[str]:
    out = []
    for name in ("full", "lora"):
        m = c[name]
        out.append(f"{name:<5} actor: update {fmt(m['actor_update']['tokens_per_s'], 'tok/s')}, log-probs "
                   f"{fmt(m['actor_logp']['tokens_per_s'], 'tok/s')}, trainable {fmt(m['trainable'])} of "
                   f"{fmt(m['params'])} params, state {fmt(m['state_bytes']['total'] / 2**20, 'MiB')}, "
                   f"RSS +{fmt(m['rss_growth_mib'], 'MiB')} in updates, peak {fmt(m['peak_rss_mib'], 'MiB')}")
    return out + [f"ratio {k}: {fmt_ratio(v)}" for k, v in c["ratios"].items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="prompt records (JSONL) whose first --prompts make the batch")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--response-tokens", type=int, default=32)
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per update (as ppo.minibatches)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the fastest counts")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the LoRA-vs-full comparison (0: skip it)")
    p.add_argument("--budget-rows", type=int, default=8,
                   help="token budget vs fixed micro-batches of this many rows, varied lengths (0: skip it)")
    p.add_argument("--pack-rows", type=int, default=8,
                   help="packed vs padded micro-batches of this many rows, varied lengths (0: skip it)")
    p.add_argument("--actor-only", choices=("full", "lora"), help=argparse.SUPPRESS)   # one side of the comparison
    p.add_argument("--results-dir", default=None)
    p.add_argument("--json", help="write the measurement here instead of bench/results/train_step.json")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = dict(prompts=args.prompts, n=args.n, response_tokens=args.response_tokens, repeats=args.repeats,
               minibatches=args.minibatches)
    lora = LoRAConfig(r=args.lora_r, alpha=2.0 * args.lora_r) if args.lora_r > 0 else None
    if args.actor_only:
        m = measure_actor(args.model, args.data, lora=lora if args.actor_only == "lora" else None, **cfg)
        write_json(args.json, m)
        return 0
    m = measure(args.model, args.data, **cfg)
    result = {"config": {**cfg, "model": args.model, "lora_r": args.lora_r}, "metrics": m, "ratios": {},
              "headline": headline(m)}
    if args.budget_rows > 0:
        b = budget_vs_rows(args.model, args.data, micro_batch_size=args.budget_rows, **cfg)
        m["budget_vs_rows"] = b
        result["ratios"].update({
            "budget/rows padded tokens in updates": ratio(b["budget"]["update_padded_tokens"],
                                                          b["rows"]["update_padded_tokens"]),
            "budget/rows actor_update speed": ratio(b["rows"]["actor_update_s"], b["budget"]["actor_update_s"]),
            "budget/rows actor_logp speed": ratio(b["rows"]["actor_logp_s"], b["budget"]["actor_logp_s"])})
    if args.pack_rows > 0:
        pk = packed_vs_padded(args.model, args.data, micro_batch_size=args.pack_rows, **cfg)
        m["packed_vs_padded"] = pk
        result["ratios"].update({
            "packed/padded tokens computed in updates": ratio(pk["update_tokens"]["packed"],
                                                              pk["update_tokens"]["padded"]),
            **{f"packed/padded {k.removesuffix('_s')} speed": ratio(pk["padded"][k], pk["packed"][k])
               for k in ("actor_update_s", "critic_update_s", "actor_logp_s")}})
    if lora is not None:
        child = ["--model", args.model, "--data", args.data, "--prompts", str(args.prompts), "--n", str(args.n),
                 "--response-tokens", str(args.response_tokens), "--minibatches", str(args.minibatches),
                 "--repeats", str(args.repeats), "--lora-r", str(args.lora_r)]
        c = lora_vs_full(child)
        m["lora_vs_full"] = {"full": c["full"], "lora": c["lora"]}
        result["ratios"].update(c["ratios"])
        result["headline"] += lora_lines(c)[:2]
    if args.json:
        write_json(args.json, result)
    else:
        print(f"-> {write_result('train_step', result, args.results_dir)}")
    print("\n".join(result["headline"]))
    for k, v in result["ratios"].items():
        print(f"ratio {k}: {fmt_ratio(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
