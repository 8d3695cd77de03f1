"""The hybrid RL driver (`vlrl rl`): a single controller whose loop reads as the algorithm's dataflow.

    prompts -> rollout (n per prompt) -> hybrid reward (format gate, verifiers, RM)
            -> old/ref log-probs, values -> per-task KL -> advantages (decoupled GAE | GRPO)
            -> critic update, actor update -> weight sync -> metrics, checkpoint

PPO uses ONE shared critic for every task type (RLHF and RLVR prompts in the same batch) and a
per-task KL coefficient. Workers run here or as Ray actors (`rl.placement`); each stage is timed.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from model.load import load_processor
from records import Record, VideoGeometry, load_records, media_counts
from records.mixture import batch_indices, weighted_records
from rewards.evaluate import add_rm_scores, add_sampled_scores, eval_subset, format_table, judge, summarize, write_eval
from rewards.hybrid import RewardResult
from rewards.inputs import is_correct, reward_inputs
from rl.algos import (decoupled_gae, dynamic_sampling_mask, group_advantages, kl_coefs, kl_penalty_rewards,
                      length_adaptive_lambda, token_rewards_from_scores, whiten, whiten_by_group)
from rl.algos import kl as kl_estimate
from rl.batch import RolloutBatch
from rl.config import GRPOConfig, KLConfig, PPOConfig, RLConfig
from rl.placement import Handle, spawn, start_local_ray
from rl.workers import CriticWorker, PolicyWorker, RewardWorker
from rollout.sequences import build_sequences, engine_logp, prompt_from_record
from rollout.types import Completion, EngineConfig, Prompt, SamplingConfig
from rollout.worker import RolloutWorker
from training.atomic import atomic_dir, write_json
from training.config import ConfigError, to_dict
from training.runlog import (MetricsLog, latest_checkpoint, load_trainer_state, over_budget, periodic, save_checkpoint,
                             set_rng_state)

# ----------------------------------------------------------------------------- pure helpers


@dataclass
class Advantages:
    adv: Tensor             # (B, T) actor advantages, 0 off the response
    returns: Tensor | None  # (B, T) critic targets (PPO; None for GRPO)
    token_rewards: Tensor   # (B, T) the score on the last response token, KL penalty folded in (mode reward)
    keep: Tensor            # (B,) bool: rows the updates train on (DAPO dynamic sampling drops some)


def compute_advantages(scores: Tensor, mask: Tensor, *, old_logp: Tensor | None, ref_logp: Tensor | None,
                       values: Tensor | None, kl_coef: Tensor, prompt_index: Tensor, task_id: Tensor, algo: str,
                       ppo: PPOConfig, grpo: GRPOConfig, kl_mode: str, gamma: float = 1.0) -> Advantages:
    """Advantages and critic targets of one step, all on label positions.

    scores (B,), mask (B, T), old_logp / ref_logp (B, T) (ref_logp None: no reference policy, so no
    KL), values (B, T) (PPO), kl_coef (B,), prompt_index (B,) (GRPO groups), task_id (B,) (PPO
    whitening by task).
    """
    rewards = token_rewards_from_scores(scores, mask)                       # (B, T)
    if kl_mode == "reward" and ref_logp is not None:
        rewards = kl_penalty_rewards(rewards, old_logp, ref_logp, mask, kl_coef)
    keep = torch.ones(mask.shape[0], dtype=torch.bool)
    if algo == "grpo":
        adv_seq = group_advantages(scores, prompt_index, norm_std=grpo.norm_std)   # (B,)
        if grpo.dynamic_sampling:
            keep = dynamic_sampling_mask(scores, prompt_index)
        return Advantages(adv_seq[:, None] * mask, None, rewards, keep)
    lengths = mask.sum(-1).clamp(min=1)
    lam_actor = length_adaptive_lambda(lengths, alpha=ppo.lam_alpha) if ppo.lam_alpha > 0 else ppo.lam_actor
    adv, returns = decoupled_gae(rewards, values, mask, gamma=gamma, lam_actor=lam_actor, lam_critic=ppo.lam_critic)
    if ppo.whiten_adv:
        if ppo.whiten_by == "batch":
            adv = whiten(adv, mask)
        else:
            adv = whiten_by_group(adv, mask, task_id, scale="group" if ppo.whiten_by == "task" else "batch")
    return Advantages(adv * mask, returns, rewards, keep)


def minibatch_rows(rows: list[int], *, minibatches: int, epochs: int, seed: int) -> list[list[int]]:
    """`epochs` shuffled passes over `rows`, each split into `minibatches` parts."""
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = rows[:]
        rng.shuffle(order)
        k = max(1, min(minibatches, len(order)))
        out += [order[i::k] for i in range(k)]
    return [r for r in out if r]


def video_rows_last(rows: list[int], seq) -> list[int]:
    """`rows` with the rows that hold video clips moved to the end (a stable sort): their micro-batches
    pad to video length, the others do not. A minibatch's loss does not depend on its rows' order."""
    vision = seq.vision
    if vision is None or vision.videos_per_row is None:
        return rows
    return sorted(rows, key=lambda r: bool(vision.videos_per_row[r]))


def uses_kl(kl_cfg: KLConfig) -> bool:
    """Whether any task has a non-zero KL coefficient (else no reference policy is needed)."""
    return kl_cfg.default != 0 or any(c != 0 for c in kl_cfg.coefs.values())


def prompt_pool(cfg: RLConfig) -> list[Record]:
    """The records the steps draw prompts from: `cfg.data` with each record of task t repeated
    `cfg.task_weights[t]` times (the prompt mixture)."""
    return weighted_records(load_records(cfg.data, require="prompt"), cfg.task_weights)


def check_media_limits(records: list[Record], engine: EngineConfig, geometry: VideoGeometry) -> None:
    """ConfigError naming the rollout setting when a prompt holds more images or video clips than the
    vLLM engine is started for (`rollout.max_images_per_prompt`, `rollout.max_video_clips_per_prompt`)."""
    if engine.backend != "vllm":
        return
    for rec in records:
        if not rec.videos and len(rec.images) <= engine.max_images_per_prompt:
            continue
        images, clips = media_counts(rec, geometry)
        for n, key in ((images, "max_images_per_prompt"), (clips, "max_video_clips_per_prompt")):
            if n > getattr(engine, key):
                raise ConfigError(f"rollout.{key}: {getattr(engine, key)}, but the prompt at {rec.source} "
                                  f"({rec.id}) takes {n}")


def step_metrics(batch: RolloutBatch, results: list[RewardResult]) -> dict[str, float]:
    """Reward per task and component, KL per task (when a reference policy runs), the critic's value
    bias per task (PPO), response lengths."""
    out: dict[str, float] = {}
    by_task = defaultdict(list)
    for i, t in enumerate(batch.tasks):
        by_task[t].append(i)
    mask = batch.mask
    k1 = None if batch.ref_logp is None else kl_estimate(batch.old_logp, batch.ref_logp, kind="k1") * mask
    for t, idx in by_task.items():
        out[f"reward/{t}/total"] = sum(results[i].reward for i in idx) / len(idx)
        for part in sorted({p for i in idx for p in results[i].parts}):
            out[f"reward/{t}/{part}"] = sum(results[i].parts.get(part, 0.0) for i in idx) / len(idx)
        if k1 is not None:
            out[f"kl/{t}"] = float(k1[idx].sum() / mask[idx].sum().clamp(min=1))
        if batch.values is not None:  # the shared critic's bias on this task: V(first response state) - score
            first = batch.values[idx].gather(1, mask[idx].argmax(-1, keepdim=True))[:, 0]
            out[f"critic/value_bias/{t}"] = float((first - batch.scores[idx]).mean())
    out["reward/all/total"] = sum(r.reward for r in results) / max(1, len(results))
    lengths = mask.sum(-1).float()
    out["response/length_mean"] = float(lengths.mean())
    out["response/length_max"] = float(lengths.max())
    if batch.entropy is not None:  # else (old_logp "engine") the actor update reports it
        out["response/entropy"] = float((batch.entropy * mask).sum() / mask.sum().clamp(min=1))
    return out


def engine_logp_gap(batch: RolloutBatch, completions: list[list[Completion]]) -> float:
    """max |engine log-prob - trainer log-prob| over sampled tokens (both of the raw policy at T=1)."""
    try:
        engine = engine_logp(completions, batch.mask)
    except ValueError:
        return float("nan")
    if not batch.mask.any():
        return float("nan")
    return float(((engine - batch.old_logp) * batch.mask).abs().max())


# ----------------------------------------------------------------------------- the run

class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        yield
        self.seconds[f"time/{name}"] = self.seconds.get(f"time/{name}", 0.0) + time.time() - t0


class RLRun:
    """Holds the workers of one run: the actor, the reference policy (when some task has KL), the
    shared critic (PPO), the reward worker and the rollout worker."""

    def __init__(self, cfg: RLConfig, *, start_from: Path | None):
        self.cfg = cfg
        self.records = prompt_pool(cfg)
        self.eval_records = load_records(cfg.eval_data, require="prompt") if cfg.eval_data else []
        self.policy_dir = str(start_from or cfg.policy)
        self.processor = load_processor(self.policy_dir)
        self.geometry = VideoGeometry.of(self.processor)
        check_media_limits(self.records + self.eval_records, cfg.rollout, self.geometry)
        r = cfg.ray
        self.own_ray = False   # whether this run started Ray (and so shuts it down in close())
        if r.enabled:
            import ray  # optional: only Ray placement needs it
            if not ray.is_initialized():
                start_local_ray(num_cpus=r.num_cpus, address=None if r.address in (None, "local") else r.address)
                self.own_ray = True
        common = dict(use_ray=r.enabled, timeout=r.timeout_s)
        self.actor: Handle[PolicyWorker] = spawn(
            PolicyWorker, self.policy_dir, optim=cfg.actor_optim, total_steps=cfg.steps, dtype=cfg.dtype,
            seed=cfg.seed, chunk_size=cfg.ppo.entropy_chunk, temperature=cfg.rollout.temperature,
            num_gpus=r.actor_gpus, name="actor", **common)
        # No KL anywhere: no reference policy (ref_logp stays None and no KL is logged).
        self.ref: Handle[PolicyWorker] | None = None
        if uses_kl(cfg.kl):
            self.ref = spawn(PolicyWorker, cfg.policy, optim=None, dtype=cfg.dtype, chunk_size=cfg.ppo.entropy_chunk,
                             temperature=cfg.rollout.temperature, num_gpus=r.actor_gpus, name="ref", **common)
        self.critic: Handle[CriticWorker] | None = None
        if cfg.algo == "ppo":
            critic_dir = str(start_from / "critic") if start_from else (cfg.critic or cfg.policy)
            self.critic = spawn(CriticWorker, critic_dir, optim=cfg.critic_optim, total_steps=cfg.steps,
                                dtype=cfg.dtype, seed=cfg.seed, num_gpus=r.actor_gpus, name="critic", **common)
        self.reward: Handle[RewardWorker] = spawn(RewardWorker, cfg.reward, reward_model=cfg.reward_model,
                                                  name="reward", **common)
        self.rollout: Handle[RolloutWorker] = self._start_rollout()

    def _start_rollout(self) -> Handle[RolloutWorker]:
        ro = self.cfg.rollout
        engine = ro if ro.dtype is not None else dataclasses.replace(ro, dtype=self.cfg.dtype)
        return spawn(RolloutWorker, self.policy_dir, engine, seed=self.cfg.seed, use_ray=self.cfg.ray.enabled,
                     timeout=self.cfg.ray.timeout_s, num_gpus=self.cfg.ray.rollout_gpus, name="")

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig) -> list[list[Completion]]:
        """The rollout, restarting a dead rollout worker (with the current weights) and retrying."""
        last = None
        for attempt in range(self.cfg.rollout.retries + 1):
            try:
                return self.rollout.generate(prompts, sampling).result()
            except Exception as e:  # a dead actor (RayActorError) or a crashed engine: restart, retry
                last = e
                print(f"[rl] rollout failed ({type(e).__name__}: {e}); restarting the engine (try {attempt + 1})")
                try:
                    self.rollout.close().result()
                except Exception:  # noqa: BLE001  (the worker may be gone already)
                    pass
                self.rollout.kill()
                self.rollout = self._start_rollout()
                self.rollout.sync_weights(self.actor.state_dict().result()).result()
        raise RuntimeError(f"rollout failed {self.cfg.rollout.retries + 1} times") from last

    def checkpoint(self, out: Path, step: int) -> None:
        models = {"policy": _Saver(self.actor)}
        state = {"actor": self.actor.optim_state().result()}
        if self.critic is not None:
            models["critic"] = _Saver(self.critic)
            state["critic"] = self.critic.optim_state().result()
        save_checkpoint(out, step, models=models, state=state, keep=self.cfg.keep_checkpoints)

    def resume(self, ckpt: Path) -> int:
        """Restore the optimizers and the RNG from `ckpt` (the weights were loaded from it); returns its step."""
        state = load_trainer_state(ckpt)
        self.actor.load_optim_state(state["actor"]).result()
        if self.critic is not None:
            self.critic.load_optim_state(state["critic"]).result()
        set_rng_state(state["rng"])
        return state["step"]

    def close(self) -> None:
        """Stop the engine and the verifier pool, end the worker actors (a pipeline runs several RL
        stages in one process) and Ray itself where this run started it."""
        for h in (self.rollout, self.reward):
            try:
                h.close().result()
            except Exception:  # noqa: BLE001
                pass
        for h in (self.rollout, self.reward, self.actor, self.ref, self.critic):
            if h is not None:
                h.kill()
        if self.own_ray:
            import ray  # optional: only Ray placement needs it
            ray.shutdown()


def rollout_step(run: RLRun, step: int) -> tuple[list[Record], list[list[Completion]], list[RewardResult],
                                                  RolloutBatch, Timer]:
    """Sample the step's prompts, roll them out, score them and lay them out as a batch."""
    cfg, ro, tm = run.cfg, run.cfg.rollout, Timer()
    with tm("sample"):
        idx = batch_indices(len(run.records), step, 0, batch_size=cfg.prompts_per_step, grad_accum=1, seed=cfg.seed)
        # video prompts last: a micro-batch pads its rows to the longest, and they are several image prompts long
        records = sorted((run.records[i] for i in idx), key=lambda r: bool(r.videos))
        prompts = [prompt_from_record(r, run.geometry) for r in records]
        sampling = SamplingConfig.of(ro, seed=cfg.seed * 1_000_003 + step)
    with tm("rollout"):
        completions = run.generate(prompts, sampling)
    with tm("reward"):
        results = run.reward.score(reward_inputs(records, completions, prompts)).result()
    with tm("prepare"):
        seq = build_sequences(run.processor, prompts, completions)
        tasks = [records[i].task for i in seq.prompt_index.tolist()]
        names = sorted(set(tasks))
        batch = RolloutBatch(seq=seq, tasks=tasks, task_id=torch.tensor([names.index(t) for t in tasks]),
                             scores=torch.tensor([r.reward for r in results], dtype=torch.float32),
                             correct=torch.tensor([is_correct(r) for r in results]),
                             kl_coef=kl_coefs(tasks, cfg.kl.coefs, default=cfg.kl.default))
    return records, completions, results, batch, tm


def fit(cfg: RLConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run RL; returns the final policy folder (`out/final`)."""
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out) if resume else None
    run = RLRun(cfg, start_from=ckpt)
    log = MetricsLog(out)
    samples_log = MetricsLog(out, name="rollouts.jsonl", tensorboard=False)
    step = 0
    if ckpt is not None:
        step = run.resume(ckpt)
        log.truncate_after(step)
        samples_log.truncate_after(step)
        print(f"[rl] resumed from {ckpt} at step {step}")
    else:
        write_json(out / "config.json", to_dict(cfg))

    ro, mbs, from_engine = cfg.rollout, cfg.ppo.micro_batch_size, cfg.ppo.old_logp == "engine"
    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"rl/{cfg.algo}", dynamic_ncols=True)
    while step < cfg.steps:
        records, completions, results, batch, tm = rollout_step(run, step)
        with tm("logp"):
            actor = None if from_engine else run.actor.logp(batch.seq, micro_batch_size=mbs)
            ref = None if run.ref is None else run.ref.logp(batch.seq, micro_batch_size=mbs)
            critic = None if run.critic is None else run.critic.values(batch.seq, micro_batch_size=mbs)
            if from_engine:  # the sampler's own log-probs: same weights, one forward pass fewer
                batch.old_logp = engine_logp(completions, batch.mask)
            else:
                batch.old_logp, batch.entropy = actor.result()
            batch.ref_logp = None if ref is None else ref.result()[0]
            batch.values = None if critic is None else critic.result()
        engine_gap = engine_logp_gap(batch, completions) if ro.temperature == 1.0 and not from_engine else None
        with tm("advantage"):
            a = compute_advantages(batch.scores, batch.mask, old_logp=batch.old_logp, ref_logp=batch.ref_logp,
                                   values=batch.values, kl_coef=batch.kl_coef, prompt_index=batch.seq.prompt_index,
                                   task_id=batch.task_id, algo=cfg.algo, ppo=cfg.ppo, grpo=cfg.grpo,
                                   kl_mode=cfg.kl.mode, gamma=cfg.ppo.gamma)
            batch.adv, batch.returns, batch.keep = a.adv, a.returns, a.keep
        with tm("update"):
            rows = [i for i in range(batch.rows) if batch.keep[i]]
            mb_rows = minibatch_rows(rows, minibatches=cfg.ppo.minibatches, epochs=cfg.ppo.epochs, seed=cfg.seed + step)
            mb_rows = [video_rows_last(r, batch.seq) for r in mb_rows]
            actor_on = cfg.algo == "grpo" or step >= cfg.ppo.value_pretrain_steps
            pending = []
            if run.critic is not None:
                pending.append(run.critic.update(batch, ppo=cfg.ppo, minibatch_rows=mb_rows))
            if actor_on and mb_rows:
                pending.append(run.actor.update(batch, ppo=cfg.ppo, kl_mode=cfg.kl.mode, kl_kind=cfg.kl.kind,
                                                minibatch_rows=mb_rows, entropy=from_engine))
            update_metrics = {k: v for p in pending for k, v in p.result().items()}
        with tm("sync"):
            if actor_on:
                run.rollout.sync_weights(run.actor.state_dict().result()).result()
        step += 1
        n_tokens = sum(len(c.token_ids) for g in completions for c in g)
        metrics = {**step_metrics(batch, results), **update_metrics, **tm.seconds,
                   "rollout/tokens_per_s": n_tokens / max(1e-9, tm.seconds["time/rollout"]),
                   "rollout/kept_frac": float(batch.keep.float().mean()),
                   "train/value_pretraining": float(not actor_on)}
        if engine_gap is not None:  # the engine runs the weights the trainer has: ~1e-5 after a sync
            metrics["rollout/logp_gap_max"] = engine_gap
        metrics.update({f"verifier_pool/{k}": float(v) for k, v in run.reward.stats().result().items()})
        log.log(step, metrics)
        samples_log.log(step, {}, rows=[
            {"id": records[p].id, "task": records[p].task, "response": completions[p][j].text,
             "reward": results[p * ro.n + j].reward}
            for p in range(min(cfg.log_samples, len(records))) for j in range(ro.n)])
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/all/total']:.3f}")
        out_of_time = over_budget(t_start, cfg.max_minutes)
        if run.eval_records and periodic(step, cfg.eval_every) and step < cfg.steps:
            table, _ = evaluate_run(run, cfg.eval_limit)
            log.log(step, _eval_metrics(table))
            bar.write(format_table(table, f"step {step}"))
        if periodic(step, cfg.save_every) or step == cfg.steps or out_of_time:
            run.checkpoint(out, step)
        if out_of_time:
            bar.write(f"[rl] time budget of {cfg.max_minutes} min reached at step {step}")
            break
    bar.close()
    final = atomic_dir(out / "final", lambda d: run.actor.save(str(d)).result())
    if run.critic is not None:
        atomic_dir(out / "final_critic", lambda d: run.critic.save(str(d)).result())
    if run.eval_records:
        table, gens = evaluate_run(run, 0)
        log.log(step, _eval_metrics(table))
        write_eval(out / "eval.json", table, gens)   # + eval.generations.jsonl (greedy), as SFT writes
        print(format_table(table, f"held-out after RL ({step} steps, {cfg.algo})"))
    run.close()
    log.close()
    samples_log.close()
    return final


class _Saver:
    """Adapter so save_checkpoint can save a worker's model wherever the worker lives."""

    def __init__(self, handle: Handle):
        self.handle = handle

    def save_pretrained(self, path) -> None:
        self.handle.save(str(path)).result()


def _eval_metrics(table: dict) -> dict[str, float]:
    return {f"eval/{t}/{k}": v for t, row in table.items() for k, v in row.items()
            if k not in ("n", "n_distinct") and isinstance(v, (int, float))}


def evaluate_run(run: RLRun, limit: int = 0) -> tuple[dict, list]:
    """(table, greedy generations): held-out accuracy per task (greedy); where a reward model is
    loaded, its mean score on the greedy solutions of RM-routed prompts (`rm_score`); with
    `eval_samples` = k, the mean accuracy of k samples per prompt at the rollout temperature
    (`sampled_accuracy`) and the RM's mean score of those samples (`sampled_rm_score`)."""
    records = eval_subset(run.eval_records, limit)
    # greedy answers get the token budget the rollouts had
    responses = run.actor.generate_greedy(records, max_new_tokens=run.cfg.rollout.max_tokens).result()
    gens = judge(records, responses)
    table = summarize(gens)

    def rm_score(items):
        return run.reward.rm_scores(items).result()

    table = add_rm_scores(table, records, responses, run.cfg.reward, rm_score)
    k, ro = run.cfg.eval_samples, run.cfg.rollout
    if k:  # avg@k with the rollout engine at the training temperature; one fixed seed for every eval
        prompts = [prompt_from_record(r, run.geometry) for r in records]
        groups = run.generate(prompts, SamplingConfig.of(ro, n=k, seed=run.cfg.seed + 7))
        table = add_sampled_scores(table, records, [[c.text for c in g] for g in groups], run.cfg.reward, rm_score)
    return table, gens
