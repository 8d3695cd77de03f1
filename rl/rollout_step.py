"""One RL step's rollout half: which prompts a step draws, the rollout and reward, DAPO's refill,
the batch's layout, and the checks of the engine against the trainer (log-prob gap, truncated IS
weights). The draws are pure functions of (step, draw round), so a resumed run draws the same
prompts; `rollout_step` reads only what `StepSource` names, so it runs the same in the driver's
thread and in the prefetch thread of `rollout.async`.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from records import Record, VideoGeometry, load_records, media_counts
from records.mixture import balanced_indices, batch_indices, weighted_records
from rewards.hybrid import RewardResult
from rewards.inputs import is_correct, reward_inputs
from rl.algos import dynamic_sampling_mask, kl_coefs, truncated_is_weight
from rl.algos import kl as kl_estimate
from rl.batch import RolloutBatch
from rl.config import RLConfig
from rl.rollouts import Rollouts
from rollout.sequences import build_sequences, engine_logp, prompt_from_record
from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig
from training.config import ConfigError


class StepSource(Protocol):
    """What a step's rollout reads from the run (`rl.driver.RLRun`)."""
    cfg: RLConfig
    records: list[Record]
    geometry: VideoGeometry
    processor: object
    rollouts: Rollouts
    score: Callable[[list], list[RewardResult]]


def prompt_pool(cfg: RLConfig) -> list[Record]:
    """The records the steps draw prompts from: `cfg.data` with each record of task t repeated
    `cfg.task_weights[t]` times (the prompt mixture)."""
    return weighted_records(load_records(cfg.data, tasks=cfg.reward.known_tasks, require="prompt"), cfg.task_weights)


def check_media_limits(records: list[Record], engine: EngineConfig, geometry: VideoGeometry) -> None:
    """ConfigError naming the rollout setting when a prompt holds more images or video clips than the
    vLLM engine is started for (`rollout.max_images_per_prompt`, `rollout.max_video_clips_per_prompt`)."""
    if engine.backend != "vllm":
        return
    for rec in records:
        if not rec.videos and len(rec.images) <= engine.max_images_per_prompt:
            continue
        images, clips = media_counts(rec, geometry)
        for n, key in ((images, "max_images_per_prompt"), (clips, "max_video_clips_per_prompt")):
            if n > getattr(engine, key):
                raise ConfigError(f"rollout.{key}: {getattr(engine, key)}, but the prompt at {rec.source} "
                                  f"({rec.id}) takes {n}")


def step_metrics(batch: RolloutBatch, results: list[RewardResult]) -> dict[str, float]:
    """Reward per task and component, KL per task (when a reference policy runs), the critic's value
    bias per task (PPO), response lengths."""
    out: dict[str, float] = {}
    by_task = defaultdict(list)
    for i, t in enumerate(batch.tasks):
        by_task[t].append(i)
    mask = batch.mask
    k1 = None if batch.ref_logp is None else kl_estimate(batch.old_logp, batch.ref_logp, kind="k1") * mask
    for t, idx in by_task.items():
        out[f"reward/{t}/total"] = sum(results[i].reward for i in idx) / len(idx)
        for part in sorted({p for i in idx for p in results[i].parts}):
            out[f"reward/{t}/{part}"] = sum(results[i].parts.get(part, 0.0) for i in idx) / len(idx)
        if k1 is not None:
            out[f"kl/{t}"] = float(k1[idx].sum() / mask[idx].sum().clamp(min=1))
        if batch.values is not None:  # the shared critic's bias on this task: V(first response state) - score
            first = batch.values[idx].gather(1, mask[idx].argmax(-1, keepdim=True))[:, 0]
            out[f"critic/value_bias/{t}"] = float((first - batch.scores[idx]).mean())
    out["reward/all/total"] = sum(r.reward for r in results) / max(1, len(results))
    lengths = mask.sum(-1).float()
    out["response/length_mean"] = float(lengths.mean())
    out["response/length_max"] = float(lengths.max())
    if batch.entropy is not None:  # else (old_logp "engine") the actor update reports it
        out["response/entropy"] = float((batch.entropy * mask).sum() / mask.sum().clamp(min=1))
    return out


def engine_logp_gap(batch: RolloutBatch, completions: list[list[Completion]]) -> float:
    """max |engine log-prob - trainer log-prob| over sampled tokens (both of the raw policy at T=1)."""
    try:
        engine = engine_logp(completions, batch.mask)
    except ValueError:
        return float("nan")
    if not batch.mask.any():
        return float("nan")
    return float(((engine - batch.old_logp) * batch.mask).abs().max())


def tis_weights(batch: RolloutBatch, completions: list[list[Completion]], *, cap: float) -> tuple[Tensor | None, dict]:
    """The batch's truncated IS weights (trainer's old policy over the engine's, capped) and their
    metrics; (None, {"rollout/tis_applied": 0}) where the engine's log-probs do not line up with
    the batch's tokens."""
    try:
        sampler = engine_logp(completions, batch.mask)
    except ValueError:
        return None, {"rollout/tis_applied": 0.0}
    w = truncated_is_weight(batch.old_logp, sampler, batch.mask, cap=cap)
    m = batch.mask.bool()
    return w, {"rollout/tis_applied": 1.0, "rollout/tis_weight_mean": float(w[m].mean()) if m.any() else 1.0,
               "rollout/tis_capped_frac": float((w[m] >= cap * (1 - 1e-6)).float().mean()) if m.any() else 0.0}


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        yield
        self.seconds[f"time/{name}"] = self.seconds.get(f"time/{name}", 0.0) + time.time() - t0


def groups_with_signal(scores: Sequence[float], n: int) -> list[bool]:
    """Per group of `n` consecutive samples: whether its scores differ (DAPO's learning signal)."""
    if not scores:
        return []
    ids = torch.arange(len(scores)) // n
    return dynamic_sampling_mask(torch.tensor(scores, dtype=torch.float32), ids).view(-1, n)[:, 0].tolist()


def refill_pick(signal: Sequence[bool], want: int) -> list[int]:
    """The groups a refilled step trains on: the first `want` that carry a signal, in draw order;
    none carrying one: the first `want` (the update then drops them all)."""
    picked = [i for i, s in enumerate(signal) if s][:want]
    return picked or list(range(min(want, len(signal))))


def draw_indices(records: Sequence[Record], step: int, draw: int, cfg: RLConfig) -> list[int]:
    """Prompt indices of rollout round `draw` of `step`: round 0 is the step's own batch; refill
    rounds come from a second seeded stream. With `balance_tasks` the tasks take the slots in
    turn. Pure functions of (step, draw): a resumed run draws the same prompts."""
    p = cfg.prompts_per_step
    index, seed = (step, cfg.seed) if draw == 0 else (step * cfg.grpo.max_extra_draws + draw - 1, cfg.seed + 1)
    if cfg.balance_tasks:
        return balanced_indices([r.task for r in records], cfg.task_weights, index * p, p, seed=seed)
    return batch_indices(len(records), index, 0, batch_size=p, grad_accum=1, seed=seed)


def rollout_step(run: StepSource, step: int) -> tuple[list[Record], list[list[Completion]], list[RewardResult],
                                                  RolloutBatch, Timer, dict[str, float]]:
    """Sample the step's prompts, roll them out, score them and lay them out as a batch. With GRPO's
    dynamic sampling, rounds of new prompts are drawn (at most `grpo.max_extra_draws`) until
    `prompts_per_step` groups have scores that differ, and the batch holds those groups only."""
    cfg, ro, tm = run.cfg, run.cfg.rollout, Timer()
    refill = cfg.algo == "grpo" and cfg.grpo.dynamic_sampling
    records: list[Record] = []
    prompts: list[Prompt] = []
    completions: list[list[Completion]] = []
    results: list[RewardResult] = []
    draws = 0
    while True:
        with tm("sample"):
            recs = [run.records[i] for i in draw_indices(run.records, step, draws, cfg)]
            ps = [prompt_from_record(r, run.geometry) for r in recs]
            sampling = SamplingConfig.of(ro, seed=cfg.seed * 1_000_003 + step + draws * 1_000_000_007)
        with tm("rollout"):
            comps = run.rollouts.generate(ps, sampling)
        with tm("reward"):
            results += run.score(reward_inputs(recs, comps, ps))
        records, prompts, completions = records + recs, prompts + ps, completions + comps
        draws += 1
        if not refill:
            break
        signal = groups_with_signal([r.reward for r in results], ro.n)
        if sum(signal) >= cfg.prompts_per_step or draws > cfg.grpo.max_extra_draws:
            break
    stats = {}
    if refill:
        stats = {"rollout/draws": float(draws), "rollout/prompts_drawn": float(len(records)),
                 "rollout/groups_with_signal": sum(signal) / len(signal),
                 "reward/all/drawn": sum(r.reward for r in results) / len(results)}   # the batch's is biased
        pick = refill_pick(signal, cfg.prompts_per_step)
        results = [results[p * ro.n + j] for p in pick for j in range(ro.n)]
        records, prompts, completions = ([xs[p] for p in pick] for xs in (records, prompts, completions))
    with tm("prepare"):
        # video prompts last: a micro-batch pads its rows to the longest, and they are several image prompts long
        order = sorted(range(len(records)), key=lambda p: bool(records[p].videos))
        results = [results[p * ro.n + j] for p in order for j in range(ro.n)]
        records, prompts, completions = ([xs[p] for p in order] for xs in (records, prompts, completions))
        seq = build_sequences(run.processor, prompts, completions)
        tasks = [records[i].task for i in seq.prompt_index.tolist()]
        names = sorted(set(tasks))
        batch = RolloutBatch(seq=seq, tasks=tasks, task_id=torch.tensor([names.index(t) for t in tasks]),
                             scores=torch.tensor([r.reward for r in results], dtype=torch.float32),
                             correct=torch.tensor([is_correct(r) for r in results]),
                             kl_coef=kl_coefs(tasks, cfg.kl.coefs, default=cfg.kl.default))
    return records, completions, results, batch, tm, stats

