"""Rejection sampling: acceptance of fabricated samples (only correct, well-formatted ones, de-duplicated,
capped; best-of-k for reward-model prompts), and `vlrl rft` end to end on the SFT'd tiny VLM."""
import dataclasses
import json
from pathlib import Path

import pytest

import recipe.cli
from recipe.rft import accept_samples, run_rft, sft_record
from rollout.types import EngineConfig
from recipe.sft import SFTConfig
from records import Record, load_records
from rewards.config import DEFAULT_ROUTES, PoolConfig, RewardConfig
from rewards.hybrid import RewardInput, RewardResult, score_batch, verdict


def vlrl(*argv) -> int:
    return recipe.cli.main([str(a) for a in argv])


def _res(reward, fmt=1.0, **parts):
    """A result as the counting route scores it (its `correct` is the route's verifiers' verdict)."""
    parts = {"format": fmt, **parts}
    return RewardResult(reward, parts, verdict(parts, DEFAULT_ROUTES["counting"]))


def test_accepts_only_correct_well_formatted_samples():
    samples = [
        ("<think>a</think>3", _res(1.0, counting=1.0)),            # 0 correct
        ("<think>a</think>4", _res(0.0, counting=0.0)),            # 1 wrong
        ("3", _res(1.0, fmt=0.0, counting=1.0)),                   # 2 right answer, no think block (gate off)
        ("<think>a</think>3 ", _res(1.0, counting=1.0)),           # 3 duplicate of 0 up to whitespace
        ("<think>b</think>3", _res(0.99, counting=0.99)),          # 4 almost right is not right
        ("<think>c</think>3", _res(1.0, counting=1.0)),            # 5 correct
        ("<think>d</think>three", _res(1.0, counting=1.0)),        # 6 correct
        ("<think>e</think>3", _res(1.0, rm=1.0)),                  # 7 an RM score alone is never "correct"
        ("<think>f</think>3", _res(1.0, counting=1.0, timeout=0.0)),  # 8 correct
    ]
    texts, results = zip(*samples)
    assert accept_samples(texts, results, mode="verifier", max_per_prompt=10) == [0, 5, 6, 8]
    assert accept_samples(texts, results, mode="verifier", max_per_prompt=2) == [0, 5]
    assert accept_samples(texts[1:3], results[1:3], mode="verifier", max_per_prompt=4) == []


def test_min_overlap_takes_the_closest_intervals_and_drops_the_half_right_ones():
    """The temporal route scores tIoU 0.5 as it scores 1.0; RFT with min_overlap keeps the exact ones."""
    texts = ["<think>a</think>[3.0, 4.0]", "<think>b</think>[3.0, 5.0]", "<think>c</think>[2.0, 5.0]",
             "<think>d</think>[0.0, 1.0]", "<think>e</think>[3, 5]"]
    inputs = [RewardInput(task="video_temporal", response=t, answer="[3.0, 5.0]") for t in texts]
    results = score_batch(inputs, RewardConfig(pool=PoolConfig(workers=0)))
    assert [r.reward for r in results] == [1.0, 1.0, 1.0, 0.0, 1.0]                  # tIoU 0.5, 1, 0.67, 0, 1
    assert accept_samples(texts, results, mode="verifier", max_per_prompt=4) == [1, 4, 2, 0]   # closest first
    assert accept_samples(texts, results, mode="verifier", max_per_prompt=4, min_overlap=0.6) == [1, 4, 2]
    assert accept_samples(texts, results, mode="verifier", max_per_prompt=1, min_overlap=1.0) == [1]
    counts = [_res(1.0, counting=1.0), _res(1.0, counting=1.0)]   # no overlap measured: as before
    assert accept_samples(["<think>a</think>3", "<think>b</think>3"], counts, mode="verifier", max_per_prompt=4,
                          min_overlap=1.0) == [0, 1]


def test_an_overlap_outside_0_1_stops_with_the_flag_or_key_named(tmp_path, capsys):
    from recipe.pipeline import PipelineConfig
    from training.config import ConfigError, load_config

    with pytest.raises(SystemExit) as stop:
        vlrl("rft", "--model", tmp_path, "--data", tmp_path / "x.jsonl", "--output-dir", tmp_path, "--min-overlap", "1.5")
    assert stop.value.code == 2 and "--min-overlap: must lie in [0, 1], got 1.5" in capsys.readouterr().err
    cfg = tmp_path / "p.yaml"
    cfg.write_text("round:\n  min_overlap: -0.1\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: round: min_overlap: must lie in \[0, 1\]"):
        load_config(PipelineConfig, cfg, [])


def test_best_of_k_takes_the_best_formatted_sample():
    texts = ["a", "<think>x</think>b", "<think>x</think>c", "<think>x</think>d"]
    results = [_res(0.0, fmt=0.0, rm=0.0), _res(0.4, rm=0.4), _res(0.9, rm=0.9), _res(0.9, rm=0.9)]
    assert accept_samples(texts, results, mode="best_of_k", max_per_prompt=4) == [2]   # ties: the first
    assert accept_samples(texts[:1], results[:1], mode="best_of_k", max_per_prompt=4) == []
    with pytest.raises(ValueError):
        accept_samples(texts, results, mode="both", max_per_prompt=4)


def test_sft_record_layout(tmp_path):
    rec = Record(id="count-1", task="counting", images=[tmp_path / "a.png"],
                 messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}],
                 answer="3", meta={"difficulty": 0.5})
    out = sft_record(rec, "<think>x</think>3", 2, reward=1.0)
    assert out.id == "count-1-rft2" and out.target == "<think>x</think>3" and out.prompt_messages == rec.messages
    assert out.meta["rft"] == {"source_id": "count-1", "reward": 1.0} and out.meta["difficulty"] == 0.5
    assert rec.messages[-1]["role"] == "user"   # the source record is untouched


def test_vlrl_rft_end_to_end(tmp_path, sft_run):
    rows = [json.loads(line) for line in Path(sft_run["data"]["rl"]).read_text().splitlines()]
    picked = [r for t in ("counting", "math") for r in [r for r in rows if r["task"] == t][:8]]
    src_dir = Path(sft_run["data"]["rl"]).parent
    for r in picked:
        r["images"] = [str((src_dir / p).resolve()) for p in r["images"]]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in picked))
    out = tmp_path / "round1"
    # greedy (temperature 0): the k samples of a prompt are identical, so de-duplication leaves one, and
    # the SFT'd model's ~40% greedy accuracy makes some accepted samples all but certain on 16 prompts
    rc = vlrl("rft", "--model", sft_run["final"], "--data", data, "--k", 2, "--temperature", 0, "--backend", "hf",
              "--max-tokens", 40, "--max-per-prompt", 2, "--output-dir", out, "--no-train",
              "--reward-set", "pool.workers=0", "--quiet")
    assert rc == 0
    summary = json.loads((out / "rft.json").read_text())
    assert summary["counts"]["prompts"] == 16 and summary["counts"]["samples"] == 32 and summary["sft"] is None
    assert not (out / "sft").exists()
    n = summary["counts"]["accepted"]
    assert n > 0, "the SFT'd tiny VLM should solve some of the easy prompts"
    recs = load_records(out / "rft_sft.jsonl", require="target")
    assert len(recs) == n
    ids = {r["id"]: r for r in picked}
    per_prompt = {}
    for r in recs:
        src, _, j = r.id.rpartition("-rft")
        per_prompt.setdefault(src, []).append(int(j))
        assert r.images[0] == Path(ids[src]["images"][0]) and r.answer == ids[src]["answer"]
    assert all(js == [0] for js in per_prompt.values())   # identical greedy samples: one kept per prompt
    # every accepted response, scored again, is correct and well formatted
    again = score_batch([RewardInput(task=r.task, response=r.target, answer=r.answer, image_sizes=((84, 84),))
                         for r in recs], RewardConfig(pool=PoolConfig(workers=0)))
    assert all(x.reward == 1.0 and x.parts["format"] == 1.0 for x in again)


def test_rft_trains_the_next_model(tmp_path, sft_run):
    """The SFT leg: a 1-step SFT from the accepted records lands in D/sft/final."""
    rows = [json.loads(line) for line in Path(sft_run["data"]["rl"]).read_text().splitlines() if '"counting"' in line][:6]
    src_dir = Path(sft_run["data"]["rl"]).parent
    for r in rows:
        r["images"] = [str((src_dir / p).resolve()) for p in r["images"]]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = dataclasses.replace(SFTConfig(), steps=1, batch_size=2, save_every=0, eval_data=None)
    s = run_rft(str(sft_run["final"]), str(data), str(tmp_path / "d"), k=2, reward_cfg=RewardConfig(pool=PoolConfig(workers=0)),
                sft_cfg=sft, engine=EngineConfig(backend="hf"), max_tokens=40, temperature=0.0, progress=False)
    if s["counts"]["accepted"] == 0:
        pytest.skip("no accepted sample on these prompts")
    assert (tmp_path / "d" / "sft" / "final" / "model.safetensors").is_file()
    assert s["sft"]["final"].endswith("final") and json.loads((tmp_path / "d" / "rft.json").read_text())["sft"]
