"""The rollout worker: one generation engine behind the calls the RL driver makes (generate, weight
sync, close), placed in the driver process or in a Ray actor by `training.placement`."""
from __future__ import annotations

import os
import time
from typing import Mapping, Sequence

import torch

from rollout import make_engine
from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig


class RolloutWorker:
    """Holds one engine (`make_engine(model, cfg, seed=seed)`); the methods mirror `Engine`."""

    def __init__(self, model: str, cfg: EngineConfig, *, seed: int = 0):
        self.model, self.cfg = model, cfg
        self.engine = make_engine(model, cfg, seed=seed)

    def ping(self) -> dict:
        """Cheap liveness check, with what the worker runs."""
        return {"backend": self.cfg.backend, "model": self.model, "pid": os.getpid(),
                "start_seconds": getattr(self.engine, "start_seconds", None)}

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        return self.engine.generate(prompts, sampling)

    def sync_weights(self, state: Mapping[str, torch.Tensor]) -> float:
        """Load `state` (HF names); returns the seconds it took inside the worker."""
        t0 = time.perf_counter()
        self.engine.sync_weights(state)
        return time.perf_counter() - t0

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """One bucket of a sync (whole layers); `finish_sync` after the last."""
        self.engine.load_weights(state)

    def finish_sync(self) -> None:
        self.engine.finish_sync()

    # `sync_method: transfer` (vLLM engines): the calls of vLLM's weight-transfer API, see VLLMEngine
    def transfer_ranks(self) -> int:
        """Ranks this engine takes in a transfer group: its tensor-parallel workers."""
        return self.cfg.tensor_parallel_size

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self.engine.update_weights(update_info)

    def finish_weight_update(self) -> None:
        self.engine.finish_weight_update()

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.shutdown_weight_transfer_engine()

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        self.engine.close()
