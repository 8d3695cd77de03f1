"""Every model family end to end on its tiny model: the factory, its conventions (template, resize,
grounding coordinates), SFT, the reward model, the difficulty filter and RFT, GRPO on HF rollouts,
PPO on vLLM rollouts with weight sync, vLLM log-probs against the trainer's, and one learning check."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import recipe.cli
from model.families import FAMILIES, family_of, grounding_settings, resize_settings
from model.info import describe
from model.inputs import IGNORE, encode_sft
from model.load import load_processor, load_vlm
from model.lora import LoRAConfig, add_adapters, full_params
from model.tiny import TinySpec, build_tiny_vlm
from recipe.filter import run_filter
from recipe.rft import run_rft
from recipe.sft import SFTConfig, train_sft
from records import load_images, load_records, write_records
from rewards.config import PoolConfig, RewardConfig, TaskRoute, VerifierRoute
from rewards.evaluate import judge
from rewards.inputs import for_model
from rewards.rm import RewardModelScorer
from rewards.rm_train import RMConfig, train_rm
from rl.config import GRPOConfig, KLConfig, PPOConfig, RLConfig, RolloutConfig
from rl.driver import fit
from rollout import EngineConfig, make_engine
from synth.prefs import write_preference_pairs
from synth.suite import SceneSpec, corpus_texts, make_example, write_suite
from tests import rollout_checks as checks
from training.optim import OptimConfig
from verifiers import Sample, load
from verifiers.coords import encode_box, resized_size

FAMILY_NAMES = list(FAMILIES)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def vlrl(*argv) -> int:
    return recipe.cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """One tiny model folder per family, built by `vlrl model init-tiny`."""
    root = tmp_path_factory.mktemp("families")
    for name in FAMILY_NAMES:
        assert vlrl("model", "init-tiny", root / name, "--family", name) == 0
    return {name: root / name for name in FAMILY_NAMES}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A few records of every task (pixel-box targets), the RL prompts with a rule answer (no reward
    model needed) and a few preference pairs."""
    root = tmp_path_factory.mktemp("family_data")
    paths = write_suite(root / "suite", seed=3, n=8, n_heldout=2, n_rl=4)
    write_records(root / "suite" / "rules.jsonl", [r for r in load_records(paths["rl"]) if r.task != "caption"])
    pairs = write_preference_pairs(root / "pairs", seed=3, n=8, n_heldout=4)
    return {**{k: str(v) for k, v in paths.items()}, "rules": str(root / "suite" / "rules.jsonl"), "pairs": pairs}


def _sft_cfg(model, data, out, **kw) -> SFTConfig:
    return SFTConfig(model=str(model), data=str(data), out=str(out), steps=12, batch_size=8, save_every=0,
                     log_every=1, optim=OptimConfig(lr=1e-3, warmup_steps=1), **kw)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_init_tiny_writes_the_familys_own_folder(family_dirs, small_data, capsys, name):
    fam, path = FAMILIES[name], family_dirs[name]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == name and family_of(path) is fam
    assert json.loads((path / "vlrl_tiny.json").read_text())["family"] == name
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = load_processor(path)
    assert type(model) is fam.model_cls and type(processor) is fam.processor_cls
    text = cfg["text_config"]
    assert text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) == 64   # vLLM CPU attention
    # the family's template, prefix-stable: labels cover exactly the assistant turn (+ its end marker)
    recs = load_records(small_data["sft"])[:3]
    batch = encode_sft(processor, [r.messages for r in recs], [load_images(r) for r in recs])
    for i, r in enumerate(recs):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE]
        assert processor.tokenizer.decode(labelled) == r.target + "<|im_end|>\n"
        # an 84x84 board is 3x3 image tokens in every family (Qwen3-VL resizes it to 96x96, 32-pixel tokens)
        assert int((batch["input_ids"][i] == model.config.image_token_id).sum()) == 9
    rendered = processor.apply_chat_template(recs[0].prompt_messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.") == (name == "qwen2_5_vl")
    # `vlrl model info`: the parameter groups add up to the model's parameters
    assert vlrl("model", "info", path) == 0
    out = capsys.readouterr().out
    assert fam.title in out and "image tokens    4-" in out
    info = describe(path)
    assert sum(info.params.values()) == sum(p.numel() for p in model.parameters())
    assert info.params["vision"] > 0 and info.params["merger"] > 0 and info.params["llm"] > 0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_resized_size_is_the_processors_resize(family_dirs, name):
    """verifiers.coords.resized_size, fed with the processor's settings, predicts the grid the
    processor makes (the resized-pixel coordinates of Qwen2.5-VL depend on it)."""
    processor = load_processor(family_dirs[name])
    r = resize_settings(processor)
    patch = processor.image_processor.patch_size
    for w, h in [(84, 84), (100, 60), (300, 40), (300, 300), (500, 500), (10, 90), (57, 131)]:
        grid = processor.image_processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        expected = (int(grid[2]) * patch, int(grid[1]) * patch)
        assert resized_size(w, h, factor=r.factor, min_pixels=r.min_pixels, max_pixels=r.max_pixels) == expected


def test_each_family_writes_and_scores_its_own_coordinates(family_dirs):
    """The suite writes a grounding target in the family's coordinates; the family's grounding
    settings score it right on a board the processor resizes (Qwen3-VL: 84 -> 96 pixels)."""
    conventions = {name: grounding_settings(load_processor(family_dirs[name])) for name in FAMILY_NAMES}
    assert {n: c["coords"] for n, c in conventions.items()} == {
        "qwen2_vl": "norm1000", "qwen2_5_vl": "resized", "qwen3_vl": "norm1000"}
    assert conventions["qwen2_5_vl"]["resize_factor"] == 28
    for name, settings in conventions.items():
        rec = make_example("grounding", random.Random(5), SceneSpec(**settings))
        solution = rec["messages"][1]["content"][0]["text"].split("</think>")[1]
        score = load("grounding", **settings)(Sample("grounding", solution, rec["answer"], ((84, 84),)))
        assert score.value == 1.0 and score.parts["iou"] > 0.95, (name, solution, rec["answer"])
    # 0-1000 targets are not pixel boxes (the record's answer stays in pixels)
    norm = make_example("grounding", random.Random(5), SceneSpec(coords="norm1000"))
    assert norm["messages"][1]["content"][0]["text"].split("</think>")[1] != norm["answer"]


def test_data_synth_writes_the_coordinates_of_the_model(tmp_path, family_dirs):
    """`vlrl data synth --model DIR`: targets in that model's coordinates (Qwen2.5-VL's resized pixels
    equal the pixels of an 84x84 board, which its processor leaves as it is); without it, Qwen2-VL's 0-1000."""
    def targets(out):
        recs = [r for r in load_records(out / "sft.jsonl") if r.task == "grounding"]
        return [(r.target.split("</think>")[1], r.answer) for r in recs]

    assert vlrl("data", "synth", tmp_path / "a", "--n", 3, "--n-heldout", 1, "--n-rl", 1,
                "--model", family_dirs["qwen2_5_vl"]) == 0
    assert all(t == a for t, a in targets(tmp_path / "a"))
    assert vlrl("data", "synth", tmp_path / "b", "--n", 3, "--n-heldout", 1, "--n-rl", 1) == 0
    assert all(json.loads(t) == encode_box(json.loads(a), "norm1000", (84, 84)) for t, a in targets(tmp_path / "b"))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_short_sft_lowers_the_loss_and_evaluates(tmp_path, family_dirs, small_data, name):
    final = train_sft(_sft_cfg(family_dirs[name], small_data["sft"], tmp_path / "run",
                               eval_data=small_data["heldout"], eval_max_new_tokens=8), progress=False)
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in json.loads(line)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses   # nats per token, from ~ln(vocab)
    assert family_of(final).name == name
    table = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert table["all"]["n"] == len(load_records(small_data["heldout"]))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reward_model_trains_and_scores(tmp_path, family_dirs, small_data, name):
    pairs = small_data["pairs"]
    final = train_rm(RMConfig(model=str(family_dirs[name]), data=str(pairs["train"]), eval_data=str(pairs["heldout"]),
                              out=str(tmp_path / "rm"), steps=2, batch_size=2, save_every=0, log_every=1,
                              optim=OptimConfig(lr=1e-3, warmup_steps=1)), progress=False)
    assert (final / "value_head.safetensors").is_file()
    heldout = load_records(pairs["heldout"], require="preference")
    scores = RewardModelScorer(final)([(r.images, r.messages, "A red square.") for r in heldout])
    assert len(scores) == len(heldout) and all(0.0 < s < 1.0 for s in scores)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_filter_and_rft_sample_and_score(tmp_path, family_dirs, small_data, name):
    """The difficulty filter and rejection sampling on HF rollouts, routes scored with the family's coordinates."""
    data = tmp_path / "prompts.jsonl"
    write_records(data, load_records(small_data["rules"])[:6])
    reward = RewardConfig(pool=PoolConfig(workers=0))
    summary = run_filter(str(family_dirs[name]), str(data), str(tmp_path / "filter" / "kept.jsonl"), k=2,
                         band=(0.0, 1.0), reward_cfg=reward, engine=EngineConfig(backend="hf"), max_tokens=12,
                         progress=False)
    assert summary["counts"]["total"] == 6 and sum(summary["histogram"]["before"]) == 6
    rft = run_rft(str(family_dirs[name]), str(data), str(tmp_path / "rft"), k=2, reward_cfg=reward,
                  engine=EngineConfig(backend="hf"), max_tokens=12, progress=False)
    assert rft["counts"]["samples"] == 12 and (tmp_path / "rft" / "rft_sft.jsonl").is_file()


def _rl_cfg(policy, data, out, **kw) -> RLConfig:
    base = dict(policy=str(policy), data=str(data), eval_data=None, out=str(out), steps=1, prompts_per_step=4,
                rollout=RolloutConfig(backend="hf", n=2, max_tokens=16), save_every=0,
                reward=RewardConfig(pool=PoolConfig(workers=0)), kl=KLConfig(coefs={"math": 0.05}),
                ppo=PPOConfig(minibatches=1, micro_batch_size=8))
    return RLConfig(**{**base, **kw})


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_grpo_step_on_hf_rollouts(tmp_path, family_dirs, small_data, name):
    final = fit(_rl_cfg(family_dirs[name], small_data["rules"], tmp_path / "run", algo="grpo",
                        grpo=GRPOConfig(norm_std=False)), progress=False)
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "actor/loss" in m and "kl/math" in m and not any(k.startswith("critic/") for k in m)
    assert family_of(final).name == name


@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if n != "qwen2_vl"])   # qwen2_vl: test_rollout_vllm
def test_vllm_logp_matches_the_trainer_and_follows_weight_sync(tmp_path, family_dirs, small_data, name):
    engine = make_engine(str(family_dirs[name]), EngineConfig(backend="vllm", max_model_len=512,
                                                              cache_root=str(tmp_path / "vllm-cache")))
    try:
        model, processor = load_vlm(family_dirs[name])
        prompts = checks.make_prompts(Path(small_data["rl"]).parent)
        checks.check_logp_matches_trainer(engine, model, processor, prompts)
        checks.check_sync(engine, model, processor, prompts)   # a vision-only change, every weight, the original
    finally:
        engine.close()


@needs_vllm
@pytest.mark.vllm
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_ppo_steps_on_vllm_rollouts(tmp_path, family_dirs, small_data, name):
    """Two PPO steps with the shared critic on this family's backbone. The engine's sampled-token
    log-probs match the actor's forward at both steps: the second samples from the synced weights."""
    cfg = _rl_cfg(family_dirs[name], small_data["rules"], tmp_path / "run", steps=2,
                  rollout=RolloutConfig(backend="vllm", n=2, max_tokens=16, max_model_len=512,
                                        cache_root=str(tmp_path / "vllm-cache")))
    final = fit(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("critic/loss" in r and "actor/loss" in r for r in rows)
    assert rows[0]["rollout/logp_gap_max"] < checks.LOGP_TOL and rows[1]["rollout/logp_gap_max"] < checks.LOGP_TOL
    before, after = load_file(family_dirs[name] / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "run" / "final_critic" / "value_head.safetensors").is_file()


@pytest.mark.slow
def test_qwen3_vl_sft_learns_counting(tmp_path_factory):
    """A family other than the default learns: SFT of the tiny Qwen3-VL from random init counts
    shapes on held-out scenes well above chance (1 in 6)."""
    root = tmp_path_factory.mktemp("qwen3_learn")
    model = build_tiny_vlm(root / "hf", corpus_texts(), TinySpec(), family="qwen3_vl")
    data = write_suite(root / "data", seed=1, n=600, n_heldout=60, n_rl=4, tasks=("counting", "math"),
                       spec=SceneSpec(color_questions=0.0))
    cfg = SFTConfig(model=str(model), data=str(data["sft"]), eval_data=str(data["heldout"]), out=str(root / "run"),
                    steps=300, batch_size=16, save_every=0, log_every=20, optim=OptimConfig(lr=3e-4, warmup_steps=20))
    train_sft(cfg, progress=False)
    after = json.loads((root / "run" / "eval.json").read_text())
    assert after["all"]["format"] >= 0.9 and after["counting"]["accuracy"] >= 0.5, after


def test_judge_reads_responses_in_the_models_coordinates(family_dirs, small_data):
    """Held-out accuracy uses the responding model's convention: a resized-pixel box of a board the
    processor does not resize evaluates the same as the pixel box; a 0-1000 box needs norm1000."""
    rec = next(r for r in load_records(small_data["heldout"]) if r.task == "grounding")
    box = json.loads(rec.answer)
    norm = "<think>x</think>{}".format(encode_box(box, "norm1000", (84, 84)))
    cfg = RewardConfig(pool=PoolConfig(workers=0))
    assert [g.correct for g in judge([rec], [norm], for_model(cfg, load_processor(family_dirs["qwen3_vl"])))] == [True]
    assert [g.correct for g in judge([rec], [norm], cfg.with_verifier_settings({"grounding": {"coords": "pixel"}}))] == [False]


def test_model_conventions_fill_grounding_routes_without_overriding_them(family_dirs):
    own = TaskRoute(verifiers=(VerifierRoute("grounding", settings={"coords": "pixel"}),))
    cfg = RewardConfig(tasks={"ui": own})
    out = for_model(cfg, load_processor(family_dirs["qwen2_5_vl"]))
    resize = {"resize_factor": 28, "min_pixels": 56 * 56, "max_pixels": 112 * 112}
    assert out.route("grounding").verifiers[0].settings == {"mode": "iou", "iou_threshold": 0.5, "accept": ("box",),
                                                           "coords": "resized", **resize}
    assert out.route("ui").verifiers[0].settings == {"coords": "pixel", **resize}   # the config's own coords win
    assert out.route("counting") == cfg.route("counting")
    qwen3 = for_model(cfg, load_processor(family_dirs["qwen3_vl"]))
    assert qwen3.route("grounding").verifiers[0].settings["coords"] == "norm1000"
    assert cfg.with_verifier_settings({}) is cfg


def test_model_info_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert vlrl("model", "info", tmp_path) == 2
    assert "not a model folder (no config.json)" in capsys.readouterr().err


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_adapts_each_familys_language_model_and_merges_under_its_names(family_dirs, name):
    """The default LoRA targets reach every family's language-model linears (not its vision tower),
    and the merged weights carry the base model's names with W + (alpha / r) B A in the adapted ones."""
    model, _ = load_vlm(family_dirs[name])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = add_adapters(model, LoRAConfig(r=4, alpha=8.0))
    assert len(adapted) == 7 * model.config.get_text_config().num_hidden_layers
    assert all(".language_model." in f".{n}" and "visual" not in n for n in adapted)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            p.data.normal_()
    merged = dict(full_params(model))
    assert set(merged) == set(base)
    layer = model.get_submodule(adapted[0])
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert torch.allclose(merged[f"{adapted[0]}.weight"], base[f"{adapted[0]}.weight"] + 2.0 * b @ a, atol=1e-6)
    untouched = next(k for k in base if "visual" in k and k.endswith("weight"))
    assert torch.equal(merged[untouched], base[untouched])
