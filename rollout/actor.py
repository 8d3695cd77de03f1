"""A thin Ray actor around one generation engine, and a local Ray start with settings that hold on
a small CPU machine.

Every call the driver makes on a worker should be bounded: `ray.get(ref, timeout=...)`. On a
machine whose CPUs are all held by fractional-CPU actors a task that asks for CPU pends forever,
so helpers that must always run are declared with `num_cpus=0`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig, make_engine

# The repository root, so Ray worker processes import this package however the driver found it.
_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class WorkerResources:
    """What one rollout worker reserves from Ray."""

    num_cpus: float = 1
    """CPUs for the actor (its engine runs one OpenMP thread per CPU on the CPU backend)."""
    num_gpus: float = 0
    """GPUs for the actor; a vLLM engine with tensor parallelism t needs t."""


def start_local_ray(*, num_cpus: int = 2, object_store_mb: int = 200, temp_dir: str | None = None,
                    address: str | None = None) -> None:
    """`ray.init` for this project: no dashboard, a small object store, an own temp folder, no auth
    token warning, and the repository on the workers' PYTHONPATH. With `address`, join a cluster
    instead (resources then come from the cluster)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False)
        return
    temp_dir = temp_dir or os.path.join(tempfile.gettempdir(), f"vlrl-ray-{os.getuid()}")
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_mb * 2**20,
             _temp_dir=os.path.abspath(temp_dir), runtime_env=runtime_env, log_to_driver=False)


class RolloutWorker:
    """Holds one engine (`make_engine(cfg)`) in a Ray actor; the methods mirror `Engine`."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.engine = make_engine(cfg)

    def ping(self) -> dict:
        """Cheap liveness check, with what the worker runs."""
        return {"backend": self.cfg.backend, "model": self.cfg.model, "pid": os.getpid(),
                "start_seconds": getattr(self.engine, "start_seconds", None)}

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        return self.engine.generate(prompts, sampling)

    def sync_weights(self, state: Mapping) -> float:
        """Load `state` (HF names); returns the seconds it took inside the worker."""
        import time
        t0 = time.perf_counter()
        self.engine.sync_weights(state)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.engine.close()


def start_rollout_worker(cfg: EngineConfig, resources: WorkerResources = WorkerResources()):
    """A `RolloutWorker` actor placed with `resources`. Its engine starts in the constructor: wait
    for it with `ray.get(worker.ping.remote(), timeout=...)`."""
    import ray

    return ray.remote(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)(RolloutWorker).remote(cfg)
