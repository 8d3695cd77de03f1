"""The verifier pool: per-call timeout, errors scored 0 and counted, hung workers replaced, hostile inputs."""
import os
import subprocess
import time
from pathlib import Path

import pytest

from rewards.pool import Call, VerifierPool
from verifiers import Sample

HELPERS = Path(__file__).parent / "helpers" / "testonly_verifiers.py"
TIMEOUT = 3.0


def spec(name):
    return f"{HELPERS}:{name}"


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=2, timeout_s=TIMEOUT) as p:
        yield p.wait_ready()   # cold imports are not part of any call's time


def test_hanging_verifier_times_out_and_the_next_call_works(pool):
    before = dict(pool.stats)
    calls = [Call(spec("Hang"), {}, Sample("t", r)) for r in ("ok", "hang", "ok", "ok")]
    start = time.monotonic()
    out = pool.run(calls)
    assert time.monotonic() - start < TIMEOUT + 2.0
    assert [o.status for o in out] == ["ok", "timeout", "ok", "ok"]
    assert [o.value for o in out] == [1.0, 0.0, 1.0, 1.0]
    assert pool.stats["timeouts"] == before.get("timeouts", 0) + 1
    assert pool.stats["restarts"] == before.get("restarts", 0) + 1
    again = pool.run([Call(spec("Hang"), {}, Sample("t", "ok")), Call("math", {}, Sample("math", "\\boxed{7}", "7"))])
    assert [o.value for o in again] == [1.0, 1.0]


def test_no_worker_leaks_after_a_timeout(pool):
    pool.run([Call(spec("Hang"), {}, Sample("t", "hang"))])
    children = subprocess.run(["ps", "-o", "stat=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    assert "Z" not in children.split(), children


@pytest.mark.parametrize("name, settings, status", [
    ("Raise", {}, "error"), ("Die", {}, "error"), ("BadValue", {}, "error"), ("BadValue", {"value": float("nan")}, "error"),
    ("BadValue", {"value": 0.5, "correct": 1}, "error"), ("BadValue", {"value": None, "correct": True}, "error"),
    ("BadValue", {"value": 0.5}, "ok"), ("BadValue", {"value": 0.5, "correct": True}, "ok"),
])
def test_failures_score_zero_and_are_counted(pool, name, settings, status):
    errors = pool.stats.get("errors", 0)
    (out,) = pool.run([Call(spec(name), settings, Sample("t", "x"))])
    assert out.status == status
    assert out.value == (0.5 if status == "ok" else 0.0)
    assert out.correct is (settings.get("correct") if status == "ok" else None)
    assert pool.stats.get("errors", 0) == errors + (status == "error")


def test_unknown_verifier_is_an_error_not_a_crash(pool):
    (out,) = pool.run([Call("no_such_verifier", {}, Sample("t", "x"))])
    assert out.status == "error" and "unknown verifier" in out.error


HOSTILE_MATH = [
    "\\boxed{9^{9^{9^{9}}}}", "9**9**9**9", "__import__('os').system('touch /tmp/vlrl_pwned_pool')",
    "x" * 1_000_000, "\x00\\boxed{7}\x00", "{" * 10_000, "\\boxed{" * 10_000, "\\frac{\\frac{", "\\[" * 8000,
    "$" + "(" * 30 + "7" + ")" * 30 + "$", "\ud800\udfff odd surrogates 7",
]


def test_hostile_math_through_the_pool_returns_in_time(pool):
    calls = [Call("math", {}, Sample("math", r, "7")) for r in HOSTILE_MATH]
    start = time.monotonic()
    out = pool.run(calls)
    assert time.monotonic() - start < 2 * TIMEOUT
    assert all(o.status == "ok" for o in out), [(r[:20], o) for r, o in zip(HOSTILE_MATH, out) if o.status != "ok"]
    assert all(o.value in (0.0, 1.0) for o in out)
    assert not os.path.exists("/tmp/vlrl_pwned_pool")


def test_in_process_mode_turns_exceptions_into_zero():
    with VerifierPool(workers=0) as p:
        out = p.run([Call(spec("Raise"), {}, Sample("t", "x")), Call("counting", {}, Sample("counting", "3", "3"))])
    assert [(o.status, o.value) for o in out] == [("error", 0.0), ("ok", 1.0)]
    assert p.stats["errors"] == 1


def test_run_after_close_is_an_error():
    p = VerifierPool(workers=0)
    p.close()
    with pytest.raises(RuntimeError):
        p.run([])
