"""The rollout replicas: M engines behind one `generate`, fed the trainer's weights.

A call's prompts are cut into one contiguous share per replica and the completions merged back in
prompt order. Every prompt keeps its own seed (prompt i of the call samples with seed + i * n, as
one engine would), so a sample does not depend on which replica drew it. A replica that dies is
restarted with the current weights and only its share is retried; the others keep their results.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig
from rollout.worker import RolloutWorker
from training.placement import Handle, Replicas, spawn


class Rollouts:
    """`replicas` rollout workers on the HF model folder `model`, with the engine settings `engine`."""

    def __init__(self, model: str, engine: EngineConfig, *, replicas: int = 1, seed: int = 0, use_ray: bool = False,
                 retries: int = 2, timeout: float = 600.0, num_gpus: float = 0.0,
                 on_restart: Callable[[Handle[RolloutWorker]], None] | None = None,
                 placement: Callable[[int], dict] | None = None):
        self.model, self.engine = model, engine

        def start(i: int) -> Handle[RolloutWorker]:
            return spawn(RolloutWorker, model, engine, seed=seed, use_ray=use_ray, timeout=timeout,
                         num_gpus=num_gpus, name=f"rollout-{i}",
                         placement=None if placement is None else (lambda _: placement(i)))

        self.pool: Replicas[RolloutWorker] = Replicas(start, replicas, retries=retries, on_restart=on_restart,
                                                      name="rollout replica")

    @property
    def handles(self) -> list[Handle[RolloutWorker]]:
        return self.pool.handles

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        """`sampling.n` completions per prompt, result[prompt][sample], spread over the replicas."""
        def call(handle: Handle[RolloutWorker], share: list[Prompt], start: int):
            seed = None if sampling.seed is None else sampling.seed + start * sampling.n
            return handle.generate(share, dataclasses.replace(sampling, seed=seed))
        return self.pool.map(call, prompts)

    def sleep(self) -> None:
        for f in [h.sleep() for h in self.handles]:
            f.result()

    def wake_up(self) -> None:
        for f in [h.wake_up() for h in self.handles]:
            f.result()

    def close(self) -> None:
        self.pool.close()
