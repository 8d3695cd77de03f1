"""Placing workers: in the driver process, or as Ray actors on a local or remote cluster.

Ray itself is started with `rollout.actor.start_local_ray` (or joins a cluster by address).
`spawn(cls, *args, use_ray=..., num_cpus=..., num_gpus=..., **kwargs)` returns a `Handle` whose `.call(method, ...)`
returns a `Pending`; `.result()` waits (bounded by the configured timeout under Ray). The driver
is written once against this and runs the same either way.
"""
from __future__ import annotations

import os
from typing import Any


class Pending:
    def __init__(self, value: Any = None, ref: Any = None, timeout: float | None = None):
        self._value, self._ref, self._timeout = value, ref, timeout

    def result(self) -> Any:
        if self._ref is None:
            return self._value
        import ray
        return ray.get(self._ref, timeout=self._timeout)


class Handle:
    """A worker living here (`obj`) or in a Ray actor (`actor`)."""

    def __init__(self, obj: Any = None, actor: Any = None, timeout: float | None = None, name: str = ""):
        self.obj, self.actor, self.timeout, self.name = obj, actor, timeout, name

    @property
    def remote(self) -> bool:
        return self.actor is not None

    def call(self, method: str, *args, **kwargs) -> Pending:
        if self.actor is None:
            return Pending(getattr(self.obj, method)(*args, **kwargs))
        return Pending(ref=getattr(self.actor, "call").remote(method, *args, **kwargs), timeout=self.timeout)

    def __call__(self, method: str, *args, **kwargs) -> Any:
        return self.call(method, *args, **kwargs).result()

    def kill(self) -> None:
        if self.actor is not None:
            import ray
            ray.kill(self.actor, no_restart=True)


class _Host:
    """The Ray actor body: builds the worker inside the actor process and dispatches calls."""

    def __init__(self, cls, args, kwargs, env):
        os.environ.update(env)
        self.obj = cls(*args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.obj, method)(*args, **kwargs)

    def ping(self) -> bool:
        return True


def spawn(cls, *args, use_ray: bool = False, num_cpus: float = 0, num_gpus: float = 0, timeout: float = 600.0,
          name: str = "", **kwargs) -> Handle:
    """Create `cls(*args, **kwargs)` here, or in a Ray actor with the given resources.

    CPU actors default to num_cpus=0: on a 2-core machine, fractional CPU reservations starve
    later tasks into pending forever; the OS shares the cores, one OpenMP thread each.
    """
    if not use_ray:
        return Handle(obj=cls(*args, **kwargs), name=name)
    import ray

    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE",
                                      "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                      "VLLM_CACHE_ROOT") if k in os.environ}
    actor_cls = ray.remote(_Host)
    actor = actor_cls.options(num_cpus=num_cpus, num_gpus=num_gpus, name=name or None).remote(cls, args, kwargs, env)
    ray.get(actor.ping.remote(), timeout=timeout)
    return Handle(actor=actor, timeout=timeout, name=name)
