"""Trainer throughput on a fixed batch: the actor's PPO update, the critic's value update and the
actor's log-prob pass (tokens/s), through the same workers the RL driver uses (`rl.workers`).

    python -m bench.train_step --model DIR --data FILE.jsonl [--prompts 8 --n 8 --response-tokens 32]

The batch is built like a rollout batch (`rollout.sequences.build_sequences`) from real prompts
with images and fixed-length random responses: speed does not depend on what the tokens say.
tokens/s counts every token of the forward/backward (prompt + response, no padding); the response
tokens/s (what the loss is taken over) is reported next to it.
"""
from __future__ import annotations

import argparse

import torch

from bench.common import best_time, fmt, peak_rss_mib, throughput, write_result
from records import load_images, load_records
from rl.batch import RolloutBatch
from rl.config import PPOConfig
from rl.driver import minibatch_rows
from rl.workers import CriticWorker, PolicyWorker
from rollout.sequences import build_sequences, vision_token_ids
from rollout.types import Completion, Prompt
from training.atomic import write_json
from training.optim import OptimConfig


def fixed_batch(processor, data: str, *, prompts: int, n: int, response_tokens: int, seed: int = 0) -> RolloutBatch:
    """A rollout-shaped batch: `prompts` records x `n` random responses of `response_tokens` tokens,
    with the RL fields the updates read (adv, returns, values, ...; old_logp is the caller's)."""
    records = load_records(data, require="prompt")[:prompts]
    batch_prompts = [Prompt(r.prompt_messages, load_images(r)) for r in records]
    g = torch.Generator().manual_seed(seed)
    banned = set(vision_token_ids(processor)) | set(processor.tokenizer.all_special_ids)
    allowed = torch.tensor([t for t in range(len(processor.tokenizer)) if t not in banned])
    completions = [[Completion(token_ids=allowed[torch.randint(len(allowed), (response_tokens,), generator=g)].tolist(),
                               logp=[0.0] * response_tokens, text="", finish_reason="length") for _ in range(n)]
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


def headline(m: dict) -> list[str]:
    return [f"{name:<13} {fmt(m[name]['tokens_per_s'], 'tok/s')} ({fmt(m[name]['response_tokens_per_s'])} response "
            f"tok/s, {fmt(m[name]['seconds'], 's')} per batch of {m['batch_rows']} x {m['tokens'] // m['batch_rows']} tok)"
            for name in ("actor_logp", "actor_update", "critic_update")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="prompt records (JSONL) whose first --prompts make the batch")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--response-tokens", type=int, default=32)
    p.add_argument("--minibatches", type=int, default=2, help="optimizer steps per update (as ppo.minibatches)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the fastest counts")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--json", help="write the measurement here instead of bench/results/train_step.json")
    args = p.parse_args(argv)
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    cfg = dict(prompts=args.prompts, n=args.n, response_tokens=args.response_tokens, repeats=args.repeats,
               minibatches=args.minibatches)
    m = measure(args.model, args.data, **cfg)
    result = {"config": {**cfg, "model": args.model}, "metrics": m, "ratios": {}, "headline": headline(m)}
    if args.json:
        write_json(args.json, result)
    else:
        print(f"-> {write_result('train_step', result, args.results_dir)}")
    print("\n".join(result["headline"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
