"""`vlrl report` renders a fake run folder (SFT, RL, filter, RFT stages) and an SFT-only one: the HTML
references only PNGs that exist, and every expected chart is there."""
import json
import re
import time

import recipe.cli
from recipe.filter import Verdict, summarize


def vlrl(*argv) -> int:
    return recipe.cli.main([str(a) for a in argv])


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _done(stage_dir):
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "done.json").write_text("{}")
    time.sleep(0.01)   # stage order falls back to done.json times


def _table(acc_c, acc_m):
    return {"counting": {"n": 10, "format": 1.0, "accuracy": acc_c}, "math": {"n": 10, "format": 0.9, "accuracy": acc_m},
            "caption": {"n": 5, "format": 1.0, "accuracy": None},
            "all": {"n": 25, "format": 0.96, "accuracy": (acc_c + acc_m) / 2}}


def _sft_stage(run):
    _done(run / "model")
    _done(run / "data")
    _jsonl(run / "sft" / "metrics.jsonl", [{"step": s, "time": 0, "train/loss": 3.0 / s} for s in (10, 20, 30)]
           + [{"step": 30, "time": 0, "eval/counting/accuracy": 0.5}])
    (run / "sft" / "eval.json").write_text(json.dumps(_table(0.5, 0.3)))
    _done(run / "sft")


def _img_srcs(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _check_images(run, page):
    srcs = _img_srcs(page)
    assert srcs and len(srcs) == len(set(srcs))
    for s in srcs:
        assert (run / s).is_file() and (run / s).read_bytes()[:4] == b"\x89PNG", s
    return {s.split("/")[-1] for s in srcs}


def test_report_of_a_full_round(tmp_path):
    run = tmp_path / "run"
    _sft_stage(run)
    rl_rows = [{"step": s, "time": 0, "reward/counting/total": 0.1 * s, "reward/counting/format": 0.9,
                "reward/counting/counting": 0.1 * s, "reward/counting/timeout": 0.0, "reward/math/total": 0.05 * s,
                "reward/math/format": 1.0, "reward/math/math": 0.05 * s, "reward/math/math/parse": 1.0,
                "reward/all/total": 0.07 * s, "kl/counting": 0.0, "kl/math": 0.01 * s, "actor/loss": 0.1}
               for s in range(1, 6)] + [{"step": 5, "time": 0, "eval/counting/accuracy": 0.7}]
    _jsonl(run / "rl1" / "metrics.jsonl", rl_rows)
    (run / "rl1" / "eval.json").write_text(json.dumps(_table(0.7, 0.4)))
    # the reward model's stage has an eval.json of another schema (pairwise accuracy): not a held-out table
    (run / "rm").mkdir()
    (run / "rm" / "eval.json").write_text(json.dumps({"step": 300, "data": "prefs.jsonl", "n": 200,
                                                      "pairwise_accuracy": 1.0, "by_corruption": {}}))
    _done(run / "rm")
    _done(run / "rl1")
    verdicts = ([Verdict(True, "in_band", pass_rate=0.5)] * 3 + [Verdict(False, "above_band", pass_rate=1.0)] * 4
                + [Verdict(False, "below_band", pass_rate=0.0)] * 2 + [Verdict(False, "no_reward_model")])

    class R:
        def __init__(self, task):
            self.task = task
    recs = [R("counting")] * 5 + [R("math")] * 4 + [R("caption")]
    filt = {"k": 4, "band": [0.1, 0.9], "model": "rl1/final", **summarize(recs, verdicts, k=4)}
    (run / "filter1").mkdir()
    (run / "filter1" / "rl.filter.json").write_text(json.dumps(filt))
    _done(run / "filter1")
    (run / "rft1").mkdir()
    (run / "rft1" / "rft.json").write_text(json.dumps(
        {"k": 4, "counts": {"prompts": 3, "accepted": 5, "prompts_with_accepted": 3},
         "tasks": {"counting": {"prompts": 2, "samples": 8, "formatted": 8, "accepted": 4, "prompts_with_accepted": 2}}}))
    _jsonl(run / "rft1" / "sft" / "metrics.jsonl", [{"step": 5, "time": 0, "train/loss": 1.0}])
    _done(run / "rft1")
    rl1 = _table(0.7, 0.4)
    rl1["counting"].update(n_distinct=8, distinct_accuracy=0.625)   # the held-out file repeats two prompts
    summary = {"stages": {"sft": _table(0.5, 0.3), "rl1": rl1, "rft1": _table(0.8, 0.45)},
               "final_model": "rft1/sft/final"}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "report").mkdir()
    (run / "report" / "stale.png").write_bytes(b"old")   # from an earlier report: must go

    assert vlrl("report", run) == 0
    page = (run / "report.html").read_text()
    names = _check_images(run, page)
    assert names == {"accuracy.png", "data.png", "loss_sft.png", "reward_rl1.png", "kl_rl1.png",
                     "filter_filter1_rl.png", "loss_rft1.png"}
    assert not (run / "report" / "stale.png").exists()
    assert page.index("Stage sft") < page.index("Stage rl1") < page.index("Stage rft1")   # run order
    assert "kept 3 of 10" in page and "no_reward_model" in page and "0.800" in page     # rft1 accuracy from summary
    assert "counting accuracy, distinct prompts" in page and "0.625" in page
    assert "math accuracy, distinct prompts" not in page


def test_report_of_an_sft_only_run(tmp_path):
    run = tmp_path / "run"
    _sft_stage(run)
    (run / "summary.json").write_text(json.dumps({"stages": {"sft": _table(0.5, 0.3)}}))
    assert vlrl("report", run) == 0
    assert _check_images(run, (run / "report.html").read_text()) == {"accuracy.png", "loss_sft.png"}
    # a bare SFT run folder (what `vlrl sft` writes) reads as one stage
    bare = run / "sft"
    assert vlrl("report", bare) == 0
    assert _check_images(bare, (bare / "report.html").read_text()) == {"accuracy.png", "loss_sft.png"}


def test_report_of_a_missing_folder_exits_2(tmp_path, capsys):
    assert vlrl("report", tmp_path / "nope") == 2
    assert "not a folder" in capsys.readouterr().err
