"""The RL driver: advantage assembly, per-task KL routing, one in-process step, exact resume."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rl.driver
from records import VideoGeometry, load_images, load_records, write_records
from rewards.config import PoolConfig, RewardConfig
from rewards.hybrid import score_batch
from rl.algos import kl as kl_estimate
from rl.batch import RolloutBatch
from rl.config import GRPOConfig, KLConfig, PPOConfig, RLConfig, RolloutConfig
from rl.driver import compute_advantages, evaluate_run, fit, minibatch_rows, uses_kl
from rl.rollout_step import prompt_pool
from rl.workers import PolicyWorker
from model.load import load_vlm
from rollout import make_engine
from rollout.greedy import generate_greedy
from rollout.sequences import build_sequences
from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig
from rollout.worker import RolloutWorker
from training.config import ConfigError
from training.optim import OptimConfig
from training.placement import Future
from tests.helpers.kill import run_killed_after_checkpoint


def _toy_batch():
    torch.manual_seed(0)
    B, T = 4, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)
    return {"mask": mask, "scores": torch.tensor([1.0, 0.0, 1.0, 0.0]), "logp": -torch.rand(B, T),
            "ref_logp": -torch.rand(B, T), "values": torch.rand(B, T),
            "kl_coef": torch.tensor([0.1, 0.0, 0.5, 0.0]), "prompt_index": torch.tensor([0, 0, 1, 1]),
            "task_id": torch.tensor([0, 0, 1, 1])}


def _adv(b, **kw):
    """compute_advantages on a dict of toy tensors."""
    settings = {"algo": "ppo", "ppo": PPOConfig(), "grpo": GRPOConfig(), **kw}
    return compute_advantages(b["scores"], b["mask"], old_logp=b["logp"], ref_logp=b["ref_logp"], values=b["values"],
                              kl_coef=b["kl_coef"], prompt_index=b["prompt_index"], task_id=b["task_id"], **settings)


def test_per_task_kl_reaches_only_its_samples():
    b = _toy_batch()
    out = _adv(b, kl_mode="reward")
    plain = _adv({**b, "kl_coef": torch.zeros(4)}, kl_mode="reward")
    k1 = kl_estimate(b["logp"], b["ref_logp"], kind="k1") * b["mask"]
    diff = plain.token_rewards - out.token_rewards
    assert torch.allclose(diff, b["kl_coef"][:, None] * k1, atol=1e-6)   # -beta_i * k1 on every token of sample i
    assert torch.equal(diff[[1, 3]], torch.zeros(2, 5))                    # beta = 0: exactly no KL
    # the score sits on the last response token
    assert plain.token_rewards[0].tolist() == [0, 0, 1, 0, 0] and plain.token_rewards[2].tolist() == [0, 1, 0, 0, 0]
    # no reference policy (every coefficient 0): exactly the rewards of zero coefficients
    no_ref = _adv({**b, "kl_coef": torch.zeros(4), "ref_logp": None}, kl_mode="reward")
    assert torch.equal(no_ref.token_rewards, plain.token_rewards) and torch.equal(no_ref.adv, plain.adv)


def test_loss_mode_leaves_rewards_alone_and_grpo_ignores_values():
    b = _toy_batch()
    out = _adv(b, kl_mode="loss")
    assert out.token_rewards.sum() == 2.0 and (out.adv * (1 - b["mask"])).abs().sum() == 0
    g = _adv({**b, "values": torch.full((4, 5), 9.0)}, algo="grpo", kl_mode="loss")
    # group 0 scores (1, 0), group 1 scores (1, 0): the better sample gets the positive advantage
    assert g.adv[0, 0] > 0 > g.adv[1, 0] and g.adv[2, 0] > 0 > g.adv[3, 0] and g.returns is None
    ds = _adv({**b, "scores": torch.tensor([1.0, 1.0, 1.0, 0.0])}, algo="grpo",
              grpo=GRPOConfig(dynamic_sampling=True), kl_mode="loss")
    assert ds.keep.tolist() == [False, False, True, True]


def test_per_task_whitening_undoes_a_value_bias_of_one_task():
    """The shared critic overestimates task 1 (values 0.9 where 1 of 3 samples is right): batch
    whitening leaves task 1's advantages mostly negative; per-task whitening centres each task."""
    b = {"mask": torch.ones(6, 3), "scores": torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]),
         "values": torch.tensor([0.5, 0.5, 0.5, 0.9, 0.9, 0.9])[:, None].repeat(1, 3),
         "logp": torch.zeros(6, 3), "ref_logp": torch.zeros(6, 3), "kl_coef": torch.zeros(6),
         "prompt_index": torch.arange(6), "task_id": torch.tensor([0, 0, 0, 1, 1, 1])}

    def adv(whiten_by):
        return _adv(b, ppo=PPOConfig(lam_alpha=0, whiten_by=whiten_by), kl_mode="reward").adv

    assert adv("batch")[3:].mean() < -0.1                                     # task 1 pushed down as a whole
    by_task = adv("task")
    for rows in (slice(0, 3), slice(3, 6)):
        assert abs(float(by_task[rows].mean())) < 1e-5 and float(by_task[rows].std()) > 0.5
    assert by_task[4].mean() > 0 > by_task[3].mean()                          # the right sample still wins
    centred = adv("task_center")
    for rows in (slice(0, 3), slice(3, 6)):
        assert abs(float(centred[rows].mean())) < 1e-5
    assert centred[4].mean() > 0 > centred[3].mean()


def test_task_weights_set_the_prompt_mixture(sft_run, tmp_path):
    cfg = _cfg(sft_run, tmp_path / "run")
    plain = prompt_pool(cfg)
    pool = prompt_pool(dataclasses.replace(cfg, task_weights={"math": 3}))
    n_math = sum(r.task == "math" for r in plain)
    assert n_math > 0 and len(pool) == len(plain) + 2 * n_math
    assert sum(r.task == "math" for r in pool) == 3 * n_math
    with pytest.raises(ConfigError, match="task_weights"):
        RLConfig(task_weights={"math": 0})


def test_engine_old_logp_needs_temperature_one():
    with pytest.raises(ConfigError, match="ppo.old_logp"):
        RLConfig(ppo=PPOConfig(old_logp="engine"), rollout=RolloutConfig(temperature=0.7))


def test_reference_policy_only_when_some_task_has_kl():
    assert not uses_kl(KLConfig()) and not uses_kl(KLConfig(coefs={"math": 0.0}))
    assert uses_kl(KLConfig(coefs={"caption": 0.02})) and uses_kl(KLConfig(default=0.01))


def test_minibatches_cover_every_row_each_epoch():
    mbs = minibatch_rows(list(range(10)), minibatches=3, epochs=2, seed=0)
    assert len(mbs) == 6
    assert sorted(sum(mbs[:3], [])) == list(range(10)) and sorted(sum(mbs[3:], [])) == list(range(10))


def _cfg(sft_run, out, **kw):
    data = sft_run["data"]
    base = RLConfig(policy=str(sft_run["final"]), data=str(data["rl"]), eval_data=None, out=str(out), steps=2,
                    prompts_per_step=4, rollout=RolloutConfig(backend="hf", n=2, max_tokens=24),
                    reward=RewardConfig(pool=PoolConfig(workers=0)), kl=KLConfig(coefs={"math": 0.05}),
                    ppo=PPOConfig(minibatches=1, micro_batch_size=8), save_every=1, keep_checkpoints=3)
    return dataclasses.replace(base, **kw)


def test_one_step_updates_and_syncs(tmp_path, sft_run):
    heldout = tmp_path / "heldout.jsonl"
    write_records(heldout, load_records(sft_run["data"]["heldout"])[:3])
    final = fit(_cfg(sft_run, tmp_path / "run", steps=1, eval_data=str(heldout)), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    m = rows[0]
    for key in ("reward/counting/total", "reward/math/total", "kl/math", "critic/loss", "critic/explained_variance",
                "actor/clip_frac_high", "response/entropy", "response/length_mean", "rollout/tokens_per_s",
                "time/rollout", "time/update"):
        assert key in m, key
    before, after = load_file(sft_run["final"] / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)      # the actor moved
    assert (tmp_path / "run" / "final_critic" / "value_head.safetensors").is_file()
    samples = (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()
    assert len(samples) == 4 * 2 and {"id", "task", "response", "reward"} <= set(json.loads(samples[0]))
    table = json.loads((tmp_path / "run" / "eval.json").read_text())     # held-out eval after the run
    greedy = (tmp_path / "run" / "eval.generations.jsonl").read_text().splitlines()
    assert table["all"]["n"] == 3 and len(greedy) == 3 and {"id", "response", "correct"} <= set(json.loads(greedy[0]))


def _rollout_batch(sft_run, *, prompts: int, n: int):
    """A policy worker (lr 1e-5) and a real rollout batch (images included) of its SFT model."""
    records = load_records(sft_run["data"]["rl"], require="prompt")[:prompts]
    prompt_list = [Prompt(r.prompt_messages, load_images(r)) for r in records]
    engine = make_engine(str(sft_run["final"]), EngineConfig(backend="hf"))
    completions = engine.generate(prompt_list, SamplingConfig(n=n, max_tokens=24, seed=0))
    worker = PolicyWorker(str(sft_run["final"]), optim=OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    return worker, build_sequences(worker.processor, prompt_list, completions)


def _batch(seq, **fields) -> RolloutBatch:
    rows = seq.rows
    base = dict(tasks=["counting"] * rows, task_id=torch.zeros(rows, dtype=torch.long), scores=torch.zeros(rows),
                correct=torch.zeros(rows, dtype=torch.bool), kl_coef=torch.zeros(rows))
    return RolloutBatch(seq=seq, **{**base, **fields})


def test_actor_update_moves_log_probs_the_way_the_advantage_points(sft_run):
    """Real policy, real rollout batch (images included): samples of prompts with A > 0 gain
    log-probability and those with A < 0 lose it after a few small actor steps."""
    worker, seq = _rollout_batch(sft_run, prompts=4, n=2)
    mask = seq.label_mask
    sign = 1.0 - 2.0 * (seq.prompt_index % 2).float()                 # prompts 0, 2: A = +1; 1, 3: A = -1
    before = worker.logp(seq)[0]
    rows = mask.shape[0]
    batch = _batch(seq, adv=sign[:, None] * mask, old_logp=before, ref_logp=before)
    for _ in range(3):
        worker.update(batch, ppo=PPOConfig(lm_coef=0.0), kl_mode="reward", kl_kind="k3",
                      minibatch_rows=[list(range(rows))])
    change = ((worker.logp(seq)[0] - before) * mask).sum(-1)
    assert change[sign > 0].mean() > 0 > change[sign < 0].mean(), change


def test_positive_lm_loss_is_the_mean_nll_of_the_correct_samples_only(sft_run):
    """VAPO's L_NLL averages over the correct samples' tokens: wrong samples in the same minibatch
    (even long ones) must not dilute it. Checked on the update's own forward, micro-batched."""
    worker, seq = _rollout_batch(sft_run, prompts=3, n=2)
    mask, rows = seq.label_mask, seq.rows
    before = worker.logp(seq)[0]
    correct = torch.tensor([i % 3 == 0 for i in range(rows)])
    batch = _batch(seq, adv=torch.zeros_like(mask), old_logp=before, ref_logp=before, correct=correct)
    m = worker.update(batch, ppo=PPOConfig(lm_coef=1.0, micro_batch_size=2), kl_mode="reward", kl_kind="k3",
                      minibatch_rows=[list(range(rows))])
    pos = mask * correct[:, None]
    expected = float(-(before * pos).sum() / pos.sum())
    assert m["actor/lm_loss"] == pytest.approx(expected, rel=1e-4)


def test_value_pretraining_trains_the_critic_alone(tmp_path, sft_run):
    """ppo.value_pretrain_steps: the first steps update the critic on the frozen SFT policy's returns;
    the actor and the rollout engine keep the SFT weights."""
    cfg = _cfg(sft_run, tmp_path / "run", steps=1, save_every=0,
               ppo=PPOConfig(minibatches=1, micro_batch_size=8, value_pretrain_steps=1))
    final = fit(cfg, progress=False)
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["train/value_pretraining"] == 1.0 and "critic/loss" in m and not any(k.startswith("actor/") for k in m)
    before, after = load_file(sft_run["final"] / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)               # the actor did not move
    # the critic's backbone (saved as language_model.*) moved away from the policy's decoder (model.*)
    critic = load_file(tmp_path / "run" / "final_critic" / "model.safetensors")
    pairs = {k: "model." + k.removeprefix("language_model.") for k in critic if k.startswith("language_model.")}
    pairs = {k: v for k, v in pairs.items() if v in before}
    assert pairs and any(not torch.equal(critic[k], before[v]) for k, v in pairs.items())


def test_killed_run_resumes_at_the_same_step_and_data(tmp_path, sft_run, monkeypatch):
    fit(_cfg(sft_run, tmp_path / "a"), progress=False)
    run_killed_after_checkpoint(monkeypatch, rl.driver, lambda: fit(_cfg(sft_run, tmp_path / "b"), progress=False))
    fit(_cfg(sft_run, tmp_path / "b"), progress=False)

    def ids(run, step):
        rows = [json.loads(x) for x in (tmp_path / run / "rollouts.jsonl").read_text().splitlines()]
        return [r["id"] for r in rows if r["step"] == step]

    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]                       # no step replayed or skipped
    assert ids("b", 2) == ids("a", 2) and ids("b", 1) == ids("a", 1)   # same data position
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and "critic" in state and "actor" in state


def test_nonfinite_loss_skips_the_update(sft_run):
    rec = load_records(sft_run["data"]["rl"])[0]
    prompt = Prompt(rec.prompt_messages, load_images(rec))
    w = PolicyWorker(str(sft_run["final"]), optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))
    tok = w.processor.tokenizer
    ids = tok("<think>x</think>3<|im_end|>")["input_ids"]
    seq = build_sequences(w.processor, [prompt], [[Completion(ids, [0.0] * len(ids), "", "stop")]])
    lp = w.logp(seq)[0]
    adv = torch.ones_like(lp)
    adv[0, -1] = float("nan")
    batch = _batch(seq, old_logp=lp, ref_logp=lp, adv=adv)
    before = w.state_dict()
    m = w.update(batch, ppo=PPOConfig(), kl_mode="reward", kl_kind="k3", minibatch_rows=[[0]])
    assert m["actor/skipped_nonfinite"] == 1
    assert all(torch.equal(before[k], v) for k, v in w.state_dict().items())


def test_dead_rollout_worker_is_restarted_and_the_step_retried(tmp_path, sft_run, monkeypatch):
    real = RolloutWorker.generate
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("engine died")
        return real(self, *a, **k)

    monkeypatch.setattr(RolloutWorker, "generate", flaky)
    fit(_cfg(sft_run, tmp_path / "run", steps=1, save_every=0), progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert calls["n"] == 2 and steps == [1]


@pytest.mark.ray
@pytest.mark.vllm
def test_ray_smoke_with_vllm_rollouts(tmp_path, sft_run):
    """The actor graph: policy, reference, shared critic, reward and a vLLM rollout engine as Ray
    actors; two steps with weight sync, then a checkpoint and a final policy. The old log-probs
    come from the engine (ppo.old_logp "engine"): right after a sync they are the actor's own, so
    the ratio of the single minibatch's forward is 1 and nothing is clipped. The held-out eval's
    greedy answers come from the engine (`eval_greedy: engine`): the final model's own HF greedy ones."""
    import ray

    heldout = tmp_path / "heldout.jsonl"
    records = [r for r in load_records(sft_run["data"]["heldout"]) if r.task != "caption"][:6]
    write_records(heldout, records)
    cfg = _cfg(sft_run, tmp_path / "run", rollout=RolloutConfig(backend="vllm", n=2, max_tokens=24),
               ppo=PPOConfig(minibatches=1, micro_batch_size=8, old_logp="engine"),
               ray=dataclasses.replace(RLConfig().ray, enabled=True, timeout_s=300),
               eval_data=str(heldout), eval_greedy="engine")
    try:
        final = fit(cfg, progress=False)
    finally:
        ray.shutdown()
    engine = [json.loads(x)["response"] for x in (tmp_path / "run" / "eval.generations.jsonl").read_text().splitlines()]
    own = generate_greedy(*load_vlm(final), records, max_new_tokens=24)
    assert engine == own and len(set(own)) > 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if not any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["rollout/tokens_per_s"] > 0
    for r in rows:
        assert r["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["actor/clip_frac_high"] == r["actor/clip_frac_low"] == 0.0
        assert r["response/entropy"] > 0 and "rollout/logp_gap_max" not in r
    assert (final / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "critic" / ".metadata").is_file()   # sharded state


def test_greedy_eval_gets_the_rollouts_token_budget(sft_run, tmp_path):
    records = load_records(sft_run["data"]["heldout"])[:4]
    calls = []

    class Actor:
        def generate_greedy(self, recs, **kw):
            calls.append(("generate_greedy", kw))
            return Future([f"<think>x</think>{r.answer}" for r in recs])

    class Reward:   # the reward worker: the training route scores the eval
        def score(self, inputs):
            calls.append(("score", len(inputs)))
            return Future(score_batch(inputs, cfg.reward))

    cfg = _cfg(sft_run, tmp_path / "run", rollout=RolloutConfig(backend="hf", n=2, max_tokens=56))
    run = SimpleNamespace(cfg=cfg, eval_records=records, actor=Actor(), reward_cfg=cfg.reward)
    run.greedy = lambda recs: rl.driver.RLRun.greedy(run, recs)
    run.score = lambda inputs: Reward().score(inputs).result()
    table, gens = evaluate_run(run)
    assert calls == [("generate_greedy", {"max_new_tokens": 56}), ("score", 4)]
    assert table["all"]["accuracy"] == 1.0 and table["all"]["reward"] == 1.0
    assert [g.id for g in gens] == [r.id for r in records]


@pytest.mark.parametrize("placement", ["split", "colocated"])
def test_sampled_eval_runs_beside_the_greedy_one_unless_they_share_gpus(sft_run, tmp_path, placement):
    """eval_samples = k: the engines draw k samples per prompt while the actor decodes greedily (a
    barrier both must reach proves the overlap); colocated engines and actor take turns."""
    import threading

    records = load_records(sft_run["data"]["heldout"])[:3]
    together = threading.Barrier(2, timeout=20)
    calls = []

    class Actor:
        def generate_greedy(self, recs, **kw):
            calls.append("greedy")
            if placement == "split":
                together.wait()
            return Future([f"<think>x</think>{r.answer}" for r in recs])

    class Rollouts:
        def generate(self, prompts, sampling):
            calls.append("sampled")
            if placement == "split":
                together.wait()
            return [[Completion(token_ids=[1], logp=[0.0], text="<think>x</think>nope", finish_reason="stop")] * sampling.n
                    for _ in prompts]

    cfg = _cfg(sft_run, tmp_path / "run", eval_samples=2,
               ray=dataclasses.replace(RLConfig().ray, placement=placement))
    run = SimpleNamespace(cfg=cfg, eval_records=records, actor=Actor(), rollouts=Rollouts(), reward_cfg=cfg.reward,
                          geometry=VideoGeometry())
    run.greedy = lambda recs: rl.driver.RLRun.greedy(run, recs)
    run.score = lambda inputs: score_batch(inputs, cfg.reward)
    table, _ = evaluate_run(run)
    assert table["all"]["accuracy"] == 1.0 and table["all"]["sampled_accuracy"] == 0.0
    if placement == "colocated":
        assert calls == ["greedy", "sampled"]
    else:
        assert sorted(calls) == ["greedy", "sampled"]


def test_actor_ema_is_the_stages_policy_and_resumes_exactly(tmp_path, sft_run, monkeypatch):
    """actor_ema: final/ is the weight average, not the last weights, and a run killed after its
    first checkpoint ends on the same average as one that ran through."""
    cfg = lambda out: _cfg(sft_run, tmp_path / out, actor_ema=0.5)   # noqa: E731
    through = load_file(fit(cfg("a"), progress=False) / "model.safetensors")
    run_killed_after_checkpoint(monkeypatch, rl.driver, lambda: fit(cfg("b"), progress=False))
    resumed = load_file(fit(cfg("b"), progress=False) / "model.safetensors")
    assert all(torch.allclose(through[k], resumed[k], atol=1e-6) for k in through)
    # the last weights, from the last checkpoint: the average lies elsewhere, and moved from the SFT model
    worker = PolicyWorker(str(sft_run["final"]), optim=OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    live = load_file(worker.export_checkpoint(tmp_path / "a" / "checkpoints" / "step-000002", "actor",
                                              tmp_path / "live") / "model.safetensors")
    sft = load_file(sft_run["final"] / "model.safetensors")
    moved = [k for k in sft if not torch.equal(sft[k], live[k])]
    assert moved and all(not torch.equal(through[k], live[k]) and not torch.equal(through[k], sft[k]) for k in moved)
    with pytest.raises(ConfigError, match="actor_ema"):
        dataclasses.replace(cfg("c"), actor_ema=1.0)
