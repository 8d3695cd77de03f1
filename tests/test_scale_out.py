"""Scale-out on CPU with gloo and the tiny VLM: FSDP2 worker groups as Ray actors, rollout replicas,
bucketed weight sync, sharded checkpoints, and recovery from dead workers."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rl.driver
from bench.train_step import fixed_batch
from rewards.config import PoolConfig, RewardConfig
from rl.config import PPOConfig, RayConfig, RLConfig, RolloutConfig
from rl.driver import fit, minibatch_rows
from rl.workers import CriticWorker, PolicyWorker
from rollout.sync import buckets, layer_key
from training.distributed import FSDPConfig, padded_chunks, shard_rows
from training.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[1]


def test_rows_are_shared_out_and_every_rank_runs_the_same_passes():
    rows = list(range(7))
    shares = [shard_rows(rows, rank=r, world=3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    chunks = [padded_chunks(s, 2, total=7, world=3) for s in shares]
    assert [len(c) for c in chunks] == [2, 2, 2]                  # ceil(ceil(7 / 3) / 2) passes each
    assert chunks[1] == [([1, 4], True), ([1], False)]            # the padding pass repeats a row
    assert padded_chunks([], 2, total=1, world=2) == [([0], False)]   # a rank without rows still takes part


def test_buckets_keep_layers_whole():
    t = torch.zeros(10)   # 40 bytes
    named = [("model.embed_tokens.weight", t), ("model.layers.0.q_proj.weight", t), ("model.layers.0.k_proj.weight", t),
             ("model.layers.1.q_proj.weight", t), ("model.layers.1.k_proj.weight", t), ("lm_head.weight", t)]
    out = [list(b) for b in buckets(named, max_bytes=50)]
    assert out == [["model.embed_tokens.weight", "model.layers.0.q_proj.weight", "model.layers.0.k_proj.weight"],
                   ["model.layers.1.q_proj.weight", "model.layers.1.k_proj.weight"], ["lm_head.weight"]]
    assert layer_key("model.visual.blocks.3.attn.qkv.weight") == "model.visual.blocks.3"
    assert sum(len(b) for b in buckets(named, max_bytes=10**9)) == len(named)


@pytest.mark.ray
def test_two_ranks_update_the_actor_and_the_critic_as_one_rank(ray_cluster, sft_run):
    """FSDP2 over 2 gloo ranks vs one unsharded worker, on the same fixed batch (images included):
    the same log-probs, loss, gradient norm and updated weights (float32)."""
    from training.placement import spawn

    model, optim = str(sft_run["final"]), OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
    ppo = PPOConfig(minibatches=2, micro_batch_size=3, lm_coef=0.1)
    one = PolicyWorker(model, optim=optim)
    batch = fixed_batch(one.processor, sft_run["data"]["rl"], prompts=3, n=3, response_tokens=6)
    batch.old_logp, _ = one.logp(batch.seq, micro_batch_size=4)
    batch.ref_logp = batch.old_logp
    rows = minibatch_rows(list(range(batch.rows)), minibatches=2, epochs=1, seed=0)   # 5 + 4 rows
    two = spawn(PolicyWorker, model, optim=optim, workers=2, use_ray=True, timeout=600)
    try:
        assert torch.equal(two.logp(batch.seq, micro_batch_size=4).result()[0], batch.old_logp)
        m1 = one.update(batch, ppo=ppo, kl_mode="loss", kl_kind="k3", minibatch_rows=rows)
        m2 = two.update(batch, ppo=ppo, kl_mode="loss", kl_kind="k3", minibatch_rows=rows).result()
        for k in ("actor/loss", "actor/grad_norm", "actor/lm_loss", "actor/clip_frac_high"):
            assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
        s1, s2 = one.state_dict(), two.state_dict().result()
        assert s1.keys() == s2.keys() and max((s1[k] - s2[k]).abs().max().item() for k in s1) < 1e-5
    finally:
        two.kill()
    one = CriticWorker(model, optim=optim)
    batch.values = one.values(batch.seq, micro_batch_size=4)
    two = spawn(CriticWorker, model, optim=optim, workers=2, use_ray=True, timeout=600)
    try:
        assert torch.equal(two.values(batch.seq, micro_batch_size=4).result(), batch.values)
        m1 = one.update(batch, ppo=ppo, minibatch_rows=rows)
        m2 = two.update(batch, ppo=ppo, minibatch_rows=rows).result()
        for k in ("critic/loss", "critic/grad_norm", "critic/clip_frac"):   # (explained variance is per micro-batch)
            assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-7), k
        s1, s2 = one.state_dict(), two.state_dict().result()
        assert max((s1[k] - s2[k]).abs().max().item() for k in s1) < 1e-5
    finally:
        two.kill()


def _cfg(sft_run, out, **kw) -> RLConfig:
    base = RLConfig(policy=str(sft_run["final"]), data=str(sft_run["data"]["rl"]), eval_data=None, out=str(out),
                    steps=2, prompts_per_step=4, rollout=RolloutConfig(backend="hf", n=2, max_tokens=16),
                    reward=RewardConfig(pool=PoolConfig(workers=0)),
                    ppo=PPOConfig(minibatches=2, micro_batch_size=2), save_every=1, keep_checkpoints=4,
                    ray=RayConfig(timeout_s=300))
    return dataclasses.replace(base, **kw)


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.mark.ray
def test_sharded_trainers_and_replicas_run_and_match_one_worker(ray_cluster, sft_run, tmp_path):
    """ray.actor_workers=2 ray.critic_workers=2: with one HF replica the final policy (the weight
    average, `actor_ema`, kept shard by shard) matches the in-process run of the same seed; with
    rollout.replicas=2 the run finishes every step."""
    ray = dataclasses.replace(RayConfig(timeout_s=300), actor_workers=2, critic_workers=2)
    one = fit(_cfg(sft_run, tmp_path / "one", actor_ema=0.5), progress=False)
    two = fit(_cfg(sft_run, tmp_path / "two", ray=ray, actor_ema=0.5), progress=False)
    a, b = _weights(one), _weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert any(not torch.equal(a[k], _weights(sft_run["final"])[k]) for k in a)      # both moved
    ckpt = tmp_path / "two" / "checkpoints" / "step-000002"
    assert (ckpt / "actor" / ".metadata").is_file() and (ckpt / "critic" / ".metadata").is_file()
    assert (ckpt / "actor" / "ema" / ".metadata").is_file()
    rep = fit(_cfg(sft_run, tmp_path / "rep", ray=ray, rollout=RolloutConfig(backend="hf", n=2, max_tokens=16,
                                                                             replicas=2)), progress=False)
    assert _steps(tmp_path / "rep") == [1, 2] and (rep / "model.safetensors").is_file()
    m = json.loads((tmp_path / "rep" / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["sync/buckets"] >= 1 and m["restarts/rollout"] == 0 and m["restarts/trainer"] == 0


@pytest.mark.ray
def test_a_dead_replica_or_trainer_rank_costs_no_step(ray_cluster, sft_run, tmp_path, monkeypatch):
    """Ray actors killed mid-run: a rollout replica during generate and during the weight sync (it is
    restarted with the current weights, only its share retried), then a trainer rank during the
    update (every worker restarts from the last checkpoint). Each run logs every step once."""
    import ray

    rng = random.Random(0)
    kill_at = {"generate": rng.choice([1, 2]), "sync": rng.choice([1, 2])}
    calls = {"generate": 0, "sync": 0}
    real_generate, real_push = rl.driver.Rollouts.generate, rl.driver.RLRun.push_weights

    def generate(self, prompts, sampling):
        calls["generate"] += 1
        if calls["generate"] == kill_at["generate"]:
            ray.kill(self.handles[0].actor)
        return real_generate(self, prompts, sampling)

    def push(self, targets):
        calls["sync"] += 1
        if calls["sync"] == kill_at["sync"] + 1:       # +1: the first push is the one at start-up
            ray.kill(targets[-1].actor)
        return real_push(self, targets)

    monkeypatch.setattr(rl.driver.Rollouts, "generate", generate)
    monkeypatch.setattr(rl.driver.RLRun, "push_weights", push)
    ray_cfg = dataclasses.replace(RayConfig(timeout_s=300), critic_workers=2)
    fit(_cfg(sft_run, tmp_path / "replica", ray=ray_cfg,
             rollout=RolloutConfig(backend="hf", n=2, max_tokens=16, replicas=2)), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "replica" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["restarts/rollout"] == 2
    monkeypatch.undo()

    real_update = rl.driver.WorkerGroup.__getattr__
    died = {"n": 0}

    def getattr_killing_rank_1(self, method):
        call = real_update(self, method)
        if method == "update" and self.cls is CriticWorker and not died["n"]:
            def update(*a, **k):
                f = call(*a, **k)
                died["n"] += 1
                ray.kill(self.actors[1])
                return f
            return update
        return call

    monkeypatch.setattr(rl.driver.WorkerGroup, "__getattr__", getattr_killing_rank_1)
    fit(_cfg(sft_run, tmp_path / "trainer", ray=ray_cfg, steps=3), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "trainer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and died["n"] == 1 and rows[-1]["restarts/trainer"] == 1


def _vlrl_rl(cfg_path: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "recipe.cli", "rl", "--config", str(cfg_path), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_9_of_the_driver_resumes_to_the_same_weights(sft_run, tmp_path):
    """`vlrl rl` killed with SIGKILL after its second checkpoint, then run again: the same final
    policy, bit for bit, as a run never killed."""
    import yaml

    def config(out: Path) -> Path:
        cfg = {"policy": str(sft_run["final"]), "data": str(sft_run["data"]["rl"]), "eval_data": None, "out": str(out),
               "steps": 4,
               "prompts_per_step": 4, "save_every": 1, "keep_checkpoints": 5,
               "rollout": {"backend": "hf", "n": 2, "max_tokens": 16}, "reward": {"pool": {"workers": 0}},
               "kl": {"coefs": {"math": 0.05}}, "ppo": {"minibatches": 2, "micro_batch_size": 4}}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _vlrl_rl(config(whole), whole).wait(timeout=900) == 0
    proc = _vlrl_rl(config(killed), killed)
    deadline = time.time() + 900
    while not (killed / "checkpoints" / "step-000002").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    time.sleep(random.Random(1).uniform(0.0, 2.0))    # somewhere inside step 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    assert _vlrl_rl(config(killed), killed).wait(timeout=900) == 0
    assert _steps(killed) == [1, 2, 3, 4]
    a, b = _weights(whole / "final"), _weights(killed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ray
def test_sft_and_reward_model_training_on_two_ranks_match_one(ray_cluster, tiny_model_dir, suite_dir, tmp_path):
    """`workers: 2` shares each batch over two FSDP2 ranks (5 records: 3 + 2): the same losses and
    final weights as one worker."""
    from recipe.sft import SFTConfig, train_sft
    from rewards.rm_train import RMConfig, train_rm
    from synth.prefs import write_preference_pairs

    optim = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
    sft = SFTConfig(model=str(tiny_model_dir), data=str(suite_dir / "sft.jsonl"), out=str(tmp_path / "sft1"), steps=3,
                    batch_size=5, save_every=2, log_every=1, optim=optim, eval_data=str(suite_dir / "heldout.jsonl"),
                    eval_max_new_tokens=8)
    one = train_sft(sft, progress=False)
    two = train_sft(dataclasses.replace(sft, out=str(tmp_path / "sft2"), workers=2), progress=False)

    def losses(run: str, key: str) -> list[float]:
        return [json.loads(x)[key] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if key in json.loads(x)]

    assert losses("sft2", "train/loss") == pytest.approx(losses("sft1", "train/loss"), rel=1e-5)
    a, b = _weights(one), _weights(two)
    # three Adam steps at lr 1e-3: a rounding-level gradient difference moves a weight by < lr / 10
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert (tmp_path / "sft2" / "checkpoints" / "step-000002" / "model" / ".metadata").is_file()
    # the whole model as one FSDP unit, kept gathered between forward and backward: the same training
    root = train_sft(dataclasses.replace(sft, out=str(tmp_path / "sft3"), workers=2,
                                         fsdp=FSDPConfig(wrap="root", reshard_after_forward=False)), progress=False)
    assert losses("sft3", "train/loss") == pytest.approx(losses("sft1", "train/loss"), rel=1e-5)
    c = _weights(root)
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-4
    # the held-out eval decodes greedily on the sharded model (the vision tower runs outside the
    # root's forward there): every prompt answered, as one worker answers it
    answers = [[json.loads(x)["response"] for x in (tmp_path / r / "eval.generations.jsonl").read_text().splitlines()]
               for r in ("sft1", "sft2", "sft3")]
    assert len(answers[0]) == 40 and answers[1] == answers[0] and answers[2] == answers[0]

    pairs = write_preference_pairs(tmp_path / "prefs", n=20, n_heldout=4)
    rm = RMConfig(model=str(tiny_model_dir), data=str(pairs["train"]), eval_data=str(pairs["heldout"]),
                  out=str(tmp_path / "rm1"), steps=2, batch_size=5, save_every=0, log_every=1, optim=optim)
    one = train_rm(rm, progress=False)
    two = train_rm(dataclasses.replace(rm, out=str(tmp_path / "rm2"), workers=2), progress=False)
    assert losses("rm2", "train/loss") == pytest.approx(losses("rm1", "train/loss"), rel=1e-5)
    a, b = _weights(one), _weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    root = train_rm(dataclasses.replace(rm, out=str(tmp_path / "rm3"), workers=2,
                                        fsdp=FSDPConfig(wrap="root", reshard_after_forward=False)), progress=False)
    assert losses("rm3", "train/loss") == pytest.approx(losses("rm1", "train/loss"), rel=1e-5)
    c = _weights(root)
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-4
    r1, r2 = (json.loads((tmp_path / r / "eval.json").read_text()) for r in ("rm1", "rm2"))
    assert r2["margin"] == pytest.approx(r1["margin"], rel=1e-4) and r2["n"] == r1["n"] == 4
