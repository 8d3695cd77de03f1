"""The benchmark harness's pure parts: ratios and formatting, samples-to-target, learning curves
from a vlrl run's metrics rows, FLOPs/MFU arithmetic, and the results file. No timing here."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from bench.common import (fmt, fmt_ratio, held_to_end, ratio, samples_to_stay, samples_to_target, summary_lines, throughput,
                          write_result)
from bench.e2e_vs_trl import _completion_text, compare, counting_reward, vlrl_curve
from bench.gpu_profile import (SPECIAL_TOKENS, TEXT, dense_params, mfu, model_config, peak_flops_for, profile, text_dims,
                               train_flops)
from model.load import load_vlm
from rewards.config import PoolConfig, RewardConfig
from synth.suite import write_suite


def test_ratio_and_throughput_never_divide_by_zero():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 2.0) is None and ratio(2.0, None) is None
    assert throughput(100, 4.0) == 25.0 and throughput(100, 0.0) == 0.0


@pytest.mark.parametrize("value, unit, text", [
    (None, "s", "-"), (0.1234, "s", "0.123 s"), (12.345, "", "12.3"), (1234.5, "tok/s", "1,234 tok/s"),
    (2.5e-4, "s", "2.50e-04 s"), (3_200_000, "", "3.20e+06"), (0, "", "0"),
])
def test_fmt(value, unit, text):
    assert fmt(value, unit) == text


def test_summary_lists_headlines_ratios_and_failures():
    lines = summary_lines([
        {"name": "rollout", "headline": ["vllm 900 tok/s"], "ratios": {"vllm/hf tokens_per_s": 3.0}},
        {"name": "e2e_vs_trl", "ok": False, "error": "timed out"},
    ])
    assert lines == ["== rollout", "   vllm 900 tok/s", "   ratio vllm/hf tokens_per_s: 3.00x",
                     "== e2e_vs_trl  FAILED: timed out"]
    assert fmt_ratio(None) == "-"
    assert summary_lines([{"name": "x", "summary": ["compact"], "headline": ["long"]}]) == ["== x", "   compact"]


def test_samples_to_target_is_the_first_crossing():
    curve = [{"samples": 0, "seconds": 0.0, "accuracy": 0.5}, {"samples": 64, "seconds": 3.0, "accuracy": 0.82},
             {"samples": 128, "seconds": 6.0, "accuracy": 0.7}, {"samples": 192, "seconds": 9.0, "accuracy": 0.9}]
    assert samples_to_target(curve, 0.8) == curve[1]
    assert samples_to_target(curve, 0.5)["samples"] == 0          # reached at the start
    assert samples_to_target(curve, 0.95) is None                   # never reached
    assert samples_to_target([{"samples": 1, "seconds": 1, "accuracy": None}], 0.0) is None


def test_a_gain_held_when_the_last_point_is_still_at_the_target():
    pts = [{"accuracy": a} for a in (0.5, 0.62, 0.58, None)]
    assert held_to_end(pts, 0.6) is False          # reached at the second point, lost by the last evaluated one
    assert held_to_end(pts, 0.55) is True
    assert held_to_end(pts, 0.7) is None           # never reached


def test_samples_to_target_reads_the_named_metric():
    curve = [{"samples": 0, "seconds": 0.0, "accuracy": 0.9, "sampled_accuracy": 0.1},
             {"samples": 64, "seconds": 3.0, "accuracy": 0.5, "sampled_accuracy": None},
             {"samples": 128, "seconds": 6.0, "accuracy": 0.5, "sampled_accuracy": 0.45}]
    assert samples_to_target(curve, 0.4, key="sampled_accuracy")["samples"] == 128


def test_vlrl_curve_cuts_evaluation_and_checkpoint_time_out():
    rows = [
        {"step": 1, "time": 10.0, "time/rollout": 2.0, "time/update": 1.0},    # first step: its stage times (3 s)
        {"step": 2, "time": 14.0, "time/rollout": 2.0},                         # +4 s of wall time
        {"step": 2, "time": 20.0, "eval/counting/accuracy": 0.6},              # 6 s of eval: not training
        {"step": 3, "time": 29.0, "time/rollout": 2.5},                         # after an eval (+ checkpoint): 2.5 s
        {"step": 4, "time": 32.0, "time/rollout": 2.0},                         # +3 s
        {"step": 4, "time": 35.0, "eval/counting/accuracy": 0.8},
    ]
    assert vlrl_curve(rows, samples_per_step=64) == [
        {"samples": 128, "seconds": 7.0, "accuracy": 0.6}, {"samples": 256, "seconds": 12.5, "accuracy": 0.8}]


def test_compare_forms_ratios_against_trl_only_when_both_reached():
    def run(points, train_s):
        return {"curve": [{"samples": s, "seconds": t, "accuracy": a, "sampled_accuracy": a / 2} for s, t, a in points],
                "train_s": train_s, "samples": 256}
    runs = {"vlrl-grpo": run([(0, 0, 0.5), (128, 10.0, 0.85)], 20.0),
            "vlrl-ppo": run([(0, 0, 0.5), (256, 30.0, 0.6)], 30.0),
            "trl-grpo": run([(0, 0, 0.5), (192, 40.0, 0.81)], 50.0)}
    reached, ratios = compare(runs, {"accuracy": 0.8, "sampled_accuracy": 0.42})
    assert reached["accuracy"]["vlrl-ppo"] is None and reached["accuracy"]["trl-grpo"]["samples"] == 192
    assert ratios["vlrl-grpo/trl seconds to target (accuracy)"] == pytest.approx(0.25)
    assert ratios["vlrl-grpo/trl samples to target (accuracy)"] == pytest.approx(128 / 192)
    assert ratios["vlrl-ppo/trl seconds to target (accuracy)"] is None
    assert ratios["vlrl-ppo/trl seconds per sample"] == pytest.approx(30 / 50)
    assert reached["sampled_accuracy"]["trl-grpo"] is None          # 0.405 < 0.42
    assert ratios["vlrl-grpo/trl seconds to target (sampled_accuracy)"] is None
    assert reached["stay"]["vlrl-grpo"]["samples"] == 128 and reached["stay"]["vlrl-ppo"] is None
    assert ratios["vlrl-grpo/trl seconds to stay at target (accuracy)"] == pytest.approx(0.25)


def test_trl_completions_become_text():
    assert _completion_text("3") == "3"
    assert _completion_text([{"role": "assistant", "content": "<think>x</think>3"}]) == "<think>x</think>3"
    assert _completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"


def test_trl_reward_is_the_projects_hybrid_reward():
    """The function TRL calls scores like vlrl's reward worker: format gate first, then counting."""
    reward = counting_reward(RewardConfig(pool=PoolConfig(workers=0)))
    completions = [[{"role": "assistant", "content": "<think>I count 3 shapes.</think>3"}],
                   [{"role": "assistant", "content": "<think>I count 2 shapes.</think>2"}],
                   [{"role": "assistant", "content": "3"}]]                       # right count, no format: gated
    assert reward(prompts=[None] * 3, completions=completions, answer=["3"] * 3, task=["counting"] * 3) == [1.0, 0.0, 0.0]


def test_dense_params_match_the_published_decoders():
    # Qwen2.5-7B's decoder is 7.62B with embeddings; without the input embedding (152064 x 3584) 7.07B
    assert dense_params(TEXT["7b"]) == pytest.approx(7.07e9, rel=0.01)
    # hand count of a toy decoder: 1 layer, h=4, 2 heads (head_dim 2), 1 kv head, mlp 8, vocab 10
    toy = dict(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
               vocab_size=10)
    assert dense_params(toy) == (2 * 4 * 4) + (2 * 4 * 2) + (3 * 4 * 8) + 10 * 4


def test_train_flops_and_mfu():
    toy = dict(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
               vocab_size=10)
    n = dense_params(toy)
    assert train_flops(toy, [3, 5]) == 6 * n * 8 + 12 * (9 + 25) * 2 * 2 * 1
    # 1e15 FLOPs in 2 s on one 1e15 FLOP/s device: 50%; on 2 devices: 25%
    assert mfu(1e15, 2.0, peak_flops=1e15) == pytest.approx(0.5)
    assert mfu(1e15, 2.0, peak_flops=1e15, n_devices=2) == pytest.approx(0.25)
    assert mfu(1e15, 0.0, peak_flops=1e15) == 0.0
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops_for("a CPU") is None


def test_write_result_is_stamped_and_atomic(tmp_path):
    path = write_result("demo", {"metrics": {"x": 1.0}, "ratios": {"a/b": 2.0}}, tmp_path)
    doc = json.loads(path.read_text())
    assert path == tmp_path / "demo.json" and doc["name"] == "demo" and doc["metrics"] == {"x": 1.0}
    assert {"cpu", "cores", "torch", "env"} <= set(doc["machine"]) and doc["command"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_random_init_qwen2_5_vl_7b_has_the_published_size():
    """The GPU profile's 7B config, instantiated on the meta device (no memory): 8.29B parameters,
    as Qwen2.5-VL-7B-Instruct's model card states."""
    cfg = model_config("7b", {t: i for i, t in enumerate(SPECIAL_TOKENS)})
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.29e9, rel=0.005)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_gpu_profile_runs_its_worker_groups_on_cpu(tiny_model_dir, tmp_path, ray_cluster):
    """The GPU profile's code path, on CPU with the tiny model: 2 vLLM replicas roll out, a 2-rank
    actor group takes log-probs and an update, then syncs every parameter into both replicas."""
    data = tmp_path / "data"
    write_suite(data, seed=0, n=1, n_heldout=1, n_rl=4, tasks=("counting",))
    m = profile(tiny_model_dir, data, workers=2, prompts=4, n=2, response_tokens=8, micro_batch_size=4,
                peak=1e12, gpu=False)
    model, _ = load_vlm(str(tiny_model_dir))
    assert m["weight_sync"]["mib"] * 2**20 == sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < m["generated_tokens"] <= 4 * 2 * 8 and m["sequences"] == 4 * 2
    parts = m["rollout"]["seconds"] + m["weight_sync"]["seconds"] + m["actor_logp"]["seconds"] + \
        m["actor_update"]["seconds"]
    assert m["step"]["seconds"] == pytest.approx(parts)
    assert m["dense_params"] == dense_params(text_dims(tiny_model_dir)) and 0 < m["actor_update"]["mfu"] < 1


def test_the_e2e_start_is_an_hf_folder_of_the_sft_step_it_names(tiny_model_dir, suite_dir, tmp_path):
    """bench.scratch.sft_model(take < steps): the weights of step `take` (from its sharded
    checkpoint) as a model folder that loads, not the final weights; a second call reuses it."""
    from safetensors.torch import load_file

    from bench.scratch import sft_model

    data = {"sft": suite_dir / "sft.jsonl"}
    early = sft_model(tmp_path, tiny_model_dir, data, steps=6, take=2, batch_size=4)   # saved at 2, 4 and 6
    load_vlm(str(early))
    final = tmp_path / "sft-2-of-6" / "final"
    a, b = load_file(early / "model.safetensors"), load_file(final / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert sft_model(tmp_path, tiny_model_dir, data, steps=6, take=2, batch_size=4) == early


def test_samples_to_stay_is_the_start_of_the_last_run_at_or_above_the_target():
    pts = [{"samples": s, "seconds": s / 10, "accuracy": a}
           for s, a in [(0, 0.5), (10, 0.8), (20, 0.6), (30, 0.75), (40, None), (50, 0.9)]]
    assert samples_to_stay(pts, 0.7)["samples"] == 30       # the spike at 10 was lost at 20; 30 on it held
    assert samples_to_stay(pts, 0.55)["samples"] == 10
    assert samples_to_stay(pts, 0.95) is None and samples_to_stay(pts, None) is None
    assert samples_to_stay(pts[:3], 0.7) is None               # lost by the last evaluation
    assert samples_to_target(pts, 0.7)["samples"] == 10        # the first crossing counts the spike


def test_e2e_targets_are_relative_to_the_start_with_a_gain():
    from bench.e2e_vs_trl import e2e_targets

    start = {"accuracy": 0.6, "sampled_accuracy": 0.4}
    assert e2e_targets(start, target=0.75, gain=None, sampled_target=None) == {"accuracy": 0.75, "sampled_accuracy": 0.2}
    t = e2e_targets(start, target=0.75, gain=0.1, sampled_target=None)
    assert t["accuracy"] == pytest.approx(0.7) and t["sampled_accuracy"] == pytest.approx(0.5)
    assert e2e_targets({"accuracy": 0.6, "sampled_accuracy": None}, target=0.75, gain=0.1,
                       sampled_target=None)["sampled_accuracy"] is None   # not measured: no sampled target
