"""`vlrl plan`: memory figures per worker group against hand-computed values, and the shipped 7B configs."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from recipe.plan import GIB, ModelFigures, activation_bytes, engine_memory, model_figures, plan, trainer_memory
from rl.config import KLConfig, PPOConfig, RayConfig, RLConfig, RolloutConfig
from training.distributed import FSDPConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelFigures(family="test", params=1_000_000_000, vision=100_000_000, merger=10_000_000, llm=890_000_000,
                     lm_head=100_000_000, hidden=1000, layers=10, vocab=1000, kv_heads=2, head_dim=100,
                     largest_block=50_000_000)


def test_trainer_figures_by_hand():
    # 1e9 parameters over 4 ranks: float32 master 1 GB, gradients 1 GB, Adam moments 2 GB per GPU;
    # two gathered bf16 blocks of 5e7 parameters: 2e8 bytes
    g = trainer_memory("actor", 10**9, ranks=4, train=True, compute_bytes=2, offload=False, largest_block=5 * 10**7,
                       activations=0)
    assert (g.master, g.grads, g.optim, g.weights) == (1e9, 1e9, 2e9, 2e8)
    assert g.total == 4.2e9
    off = trainer_memory("actor", 10**9, ranks=4, train=True, compute_bytes=2, offload=True, largest_block=5 * 10**7,
                         activations=0)
    assert off.master == off.grads == off.optim == 0 and off.weights == 2e8
    # a frozen bf16 reference over 2 ranks: its shard 1e9 bytes plus the gathered blocks
    ref = trainer_memory("reference", 10**9, ranks=2, train=False, compute_bytes=2, offload=False,
                         largest_block=5 * 10**7, activations=0)
    assert ref.weights == 1e9 + 2e8 and ref.grads == ref.optim == ref.master == 0


def test_activation_and_engine_figures_by_hand():
    # forward: 17 c s b h for one layer + c s b V logits + 4 s b V float32 log-softmax
    fwd = activation_bytes(micro_batch=2, seq_len=100, hidden=10, layers=3, vocab=50, compute_bytes=2, train=False,
                           checkpointing=False)
    assert fwd == 17 * 2 * 100 * 2 * 10 + 200 * 50 * 2 + 4 * 200 * 50
    # training, no checkpointing: every layer's 17 c s b h, logits and their gradient, the log-softmax
    full = activation_bytes(micro_batch=2, seq_len=100, hidden=10, layers=3, vocab=50, compute_bytes=2, train=True,
                            checkpointing=False)
    assert full == 3 * 68_000 + 200 * 50 * 4 + 4 * 200 * 50
    ckpt = activation_bytes(micro_batch=2, seq_len=100, hidden=10, layers=3, vocab=50, compute_bytes=2, train=True,
                            checkpointing=True, logp_chunk=10)
    assert ckpt == 3 * 2 * 200 * 10 + 68_000 + 200 * 50 * 4 + 4 * 10 * 2 * 50
    # an 80 GiB GPU at utilization 0.5 with 1e9 bf16 parameters over TP 2: 1e9 bytes of weights
    e = engine_memory(10**9, replicas=3, tp=2, gpu_bytes=80 * GIB, utilization=0.5)
    assert e.gpus == 6 and e.engine_weights == 1e9 and e.kv_cache == 40 * GIB - 1e9 - 2 * GIB


def test_plan_adds_up_the_groups_and_says_what_to_change():
    cfg = RLConfig(dtype="bfloat16", rollout=RolloutConfig(max_model_len=100, tensor_parallel_size=1, replicas=2,
                                                           gpu_memory_utilization=0.5),
                   ppo=PPOConfig(micro_batch_size=1), ray=RayConfig(actor_workers=2, critic_workers=2))
    p = plan(cfg, SMALL, gpus_per_node=8, nodes=1, gpu_memory_gib=80)
    assert [g.name for g in p.groups] == ["actor", "critic", "rollout"]    # no KL: no reference
    assert p.gpus_needed == 2 + 2 + 2 and p.fits
    actor = p.groups[0]
    assert actor.master == 4 * 10**9 / 2 and actor.optim == 8 * 10**9 / 2
    averaged = plan(dataclasses.replace(cfg, actor_ema=0.9), SMALL, gpus_per_node=8, nodes=1, gpu_memory_gib=80)
    assert averaged.groups[0].optim == 12 * 10**9 / 2 and averaged.groups[1].optim == p.groups[1].optim
    # the critic has no LM head but a value head
    assert p.groups[1].master == 4 * (10**9 - 10**8 + 1001) / 2
    # the same model on GPUs of 6 GiB does not fit (the actor needs 8.2e9 bytes a rank), and the advice names the keys
    small = plan(cfg, SMALL, gpus_per_node=8, nodes=1, gpu_memory_gib=6)
    assert not small.fits and any("ray.actor_workers" in a for a in small.advice)
    assert any("fsdp.cpu_offload" in a for a in small.advice)
    crowded = plan(dataclasses.replace(cfg, kl=KLConfig(default=0.1), ray=RayConfig(actor_workers=4, critic_workers=4)),
                   SMALL, gpus_per_node=8, nodes=1, gpu_memory_gib=80)
    assert crowded.gpus_needed == 4 + 4 + 1 + 2 and not crowded.fits and "colocated" in crowded.advice[0]
    offloaded = plan(dataclasses.replace(cfg, fsdp=FSDPConfig(cpu_offload=True)), SMALL, gpus_per_node=8, nodes=1,
                     gpu_memory_gib=80)
    assert offloaded.groups[0].master == 0
    # fsdp.wrap: root gathers the whole model instead of one block at a time
    assert actor.weights == 2 * 50_000_000 * 2
    rooted = plan(dataclasses.replace(cfg, fsdp=FSDPConfig(wrap="root")), SMALL, gpus_per_node=8, nodes=1,
                  gpu_memory_gib=80)
    assert rooted.groups[0].weights == 2 * 10**9 * 2


def test_model_figures_from_config_json(tiny_model_dir):
    m = model_figures(tiny_model_dir)
    assert m.family == "qwen2_vl" and m.params == m.vision + m.merger + m.llm
    assert m.vision > 0 and m.merger > 0 and m.lm_head == m.vocab * m.hidden and m.largest_block > 0


@pytest.mark.parametrize("config", ["rl_hybrid.yaml", "rl_hybrid_2node.yaml"])
def test_the_7b_configs_fit(config):
    out = subprocess.run([sys.executable, "-m", "recipe.cli", "plan", "--config", f"configs/qwen2_5_vl_7b/{config}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8.29B parameters" in out.stdout and out.stdout.strip().splitlines()[-1] == "fits"
    more = subprocess.run([sys.executable, "-m", "recipe.cli", "plan", "--config", f"configs/qwen2_5_vl_7b/{config}",
                           "--gpu-memory-gib", "24"], cwd=ROOT, capture_output=True, text=True)
    assert more.returncode == 1 and "does not fit" in more.stdout
