"""SFT: exact resume after a crash, and learning on the tiny VLM (a metric must move)."""
import json
from types import SimpleNamespace as R

import pytest
import torch
from safetensors.torch import load_file

import recipe.sft
from recipe.sft import SFTConfig, train_sft
from records import load_records
from records.mixture import batch_indices, weighted_records
from rewards.evaluate import evaluate
from training.optim import OptimConfig, lr_factor, lr_groups, make_optimizer
from tests.helpers.kill import run_killed_after_checkpoint


def test_lr_schedule_shape():
    f = lambda s: lr_factor(s, total=100, warmup=10, schedule="cosine", min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2


def test_batches_are_a_pure_function_of_the_step():
    kw = dict(batch_size=3, grad_accum=2, seed=0)
    seen = [i for step in range(5) for m in range(2) for i in batch_indices(10, step, m, **kw)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # whole epochs
    assert batch_indices(10, 3, 1, **kw) == batch_indices(10, 3, 1, **kw)


def _cfg(tiny_model_dir, suite_dir, out, **kw):
    return SFTConfig(model=str(tiny_model_dir), data=str(suite_dir / "sft.jsonl"), out=str(out), steps=4,
                     batch_size=4, save_every=2, keep_checkpoints=5, log_every=1,
                     optim=OptimConfig(lr=1e-3, warmup_steps=1), **kw)


def test_task_weights_repeat_records_of_a_task():
    recs = [R(task="counting", id="c0"), R(task="grounding", id="g0"), R(task="math", id="m0")]
    out = weighted_records(recs, {"grounding": 3})
    assert [r.id for r in out] == ["c0", "g0", "g0", "g0", "m0"]
    assert weighted_records(recs, {}) == recs
    with pytest.raises(ValueError, match="task_weights"):
        weighted_records(recs, {"math": 0})


def test_lr_scale_groups_by_longest_prefix_and_rejects_typos():
    names = ["model.visual.blocks.0.w", "model.visual.merger.w", "model.language_model.layers.0.w", "lm_head.weight"]
    groups = lr_groups(names, {"model.visual": 10, "model.visual.merger": 2, "lm_head": 0})
    assert groups == {10.0: ["model.visual.blocks.0.w"], 2.0: ["model.visual.merger.w"],
                      1.0: ["model.language_model.layers.0.w"], 0.0: ["lm_head.weight"]}
    with pytest.raises(ValueError, match="lr_scale.model.vis: matches no parameter"):  # dot boundaries only
        lr_groups(names, {"model.vis": 3})
    with pytest.raises(ValueError, match="must be >= 0"):
        lr_groups(names, {"lm_head": -1})


def test_zero_lr_scale_freezes_and_the_rest_trains_at_its_multiple():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    opt, _ = make_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant",
                                               lr_scale={"0": 0, "1.bias": 5}), total_steps=10)
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert sorted((g["lr"], len(g["params"])) for g in opt.param_groups) == [(1e-3, 1), (5e-3, 1)]
    frozen = model[0].weight.detach().clone()
    model(torch.ones(3, 2)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen) and model[0].weight.grad is None
    with pytest.raises(ValueError, match="every parameter is frozen"):
        make_optimizer(model, OptimConfig(lr_scale={"0": 0, "1": 0}), total_steps=10)


def test_killed_run_resumes_exactly(tmp_path, tiny_model_dir, suite_dir, monkeypatch):
    straight = train_sft(_cfg(tiny_model_dir, suite_dir, tmp_path / "a"), progress=False)

    run_killed_after_checkpoint(monkeypatch, recipe.sft,
                                lambda: train_sft(_cfg(tiny_model_dir, suite_dir, tmp_path / "b"), progress=False))
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-000002"
    resumed = train_sft(_cfg(tiny_model_dir, suite_dir, tmp_path / "b"), progress=False)

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # no step replayed or skipped in the log


@pytest.mark.slow
def test_sft_teaches_counting_and_format(tiny, sft_run):
    """From a random-init tiny VLM: counting accuracy and the format rate must rise well above chance."""
    before, _ = evaluate(*tiny, load_records(sft_run["data"]["heldout"]))
    after = json.loads((sft_run["run"] / "eval.json").read_text())
    assert before["counting"]["format"] < 0.1 and before["counting"]["accuracy"] < 0.3
    assert after["all"]["format"] >= 0.9
    assert after["counting"]["accuracy"] >= 0.5, after
