"""LoRA actors (PEFT): the frozen base as the reference policy, merged weights for the engines and
the export, adapter-only checkpoints with exact resume, a learning check, and LoRA under FSDP2
worker groups (2 gloo ranks as Ray actors)."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import rl.driver
from model.load import load_vlm
from model.lora import LoRAConfig, add_adapters, full_params, target_pattern
from records import load_images, load_records, write_records
from rewards.config import PoolConfig, RewardConfig
from rl.batch import RolloutBatch
from rl.config import KLConfig, PPOConfig, RayConfig, RLConfig, RolloutConfig
from rl.driver import fit
from rl.workers import PolicyWorker
from rollout import make_engine
from rollout.sequences import build_sequences, engine_logp
from rollout.types import EngineConfig, Prompt, SamplingConfig
from rollout.worker import RolloutWorker
from tests.rollout_checks import LOGP_TOL
from training.config import ConfigError, load_config
from training.optim import OptimConfig
from training.placement import Handle
from tests.helpers.kill import run_killed_after_checkpoint

LORA = LoRAConfig(r=8, alpha=16.0)


# ----------------------------------------------------------------------------- config and targets

def test_lora_keys_are_checked_at_load_time(tmp_path):
    cfg = load_config(RLConfig, None, ["actor_lora.r=4", "actor_lora.target_modules=[q_proj, v_proj]"])
    assert cfg.actor_lora == LoRAConfig(r=4, target_modules=("q_proj", "v_proj")) and cfg.critic_lora is None
    for override, message in (("actor_lora.r=0", "actor_lora: r: must be >= 1"),
                              ("critic_lora.dropout=1.0", "critic_lora: dropout: must be in"),
                              ("actor_lora.target_modules=[]", "actor_lora: target_modules: empty"),
                              ("actor_lora.target_modules=['q proj']", "actor_lora: target_modules: 'q proj'"),
                              ("actor_lora.rank=8", "unknown key 'rank'")):
        with pytest.raises(ConfigError, match=message):
            load_config(RLConfig, None, [override])
    with pytest.raises(ConfigError, match="critic_lora: algo grpo has no critic"):
        load_config(RLConfig, None, ["algo=grpo", "critic_lora.r=4"])


def test_plain_names_target_the_language_model_and_dotted_names_reach_the_vision_tower(tiny_model_dir):
    model, _ = load_vlm(tiny_model_dir)
    hits = add_adapters(model, LoRAConfig())
    assert hits and all(".language_model.layers." in n for n in hits)
    assert {n.rpartition(".")[2] for n in hits} == set(LoRAConfig().target_modules)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)   # the base is frozen
    model, _ = load_vlm(tiny_model_dir)
    hits = add_adapters(model, LoRAConfig(target_modules=("q_proj", "attn.qkv")))
    assert {n for n in hits if ".visual." in n} == {f"model.visual.blocks.{i}.attn.qkv" for i in range(2)}
    assert "(?:.*\\.)?language_model\\." in target_pattern(("q_proj",))
    with pytest.raises(ConfigError, match=r"actor_lora.target_modules: \['qkv_proj'\] match no layer .*q_proj"):
        PolicyWorker(str(tiny_model_dir), optim=OptimConfig(), lora=LoRAConfig(target_modules=("qkv_proj",)))


# ----------------------------------------------------------------------------- one worker

@pytest.fixture(scope="module")
def trained_lora(sft_run):
    """A LoRA actor after a few updates (its adapters away from zero) and the rollout batch."""
    records = load_records(sft_run["data"]["rl"], require="prompt")[:4]
    prompts = [Prompt(r.prompt_messages, load_images(r)) for r in records]
    completions = make_engine(str(sft_run["final"]), EngineConfig(backend="hf")).generate(
        prompts, SamplingConfig(n=2, max_tokens=16, seed=0))
    worker = PolicyWorker(str(sft_run["final"]), optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
                          lora=LORA)
    seq = build_sequences(worker.processor, prompts, completions)
    mask = seq.label_mask
    before = worker.logp(seq)[0]
    sign = 1.0 - 2.0 * (seq.prompt_index % 2).float()
    rows = seq.rows
    batch = RolloutBatch(seq=seq, tasks=["counting"] * rows, task_id=torch.zeros(rows, dtype=torch.long),
                         scores=torch.zeros(rows), correct=torch.zeros(rows, dtype=torch.bool),
                         kl_coef=torch.zeros(rows), adv=sign[:, None] * mask, old_logp=before, ref_logp=before)
    for _ in range(3):
        worker.update(batch, ppo=PPOConfig(lm_coef=0.0), kl_mode="reward", kl_kind="k3", minibatch_rows=[list(range(rows))])
    return {"worker": worker, "seq": seq, "prompts": prompts, "before": before}


def test_adapters_off_give_the_base_models_log_probs_exactly(trained_lora, sft_run):
    w, seq = trained_lora["worker"], trained_lora["seq"]
    base = PolicyWorker(str(sft_run["final"]))          # the frozen reference policy a full actor would use
    expected = base.logp(seq)[0]
    assert torch.equal(w.ref_logp(seq), expected)
    assert torch.equal(trained_lora["before"], expected)   # B starts at 0: a fresh adapter changes nothing
    moved = ((w.logp(seq)[0] - expected) * seq.label_mask).abs().max()
    assert moved > 1e-2                                  # ... and the adapters did learn
    assert torch.equal(w.ref_logp(seq), expected)
    assert ((w.logp(seq)[0] - expected) * seq.label_mask).abs().max() == moved   # switched on again after
    trainable = [n for n, p in w.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_the_optimizer_and_its_state_hold_the_adapters_only(trained_lora):
    """AdamW steps only the adapters: gradients and moments for them alone (`bench.train_step`
    reports these bytes against a full actor)."""
    from bench.train_step import state_bytes

    w = trained_lora["worker"]
    adapters = [p for n, p in w.model.named_parameters() if ".lora_" in n]
    assert [p for g in w.opt.param_groups for p in g["params"]] == adapters
    n = sum(p.numel() for p in adapters)
    b = state_bytes(w)
    assert b["grads"] == 4 * n and b["optimizer"] == 8 * n + 4 * len(adapters)   # exp_avg, exp_avg_sq, step
    assert b["weights"] == 4 * sum(p.numel() for p in w.model.parameters()) and n < b["weights"] / 4 / 5


def test_sync_and_export_carry_the_merged_weights(trained_lora, sft_run, tmp_path):
    """An HF engine given the pushed weights, the exported folder and the adapter folder loaded by
    PEFT onto the base policy all compute the LoRA actor's log-probs."""
    from peft import PeftModel

    w, seq = trained_lora["worker"], trained_lora["seq"]
    mask, logp = seq.label_mask, w.logp(seq)[0]
    engine = Handle(RolloutWorker, obj=RolloutWorker(str(sft_run["final"]), EngineConfig(backend="hf")))
    out = w.push_weights([engine], bucket_mb=0.05)
    assert out["failed"] == [] and out["buckets"] > 3
    names = {k for k, _ in full_params(w.model)}
    assert names == set(load_vlm(sft_run["final"])[0].state_dict())   # the base model's names, no lora_*
    completions = engine.generate(trained_lora["prompts"], SamplingConfig(n=2, max_tokens=12, seed=3)).result()
    seq2 = build_sequences(w.processor, trained_lora["prompts"], completions)
    gap = ((engine_logp(completions, seq2.label_mask) - w.logp(seq2)[0]) * seq2.label_mask).abs().max()
    assert gap < LOGP_TOL

    w.export(str(tmp_path / "final"))
    merged = PolicyWorker(str(tmp_path / "final"))
    assert ((merged.logp(seq)[0] - logp) * mask).abs().max() < LOGP_TOL
    cfg = json.loads((tmp_path / "final" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["base_model_name_or_path"] == str(sft_run["final"])
    base, _ = load_vlm(sft_run["final"])
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "final" / "adapter"))
    with torch.no_grad():
        logits = peft_model(**seq.model_inputs(), use_cache=False).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, seq.input_ids[:, 1:, None])[..., 0]
    assert ((lp - logp) * mask).abs().max() < LOGP_TOL


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_engine_samples_from_the_merged_policy(trained_lora, sft_run, tmp_path):
    w = trained_lora["worker"]
    worker = RolloutWorker(str(sft_run["final"]), EngineConfig(backend="vllm", max_model_len=512,
                                                               cache_root=str(tmp_path / "vllm-cache")))
    try:
        w.push_weights([Handle(RolloutWorker, obj=worker)], bucket_mb=0.05)
        completions = worker.generate(trained_lora["prompts"], SamplingConfig(n=2, max_tokens=12, seed=3))
    finally:
        worker.close()
    seq = build_sequences(w.processor, trained_lora["prompts"], completions)
    mask = seq.label_mask
    engine = engine_logp(completions, mask)
    assert ((engine - w.logp(seq)[0]) * mask).abs().max() < LOGP_TOL
    assert ((engine - w.ref_logp(seq)) * mask).abs().max() > 1e-2      # not the base policy's


# ----------------------------------------------------------------------------- runs

def _cfg(sft_run, out, **kw) -> RLConfig:
    base = RLConfig(policy=str(sft_run["final"]), data=str(sft_run["data"]["rl"]), eval_data=None, out=str(out),
                    steps=3, prompts_per_step=4, rollout=RolloutConfig(backend="hf", n=2, max_tokens=16),
                    reward=RewardConfig(pool=PoolConfig(workers=0)), kl=KLConfig(coefs={"math": 0.05}, mode="loss"),
                    ppo=PPOConfig(minibatches=2, micro_batch_size=2), save_every=1, keep_checkpoints=4,
                    actor_optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                    actor_lora=LoRAConfig(r=8, alpha=16.0, dropout=0.1), critic_lora=LoRAConfig(r=4, alpha=8.0),
                    ray=RayConfig(timeout_s=300))
    return dataclasses.replace(base, **kw)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _spawned(monkeypatch) -> list[str]:
    """Names of the worker groups RLRun spawns, recorded."""
    names, real = [], rl.driver.spawn

    def spawn(*a, **k):
        names.append(k.get("name", ""))
        return real(*a, **k)

    monkeypatch.setattr(rl.driver, "spawn", spawn)
    return names


def test_lora_run_resumes_exactly_from_adapter_only_checkpoints(sft_run, tmp_path, monkeypatch):
    """A LoRA actor (dropout 0.1) and a LoRA critic with KL: no reference workers, the KL taken
    against the actor's own base; checkpoints hold the adapters (and the value head) and their
    optimizer state only; a run killed after its second checkpoint ends, resumed, bit for bit
    where a run never killed ends. The engine runs the merged weights (log-prob gap ~1e-6)."""
    spawned = _spawned(monkeypatch)
    whole = fit(_cfg(sft_run, tmp_path / "whole"), progress=False)
    assert "ref" not in spawned and {"actor", "critic"} <= set(spawned)
    rows = _rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(any(v != 0 for k, v in r.items() if k.startswith("kl/")) for r in rows[1:])   # base != policy
    assert all(r["rollout/logp_gap_max"] < 1e-4 for r in rows)   # after every sync, the merged policy samples

    ckpt = tmp_path / "whole" / "checkpoints" / "step-000001"
    actor = FileSystemReader(str(ckpt / "actor")).read_metadata().state_dict_metadata
    model_keys = [k for k in actor if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert any(k.startswith("optim.state.") and ".lora_" in k for k in actor)
    critic = [k for k in FileSystemReader(str(ckpt / "critic")).read_metadata().state_dict_metadata if k.startswith("model.")]
    assert {k for k in critic if ".lora_" not in k} == {"model.value_head.weight", "model.value_head.bias"}
    size = sum(f.stat().st_size for f in (ckpt / "actor").iterdir())
    assert size < (sft_run["final"] / "model.safetensors").stat().st_size     # adapters, not the model

    run_killed_after_checkpoint(monkeypatch, rl.driver,
                                lambda: fit(_cfg(sft_run, tmp_path / "killed"), progress=False), after=2)
    resumed = fit(_cfg(sft_run, tmp_path / "killed"), progress=False)
    assert [r["step"] for r in _rows(tmp_path / "killed")] == [1, 2, 3]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(whole / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (load_file(d / "model.safetensors") for d in (tmp_path / "whole" / "final_critic",
                                                         tmp_path / "killed" / "final_critic"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_lora_grpo_run_raises_the_training_reward(sft_run, tmp_path):
    """GRPO with a LoRA actor (the default targets, r 16, lr 1e-3) on 8 fixed counting prompts, 8
    samples each at temperature 0.5, KL 0.01 against the adapters-off base: the training reward of
    the last 5 steps beats that of the first 5 by 0.15 (measured here: 0.39 -> 0.76)."""
    records = [r for r in load_records(sft_run["data"]["rl"], require="prompt") if r.task == "counting"][:8]
    data = tmp_path / "data" / "rl8.jsonl"
    write_records(data, records)
    cfg = _cfg(sft_run, tmp_path / "run", algo="grpo", data=str(data), steps=30, prompts_per_step=8, save_every=0,
               rollout=RolloutConfig(backend="hf", n=8, max_tokens=24, temperature=0.5),
               ppo=PPOConfig(minibatches=1, micro_batch_size=16), kl=KLConfig(coefs={"counting": 0.01}),
               actor_optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),   # 2e-3 collapsed at step 2
               actor_lora=LoRAConfig(), critic_lora=None)
    fit(cfg, progress=False)
    reward = [r["reward/all/total"] for r in _rows(tmp_path / "run") if "reward/all/total" in r]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert len(reward) == 30 and last >= first + 0.15, reward


# ----------------------------------------------------------------------------- FSDP2 worker groups

@pytest.mark.ray
def test_lora_actor_and_critic_groups_of_two_ranks_match_one_worker(ray_cluster, sft_run, tmp_path, monkeypatch):
    """ray.actor_workers=2 ray.critic_workers=2 with actor_lora and critic_lora (FSDP2 over gloo):
    the run matches the in-process run of the same seed (merged policy, KL against the adapters-off
    base), and its sharded adapter checkpoint exports with one worker (`vlrl export`)."""
    from recipe.cli import main as vlrl

    spawned = _spawned(monkeypatch)
    kw = dict(steps=2, actor_lora=LoRAConfig(r=8, alpha=16.0),   # no dropout: rows meet other draws on 2 ranks
              actor_optim=OptimConfig(lr=2e-4, warmup_steps=0, schedule="constant"))
    one = fit(_cfg(sft_run, tmp_path / "one", **kw), progress=False)
    ray = dataclasses.replace(RayConfig(timeout_s=300), actor_workers=2, critic_workers=2)
    two = fit(_cfg(sft_run, tmp_path / "two", ray=ray, **kw), progress=False)
    assert "ref" not in spawned
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4, name
    base, merged = load_file(sft_run["final"] / "model.safetensors"), load_file(two / "model.safetensors")
    assert any(not torch.equal(merged[k], base[k]) for k in base)                 # the merged policy moved
    r1, r2 = _rows(tmp_path / "one")[-1], _rows(tmp_path / "two")[-1]
    kl = [k for k in r1 if k.startswith("kl/")]
    assert kl and any(r1[k] != 0 for k in kl)
    assert all(r2[k] == pytest.approx(r1[k], rel=1e-3, abs=1e-7) for k in kl)
    assert r2["rollout/logp_gap_max"] < 1e-4

    assert vlrl(["export", str(tmp_path / "two"), "--out", str(tmp_path / "exported")]) == 0
    a, b = load_file(two / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert (tmp_path / "exported" / "adapter" / "adapter_config.json").is_file()
