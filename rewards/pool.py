"""Runs verifier calls in worker processes with a per-call timeout.

A call that raises, returns a value outside [0, 1], kills its worker, or runs past `timeout_s`
scores 0 and is counted; the caller never sees an exception. A worker past its deadline is
killed (SIGKILL), reaped and replaced, so a hung check cannot block later calls nor leave a
zombie. `concurrent.futures` cannot do this (a future's timeout leaves the process running), so
each worker is a `multiprocessing` process with its own pipe and the parent tracks deadlines.

`workers=0` runs the calls in-process (for debugging): exceptions still score 0, but there is
no timeout.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Literal, Mapping

from verifiers.base import Sample, Score, load


@dataclass(frozen=True)
class Call:
    """One verifier call: the verifier (name or spec), its settings, and the sample."""

    verifier: str
    settings: Mapping[str, Any]
    sample: Sample


@dataclass(frozen=True)
class Outcome:
    value: float | None                 # None: the verifier abstained
    parts: dict[str, float] = field(default_factory=dict)
    status: Literal["ok", "timeout", "error"] = "ok"
    error: str = ""
    correct: bool | None = None         # a graded verifier's verdict (Score.correct)

    @classmethod
    def failed(cls, status: Literal["timeout", "error"], error: str) -> "Outcome":
        return cls(0.0, {}, status, error)


def _settings_key(verifier: str, settings: Mapping[str, Any]) -> str:
    return verifier + json.dumps(dict(settings), sort_keys=True, default=repr)


def _outcome(score: Any) -> Outcome:
    if not isinstance(score, Score):
        return Outcome.failed("error", f"verifier returned {type(score).__name__}, not Score")
    v = score.value
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0
                          or math.isnan(v)):
        return Outcome.failed("error", f"verifier returned value {v!r} outside [0, 1]")
    if score.correct is not None and (not isinstance(score.correct, bool) or v is None):
        return Outcome.failed("error", f"verifier returned correct={score.correct!r} with value {v!r}: "
                                       "a verdict is True or False, and only beside a value")
    parts = {str(k): float(p) for k, p in dict(score.parts).items()}
    return Outcome(None if v is None else float(v), parts, correct=score.correct)


def run_call(call: Call, cache: dict[str, Any]) -> Outcome:
    """One call in this process; any exception becomes an error outcome."""
    try:
        key = _settings_key(call.verifier, call.settings)
        if key not in cache:
            cache[key] = load(call.verifier, **dict(call.settings))
        return _outcome(cache[key](call.sample))
    except Exception as e:  # a verifier may raise anything; the caller scores it 0
        return Outcome.failed("error", f"{type(e).__name__}: {str(e)[:300]}")


READY = "ready"
STARTUP_TIMEOUT_S = 300.0   # imports on a loaded 2-core machine can take tens of seconds


def _warm_imports() -> None:
    """Import what verifiers load lazily (sympy, math-verify) before the first call, so a cold
    import never counts against a call's timeout."""
    try:
        import math_verify  # noqa: F401  (heavy: warmed once per worker)
        import sympy  # noqa: F401
    except ImportError:  # the math verifier reports its own missing dependency per call
        pass


def _worker_main(conn) -> None:
    _warm_imports()
    conn.send(READY)
    cache: dict[str, Any] = {}
    while True:
        try:
            call = conn.recv()
        except (EOFError, OSError):
            return
        if call is None:
            return
        conn.send(run_call(call, cache))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="vlrl-verifier")
        self.proc.start()
        child.close()
        self.job: tuple[int, float] | None = None   # (index of the call, start time)
        self.ready = False

    def wait_ready(self) -> bool:
        """Block until the worker finished its imports (bounded); False if it died or hung there."""
        if not self.ready and self.conn.poll(STARTUP_TIMEOUT_S):
            try:
                self.ready = self.conn.recv() == READY
            except (EOFError, OSError):
                self.ready = False
        return self.ready

    def stop(self, *, kill: bool) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                kill = True
            self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)   # reap: no zombie
        self.conn.close()


class VerifierPool:
    """`run(calls) -> outcomes` with a per-call timeout; `stats` counts calls, timeouts, errors and
    worker restarts over the pool's life. Use as a context manager or call `close()`."""

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, start_method: str = "forkserver") -> None:
        if workers < 0 or timeout_s <= 0:
            raise ValueError("VerifierPool: workers >= 0 and timeout_s > 0 required")
        self.timeout_s = float(timeout_s)
        self.stats: Counter[str] = Counter()
        self._cache: dict[str, Any] = {}
        self._ctx = multiprocessing.get_context(start_method)
        self._in_process = workers == 0
        self._closed = False
        self._workers = [_Worker(self._ctx) for _ in range(workers)]

    def wait_ready(self) -> "VerifierPool":
        """Wait until every worker has finished its imports (each bounded by STARTUP_TIMEOUT_S)."""
        for w in self._workers:
            w.wait_ready()
        return self

    @classmethod
    def from_config(cls, cfg) -> "VerifierPool":
        return cls(cfg.workers, cfg.timeout_s, cfg.start_method)

    def run(self, calls: list[Call]) -> list[Outcome]:
        if self._closed:
            raise RuntimeError("VerifierPool.run after close()")
        outcomes: list[Outcome | None] = [None] * len(calls)
        if self._in_process:
            outcomes = [run_call(c, self._cache) for c in calls]
        else:
            self._run_pooled(calls, outcomes)
        self.stats["calls"] += len(calls)
        for o in outcomes:
            if o.status != "ok":
                self.stats[o.status + "s"] += 1
        return outcomes  # type: ignore[return-value]

    def _run_pooled(self, calls: list[Call], outcomes: list) -> None:
        todo = deque(range(len(calls)))
        while todo or any(w.job for w in self._workers):
            for w in self._workers:
                if w.job is None and todo:
                    if not w.wait_ready():   # the per-call clock starts only once the worker is warm
                        self.stats["startup_failures"] += 1
                        if self.stats["startup_failures"] > 3:
                            raise RuntimeError("verifier pool: worker processes fail to start (imports?)")
                        self._replace(w)
                        continue
                    i = todo.popleft()
                    try:
                        w.conn.send(calls[i])
                        w.job = (i, time.monotonic())
                    except Exception as e:   # a dead worker (OSError), or an unpicklable sample
                        outcomes[i] = Outcome.failed("error", f"cannot send the call: {type(e).__name__}: {e}")
                        if isinstance(e, OSError):
                            self._replace(w)
            busy = [w for w in self._workers if w.job]
            if not busy:
                continue
            next_deadline = min(w.job[1] for w in busy) + self.timeout_s
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for w in busy:
                if w.conn in ready:
                    i = w.job[0]
                    try:
                        outcomes[i] = w.conn.recv()
                        w.job = None
                    except (EOFError, OSError):   # the worker died (os._exit, segfault, OOM kill)
                        outcomes[i] = Outcome.failed("error", f"worker died (exit code {w.proc.exitcode})")
                        self._replace(w)
                elif time.monotonic() - w.job[1] >= self.timeout_s:
                    outcomes[w.job[0]] = Outcome.failed("timeout", f"no result within {self.timeout_s:g} s")
                    self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.stop(kill=True)
        self._workers[self._workers.index(w)] = _Worker(self._ctx)
        self.stats["restarts"] += 1

    def close(self) -> None:
        for w in self._workers:
            w.stop(kill=w.job is not None)
        self._workers = []
        self._closed = True

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
