"""Sample k responses per prompt record from a model and score each with the hybrid reward: the one
sampling path behind the difficulty filter (`vlrl filter`) and rejection sampling (`vlrl rft`)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from model.load import load_processor
from records import DataError, VideoGeometry, media_counts
from rewards.hybrid import score_batch
from rewards.inputs import reward_inputs
from rewards.pool import VerifierPool
from rewards.rm import RewardModelScorer
from rollout import make_engine
from rollout.sequences import prompt_from_record
from rollout.types import EngineConfig, SamplingConfig


@dataclass(frozen=True)
class Scored:
    """One sampled response and its reward."""

    completion: object   # rollout.types.Completion
    result: object       # rewards.hybrid.RewardResult


def needs_rm(record, reward_cfg) -> bool:
    """The record's task is routed to the reward model."""
    return reward_cfg.route(record.task).use_rm


def check_routes(records, reward_cfg) -> None:
    """Every record's task has a reward route; else a DataError naming the record."""
    for r in records:
        try:
            reward_cfg.route(r.task)
        except KeyError as e:
            path, _, line = r.source.rpartition(":")
            raise DataError(path or r.source, int(line) if line.isdigit() else 0, "task", str(e).strip("'\"")) from None


def load_reward_model(path: str | None):
    """The reward model scorer for `--rm DIR` (it loads a VLM), or None."""
    if not path:
        return None
    return RewardModelScorer(path)


def sample_and_score(model_dir: str, records: Sequence, *, k: int, backend: str, reward_cfg, rm=None,
                     max_tokens: int = 64, temperature: float = 1.0, seed: int | None = 0, chunk: int | None = None,
                     dtype: str = "float32", progress: bool = True) -> list[list[Scored]]:
    """result[i][j]: sample j of records[i] with its reward. Prompts go to the engine `chunk` at a time
    (default 32 for hf, which bounds its padded batch; 512 for vLLM, which schedules its own batches); chunk c is seeded with seed + start * k, so the samples of
    a prompt do not depend on the chunk size under vLLM on GPU. Tasks routed to the reward model need `rm`."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    unseeded = seed is None
    chunk = chunk or (512 if backend == "vllm" else 32)
    t0 = time.perf_counter()
    geometry = VideoGeometry.of(load_processor(model_dir))
    counts = [media_counts(r, geometry) for r in records]   # the engine takes the most any prompt holds
    engine = make_engine(str(model_dir), EngineConfig(
        backend=backend, dtype=dtype, max_images_per_prompt=max([1] + [i for i, _ in counts]),
        max_video_clips_per_prompt=max([0] + [c for _, c in counts])), seed=seed or 0)
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
                completions = engine.generate(prompts, sampling)
                t2 = time.perf_counter()
                results = score_batch(reward_inputs(part, completions, prompts), reward_cfg, rm=rm, pool=pool)
                t_score += time.perf_counter() - t2
                t_gen += t2 - t1
                for i, group in enumerate(completions):
                    out.append([Scored(c, results[i * k + j]) for j, c in enumerate(group)])
                if progress:
                    print(f"[sample] {min(start + chunk, len(records))}/{len(records)} prompts x {k} "
                          f"({t_gen:.1f} s generating, {t_score:.1f} s scoring)", flush=True)
    finally:
        engine.close()
    if progress:
        print(f"[sample] {backend} engine start {t_engine:.1f} s, generate {t_gen:.1f} s, score {t_score:.1f} s")
    return out

