"""The RM as the hybrid reward's `rm=` callable, and `vlrl score --rm DIR` on caption lines."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.load import load_processor
from model.reward import REWARD_CONFIG_FILE, RewardModel
from rewards.config import RewardConfig
from rewards.hybrid import RewardInput, score_batch
from rewards.rm import RewardModelScorer, to_unit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """An RM folder started from the tiny policy, with a non-trivial head."""
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        rm.critic.value_head.weight.normal_(std=0.3)
    out = tmp_path_factory.mktemp("rm") / "rm"
    rm.save_pretrained(out)
    load_processor(tiny_model_dir).save_pretrained(out)
    assert json.loads((out / REWARD_CONFIG_FILE).read_text()) == {"pooling": "last"}
    return out


def caption_images(suite_dir, k=2):
    return sorted((suite_dir / "img").glob("heldout-caption-*.png"))[:k]


def test_to_unit_is_a_stable_sigmoid():
    assert to_unit(0.0) == 0.5 and to_unit(2.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert to_unit(-1000.0) == 0.0 and to_unit(1000.0) == 1.0
    assert to_unit(3.0, offset=1.0, temperature=2.0) == pytest.approx(to_unit(1.0))
    assert to_unit(-7.5, mapping="raw") == -7.5


def test_scorer_batches_prompts_and_hybrid_reward(rm_dir, suite_dir):
    scorer = RewardModelScorer(rm_dir, batch_size=2)
    img = str(caption_images(suite_dir)[0])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    items = [([img], "Describe the image.", "A red square."), ([img], msgs, "A red square."),
             ([img], "Describe the image.", "A blue circle and a green square.")]
    raw = scorer.raw(items)
    assert raw[0] == pytest.approx(raw[1], abs=1e-5)          # a text prompt = the same user turn as messages
    assert raw[0] != pytest.approx(raw[2], abs=1e-4)          # the solution matters
    alone = scorer.raw(items[2:])                              # batching and padding change nothing
    assert alone[0] == pytest.approx(raw[2], abs=1e-4)
    assert scorer(items) == pytest.approx([to_unit(r) for r in raw])

    cfg = RewardConfig()
    samples = [RewardInput(task="caption", response="<think>two</think>A red square.", prompt="Describe the image.",
                           images=(img,)),
               RewardInput(task="caption", response="A red square.", prompt="Describe the image.", images=(img,))]
    results = score_batch(samples, cfg, rm=scorer)
    # The RM sees the solution only: same score as scoring "A red square." directly.
    assert results[0].parts["rm"] == pytest.approx(scorer(items[:1])[0], abs=1e-6)
    assert results[0].reward == pytest.approx(results[0].parts["rm"])
    assert results[1].reward == 0.0 and results[1].parts["rm"] == 0.0   # format gate


def test_vlrl_score_with_rm(tmp_path, rm_dir, suite_dir):
    im0, im1 = caption_images(suite_dir)
    rows = [{"task": "caption", "response": "<think>I see one shape.</think>A red square.",
             "prompt": "Describe the image.", "images": [f"img/{im0.name}"]},
            {"task": "caption", "response": "no think block", "prompt": "Describe the image.",
             "images": [f"img/{im1.name}"]},
            {"task": "counting", "response": "<think>x</think>3", "answer": "3"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "img").symlink_to(suite_dir / "img")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "recipe.cli", "score", str(src), "-o", str(tmp_path / "out.jsonl"),
           "--set", "pool.workers=0"]
    r = subprocess.run(cmd + ["--rm", str(rm_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert 0.0 < out[0]["parts"]["rm"] < 1.0 and out[0]["reward"] == pytest.approx(out[0]["parts"]["rm"])
    assert out[1]["parts"] == {"format": 0.0, "rm": 0.0}
    assert "rm" not in out[2]["parts"] and out[2]["reward"] == 1.0
    expected = RewardModelScorer(rm_dir)([([str(im0)],
                                           "Describe the image.", "A red square.")])
    assert out[0]["parts"]["rm"] == pytest.approx(expected[0], abs=1e-5)

    r = subprocess.run(cmd + ["--rm", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--rm" in r.stderr, r.stderr
