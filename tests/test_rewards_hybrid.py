"""The hybrid reward: format gate, what the verifiers and the RM see, weighted combination, config."""
from pathlib import Path

import pytest

from rewards.config import DEFAULT_ROUTES, RewardConfig, TaskRoute, VerifierRoute
from rewards.hybrid import RewardInput, combine, score_batch
from rewards.pool import VerifierPool
from training.config import load_config

ECHO = f"{Path(__file__).parent / 'helpers' / 'testonly_verifiers.py'}:Echo"


def cfg_with(**tasks):
    return RewardConfig(tasks=tasks, pool=RewardConfig().pool)


class FakeRM:
    def __init__(self, score=0.25):
        self.score, self.seen = score, []

    def __call__(self, items):
        self.seen += items
        return [self.score] * len(items)


def test_no_format_scores_zero_and_calls_nothing():
    rm = FakeRM()
    cfg = cfg_with(mix=TaskRoute(verifiers=(VerifierRoute(ECHO, name="echo"),), use_rm=True))
    (r,) = score_batch([RewardInput("mix", "just the answer", meta={"expect": "just the answer"})], cfg, rm=rm)
    assert r.reward == 0.0 and r.parts == {"format": 0.0, "echo": 0.0, "rm": 0.0}
    assert rm.seen == []


@pytest.mark.parametrize("response", ["<think>a</think>", "<think>a</think>x<think>b</think>y", "x<think>a</think>y"])
def test_malformed_think_blocks_are_gated(response):
    (r,) = score_batch([RewardInput("math", response, answer="7")], RewardConfig())
    assert r.reward == 0.0 and r.parts["format"] == 0.0


def test_verifiers_and_rm_see_only_the_solution():
    rm = FakeRM(0.5)
    cfg = cfg_with(mix=TaskRoute(verifiers=(VerifierRoute(ECHO, weight=3.0, name="echo"),), use_rm=True, rm_weight=1.0))
    sample = RewardInput("mix", "<think>secret thoughts</think> the solution ", prompt="Q?", images=("a.png",),
                         meta={"expect": "the solution"})
    (r,) = score_batch([sample], cfg, rm=rm)
    assert r.parts["echo"] == 1.0 and r.parts["echo/length"] == len("the solution")
    assert rm.seen == [(("a.png",), "Q?", "the solution")]
    assert r.reward == pytest.approx((3.0 * 1.0 + 1.0 * 0.5) / 4.0)


def test_weights_renormalise_over_non_abstaining_components():
    assert combine([(1.0, 1.0), (None, 5.0), (0.0, 1.0)]) == 0.5
    assert combine([(None, 1.0)]) is None
    cfg = cfg_with(mix=TaskRoute(verifiers=(VerifierRoute(ECHO, weight=2.0, name="echo"),), use_rm=True, rm_weight=1.0))
    (r,) = score_batch([RewardInput("mix", "<think>t</think>abstain")], cfg, rm=FakeRM(0.25))
    assert r.reward == 0.25 and "echo" not in r.parts
    (r,) = score_batch([RewardInput("counting", "<think>t</think>no count", answer=None)], RewardConfig())
    assert r.reward == 0.0 and r.parts["abstained"] == 1.0


def test_default_routes_score_the_synthetic_tasks():
    samples = [
        RewardInput("counting", "<think>I count 3.</think>3", answer="3"),
        RewardInput("grounding", "<think>row 1</think>[32, 4, 51, 23]", answer="[32, 4, 51, 23]", image_sizes=((84, 84),)),
        RewardInput("math", "<think>3 + 4 = 7</think>\\boxed{7}", answer="7"),
        RewardInput("math", "<think>3 + 4 = 8</think>\\boxed{8}", answer="7"),
        RewardInput("caption", "<think>x</think>A red square.", prompt="Describe."),
    ]
    out = score_batch(samples, RewardConfig(), rm=FakeRM(0.75))
    assert [r.reward for r in out] == [1.0, 1.0, 1.0, 0.0, 0.75]
    assert out[1].parts["grounding/iou"] == 1.0


def test_a_soft_verifier_rewards_the_overlap_and_judges_by_its_threshold():
    soft = VerifierRoute("temporal_grounding", settings={"mode": "soft"})
    cfg = cfg_with(video_temporal=TaskRoute(verifiers=(soft,)),
                   both=TaskRoute(verifiers=(soft, VerifierRoute(ECHO, name="echo"))))
    out = score_batch([RewardInput("video_temporal", "<think>t</think>[2.0, 4.0]", answer="[2.0, 5.0]"),
                       RewardInput("video_temporal", "<think>t</think>[2.0, 3.0]", answer="[2.0, 5.0]"),
                       RewardInput("video_temporal", "[2.0, 5.0]", answer="[2.0, 5.0]"),   # no think block
                       RewardInput("both", "<think>t</think>[2.0, 4.0]", answer="[2.0, 5.0]", meta={"expect": "no"}),
                       RewardInput("both", "<think>t</think>[2.0, 4.0]", answer="[2.0, 5.0]", meta={"expect": "[2.0, 4.0]"})],
                      cfg)
    assert [r.reward for r in out] == [pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0, pytest.approx(1 / 3),
                                       pytest.approx(5 / 6)]
    assert [r.correct for r in out] == [True, False, False, False, True]
    assert out[0].parts["temporal_grounding/correct"] == 1.0 and out[1].parts["temporal_grounding/correct"] == 0.0
    # the default route stays binary: reward and verdict agree
    (r,) = score_batch([RewardInput("video_temporal", "<think>t</think>[2.0, 4.0]", answer="[2.0, 5.0]")], RewardConfig())
    assert r.reward == 1.0 and r.correct is True and "temporal_grounding/correct" not in r.parts


def test_timeouts_and_errors_are_parts_and_score_zero():
    hang = f"{Path(__file__).parent / 'helpers' / 'testonly_verifiers.py'}:Hang"
    raise_ = f"{Path(__file__).parent / 'helpers' / 'testonly_verifiers.py'}:Raise"
    cfg = cfg_with(t=TaskRoute(verifiers=(VerifierRoute(hang, name="hang"), VerifierRoute(raise_, name="raise"))))
    with VerifierPool(workers=1, timeout_s=1.0) as pool:
        (r,) = score_batch([RewardInput("t", "<think>x</think>hang")], cfg, pool=pool)
        assert r.reward == 0.0 and r.parts["timeout"] == 1.0 and r.parts["error"] == 1.0
        (r,) = score_batch([RewardInput("t", "<think>x</think>fine")], cfg, pool=pool)
        assert r.parts["hang"] == 1.0 and r.reward == 0.5
        assert pool.stats["timeouts"] == 1 and pool.stats["errors"] == 2


def test_missing_rm_and_unknown_task_are_errors():
    with pytest.raises(ValueError, match="reward model"):
        score_batch([RewardInput("caption", "<think>x</think>y")], RewardConfig())
    with pytest.raises(KeyError):
        score_batch([RewardInput("nope", "<think>x</think>y")], RewardConfig())


def test_yaml_config_adds_and_replaces_routes(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text(
        "tasks:\n"
        "  math: {verifiers: [{verifier: math, settings: {float_rounding: 2}}]}\n"
        "  chart: {verifiers: [{verifier: counting, weight: 0.7}], use_rm: true, rm_weight: 0.3}\n"
        "pool: {workers: 0, timeout_s: 5}\n")
    cfg = load_config(RewardConfig, path, ["pool.timeout_s=7"])
    assert cfg.route("math").verifiers[0].settings["float_rounding"] == 2
    assert cfg.route("chart").rm_weight == 0.3 and cfg.route("counting") == DEFAULT_ROUTES["counting"]
    assert cfg.pool.workers == 0 and cfg.pool.timeout_s == 7.0
    out = score_batch([RewardInput("math", "<think>x</think>\\boxed{3.141}", answer="3.14")], cfg)
    assert out[0].reward == 1.0
