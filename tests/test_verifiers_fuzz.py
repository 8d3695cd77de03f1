"""Property-based fuzz of every shipped verifier (Hypothesis, the strategies of bench/fuzz_verifiers.py):
each hostile response runs through the verifier pool, whose per-call timeout bounds its time. No
exception, a value in [0, 1] or an abstention, and no timeout. The longer run is the bench."""
import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz_verifiers import CASES, calls, check, shipped
from rewards.pool import VerifierPool

TIMEOUT_S = 30.0   # generous on a loaded machine: a verifier that can hang still hits it


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(workers=1, timeout_s=TIMEOUT_S) as p:
        yield p.wait_ready()


def test_every_shipped_verifier_is_fuzzed():
    assert set(shipped()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_responses_score_in_range_without_error_or_timeout(pool, name):
    @settings(max_examples=40, database=None, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(calls(name))
    def holds(call):
        (outcome,) = pool.run([call])
        problem = check(outcome)
        assert problem is None, f"{problem} on settings {call.settings}, response {call.sample.response[:200]!r}"

    holds()
    assert pool.stats["timeouts"] == 0 and pool.stats["errors"] == 0
