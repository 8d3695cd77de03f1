"""Sample k responses per prompt record from a model and score each with the hybrid reward: the one
sampling path behind the difficulty filter (`vlrl filter`) and rejection sampling (`vlrl rft`)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from model.load import load_processor
from records import VideoGeometry, media_counts
from rewards.hybrid import score_batch
from rewards.inputs import for_model, reward_inputs
from rewards.judge import TimedJudge, load_judge
from rewards.pool import VerifierPool
from rewards.rm import RewardModelScorer
from rl.rollouts import Rollouts
from rollout.sequences import prompt_from_record
from rollout.types import EngineConfig, SamplingConfig
from training.placement import start_local_ray


@dataclass(frozen=True)
class Scored:
    """One sampled response and its reward."""

    completion: object   # rollout.types.Completion
    result: object       # rewards.hybrid.RewardResult


def needs_rm(record, reward_cfg) -> bool:
    """The record's task is routed to the reward model."""
    return reward_cfg.route(record.task).use_rm


def load_reward_model(path: str | None):
    """The reward model scorer for `--rm DIR` (it loads a VLM), or None."""
    if not path:
        return None
    return RewardModelScorer(path)


def sample_and_score(model_dir: str, records: Sequence, *, k: int, reward_cfg, engine: EngineConfig = EngineConfig(),
                     replicas: int = 1, rm=None, max_tokens: int = 64, temperature: float = 1.0,
                     seed: int | None = 0, chunk: int | None = None, progress: bool = True) -> list[list[Scored]]:
    """result[i][j]: sample j of records[i] with its reward, sampled by `replicas` engines with the
    settings `engine` (the RL run's rollout settings in the pipeline). Prompts go to the engines
    `chunk` at a time (default 32 per replica for hf, which bounds its padded batch; 512 for vLLM,
    which schedules its own batches); prompt i is seeded with seed + i * k, so its samples do not
    depend on the chunk size or the replica under vLLM. Tasks routed to the reward model need `rm`;
    the judge of judged tasks is loaded from `reward_cfg.judge`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    unseeded = seed is None
    chunk = chunk or (512 if engine.backend == "vllm" else 32) * replicas
    use_ray = replicas > 1
    own_ray = False
    if use_ray:
        import ray  # optional: only several replicas need it
        if not ray.is_initialized():
            start_local_ray()
            own_ray = True
    processor = load_processor(model_dir)
    reward_cfg = for_model(reward_cfg, processor)   # the model family's conventions
    t0 = time.perf_counter()
    judge = TimedJudge(load_judge(reward_cfg.judge)) if reward_cfg.uses_judge else None
    geometry = VideoGeometry.of(processor)
    counts = [media_counts(r, geometry) for r in records]   # the engine takes the most any prompt holds
    engine = dataclasses.replace(
        engine, max_images_per_prompt=max([engine.max_images_per_prompt] + [i for i, _ in counts]),
        max_video_clips_per_prompt=max([engine.max_video_clips_per_prompt] + [c for _, c in counts]))
    rollouts = Rollouts(str(model_dir), engine, replicas=replicas, seed=seed or 0, use_ray=use_ray)
    t_engine = time.perf_counter() - t0
    out: list[list[Scored]] = []
    t_gen = t_score = 0.0
    try:
        with VerifierPool.from_config(reward_cfg.pool) as pool:
            pool.wait_ready()
            for start in range(0, len(records), chunk):
                part = records[start:start + chunk]
                t1 = time.perf_counter()
                prompts = [prompt_from_record(r, geometry) for r in part]
                sampling = SamplingConfig(n=k, temperature=temperature, max_tokens=max_tokens,
                                          seed=None if unseeded else seed + start * k)
                completions = rollouts.generate(prompts, sampling)
                t2 = time.perf_counter()
                results = score_batch(reward_inputs(part, completions, prompts), reward_cfg, rm=rm, pool=pool,
                                      judge=judge)
                t_score += time.perf_counter() - t2
                t_gen += t2 - t1
                for i, group in enumerate(completions):
                    out.append([Scored(c, results[i * k + j]) for j, c in enumerate(group)])
                if progress:
                    print(f"[sample] {min(start + chunk, len(records))}/{len(records)} prompts x {k} "
                          f"({t_gen:.1f} s generating, {t_score:.1f} s scoring)", flush=True)
    finally:
        rollouts.close()
        if own_ray:
            import ray  # optional, see above
            ray.shutdown()
    if progress:
        cost = f" (judge {judge.seconds:.1f} s, {judge.calls} calls)" if judge is not None else ""
        print(f"[sample] {engine.backend} x{replicas} engine start {t_engine:.1f} s, generate {t_gen:.1f} s, "
              f"score {t_score:.1f} s{cost}")
    return out
