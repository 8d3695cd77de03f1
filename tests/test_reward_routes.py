"""The reward contract for users: the routed tasks are the known tasks everywhere, config mistakes are
refused at load time with one line naming the key, and the pairwise judge is a reward component."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from recipe.reward_config import load_reward_config
from rewards.config import JudgeConfig, RewardConfig, TaskRoute, VerifierRoute
from rewards.hybrid import RewardInput, score_batch
from rewards.judge import TimedJudge
from rl.config import RLConfig
from rl.workers import RewardWorker
from training.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ECHO = f"{REPO / 'tests' / 'helpers' / 'testonly_verifiers.py'}:Echo"


def rl_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "rl.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("reward, needle", [
    ("tasks: {t: {verifiers: [{verifier: no_such_verifier}]}}",
     "reward.tasks.t.verifiers[0]: verifier: unknown verifier 'no_such_verifier'"),
    ("tasks: {t: {verifiers: [{verifier: missing.py:Name}]}}", "reward.tasks.t.verifiers[0]: verifier: ValueError"),
    (f"tasks: {{t: {{verifiers: [{{verifier: '{REPO}/tests/helpers/testonly_verifiers.py:Nope'}}]}}}}",
     "defines no 'Nope'"),
    ("tasks: {t: {verifiers: [{verifier: grounding, settings: {radius: 3}}]}}",
     "reward.tasks.t.verifiers[0]: settings: 'radius' is not a setting of 'grounding' (settings: mode,"),
    ("tasks: {t: {verifiers: [{verifier: grounding, settings: {accept: [point]}}]}}",
     "reward.tasks.t.verifiers[0]: settings: 'grounding' refuses"),
    ("tasks: {t: {verifiers: [{verifier: counting, weight: -1}]}}", "reward.tasks.t.verifiers[0]: weight: must be >= 0"),
    ("tasks: {t: {use_judge: true}}", "reward: judge.model: not set, but tasks ['t'] use the judge"),
])
def test_route_mistakes_are_refused_when_the_config_loads(tmp_path, reward, needle):
    path = rl_yaml(tmp_path, f"reward: {{{reward}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(RLConfig, path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_tasks_named_in_weights_and_kl_need_a_route(tmp_path):
    with pytest.raises(ConfigError, match=r"task_weights: task\(s\) \['juggling'\] have no reward route"):
        load_config(RLConfig, rl_yaml(tmp_path, "task_weights: {juggling: 2}\n"))
    with pytest.raises(ConfigError, match=r"kl.coefs: task\(s\) \['juggling'\]"):
        load_config(RLConfig, rl_yaml(tmp_path, "kl: {coefs: {juggling: 0.1}}\n"))
    cfg = load_config(RLConfig, rl_yaml(tmp_path, "task_weights: {juggling: 2}\n"
                                                  f"reward: {{tasks: {{juggling: {{verifiers: [{{verifier: '{ECHO}'}}]}}}}}}\n"))
    assert "juggling" in cfg.reward.known_tasks and "counting" in cfg.reward.known_tasks


def test_inputs_have_no_default_in_runs_and_a_missing_one_names_its_key(tmp_path, tiny_model_dir):
    assert RLConfig().eval_data is None and RLConfig().policy == "" and RLConfig().data == ""
    with pytest.raises(ConfigError, match="^policy: not set"):
        RLConfig().check_inputs()
    with pytest.raises(ConfigError, match="^data: nope.jsonl: not found"):
        RLConfig(policy=str(tiny_model_dir), data="nope.jsonl").check_inputs()
    with pytest.raises(ConfigError, match="^eval_data: held.jsonl: not found"):
        RLConfig(policy=str(tiny_model_dir), data=str(tiny_model_dir / "config.json"), eval_data="held.jsonl").check_inputs()
    with pytest.raises(ConfigError, match="^reward_model: .*not a model folder"):
        RLConfig(policy=str(tiny_model_dir), data=str(tiny_model_dir / "config.json"),
                 reward_model=str(tmp_path)).check_inputs()


def test_rl_refuses_rm_routed_data_without_a_reward_model_before_starting(tmp_path, tiny_model_dir):
    Image.new("RGB", (84, 84)).save(tmp_path / "a.png")
    rec = {"id": "c1", "task": "caption", "images": ["a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]}
    (tmp_path / "rl.jsonl").write_text(json.dumps(rec) + "\n")
    config = rl_yaml(tmp_path, f"policy: {tiny_model_dir}\ndata: rl.jsonl\nout: run\nrollout: {{backend: hf}}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "recipe.cli", "rl", "--config", str(config), "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip()
    assert line.startswith("vlrl rl: error: reward_model: not set, but tasks ['caption']") and "\n" not in line
    assert "reward.tasks.caption" in line and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_loader_reads_the_routes_of_any_config(tmp_path):
    route = f"{{verifiers: [{{verifier: '{ECHO}'}}]}}"
    files = {"reward.yaml": (f"tasks: {{x: {route}}}\n", "tasks"),
             "rl.yaml": (f"steps: 3\nreward: {{tasks: {{x: {route}}}}}\n", "reward.tasks"),
             "pipeline.yaml": (f"run_dir: r\nrl: {{reward: {{tasks: {{x: {route}}}}}}}\n", "rl.reward.tasks")}
    for name, (text, key) in files.items():
        (tmp_path / name).write_text(text)
        cfg, got = load_reward_config(str(tmp_path / name), ["pool.workers=0"])
        assert got == key and "x" in cfg.known_tasks and cfg.pool.workers == 0, name
    assert load_reward_config(None) == (RewardConfig(), "reward.tasks")


class LengthJudge:
    """P(x better than y) = 0.5 + (len(x) - len(y)) / 100, recording the pairs it was asked."""

    def __init__(self):
        self.pairs = []

    def __call__(self, pairs):
        self.pairs += pairs
        return [0.5 + (len(x) - len(y)) / 100 for _, _, x, y in pairs]


def _judged(reference: str) -> RewardConfig:
    return RewardConfig(tasks={"story": TaskRoute(use_judge=True, judge_weight=1.0),
                               "mixed": TaskRoute(verifiers=(VerifierRoute(ECHO, name="echo"),), use_judge=True,
                                                  judge_weight=3.0)},
                        judge=JudgeConfig(model="unused", reference=reference))


def test_judge_scores_each_sample_against_its_reference_answer():
    judge = LengthJudge()
    samples = [RewardInput("story", "<think>t</think>" + "x" * 20, answer="y" * 10),
               RewardInput("story", "<think>t</think>" + "x" * 5, meta={"reference": "y" * 10}),
               RewardInput("story", "<think>t</think>no reference"),
               RewardInput("story", "unformatted", answer="y"),
               RewardInput("mixed", "<think>t</think>" + "z" * 10, answer="y" * 10, meta={"expect": "z" * 10})]
    out = score_batch(samples, _judged("answer"), judge=judge)
    assert [r.parts.get("judge") for r in out] == [pytest.approx(0.6), pytest.approx(0.45), None, 0.0, 0.5]
    assert out[2].parts["abstained"] == 1.0 and out[3].reward == 0.0
    assert out[4].reward == pytest.approx((1.0 + 3 * 0.5) / 4) and out[4].correct is True   # the judge never decides correct
    assert [p[2:] for p in judge.pairs] == [("x" * 20, "y" * 10), ("x" * 5, "y" * 10), ("z" * 10, "y" * 10)]
    with pytest.raises(ValueError, match="no judge was given"):
        score_batch(samples[:1], _judged("answer"))


def test_judge_compares_each_sample_with_the_rest_of_its_group():
    judge = LengthJudge()
    texts = ["a" * 10, "a" * 20, "a" * 30]
    samples = [RewardInput("story", f"<think>t</think>{t}", group=0) for t in texts]
    samples += [RewardInput("story", "<think>t</think>alone", group=1), RewardInput("story", "no format", group=1)]
    out = score_batch(samples, _judged("group"), judge=judge)
    # P(10 > 20) = 0.4, P(10 > 30) = 0.3 -> 0.35; 20: (0.6 + 0.4) / 2; 30: (0.7 + 0.6) / 2
    assert [out[i].parts["judge"] for i in range(3)] == [pytest.approx(0.35), pytest.approx(0.5), pytest.approx(0.65)]
    assert "judge" not in out[3].parts and out[3].parts["abstained"] == 1.0   # alone among the formatted
    assert len(judge.pairs) == 3                                                # each unordered pair once


def test_reward_worker_serves_the_judge_and_counts_its_cost(tiny_model_dir):
    cfg = RewardConfig(tasks={"story": TaskRoute(use_judge=True)}, pool=RewardConfig().pool.__class__(workers=0),
                       judge=JudgeConfig(model=str(tiny_model_dir), reference="group"))
    worker = RewardWorker(cfg)
    assert isinstance(worker.judge, TimedJudge)
    Image.new("RGB", (84, 84), "red").save(tiny_model_dir.parent / "judge.png")
    img = (str(tiny_model_dir.parent / "judge.png"),)
    samples = [RewardInput("story", f"<think>t</think>{t}", prompt="Describe.", images=img, group=0)
               for t in ("A red square.", "A blue circle.", "Red.")]
    out = worker.score(samples)
    assert all(0.0 < r.parts["judge"] < 1.0 for r in out)
    assert sum(r.parts["judge"] for r in out) == pytest.approx(1.5, abs=1e-4)   # both orders: P(x>y) + P(y>x) = 1
    cost = worker.take_cost()
    assert cost["judge/calls"] == 6 and cost["judge/seconds"] > 0   # 3 pairs, each asked in both orders
    assert worker.take_cost() == {"judge/seconds": 0.0, "judge/calls": 0.0}
    worker.close()
