"""The difficulty filter: band parsing and selection (table incl. the edges), the per-prompt verdict
from fabricated rewards, and `vlrl filter` end to end on the SFT'd tiny VLM (hf backend)."""
import ast
import json
from pathlib import Path

import pytest

import recipe.cli
from recipe.filter import judge_group, output_paths
from rewards.config import DEFAULT_ROUTES, TaskRoute, VerifierRoute
from rewards.hybrid import RewardResult
from rl.algos import difficulty

ROOT = Path(__file__).resolve().parents[1]


def vlrl(*argv) -> int:
    """`vlrl ...` in this process."""
    return recipe.cli.main([str(a) for a in argv])


@pytest.mark.parametrize("text, band", [("0.1,0.9", (0.1, 0.9)), ("0,1", (0.0, 1.0)), (" 0.5 , 0.5 ", (0.5, 0.5))])
def test_parse_band_ok(text, band):
    assert difficulty.parse_band(text) == band


@pytest.mark.parametrize("text, msg", [("0.9,0.1", "above HIGH"), ("2,3", "in [0, 1]"), ("-0.1,0.5", "in [0, 1]"),
                                       ("0.5", "LOW,HIGH"), ("a,b", "numbers"), ("0.1,0.5,0.9", "LOW,HIGH")])
def test_parse_band_rejects(text, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        difficulty.parse_band(text)


# (pass rate, kept by band [0.1, 0.9]): both edges inclusive, tolerant of float rounding at the edge
BAND_TABLE = [(0.0, False), (0.0999, False), (0.1, True), (0.1 - 1e-12, True), (0.125, True), (0.5, True),
              (0.875, True), (0.9, True), (0.9 + 1e-12, True), (0.9001, False), (1.0, False)]


def select_in_band(rates, *, low, high):
    return [difficulty.in_band(r, low=low, high=high) for r in rates]


def test_in_band_table():
    rates, expected = zip(*BAND_TABLE)
    assert select_in_band(rates, low=0.1, high=0.9) == list(expected)
    # pass rates as the filter computes them from k = 10 binary scores land exactly on the edges
    assert difficulty.in_band(difficulty.pass_rate([1] + [0] * 9), low=0.1, high=0.9)
    assert difficulty.in_band(difficulty.pass_rate([1] * 9 + [0]), low=0.1, high=0.9)
    assert select_in_band([0.0, 1.0], low=0.0, high=1.0) == [True, True]


def test_spread_and_histogram():
    assert difficulty.score_std([0.5, 0.5, 0.5]) == 0.0 and difficulty.score_std([0.0, 1.0]) == 0.5
    assert difficulty.select_by_spread([0.0, 0.049, 0.05, 0.3], min_std=0.05) == [False, False, True, True]
    edges = difficulty.histogram_edges(4)
    assert edges == [0.0, 0.125, 0.375, 0.625, 0.875, 1.0]
    assert difficulty.histogram([0.0, 0.25, 0.25, 1.0, 0.5, 0.75], edges) == [1, 2, 1, 1, 1]


def test_difficulty_module_is_pure():
    tree = ast.parse((ROOT / "rl" / "algos" / "difficulty.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert set(names) <= {"__future__", "math", "typing"}, names


def _res(reward, fmt=1.0, **parts):
    return RewardResult(reward, {"format": fmt, **parts})


def test_verdict_verifier_task_uses_gated_verifier_mean():
    route = DEFAULT_ROUTES["counting"]
    group = [_res(1.0, counting=1.0), _res(0.0, fmt=0.0, counting=0.0), _res(0.0, counting=0.0), _res(1.0, counting=1.0)]
    v = judge_group(group, route, low=0.1, high=0.9, min_std=0.05)
    assert v.keep and v.reason == "in_band" and v.pass_rate == 0.5 and v.reward_std is None
    solved = judge_group([_res(1.0, counting=1.0)] * 4, route, low=0.1, high=0.9, min_std=0.05)
    assert not solved.keep and solved.reason == "above_band" and solved.pass_rate == 1.0
    hopeless = judge_group([_res(0.0, fmt=0.0, counting=0.0)] * 4, route, low=0.1, high=0.9, min_std=0.05)
    assert not hopeless.keep and hopeless.reason == "below_band" and hopeless.pass_rate == 0.0
    # the band edge itself is kept: 1 of 4 with band [0.25, 0.75]
    edge = judge_group([_res(1.0, counting=1.0)] + [_res(0.0, counting=0.0)] * 3, route, low=0.25, high=0.75, min_std=0)
    assert edge.keep and edge.pass_rate == 0.25


def test_verdict_leaves_the_reward_model_out_of_the_pass_rate():
    route = TaskRoute(verifiers=(VerifierRoute("math"),), use_rm=True)
    group = [_res(0.6, math=1.0, rm=0.2), _res(0.1, math=0.0, rm=0.2)]
    v = judge_group(group, route, low=0.1, high=0.9, min_std=0.05)
    assert v.pass_rate == 0.5 and v.keep


def test_verdict_rm_task_uses_reward_spread():
    route = DEFAULT_ROUTES["caption"]
    flat = judge_group([_res(0.7, rm=0.7)] * 4, route, low=0.1, high=0.9, min_std=0.05)
    assert not flat.keep and flat.reason == "flat_reward" and flat.pass_rate is None and flat.reward_std == 0.0
    spread = judge_group([_res(0.2, rm=0.2), _res(0.8, rm=0.8)], route, low=0.1, high=0.9, min_std=0.05)
    assert spread.keep and spread.reason == "reward_spread" and spread.reward_std == pytest.approx(0.3)


def test_output_paths():
    p = output_paths("/x/rl.jsonl")
    assert {k: v.name for k, v in p.items()} == {"kept": "rl.jsonl", "dropped": "rl.dropped.jsonl",
                                                  "summary": "rl.filter.json", "plot": "rl.filter.png"}


def _write_subset(src: Path, dst: Path, n_per_task: int, tasks=("counting", "math")) -> list[dict]:
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    picked = [r for t in tasks for r in [r for r in rows if r["task"] == t][:n_per_task]]
    for r in picked:  # keep the images where they are: paths relative to the new file
        r["images"] = [str((src.parent / p).resolve()) for p in r["images"]]
    dst.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return picked


def test_vlrl_filter_end_to_end(tmp_path, sft_run):
    data = tmp_path / "in.jsonl"
    picked = _write_subset(Path(sft_run["data"]["rl"]), data, 3)
    caption = {**picked[0], "id": "cap-0", "task": "caption"}
    caption.pop("answer")
    with open(data, "a") as f:   # an RLHF prompt: no --rm, so it is skipped with a reason
        f.write(json.dumps(caption) + "\n")
    out = tmp_path / "f" / "kept.jsonl"
    rc = vlrl("filter", "--model", sft_run["final"], "--data", data, "--k", 4, "--band", "0.25,0.75",
              "--backend", "hf", "--max-tokens", 40, "--output", out, "--reward-set", "pool.workers=0", "--quiet")
    assert rc == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    dropped = [json.loads(line) for line in (tmp_path / "f" / "kept.dropped.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in kept + dropped) == sorted([r["id"] for r in picked] + ["cap-0"])   # nothing lost
    for r in kept + dropped:
        if r["task"] == "caption":
            assert r["meta"]["pass_rate"] is None and r["meta"]["drop_reason"] == "no_reward_model"
            continue
        rate = r["meta"]["pass_rate"]
        assert rate in {0.0, 0.25, 0.5, 0.75, 1.0} and r["meta"]["difficulty"] == pytest.approx(1 - rate)
        assert (0.25 <= rate <= 0.75) == (r in kept)
        assert (tmp_path / "f" / r["images"][0]).is_file()   # images relative to the output file
    summary = json.loads((tmp_path / "f" / "kept.filter.json").read_text())
    assert summary["counts"] == {"total": 7, "kept": len(kept), "dropped": len(dropped),
                                 "by_reason": summary["counts"]["by_reason"]}
    assert summary["counts"]["by_reason"]["no_reward_model"] == 1
    assert sum(summary["histogram"]["before"]) == 6 and sum(summary["histogram"]["after"]) == len(kept)
    assert summary["tasks"]["counting"]["total"] == 3 and summary["histogram"]["labels"][1] == "1/4"
    assert (tmp_path / "f" / "kept.filter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("band, msg", [("0.9,0.1", "LOW (0.9) is above HIGH (0.1)"), ("2,3", "must lie in [0, 1]")])
def test_bad_band_exits_2(tmp_path, capsys, band, msg):
    with pytest.raises(SystemExit) as e:
        vlrl("filter", "--model", tmp_path, "--data", tmp_path / "x.jsonl", "--band", band, "--output", tmp_path / "o.jsonl")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --band" in err and msg in err
