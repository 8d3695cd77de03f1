"""The hybrid RL driver (`vlrl rl`): a single controller whose loop reads as the algorithm's dataflow.

    prompts -> rollout (n per prompt) -> hybrid reward (format gate, verifiers, RM)
            -> old/ref log-probs, values -> per-task KL -> advantages (decoupled GAE | GRPO)
            -> critic update, actor update -> weight sync -> metrics, checkpoint

PPO uses ONE shared critic for every task type (RLHF and RLVR prompts in the same batch) and a
per-task KL coefficient. Workers run here or as Ray actors (`training.placement`); each stage is timed.
"""
from __future__ import annotations

import dataclasses
import random
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm

from model.families import verifier_settings
from model.load import load_processor
from records import Record, VideoGeometry, load_records
from rewards.evaluate import add_sampled_scores, eval_subset, format_table, judge, summarize, write_eval
from rewards.hybrid import RewardResult
from rl.algos import (decoupled_gae, dynamic_sampling_mask, group_advantages, kl_penalty_rewards,
                      length_adaptive_lambda, token_rewards_from_scores, whiten, whiten_by_group)
from rl.config import GRPOConfig, KLConfig, PPOConfig, RayConfig, RLConfig
from rl.rollout_step import (check_media_limits, engine_logp_gap, prompt_pool, rollout_step, step_metrics,
                             tis_weights)
from rl.rollouts import Rollouts
from rl.workers import CriticWorker, PolicyWorker, RewardWorker
from rollout.sequences import engine_logp, prompt_from_record
from rollout.types import SamplingConfig
from training.atomic import atomic_dir, write_json
from training.config import ConfigError, to_dict
from training.distributed import has_sharded_checkpoint
from training.placement import Handle, Replicas, WorkerGroup, spawn, start_local_ray, worker_died
from training.runlog import (MetricsLog, latest_checkpoint, load_trainer_state, over_budget, periodic, save_checkpoint,
                             set_rng_state, warn_changed_config)

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


# ----------------------------------------------------------------------------- the run

class RLRun:
    """Holds the workers of one run: the actor, the reference policy (when some task has KL; a LoRA
    actor is its own, with its adapters off), the shared critic (PPO), the reward workers and the
    rollout replicas. With `resume_from` the trainers take their weights, optimizer states and RNG
    from that checkpoint."""

    def __init__(self, cfg: RLConfig, *, resume_from: Path | None = None):
        self.cfg = cfg
        self.records = prompt_pool(cfg)
        self.eval_records = (load_records(cfg.eval_data, tasks=cfg.reward.known_tasks, require="prompt")
                             if cfg.eval_data else [])
        cfg.check_sources({r.task for r in self.records + self.eval_records})   # before any worker starts
        r, ro = cfg.ray, cfg.rollout
        self.processor = load_processor(cfg.policy)
        # the policy family's output conventions (grounding coordinates) for its verifiers
        self.verifier_settings = verifier_settings(self.processor)
        self.reward_cfg = cfg.reward.with_verifier_settings(self.verifier_settings)
        self.geometry = VideoGeometry.of(self.processor)
        check_media_limits(self.records + self.eval_records, ro, self.geometry)
        self.own_ray = False   # whether this run started Ray (and so shuts it down in close())
        self.placement = _Placement()
        if cfg.use_ray:
            import ray  # optional: only Ray placement needs it
            if not ray.is_initialized():
                start_ray(r)
                self.own_ray = True
        place = self.placement = gpu_placement(cfg)
        common = dict(use_ray=cfg.use_ray, timeout=r.timeout_s, fsdp=cfg.fsdp, num_gpus=r.actor_gpus,
                      placement=place.trainer)
        self.actor: Handle[PolicyWorker] | WorkerGroup[PolicyWorker] = spawn(
            PolicyWorker, cfg.policy, optim=cfg.actor_optim, total_steps=cfg.steps, dtype=cfg.dtype, seed=cfg.seed,
            chunk_size=cfg.ppo.entropy_chunk, temperature=ro.temperature, workers=r.actor_workers, name="actor",
            lora=cfg.actor_lora, ema=cfg.actor_ema, **common)
        # No KL anywhere: no reference policy (ref_logp stays None and no KL is logged). A LoRA actor
        # is its own reference policy: its frozen base, adapters off.
        self.ref = None
        if uses_kl(cfg.kl) and cfg.actor_lora is None:
            self.ref = spawn(PolicyWorker, cfg.policy, optim=None, dtype=cfg.dtype, chunk_size=cfg.ppo.entropy_chunk,
                             temperature=ro.temperature, workers=r.ref_workers, name="ref", **common)
        self.critic = None
        if cfg.algo == "ppo":
            self.critic = spawn(CriticWorker, cfg.critic or cfg.policy, optim=cfg.critic_optim, total_steps=cfg.steps,
                                dtype=cfg.dtype, seed=cfg.seed, workers=r.critic_workers, name="critic",
                                lora=cfg.critic_lora, **common)
        self.rewards: Replicas[RewardWorker] = Replicas(
            lambda i: spawn(RewardWorker, self.reward_cfg, reward_model=cfg.reward_model, use_ray=cfg.use_ray,
                            timeout=r.timeout_s, num_gpus=r.reward_gpus, name=f"reward-{i}",
                            placement=None if place.reward is None else (lambda _: place.reward(i))),
            r.reward_workers, retries=ro.retries, name="reward worker")
        engine = ro if ro.dtype is not None else dataclasses.replace(ro, dtype=cfg.dtype)
        if r.placement == "colocated":
            engine = dataclasses.replace(engine, enable_sleep_mode=True)
        self.rollouts = Rollouts(cfg.policy, engine, replicas=ro.replicas, seed=cfg.seed, use_ray=cfg.use_ray,
                                 retries=ro.retries, timeout=r.timeout_s, num_gpus=r.rollout_gpus,
                                 on_restart=lambda h: self.push_weights([h]), placement=place.replica)
        self.step = 0
        self.wrote_checkpoint = False
        # rollout.async: the next step's rollout, running in this thread while the trainers update
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlrl-rollout") if ro.async_ else None
        self._next: tuple[int, Future] | None = None
        if resume_from is not None:
            self.step = self.resume(resume_from)
            self.push_weights(self.rollouts.handles)   # the engines started from the SFT policy

    def may_prefetch(self, step: int) -> bool:
        """Whether step `step + 1`'s rollout may run during step `step`'s update (with the weights
        from before it): async rollouts, and no checkpoint or periodic eval between the two steps
        (so a resumed run, which regenerates that rollout with the checkpoint's weights, is exact)."""
        cfg, nxt = self.cfg, step + 1
        return (self._pool is not None and nxt < cfg.steps and not periodic(nxt, cfg.save_every)
                and not (self.eval_records and periodic(nxt, cfg.eval_every)))

    def prefetch(self, step: int) -> None:
        """Start step `step`'s rollout (`rollout_step`) in the rollout thread."""
        self._next = (step, self._pool.submit(rollout_step, self, step))

    def prefetched(self, step: int):
        """Step `step`'s rollout if it was started ahead (waits for it), else None."""
        if self._next is None or self._next[0] != step:
            return None
        _, fut = self._next
        self._next = None
        return fut.result()

    def wait_prefetch(self) -> None:
        """Block until the rollout started ahead is done (the engines must be idle to take weights)."""
        if self._next is not None:
            wait([self._next[1]])

    @property
    def ref_policy(self) -> Handle[PolicyWorker] | WorkerGroup[PolicyWorker] | None:
        """The workers that compute ref_logp: none without KL, the actor itself with LoRA, else the
        reference group."""
        if not uses_kl(self.cfg.kl):
            return None
        return self.actor if self.cfg.actor_lora is not None else self.ref

    def push_weights(self, targets: list) -> dict:
        """The actor's weights into `targets` (rollout workers); a target that failed is restarted
        (the restart pushes the weights to the new one)."""
        ro = self.cfg.rollout
        method = ro.sync_method if ro.backend == "vllm" else "reload"   # an HF engine loads a state dict
        out = self.actor.push_weights(targets, bucket_mb=ro.sync_bucket_mb, sync_method=method).result()
        for i in out["failed"]:
            self.rollouts.pool.restart(self.rollouts.handles.index(targets[i]))
        return out

    def score(self, inputs: list) -> list[RewardResult]:
        return self.rewards.map(lambda h, share, _: h.score(share), inputs)

    def rm_scores(self, items: list) -> list[float]:
        return self.rewards.map(lambda h, share, _: h.rm_scores(share), items)

    def _summed(self, call: Callable[[Handle[RewardWorker]], object]) -> dict[str, float]:
        """`call(handle)` (a Future of a dict of counts) on every reward worker, summed key by key."""
        total: dict[str, float] = defaultdict(float)
        for f in [call(h) for h in self.rewards.handles]:
            for k, v in f.result().items():
                total[k] += v
        return dict(total)

    def verifier_stats(self) -> dict[str, float]:
        """The verifier pools' counts (calls, timeouts, errors) over the reward workers."""
        return self._summed(lambda h: h.stats())

    def take_cost(self) -> dict[str, float]:
        """The judge's cost over the reward workers since the last call ({} without a judge)."""
        return self._summed(lambda h: h.take_cost())

    def greedy(self, records: list[Record]) -> list[str]:
        """Greedy answers with the rollouts' token budget (a repeated prompt is decoded once)."""
        return self.actor.generate_greedy(records, max_new_tokens=self.cfg.rollout.max_tokens).result()

    def checkpoint(self, out: Path, step: int) -> None:
        """Every trainer rank writes its shards (torch.distributed.checkpoint) under the checkpoint folder."""
        def write(d: Path) -> dict:
            state = {"actor": self.actor.save_state(str(d / "actor")).result()}
            if self.critic is not None:
                state["critic"] = self.critic.save_state(str(d / "critic")).result()
            return state
        save_checkpoint(out, step, write, keep=self.cfg.keep_checkpoints)

    def resume(self, ckpt: Path) -> int:
        """Restore the trainers and the RNG from `ckpt`; returns its step."""
        if not has_sharded_checkpoint(ckpt / "actor"):
            raise ConfigError(f"{ckpt}: not a checkpoint of this version (no sharded actor state); "
                              "start afresh with --no-resume")
        state = load_trainer_state(ckpt)
        self.actor.load_state(str(ckpt / "actor"), state["actor"]).result()
        if self.critic is not None:
            self.critic.load_state(str(ckpt / "critic"), state["critic"]).result()
        set_rng_state(state["rng"])
        return state["step"]

    def restarts(self) -> dict[str, float]:
        return {"restarts/rollout": float(self.rollouts.restarts), "restarts/reward": float(self.rewards.restarts)}

    def close(self) -> None:
        """Stop the engines and the verifier pools, end the worker actors (a pipeline runs several RL
        stages in one process) and Ray itself where this run started it."""
        if self._pool is not None:   # a rollout started ahead finishes (its result is dropped)
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._next = None
        for pool in (self.rollouts, self.rewards):
            try:
                pool.close()
            except Exception:  # noqa: BLE001
                pass
        for h in (self.actor, self.ref, self.critic):
            if h is not None:
                h.kill()
        if self.placement.group is not None:   # its GPUs go back to a Ray that outlives the run (a pipeline's)
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.placement.group)
        if self.own_ray:
            import ray  # optional: only Ray placement needs it
            ray.shutdown()


def start_ray(r: RayConfig) -> None:
    """Ray for the RL workers: a local cluster of `r.num_cpus` CPUs, or the cluster at `r.address`."""
    start_local_ray(num_cpus=r.num_cpus, address=None if r.address in (None, "local") else r.address)


@dataclass
class _Placement:
    trainer: Callable[[int], dict] | None = None   # Ray options of trainer rank i
    replica: Callable[[int], dict] | None = None   # Ray options of rollout replica i
    reward: Callable[[int], dict] | None = None    # Ray options of reward worker i
    group: object | None = None                    # the placement group, removed when the run closes


def gpu_placement(cfg: RLConfig) -> _Placement:
    """Where the workers go on a GPU cluster. split: every trainer rank and replica asks Ray for
    GPUs of its own. colocated: one placement-group bundle per GPU, trainer rank i and replica i
    share bundle i (the engines sleep while the trainers update). Without GPUs: Ray's default."""
    r = cfg.ray
    if r.placement != "colocated" or not r.actor_gpus:
        return _Placement()
    import ray  # optional: only Ray placement needs it
    from ray.util.placement_group import placement_group  # noqa: I001  (Ray: optional, see above)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n = max(r.actor_workers, r.critic_workers, r.ref_workers, cfg.rollout.replicas)
    pg = placement_group([{"GPU": 1.0, "CPU": 1.0}] * n, strategy="PACK")
    ray.get(pg.ready(), timeout=r.timeout_s)

    def bundle(i: int) -> dict:
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                        placement_group_bundle_index=i % n)}
    return _Placement(trainer=bundle, replica=bundle, reward=bundle, group=pg)


def train_step(run: RLRun, step: int) -> tuple[dict[str, float], list[dict]]:
    """One RL step (rollout, reward, log-probs, advantages, updates, weight sync); its metrics and
    the sample rows for rollouts.jsonl."""
    cfg, ro = run.cfg, run.cfg.rollout
    mbs, from_engine = dict(micro_batch_size=cfg.ppo.micro_batch_size, max_tokens=cfg.ppo.max_tokens_per_micro_batch,
                            pack=cfg.ppo.pack_sequences), cfg.ppo.old_logp == "engine"
    colocated = cfg.ray.placement == "colocated"
    t_wait = time.time()
    ahead = run.prefetched(step)           # rollout.async: started during the last step, one step behind
    records, completions, results, batch, tm, draw_stats = ahead or rollout_step(run, step)
    if ahead is not None:                  # how long the driver still waited for it
        tm.seconds["time/rollout_wait"] = time.time() - t_wait
    if run.may_prefetch(step):
        run.prefetch(step + 1)
    if colocated:
        run.rollouts.sleep()
    with tm("logp"):
        actor = None if from_engine else run.actor.logp(batch.seq, **mbs)
        ref = None if run.ref_policy is None else run.ref_policy.ref_logp(batch.seq, **mbs)
        critic = None if run.critic is None else run.critic.values(batch.seq, **mbs)
        if from_engine:  # the sampler's own log-probs: same weights, one forward pass fewer
            batch.old_logp = engine_logp(completions, batch.mask)
        else:
            batch.old_logp, batch.entropy = actor.result()
        batch.ref_logp = None if ref is None else ref.result()
        batch.values = None if critic is None else critic.result()
    engine_gap = engine_logp_gap(batch, completions) if ro.temperature == 1.0 and not from_engine else None
    tis = {}
    if cfg.ppo.tis_cap > 0 and ro.temperature == 1.0 and not from_engine:
        batch.is_weight, tis = tis_weights(batch, completions, cap=cfg.ppo.tis_cap)
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
    if colocated:
        run.rollouts.wake_up()
    with tm("sync_wait"):   # rollout.async: the engines finish the next step's rollout first
        run.wait_prefetch()
    with tm("sync"):
        sync = run.push_weights(run.rollouts.handles) if actor_on else {}
    n_tokens = sum(len(c.token_ids) for g in completions for c in g)
    metrics = {**step_metrics(batch, results), **update_metrics, **tm.seconds, **run.restarts(),
               "rollout/tokens_per_s": n_tokens / max(1e-9, tm.seconds["time/rollout"]),
               "rollout/kept_frac": float(batch.keep.float().mean()),
               "train/value_pretraining": float(not actor_on), **draw_stats, **tis,
               "rollout/policy_lag": float(ahead is not None)}
    if sync:
        metrics["sync/buckets"], metrics["sync/mib"] = float(sync["buckets"]), sync["bytes"] / 2**20
    if engine_gap is not None:  # the engine runs the weights the trainer has: ~1e-5 after a sync
        metrics["rollout/logp_gap_max"] = engine_gap
    metrics.update({f"verifier_pool/{k}": float(v) for k, v in run.verifier_stats().items()})
    metrics.update(run.take_cost())   # the judge's seconds and calls since the last step
    samples = [{"id": records[p].id, "task": records[p].task, "response": completions[p][j].text,
                "reward": results[p * ro.n + j].reward}
               for p in range(min(cfg.log_samples, len(records))) for j in range(ro.n)]
    return metrics, samples


def fit(cfg: RLConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run RL; returns the final policy folder (`out/final`). A dead trainer rank (or any worker
    that cannot be restarted alone) restarts every worker from the last checkpoint, at most
    `ray.max_restarts` times; the steps after that checkpoint run again and are logged once."""
    cfg.check_inputs()
    out = Path(cfg.out)
    log = MetricsLog(out)
    samples_log = MetricsLog(out, name="rollouts.jsonl", tensorboard=False)
    restarts = 0
    own_ckpt = False   # whether this call wrote a checkpoint (a restart resumes only from one of its own)
    while True:
        ckpt = latest_checkpoint(out) if (resume or own_ckpt) else None
        if ckpt is not None and not restarts:
            warn_changed_config(out, cfg, prefix="[rl] ")
        run = RLRun(cfg, resume_from=ckpt)
        if ckpt is not None:
            log.truncate_after(run.step)
            samples_log.truncate_after(run.step)
            print(f"[rl] resumed from {ckpt} at step {run.step}")
        elif not restarts:
            write_json(out / "config.json", to_dict(cfg))
        try:
            step = _train(run, log, samples_log, progress=progress, trainer_restarts=restarts)
            own_ckpt = own_ckpt or run.wrote_checkpoint
            break
        except Exception as e:  # noqa: BLE001  (a dead worker is told apart below; anything else re-raises)
            own_ckpt = own_ckpt or run.wrote_checkpoint
            if not (cfg.use_ray and worker_died(e)) or restarts >= cfg.ray.max_restarts:
                run.close()
                raise
            restarts += 1
            print(f"[rl] a worker died ({type(e).__name__}: {str(e)[:200]}); restarting every worker from the "
                  f"last checkpoint (restart {restarts} of {cfg.ray.max_restarts})", flush=True)
            run.close()
    if run.actor.use_ema().result() and run.eval_records and (cfg.eval_greedy == "engine" or cfg.eval_samples):
        run.push_weights(run.rollouts.handles)   # the engines evaluate the average
    final = atomic_dir(out / "final", lambda d: run.actor.export(str(d)).result())
    if run.critic is not None:
        atomic_dir(out / "final_critic", lambda d: run.critic.export(str(d)).result())
    if run.eval_records:
        table, gens = evaluate_run(run, 0)
        log.log(step, _eval_metrics(table))
        write_eval(out / "eval.json", table, gens)   # + eval.generations.jsonl (greedy), as SFT writes
        print(format_table(table, f"held-out after RL ({step} steps, {cfg.algo})"))
    run.close()
    log.close()
    samples_log.close()
    return final


def _train(run: RLRun, log: MetricsLog, samples_log: MetricsLog, *, progress: bool, trainer_restarts: int) -> int:
    """Steps from `run.step` to the end (or the time budget); returns the last step."""
    cfg, step = run.cfg, run.step
    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"rl/{cfg.algo}", dynamic_ncols=True)
    try:
        while step < cfg.steps:
            metrics, samples = train_step(run, step)
            step += 1
            metrics["restarts/trainer"] = float(trainer_restarts)
            log.log(step, metrics)
            samples_log.log(step, {}, rows=samples)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/all/total']:.3f}")
            out_of_time = over_budget(t_start, cfg.max_minutes)
            if run.eval_records and periodic(step, cfg.eval_every) and step < cfg.steps:
                table, _ = evaluate_run(run, cfg.eval_limit)
                log.log(step, _eval_metrics(table))
                bar.write(format_table(table, f"step {step}"))
            if periodic(step, cfg.save_every) or step == cfg.steps or out_of_time:
                run.checkpoint(Path(cfg.out), step)
                run.wrote_checkpoint = True
            if out_of_time:
                bar.write(f"[rl] time budget of {cfg.max_minutes} min reached at step {step}")
                break
    finally:
        bar.close()
    return step


def _eval_metrics(table: dict) -> dict[str, float]:
    return {f"eval/{t}/{k}": v for t, row in table.items() for k, v in row.items()
            if k not in ("n", "n_distinct") and isinstance(v, (int, float))}


def evaluate_run(run: RLRun, limit: int = 0) -> tuple[dict, list]:
    """(table, greedy generations): per task, the training reward's mean and the verifiers' accuracy
    of the greedy answers, scored by the reward worker (the training route: verifiers, reward model,
    judge); the RM's mean score of RM-routed prompts (`rm_score`); with `eval_samples` = k, the same
    over k samples per prompt at the rollout temperature (`sampled_accuracy`, `sampled_rm_score`)."""
    records = eval_subset(run.eval_records, limit)
    k, ro = run.cfg.eval_samples, run.cfg.rollout
    on_engine = run.cfg.eval_greedy == "engine"
    prompts = [prompt_from_record(r, run.geometry) for r in records] if k or on_engine else []

    def sample():   # avg@k with the rollout engine at the training temperature, one fixed seed for every eval
        return run.rollouts.generate(prompts, SamplingConfig.of(ro, n=k, seed=run.cfg.seed + 7))

    if on_engine:   # the greedy answers (temperature 0, the rollouts' token budget), then the samples
        greedy = run.rollouts.generate(prompts, SamplingConfig.of(ro, n=1, temperature=0.0, seed=run.cfg.seed + 7))
        responses, groups = [g[0].text for g in greedy], (sample() if k else [])
    elif not k:
        responses, groups = run.greedy(records), []   # with the token budget the rollouts have
    elif run.cfg.ray.placement == "colocated":   # engines and actor share GPUs: one at a time
        responses, groups = run.greedy(records), sample()
    else:   # the engines sample while the actor decodes greedily
        with ThreadPoolExecutor(1) as pool:
            sampled = pool.submit(sample)
            responses = run.greedy(records)
            groups = sampled.result()
    gens = judge(records, responses, run.reward_cfg, scorer=run.score)
    table = summarize(gens)
    if k:
        table = add_sampled_scores(table, records, [[c.text for c in g] for g in groups], run.reward_cfg,
                                   scorer=run.score)
    return table, gens
