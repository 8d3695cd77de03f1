"""Placing workers: in the driver process, as one Ray actor, or as a group of Ray actors.

`spawn(PolicyWorker, path, ..., use_ray=...)` returns a `Handle[PolicyWorker]`; `spawn(..., workers=N)`
with N > 1 returns a `WorkerGroup[PolicyWorker]`: N Ray actors that form one torch.distributed
process group (NCCL on GPUs, gloo on CPU), each running the worker as one rank. Either way the
worker's methods are called as methods and return a `Future`:

    logp = run.actor.logp(seq, micro_batch_size=32).result()

A group runs the call on every rank (the worker code is SPMD: each rank takes its share of the
rows and the ranks meet in collectives) and its future returns rank 0's result once every rank
has returned. In the driver process a call runs at once and the future holds its value; in Ray
actors it runs there, concurrently with calls made to other actors, and `.result()` waits
(bounded by the handle's timeout). A method the worker class does not define fails at the
attribute, naming the class.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from training.distributed import free_port, init_group, node_address

R = TypeVar("R")
W = TypeVar("W")

# The repository root, so Ray worker processes import these packages however the driver found them.
_ROOT = str(Path(__file__).resolve().parents[1])
# What a worker process needs of the driver's environment (threads, vLLM's CPU settings).
_ENV_KEYS = ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
             "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CACHE_ROOT", "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY")


class Future(Generic[R]):
    """The result of a worker call: a value already computed, or Ray object references (one per
    rank of a group) of which `pick` is the result."""

    def __init__(self, value: R | None = None, refs: list | None = None, timeout: float | None = None,
                 pick: int = 0):
        self._value, self._refs, self._timeout, self._pick = value, refs, timeout, pick

    def result(self) -> R:
        if self._refs is None:
            return self._value  # type: ignore[return-value]
        import ray  # optional: only remote futures need it
        if len(self._refs) == 1:
            return ray.get(self._refs[0], timeout=self._timeout)
        # A group: fail as soon as one rank fails (the others may be blocked in a collective with it).
        pending, values = list(self._refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self._timeout)
            if not ready:
                raise ray.exceptions.GetTimeoutError(f"no rank answered within {self._timeout} s")
            values[ready[0]] = ray.get(ready[0])
        return values[self._refs[self._pick]]


def _check_method(cls: type, method: str) -> None:
    if method.startswith("_") or not callable(getattr(cls, method, None)):
        raise AttributeError(f"{getattr(cls, '__name__', '?')} has no method {method!r}")


class Handle(Generic[W]):
    """A worker of class `cls` living in this process (`obj`) or in one Ray actor (`actor`)."""

    def __init__(self, cls: type[W], *, obj: W | None = None, actor: Any = None, timeout: float | None = None,
                 name: str = ""):
        self.cls, self.obj, self.actor, self.timeout, self.name = cls, obj, actor, timeout, name

    @property
    def remote(self) -> bool:
        return self.actor is not None

    @property
    def actors(self) -> list:
        """The Ray actors behind the handle (none for a worker in this process)."""
        return [] if self.actor is None else [self.actor]

    def __getattr__(self, method: str) -> Callable[..., Future]:
        _check_method(self.__dict__.get("cls"), method)

        def call(*args, **kwargs) -> Future:
            if self.actor is None:
                return Future(getattr(self.obj, method)(*args, **kwargs))
            return Future(refs=[self.actor.call.remote(method, *args, **kwargs)], timeout=self.timeout)

        call.__name__ = method
        return call

    def kill(self) -> None:
        """End the Ray actor (nothing to do for a worker in this process)."""
        kill_actors(self.actors)


class WorkerGroup(Generic[W]):
    """`cls` run by N Ray actors as the N ranks of one torch.distributed process group."""

    def __init__(self, cls: type[W], actors: list, *, timeout: float | None, name: str = ""):
        self.cls, self._actors, self.timeout, self.name = cls, actors, timeout, name

    @property
    def remote(self) -> bool:
        return True

    @property
    def actors(self) -> list:
        return list(self._actors)

    def __getattr__(self, method: str) -> Callable[..., Future]:
        _check_method(self.__dict__.get("cls"), method)

        def call(*args, **kwargs) -> Future:
            import ray  # optional: groups live in Ray actors
            # one copy of each argument (a batch) in the object store, shared by every rank; Ray
            # hands a method the values of the references given as its arguments
            args = tuple(ray.put(a) for a in args)
            kwargs = {k: ray.put(v) for k, v in kwargs.items()}
            refs = [a.call.remote(method, *args, **kwargs) for a in self._actors]
            return Future(refs=refs, timeout=self.timeout, pick=0)

        call.__name__ = method
        return call

    def kill(self) -> None:
        kill_actors(self._actors)


def worker_died(error: BaseException) -> bool:
    """Whether `error` says a Ray actor died (or stopped answering), as opposed to a bug in its code."""
    try:
        import ray  # optional: only Ray placement raises these
    except ImportError:
        return False
    return isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError))


class Replicas(Generic[W]):
    """Interchangeable workers that share a list of items: `map` cuts the list into one contiguous
    share per replica, runs the shares at once and merges the results in order. A replica whose
    call fails is restarted (`start(i)` for replica i; `on_restart(handle)` brings it up to date, e.g. with the
    current weights) and only its share is retried, at most `retries` times per call."""

    def __init__(self, start: Callable[[int], Handle[W]], n: int, *, retries: int = 2,
                 on_restart: Callable[[Handle[W]], None] | None = None, name: str = "replica"):
        self.start, self.retries, self.on_restart, self.name = start, retries, on_restart, name
        self.handles: list[Handle[W]] = [start(i) for i in range(n)]
        self.restarts = 0

    def map(self, call: Callable[[Handle[W], list, int], Future], items: list) -> list:
        """`call(handle, share, start)` returns a Future of the share's results (a list, one per
        item); the merged list of all results, in the order of `items`."""
        n = len(self.handles)
        bounds = [len(items) * i // n for i in range(n + 1)]
        shares = [(i, bounds[i], items[bounds[i]:bounds[i + 1]]) for i in range(n) if bounds[i + 1] > bounds[i]]
        out: list = [None] * len(items)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            futures = []
            for i, lo, share in shares:
                try:   # a call in this process runs (and fails) here; a remote one in .result()
                    futures.append((i, lo, share, call(self.handles[i], share, lo)))
                except Exception as e:  # noqa: BLE001
                    futures.append((i, lo, share, _Failed(e)))
            failed = []
            for i, lo, share, f in futures:
                try:
                    out[lo:lo + len(share)] = f.result()
                except Exception as e:  # a dead actor (RayActorError), a crashed engine: restart, retry
                    print(f"[{self.name} {i}] failed ({type(e).__name__}: {str(e)[:200]}); restarting it "
                          f"(try {attempt + 1})", flush=True)
                    self.restart(i)
                    failed.append((i, lo, share))
                    last = e
            if not failed:
                return out
            shares = failed
        raise RuntimeError(f"{self.name}: a share failed {self.retries + 1} times") from last

    def restart(self, i: int) -> None:
        old = self.handles[i]
        try:
            old.close().result()
        except Exception:  # noqa: BLE001  (the worker may be gone already)
            pass
        old.kill()
        self.handles[i] = self.start(i)
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.handles[i])

    def close(self) -> None:
        for h in self.handles:
            try:
                h.close().result()
            except Exception:  # noqa: BLE001
                pass
            h.kill()


class _Failed:
    """A call that raised at once: its future re-raises."""

    def __init__(self, error: Exception):
        self.error = error

    def result(self):
        raise self.error


def call_all(handles: list, method: str, *args, **kwargs) -> list[Future]:
    """The same call on several handles at once; for workers in Ray actors the arguments go to the
    object store once, not once per worker."""
    if any(h.remote for h in handles):
        import ray  # optional: only remote handles need it
        refs = tuple(ray.put(a) for a in args), {k: ray.put(v) for k, v in kwargs.items()}
    return [getattr(h, method)(*(refs[0] if h.remote else args), **(refs[1] if h.remote else kwargs)) for h in handles]


def kill_actors(actors: list) -> None:
    if actors:
        import ray  # optional: only Ray placement needs it
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001  (already dead)
                pass


class _Host:
    """The Ray actor body: sets the driver's environment, joins the group (ranks of a group), builds
    the worker inside the actor process and runs its methods."""

    def __init__(self, env: dict):
        os.environ.update(env)
        self.obj = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 of a group listens for the others."""
        return node_address(), free_port()

    def start(self, cls, args, kwargs, group: dict | None) -> bool:
        if group is not None:
            init_group(**group)
        self.obj = cls(*args, **kwargs)
        return True

    def call(self, method: str, *args, **kwargs):
        return getattr(self.obj, method)(*args, **kwargs)

    def ping(self) -> bool:
        return True


def spawn(cls: type[W], *args, use_ray: bool = False, workers: int = 1, num_cpus: float = 0, num_gpus: float = 0,
          timeout: float = 600.0, name: str = "", placement: Callable[[int], dict] | None = None,
          **kwargs) -> Handle[W] | WorkerGroup[W]:
    """`cls(*args, **kwargs)` here, in a Ray actor, or (workers > 1) as a group of Ray actors.

    CPU actors default to num_cpus=0: on a 2-core machine, fractional CPU reservations starve
    later tasks into pending forever; the OS shares the cores, one OpenMP thread each.
    `placement(rank)` gives extra Ray actor options per rank (a placement group bundle).
    """
    if not use_ray and workers == 1:
        return Handle(cls, obj=cls(*args, **kwargs), name=name)
    import ray  # optional: only Ray placement needs it

    env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
    host = ray.remote(_Host)
    actors = []
    for r in range(workers):
        opts = dict(num_cpus=num_cpus, num_gpus=num_gpus)   # unnamed: a restarted worker must not clash
        opts.update(placement(r) if placement else {})
        actors.append(host.options(**opts).remote(env))
    try:
        if workers == 1:
            ray.get(actors[0].start.remote(cls, args, kwargs, None), timeout=timeout)
            return Handle(cls, actor=actors[0], timeout=timeout, name=name)
        address, port = ray.get(actors[0].address.remote(), timeout=timeout)
        ray.get([a.start.remote(cls, args, kwargs, dict(rank=r, world=workers, address=address, port=port,
                                                         timeout_s=timeout))
                 for r, a in enumerate(actors)], timeout=timeout)
    except Exception:
        kill_actors(actors)
        raise
    return WorkerGroup(cls, actors, timeout=timeout, name=name)


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


def start_ray_once() -> bool:
    """Start Ray (or join the cluster at $RAY_ADDRESS) unless it runs already; whether it started it."""
    import ray  # optional: only Ray placement needs it
    if ray.is_initialized():
        return False
    start_local_ray(address=os.environ.get("RAY_ADDRESS"))
    return True


def stop_ray() -> None:
    import ray  # optional: only Ray placement needs it
    ray.shutdown()
