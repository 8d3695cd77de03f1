"""Throughput features that must not change what is learnt: token-budget micro-batching (the same
log-probs, values and updates as fixed-size micro-batches, fewer padded tokens) and DAPO dynamic
sampling that refills the batch with groups that carry a learning signal."""
import dataclasses
import json
import random
from types import SimpleNamespace as R

import pytest
import torch
from safetensors.torch import load_file

import recipe.cli
import rl.driver

from model.info import describe
from model.load import load_processor
from records import load_records, write_records
from records.mixture import balanced_indices
from records.video import VideoGeometry
from rl.algos import policy_loss, truncated_is_weight
from rewards.config import PoolConfig, RewardConfig
from rl.config import GRPOConfig, PPOConfig, RLConfig, RolloutConfig
from rl.driver import fit
from rl.rollout_step import draw_indices, groups_with_signal, refill_pick
from rl.workers import CriticWorker, PolicyWorker
from rollout.sequences import prompt_from_record
from training.config import ConfigError, load_config, to_dict
from training.distributed import padded_chunks, rank_chunks, shard_rows, token_chunks
from training.optim import OptimConfig
from tests.helpers.kill import run_killed_after_checkpoint
from tests.helpers.batches import random_response_batch


def padded_tokens(chunks, lengths) -> int:
    return sum(len(c) * max(lengths[r] for r in c) for c, _ in chunks)


# ----------------------------------------------------------------------------- micro-batch plans

def test_token_chunks_cover_every_row_once_within_the_budget():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(0, 40)
        lengths = [rng.choice([rng.randint(5, 60), rng.randint(200, 400)]) for _ in range(n)]
        budget, max_rows = rng.randint(50, 800), rng.randint(1, 8)
        chunks = token_chunks(range(n), lengths, max_tokens=budget, max_rows=max_rows)
        assert sorted(r for c in chunks for r in c) == list(range(n))
        for c in chunks:
            assert len(c) <= max_rows
            assert len(c) == 1 or len(c) * max(lengths[r] for r in c) <= budget   # a longer row goes alone


def test_ranks_agree_on_the_number_of_passes_and_share_out_every_row():
    lengths = [300, 20, 25, 310, 22, 18, 290, 30, 26]
    rows = list(range(9))
    for world in (1, 2, 3):
        plans = [rank_chunks(rows, rank=r, world=world, size=4, lengths=lengths, max_tokens=100) for r in range(world)]
        assert len({len(p) for p in plans}) == 1
        assert sorted(r for p in plans for c, real in p if real for r in c) == rows
        assert all(len(c) == 1 for p in plans for c, real in p if not real)
    # off (max_tokens 0): exactly the row-count plan
    assert rank_chunks(rows, rank=1, world=2, size=2, lengths=lengths) == padded_chunks(
        shard_rows(rows, rank=1, world=2), 2, total=9, world=2)


def test_a_token_budget_pads_fewer_tokens_than_fixed_rows_on_mixed_lengths():
    """Three video rows among image rows: 4-row chunks in row order pad every chunk to a video row's
    length; longest-first chunks of <= 640 tokens keep the image rows together."""
    lengths = [60, 300, 55, 58, 62, 310, 57, 61, 59, 305, 56, 63]
    fixed = padded_chunks(list(range(12)), 4, total=12, world=1)
    budget = rank_chunks(range(12), rank=0, world=1, size=32, lengths=lengths, max_tokens=640)
    assert padded_tokens(fixed, lengths) == 4 * 300 + 4 * 310 + 4 * 305
    assert [c for c, _ in budget] == [[5, 9], [1, 11], [4, 7, 0, 8, 3, 6, 10, 2]]
    assert padded_tokens(budget, lengths) == 2 * 310 + 2 * 300 + 8 * 62
    assert padded_tokens(budget, lengths) / padded_tokens(fixed, lengths) < 0.5


def test_token_budget_must_not_be_negative(tmp_path):
    cfg = tmp_path / "rl.yaml"
    cfg.write_text("policy: x\ndata: y\nppo: {max_tokens_per_micro_batch: -1}\n")
    from rl.config import RLConfig

    with pytest.raises(ConfigError, match=r"ppo: max_tokens_per_micro_batch: must be >= 0"):
        load_config(RLConfig, cfg)


# ----------------------------------------------------------------------------- same numbers

@pytest.fixture(scope="module")
def mixed_batch(tiny_model_dir, suite_dir, extra_suite_dir):
    """Image, two-image and video prompts with responses of 3 to 30 tokens, as one rollout batch."""
    processor = load_processor(tiny_model_dir)
    geometry = VideoGeometry.of(processor)
    recs = load_records(suite_dir / "rl.jsonl", require="prompt")[:3]
    extra = load_records(extra_suite_dir / "rl.jsonl", require="prompt")
    recs += [next(r for r in extra if r.videos), next(r for r in extra if len(r.images) == 2)]
    prompts = [prompt_from_record(r, geometry) for r in recs]
    batch = random_response_batch(processor, prompts)
    seq = batch.seq
    lengths = seq.lengths
    assert max(lengths) > 2 * min(lengths)       # a batch where the plan matters
    return batch


def _policy(path):
    return PolicyWorker(str(path), optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"), seed=0)


def test_token_budget_gives_the_same_log_probs_values_and_updates(tiny_model_dir, mixed_batch):
    batch, mask = mixed_batch, mixed_batch.mask
    budget = 2 * max(batch.seq.lengths)          # about two rows per pass
    a, b = _policy(tiny_model_dir), _policy(tiny_model_dir)
    lp_rows, ent_rows = a.logp(batch.seq, micro_batch_size=3)
    lp_tok, ent_tok = b.logp(batch.seq, micro_batch_size=32, max_tokens=budget)
    assert ((lp_rows - lp_tok) * mask).abs().max() < 1e-4
    assert ((ent_rows - ent_tok) * mask).abs().max() < 1e-4
    g = torch.Generator().manual_seed(1)
    batch.old_logp, batch.ref_logp = lp_rows, lp_rows + 0.01 * torch.randn(lp_rows.shape, generator=g)
    batch.adv = torch.randn(mask.shape, generator=g) * mask
    mb = [list(range(0, batch.rows, 2)), list(range(1, batch.rows, 2))]
    kw = dict(kl_mode="loss", kl_kind="k3", minibatch_rows=mb)
    ma = a.update(batch, ppo=PPOConfig(micro_batch_size=3, lm_coef=0.1), **kw)
    mb_ = b.update(batch, ppo=PPOConfig(micro_batch_size=32, max_tokens_per_micro_batch=budget, lm_coef=0.1), **kw)
    for k in ("actor/loss", "actor/grad_norm", "actor/lm_loss", "actor/approx_kl", "actor/kl_loss_kl"):
        assert abs(ma[k] - mb_[k]) < 1e-4 * max(1.0, abs(ma[k])), k
    moved = max((pa - pb).abs().max().item() for pa, pb in zip(a.model.parameters(), b.model.parameters()))
    assert moved < 1e-5
    assert max((pa - pb).abs().max().item() for pa, pb in
               zip(a.model.parameters(), _policy(tiny_model_dir).model.parameters())) > 1e-4   # both did step

    c1 = CriticWorker(str(tiny_model_dir), optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    c2 = CriticWorker(str(tiny_model_dir), optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    v1 = c1.values(batch.seq, micro_batch_size=3)
    v2 = c2.values(batch.seq, micro_batch_size=32, max_tokens=budget)
    assert ((v1 - v2) * mask).abs().max() < 1e-4
    batch.values, batch.returns = v1, v1 + batch.adv
    m1 = c1.update(batch, ppo=PPOConfig(micro_batch_size=3), minibatch_rows=mb)
    m2 = c2.update(batch, ppo=PPOConfig(micro_batch_size=32, max_tokens_per_micro_batch=budget), minibatch_rows=mb)
    assert abs(m1["critic/loss"] - m2["critic/loss"]) < 1e-5 and abs(m1["critic/grad_norm"] - m2["critic/grad_norm"]) < 1e-4


# ----------------------------------------------------------------------------- task-balanced prompt draws

def test_balanced_draws_give_every_task_its_share_of_each_step():
    rng = random.Random(0)
    tasks = [rng.choice("abc") for _ in range(50)] + ["d"] * 3      # uneven pools, one of 3 records
    counts = {t: tasks.count(t) for t in "abcd"}
    for step in range(12):
        idx = balanced_indices(tasks, {}, step * 6, 6, seed=0)
        per = [tasks[i] for i in idx]
        assert sorted(per.count(t) for t in "abcd") == [1, 1, 2, 2]   # 6 slots over 4 tasks
    stream = balanced_indices(tasks, {}, 0, 4 * 30, seed=0)
    for t in "abcd":   # each task walks its own records in whole shuffled epochs
        mine = [i for i in stream if tasks[i] == t]
        assert sorted(mine[:counts[t]]) == sorted(i for i in range(len(tasks)) if tasks[i] == t)
    assert balanced_indices(tasks, {}, 17, 5, seed=0) == stream[17:22]          # pure function of the position
    assert balanced_indices(tasks, {}, 17, 5, seed=1) != stream[17:22]


def test_balanced_draws_follow_the_task_weights():
    tasks = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    idx = balanced_indices(tasks, {"b": 3}, 0, 50, seed=0)
    per = [tasks[i] for i in idx]
    assert (per.count("a"), per.count("b"), per.count("c")) == (10, 30, 10)
    assert per[:5] == ["a", "b", "c", "b", "b"]            # interleaved: every turn starts with each task once


def test_rl_steps_draw_balanced_prompts_when_asked():
    recs = [R(task=t, id=f"{t}{i}") for t, n in (("counting", 40), ("grounding", 5), ("math", 15)) for i in range(n)]
    cfg = RLConfig(policy="p", data="d", prompts_per_step=6, balance_tasks=True)
    for step in range(5):
        got = [recs[i].task for i in draw_indices(recs, step, 0, cfg)]
        assert got.count("counting") == got.count("grounding") == got.count("math") == 2
    plain = dataclasses.replace(cfg, balance_tasks=False)
    got = [recs[i].task for step in range(5) for i in draw_indices(recs, step, 0, plain)]
    assert got.count("counting") > got.count("grounding")   # shuffled draws follow the pool's shares
    assert draw_indices(recs, 3, 1, cfg) != draw_indices(recs, 3, 0, cfg)   # refill rounds: a stream of their own


# ----------------------------------------------------------------------------- refilling dynamic sampling

def test_refill_helpers():
    assert groups_with_signal([1, 1, 0, 1, 0, 0, 0.5, 0.2], 2) == [False, True, False, True]
    assert groups_with_signal([], 4) == []
    assert refill_pick([False, True, True, False, True], 2) == [1, 2]
    assert refill_pick([False, False, False], 2) == [0, 1]    # no signal anywhere: the update drops them


def test_dynamic_sampling_refills_the_batch_with_groups_that_carry_a_signal(sft_run, tmp_path):
    """Three prompts in four have an answer no response can match (their groups all score 0): the
    step draws more prompts until four groups have scores that differ, and trains on those only;
    without refill rounds the step trains on the few it drew. The draws are the same in a rerun."""
    recs = [r for r in load_records(sft_run["data"]["rl"], require="prompt") if r.task == "counting"][:24]
    recs = [r if i % 4 == 0 else dataclasses.replace(r, answer="no such answer") for i, r in enumerate(recs)]
    write_records(tmp_path / "rl.jsonl", recs)
    base = RLConfig(algo="grpo", policy=str(sft_run["final"]), data=str(tmp_path / "rl.jsonl"), steps=2,
                    prompts_per_step=4, rollout=RolloutConfig(backend="hf", n=4, max_tokens=24, temperature=0.5),
                    reward=RewardConfig(pool=PoolConfig(workers=0)), ppo=PPOConfig(minibatches=1, micro_batch_size=16),
                    grpo=GRPOConfig(dynamic_sampling=True, max_extra_draws=5), save_every=0)

    def metrics(out, **kw):
        fit(dataclasses.replace(base, out=str(tmp_path / out), **kw), progress=False)
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    rows = metrics("refill")
    for m in rows:
        found = round(m["rollout/groups_with_signal"] * m["rollout/prompts_drawn"])
        assert m["rollout/prompts_drawn"] == 4 * m["rollout/draws"] and 1 <= m["rollout/draws"] <= 6
        assert found >= 4 or m["rollout/draws"] == 6                    # it stops when full, or at the cap
        if found >= 4:
            assert m["rollout/kept_frac"] == 1.0                         # the batch holds those groups only
    assert any(m["rollout/draws"] > 1 and m["rollout/kept_frac"] == 1.0 for m in rows)   # refilled, and full
    assert [m["rollout/draws"] for m in metrics("again")] == [m["rollout/draws"] for m in rows]
    plain = metrics("no_refill", grpo=GRPOConfig(dynamic_sampling=True, max_extra_draws=0))
    assert all(m["rollout/draws"] == 1 for m in plain)
    assert min(m["rollout/kept_frac"] for m in plain) < 1.0


# ----------------------------------------------------------------------------- async rollouts and TIS

def test_truncated_is_weight_scales_each_tokens_policy_loss():
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(3, 5, generator=g) for _ in range(3))
    sampler = old + 0.5 * torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    w = truncated_is_weight(old, sampler, mask, cap=1.5)
    expected = torch.where(mask.bool(), torch.exp(old - sampler).clamp(max=1.5), torch.ones(3, 5))
    assert torch.allclose(w, expected) and (w == 1.5).any() and (w < 1).any()
    kw = dict(clip_low=0.2, clip_high=0.28, agg="token_mean")
    plain, _ = policy_loss(logp, old, adv, mask, **kw)
    weighted, _ = policy_loss(logp, old, adv, mask, is_weight=w, **kw)
    per_token = [policy_loss(logp, old, adv, mask * (torch.arange(15).view(3, 5) == i), num_tokens=mask.sum(), **kw)[0]
                 for i in range(15)]
    assert torch.allclose(plain, sum(per_token))
    assert torch.allclose(weighted, sum(p * w.flatten()[i] for i, p in enumerate(per_token)))


def test_async_config_is_checked_and_round_trips(tmp_path):
    cfg = tmp_path / "rl.yaml"
    cfg.write_text("policy: x\ndata: y\nrollout: {async: true}\n")
    loaded = load_config(RLConfig, cfg)
    assert loaded.rollout.async_ and loaded.use_ray and to_dict(loaded)["rollout"]["async"] is True
    for bad, msg in (("rollout.temperature=0.7", "rollout.async: .* rollout.temperature 1"),
                     ("ppo.tis_cap=0", "rollout.async: .* ppo.tis_cap > 0"),
                     ("ray.placement=colocated", "rollout.async: colocated engines sleep")):
        with pytest.raises(ConfigError, match=msg):
            load_config(RLConfig, cfg, [bad])
    with pytest.raises(ConfigError, match=r"rollout: unknown key 'asynch' \(known: .*async,"):
        load_config(RLConfig, cfg, ["rollout.asynch=true"])


@pytest.mark.ray
def test_async_rollouts_run_one_step_behind_and_resume_exactly(ray_cluster, sft_run, tmp_path, monkeypatch):
    """Four PPO steps, a checkpoint after step 2: steps 2 and 4 are rolled out during the update
    before them, with the weights of one step before (the engine's log-probs then differ from the
    trainer's by far more than numerics, and the TIS weights leave 1); a run killed after its
    checkpoint resumes to the same metrics and weights as the uninterrupted one."""
    cfg = RLConfig(algo="ppo", policy=str(sft_run["final"]), data=str(sft_run["data"]["rl"]), steps=4,
                   prompts_per_step=4, rollout=RolloutConfig(backend="hf", n=2, max_tokens=24, async_=True),
                   reward=RewardConfig(pool=PoolConfig(workers=0)), ppo=PPOConfig(minibatches=1, micro_batch_size=8),
                   actor_optim=OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"), save_every=2,
                   ray=dataclasses.replace(RLConfig().ray, timeout_s=300))

    def rows(out):
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    fit(dataclasses.replace(cfg, out=str(tmp_path / "a")), progress=False)
    a = rows("a")
    assert [m["rollout/policy_lag"] for m in a] == [0.0, 1.0, 0.0, 1.0]
    for m in a:
        stale = m["rollout/policy_lag"] == 1.0
        assert m["rollout/tis_applied"] == 1.0
        assert (m["rollout/logp_gap_max"] > 1e-2) == stale, m   # in step: numerics only (~1e-5)
        assert (abs(m["rollout/tis_weight_mean"] - 1.0) > 1e-3) == stale, m

    run_killed_after_checkpoint(monkeypatch, rl.driver,
                                lambda: fit(dataclasses.replace(cfg, out=str(tmp_path / "b")), progress=False))
    fit(dataclasses.replace(cfg, out=str(tmp_path / "b")), progress=False)
    b = rows("b")
    keys = ("reward/all/total", "actor/loss", "actor/grad_norm", "rollout/tis_weight_mean", "rollout/policy_lag")
    assert [[m[k] for k in keys] for m in b] == [[m[k] for k in keys] for m in a]
    wa, wb = (load_file(tmp_path / out / "final" / "model.safetensors") for out in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_small_preset_is_the_tiny_architecture_at_tens_of_millions(tmp_path, tiny_model_dir):
    """`vlrl model init-tiny --size small`: the benchmarks' model where compute dominates a step."""
    assert recipe.cli.main(["model", "init-tiny", str(tmp_path / "small"), "--size", "small"]) == 0
    small, tiny = describe(tmp_path / "small"), describe(tiny_model_dir)
    assert small.family == tiny.family == "qwen2_vl" and small.template == tiny.template
    total = sum(small.params.values())
    assert 20e6 < total < 60e6 and total > 20 * sum(tiny.params.values())
    assert small.max_pixels == 224 * 224 > tiny.max_pixels
    with pytest.raises(SystemExit):
        recipe.cli.main(["model", "init-tiny", str(tmp_path / "x"), "--size", "huge"])
