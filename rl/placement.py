"""Placing workers: in the driver process, or as Ray actors on a local or remote cluster.

`spawn(PolicyWorker, path, ..., use_ray=...)` returns a `Handle[PolicyWorker]`. The worker's methods
are called as methods of the handle and return a `Future`:

    logp = run.actor.logp(batch, micro_batch_size=32).result()

In the driver process the call runs at once and the future holds its value; in a Ray actor it runs
there, concurrently with calls made to other actors, and `.result()` waits (bounded by the handle's
timeout). A method the worker class does not define fails at the attribute, naming the class. The
driver is written once against this and runs the same either way.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

R = TypeVar("R")
W = TypeVar("W")

# The repository root, so Ray worker processes import these packages however the driver found them.
_ROOT = str(Path(__file__).resolve().parents[1])
# What a worker process needs of the driver's environment (threads, vLLM's CPU settings).
_ENV_KEYS = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
             "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CACHE_ROOT")


class Future(Generic[R]):
    """The result of a worker call: a value already computed, or a Ray object reference."""

    def __init__(self, value: R | None = None, ref: Any = None, timeout: float | None = None):
        self._value, self._ref, self._timeout = value, ref, timeout

    def result(self) -> R:
        if self._ref is None:
            return self._value  # type: ignore[return-value]
        import ray  # optional: only remote futures need it
        return ray.get(self._ref, timeout=self._timeout)


class Handle(Generic[W]):
    """A worker of class `cls` living in this process (`obj`) or in a Ray actor (`actor`)."""

    def __init__(self, cls: type[W], *, obj: W | None = None, actor: Any = None, timeout: float | None = None,
                 name: str = ""):
        self.cls, self.obj, self.actor, self.timeout, self.name = cls, obj, actor, timeout, name

    @property
    def remote(self) -> bool:
        return self.actor is not None

    def __getattr__(self, method: str) -> Callable[..., Future]:
        if method.startswith("_") or not callable(getattr(self.__dict__.get("cls"), method, None)):
            raise AttributeError(f"{getattr(self.__dict__.get('cls'), '__name__', '?')} has no method {method!r}")

        def call(*args, **kwargs) -> Future:
            if self.actor is None:
                return Future(getattr(self.obj, method)(*args, **kwargs))
            return Future(ref=self.actor.call.remote(method, *args, **kwargs), timeout=self.timeout)

        call.__name__ = method
        return call

    def kill(self) -> None:
        """End the Ray actor (nothing to do for a worker in this process)."""
        if self.actor is not None:
            import ray  # optional: only remote handles need it
            ray.kill(self.actor, no_restart=True)


class _Host:
    """The Ray actor body: builds the worker inside the actor process and runs its methods."""

    def __init__(self, cls, args, kwargs, env):
        os.environ.update(env)
        self.obj = cls(*args, **kwargs)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.obj, method)(*args, **kwargs)

    def ping(self) -> bool:
        return True


def spawn(cls: type[W], *args, use_ray: bool = False, num_cpus: float = 0, num_gpus: float = 0,
          timeout: float = 600.0, name: str = "", **kwargs) -> Handle[W]:
    """`cls(*args, **kwargs)` here, or in a Ray actor with the given resources.

    CPU actors default to num_cpus=0: on a 2-core machine, fractional CPU reservations starve
    later tasks into pending forever; the OS shares the cores, one OpenMP thread each.
    """
    if not use_ray:
        return Handle(cls, obj=cls(*args, **kwargs), name=name)
    import ray  # optional: only Ray placement needs it

    env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    actor = ray.remote(_Host).options(num_cpus=num_cpus, num_gpus=num_gpus, name=name or None).remote(
        cls, args, kwargs, env)
    ray.get(actor.ping.remote(), timeout=timeout)
    return Handle(cls, actor=actor, timeout=timeout, name=name)


def start_local_ray(*, num_cpus: int = 2, object_store_mb: int = 200, temp_dir: str | None = None,
                    address: str | None = None) -> None:
    """`ray.init` for this project: no dashboard, a small object store, an own temp folder, no auth
    token warning, and the repository on the workers' PYTHONPATH. With `address`, join a cluster
    instead (resources then come from the cluster)."""
    import ray  # optional: only Ray placement needs it

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
