"""The pipeline: every stage in order, a finished stage is never re-run, and the report renders."""
import json
from types import SimpleNamespace as R

import pytest

import recipe.pipeline
import rl.driver
from recipe.pipeline import PipelineConfig, _reward_model, accuracy_table, run_pipeline
from records.mixture import mix_replay
from training.config import load_config


@pytest.mark.slow
def test_interrupted_pipeline_resumes_without_rerunning_finished_stages(tmp_path, monkeypatch, sft_run):
    overrides = [f"run_dir={tmp_path / 'run'}", f"model={sft_run['final']}", "data.seed=1", "data.color_questions=0", "data.n=40", "data.n_heldout=5", "data.n_rl=10",
                 "sft.steps=3", "sft.batch_size=8", "rm.enabled=false",
                 "rl.steps=1", "rl.prompts_per_step=4", "rl.rollout.backend=hf", "rl.rollout.n=2",
                 "rl.rollout.max_tokens=16", "rl.reward.pool.workers=0",
                 "rl.reward.tasks={caption: {verifiers: [{verifier: instruction, settings: {min_words: 2}}]}}",
                 "rounds=1", "round.k=4", "round.max_prompts=16", "round.temperature=0.5", "round.band=[0.0, 1.0]", "round.max_tokens=16",
                 "round.sft.steps=1", "round.rl_steps=1", "round.replay=1.0", "round.rl_replay=0.5"]
    cfg = load_config(PipelineConfig, None, overrides)
    real_fit = recipe.pipeline.fit
    calls = []

    def fit_dies_in_round_one(rcfg, **kw):
        calls.append(rcfg.out)
        if rcfg.out.endswith("rl1"):
            raise SystemExit("killed between stages")
        return real_fit(rcfg, **kw)

    monkeypatch.setattr(recipe.pipeline, "fit", fit_dies_in_round_one)
    with pytest.raises(SystemExit):
        run_pipeline(cfg)
    run = tmp_path / "run"
    done_before = {s: (run / s / "done.json").stat().st_mtime_ns for s in ("model", "data", "sft", "rl", "filter1", "rft1")}
    assert not (run / "rl1" / "done.json").exists()

    monkeypatch.setattr(recipe.pipeline, "fit", real_fit)
    summary = run_pipeline(cfg)
    for stage, mtime in done_before.items():   # finished stages were skipped, not redone
        assert (run / stage / "done.json").stat().st_mtime_ns == mtime, stage
    assert summary["order"] == ["sft", "rl", "rft1", "rl1"]
    assert (run / "rl1" / "done.json").is_file() and (run / "report.html").is_file()
    accepted = json.loads((run / "rft1" / "done.json").read_text())["accepted"]
    assert accepted > 0
    # replay 1.0: the RFT data hold the accepted samples plus as many SFT records
    mixed = [json.loads(line)["id"] for line in (run / "rft1" / "rft_replay.jsonl").read_text().splitlines()]
    assert len(mixed) == 2 * accepted and sum(i.startswith("sft-") for i in mixed) == accepted
    kept = (run / "filter1" / "rl.jsonl").read_text().splitlines()
    assert all("pass_rate" in json.loads(line)["meta"] for line in kept)
    # rl_replay 0.5: the round's RL prompts are the kept ones plus half as many from outside them
    rl1_prompts = json.loads((run / "rl1" / "config.json").read_text())["data"]
    mixed = [json.loads(line)["id"] for line in open(rl1_prompts)]
    kept_ids = [json.loads(line)["id"] for line in kept]
    assert mixed[:len(kept)] == kept_ids and len(mixed) == len(kept) + round(0.5 * len(kept))
    assert not set(mixed[len(kept):]) & set(kept_ids)
    assert "rl1" in accuracy_table(summary["stages"]).splitlines()[1]


def test_rm_stage_trains_with_the_rm_optim_section(tmp_path, monkeypatch):
    """`rm.optim` (lr, schedule, lr_scale) is what the pipeline's reward-model stage trains with."""
    seen = []

    def fake_train_rm(rcfg):
        seen.append(rcfg)
        out = tmp_path / "run" / "rm"
        (out / "final").mkdir(parents=True)
        (out / "eval.json").write_text("{}")
        return out / "final"

    monkeypatch.setattr(recipe.pipeline, "train_rm", fake_train_rm)
    cfg = load_config(PipelineConfig, None, [f"run_dir={tmp_path / 'run'}", "rm.n_pairs=4", "rm.n_heldout_pairs=2",
                                              "rm.optim.lr=3e-5", "rm.optim.lr_scale={critic.backbone.visual: 3}"])
    path = _reward_model(cfg, tmp_path / "run", policy="some/sft/final")
    assert path == str((tmp_path / "run" / "rm" / "final").resolve())
    (rcfg,) = seen
    assert rcfg.model == "some/sft/final"
    assert rcfg.optim.lr == 3e-5 and rcfg.optim.lr_scale == {"critic.backbone.visual": 3}


def test_mix_replay_adds_records_from_outside_the_kept_set():
    pool = [R(id=f"p{i}") for i in range(10)]
    kept = pool[:4]
    mixed = mix_replay(kept, pool, 0.5, seed=0)
    assert mixed[:4] == kept and len(mixed) == 6 and all(r.id not in {"p0", "p1", "p2", "p3"} for r in mixed[4:])
    assert [r.id for r in mix_replay(kept, pool, 0.5, seed=0)] == [r.id for r in mixed]   # seeded
    assert len(mix_replay(kept, pool, 5.0, seed=0)) == 10                                  # capped by the pool
    assert mix_replay(kept, pool, 0.0, seed=0) == kept


def test_accuracy_table_adds_the_distinct_prompt_accuracy_where_prompts_repeat():
    sft = {"grounding": {"n": 300, "format": 1.0, "accuracy": 0.627, "n_distinct": 151, "distinct_accuracy": 0.49},
           "math": {"n": 300, "format": 1.0, "accuracy": 0.913, "n_distinct": 300, "distinct_accuracy": 0.913},
           "caption": {"n": 300, "format": 1.0, "accuracy": None, "rm_score": 0.706},
           "all": {"n": 900, "format": 1.0, "accuracy": 0.77}}
    lines = accuracy_table({"sft": sft}).splitlines()
    rows = {line.split()[0]: line.split(None, 1)[1].strip() for line in lines[2:]}
    assert rows == {"grounding": "62.7 / 49.0%", "math": "91.3%", "caption": "rm 0.706", "all": "77.0%"}


def test_accuracy_table_columns_line_up_with_long_task_names():
    rows = {"spot_difference": {"n": 3, "format": 1.0, "accuracy": 0.5}, "math": {"n": 3, "format": 1.0, "accuracy": 1.0},
            "all": {"n": 6, "format": 1.0, "accuracy": 0.75}}
    lines = accuracy_table({"sft": rows, "rl": rows}).splitlines()[1:]
    assert len({len(line) for line in lines}) == 1 and lines[1].startswith("spot_difference ")


def test_the_pipeline_starts_ray_once_for_the_stages_that_place_workers_with_it(monkeypatch):
    """SFT/RM ranks or RL workers in Ray: the pipeline starts Ray before the stages (with the RL
    workers' cluster settings where they use it), so no stage starts and stops its own."""
    import ray

    started = []
    monkeypatch.setattr(rl.driver, "start_local_ray", lambda **kw: started.append(kw))
    monkeypatch.setattr(recipe.pipeline, "start_ray_once", lambda: started.append("once"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: started.append("shutdown"))

    def opened(*overrides):
        started.clear()
        with recipe.pipeline._one_ray(load_config(PipelineConfig, None, list(overrides))):
            inside = list(started)
        return inside, started[len(inside):]

    assert opened() == ([], [])                                       # every stage in the driver process
    assert opened("sft.workers=2") == (["once"], ["shutdown"])
    assert opened("rm.workers=2", "rm.enabled=false") == ([], [])      # no RM trained: nothing to place
    assert opened("rl.ray.enabled=true", "rl.ray.num_cpus=3") == ([{"num_cpus": 3, "address": None}], ["shutdown"])
    assert opened("rl.ray.enabled=true", "run_rl=false") == ([], [])
    monkeypatch.setattr(ray, "is_initialized", lambda: True)          # a Ray the caller started is left alone
    assert opened("sft.workers=2") == ([], [])
