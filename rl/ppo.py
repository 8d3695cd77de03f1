"""The hybrid RL driver (`vlrl rl`): a single controller whose loop reads as the algorithm's dataflow.

    prompts -> rollout (n per prompt) -> hybrid reward (format gate, verifiers, RM)
            -> old/ref log-probs, values -> per-task KL -> advantages (decoupled GAE | GRPO)
            -> critic update, actor update -> weight sync -> metrics, checkpoint

PPO uses ONE shared critic for every task type (RLHF and RLVR prompts in the same batch) and a
per-task KL coefficient. Workers run here or as Ray actors (`rl.actors`); each stage is timed.
"""
from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from rewards.inputs import is_correct, reward_inputs
from rl.config import to_dict
from rl.rl_config import RLConfig
from rollout.sequences import engine_logp


# ----------------------------------------------------------------------------- pure helpers

def compute_advantages(batch: dict, *, algo: str, ppo, grpo, kl_mode: str, gamma: float = 1.0) -> dict:
    """Advantages and critic targets from scores, log-probs and values (all on label positions).

    batch: scores (B,), mask (B, T), logp/ref_logp (B, T), values (B, T) (ppo), kl_coef (B,),
    prompt_index (B,), task_id (B,) (ppo with whiten_by "task" or "task_center").
    Returns adv (B, T), returns (B, T) (ppo), token_rewards (B, T), keep (B,).
    """
    from rl.algos import (decoupled_gae, dynamic_sampling_mask, group_advantages, kl_penalty_rewards,
                          length_adaptive_lambda, token_rewards_from_scores, whiten, whiten_by_group)

    mask = batch["mask"]
    rewards = token_rewards_from_scores(batch["scores"], mask)                       # (B, T)
    if kl_mode == "reward":
        rewards = kl_penalty_rewards(rewards, batch["logp"], batch["ref_logp"], mask, batch["kl_coef"])
    keep = torch.ones(mask.shape[0], dtype=torch.bool)
    if algo == "grpo":
        adv_seq = group_advantages(batch["scores"], batch["prompt_index"], norm_std=grpo.norm_std)   # (B,)
        if grpo.dynamic_sampling:
            keep = dynamic_sampling_mask(batch["scores"], batch["prompt_index"])
        adv = adv_seq[:, None] * mask
        return {"adv": adv, "token_rewards": rewards, "keep": keep}
    lengths = mask.sum(-1).clamp(min=1)
    lam_actor = length_adaptive_lambda(lengths, alpha=ppo.lam_alpha) if ppo.lam_alpha > 0 else ppo.lam_actor
    adv, returns = decoupled_gae(rewards, batch["values"], mask, gamma=gamma, lam_actor=lam_actor,
                                 lam_critic=ppo.lam_critic)
    if ppo.whiten_adv:
        if ppo.whiten_by == "batch":
            adv = whiten(adv, mask)
        else:
            adv = whiten_by_group(adv, mask, batch["task_id"], scale="group" if ppo.whiten_by == "task" else "batch")
    return {"adv": adv * mask, "returns": returns, "token_rewards": rewards, "keep": keep}


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


def uses_kl(kl_cfg) -> bool:
    """Whether any task has a non-zero KL coefficient (else no reference policy is needed)."""
    return kl_cfg.default != 0 or any(c != 0 for c in kl_cfg.coefs.values())


def prompt_pool(cfg: RLConfig) -> list:
    """The records the steps draw prompts from: `cfg.data` with each record of task t repeated
    `cfg.task_weights[t]` times (the prompt mixture)."""
    from rl.data import load_records
    from rl.sft import weighted_records
    return weighted_records(load_records(cfg.data, require="prompt"), cfg.task_weights)


def step_metrics(batch: dict, results, tasks: list[str], *, kl: bool = True) -> dict[str, float]:
    """Reward per task and component, KL per task (when a reference policy runs), the critic's value
    bias per task (PPO), response lengths."""
    from rl.algos import kl as kl_estimate

    out: dict[str, float] = {}
    by_task = defaultdict(list)
    for i, t in enumerate(tasks):
        by_task[t].append(i)
    mask = batch["mask"]
    k1 = kl_estimate(batch["logp"], batch["ref_logp"], kind="k1") * mask
    for t, idx in by_task.items():
        out[f"reward/{t}/total"] = sum(results[i].reward for i in idx) / len(idx)
        for part in sorted({p for i in idx for p in results[i].parts}):
            out[f"reward/{t}/{part}"] = sum(results[i].parts.get(part, 0.0) for i in idx) / len(idx)
        if kl:
            out[f"kl/{t}"] = float(k1[idx].sum() / mask[idx].sum().clamp(min=1))
        if "values" in batch:  # the shared critic's bias on this task: V(first response state) - score
            first = batch["values"][idx].gather(1, mask[idx].argmax(-1, keepdim=True))[:, 0]
            out[f"critic/value_bias/{t}"] = float((first - batch["scores"][idx]).mean())
    out["reward/all/total"] = sum(r.reward for r in results) / max(1, len(results))
    lengths = mask.sum(-1).float()
    out["response/length_mean"] = float(lengths.mean())
    out["response/length_max"] = float(lengths.max())
    if "entropy" in batch:  # else (old_logp "engine") the actor update reports it
        out["response/entropy"] = float((batch["entropy"] * mask).sum() / mask.sum().clamp(min=1))
    return out


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
    """Holds the workers of one run and the stages the loop calls by name."""

    def __init__(self, cfg: RLConfig, *, start_from: Path | None):
        from rl.actors import spawn
        from rl.data import load_records
        from rl.workers import CriticWorker, PolicyWorker, RewardWorker

        self.cfg = cfg
        self.records = prompt_pool(cfg)
        self.eval_records = load_records(cfg.eval_data, require="prompt") if cfg.eval_data else []
        policy_dir = str(start_from or cfg.policy)
        use_ray, r = cfg.ray.enabled, cfg.ray
        self.own_ray = False   # whether this run started Ray (and so shuts it down in close())
        if use_ray:
            import ray

            from rollout.actor import start_local_ray
            if not ray.is_initialized():
                start_local_ray(num_cpus=r.num_cpus, address=None if r.address in (None, "local") else r.address)
                self.own_ray = True
        common = dict(use_ray=use_ray, timeout=r.timeout_s)
        self.actor = spawn(PolicyWorker, policy_dir, optim=cfg.actor_optim, total_steps=cfg.steps, dtype=cfg.dtype,
                           seed=cfg.seed, chunk_size=cfg.ppo.entropy_chunk, temperature=cfg.rollout.temperature,
                           num_gpus=r.actor_gpus, name="actor", **common)
        # No KL anywhere: no reference forward (the driver then uses the actor's log-probs and logs no KL).
        self.ref = None
        if uses_kl(cfg.kl):
            self.ref = spawn(PolicyWorker, cfg.policy, optim=None, dtype=cfg.dtype, chunk_size=cfg.ppo.entropy_chunk,
                             temperature=cfg.rollout.temperature, num_gpus=r.actor_gpus, name="ref", **common)
        self.critic = None
        if cfg.algo == "ppo":
            critic_dir = str(start_from / "critic") if start_from else (cfg.critic or cfg.policy)
            self.critic = spawn(CriticWorker, critic_dir, optim=cfg.critic_optim, total_steps=cfg.steps,
                                dtype=cfg.dtype, seed=cfg.seed, num_gpus=r.actor_gpus, name="critic", **common)
        self.reward = spawn(RewardWorker, cfg.reward, reward_model=cfg.reward_model, name="reward", **common)
        self.policy_dir = policy_dir
        self.rollout = None
        self._start_rollout()
        from model.load import load_processor
        self.processor = load_processor(policy_dir)

    # -- rollout, with restart on a dead worker
    def _start_rollout(self) -> None:
        from rl.actors import spawn
        from rollout.actor import RolloutWorker
        from rollout.types import EngineConfig

        ro = self.cfg.rollout
        ecfg = EngineConfig(backend=ro.backend, model=self.policy_dir, dtype=self.cfg.dtype,
                            max_model_len=ro.max_model_len, gpu_memory_utilization=ro.gpu_memory_utilization,
                            tensor_parallel_size=ro.tensor_parallel_size, kv_cache_gib=int(max(1, ro.kv_cache_gib)),
                            seed=self.cfg.seed)
        self.rollout = spawn(RolloutWorker, ecfg, use_ray=self.cfg.ray.enabled, timeout=self.cfg.ray.timeout_s,
                             num_gpus=self.cfg.ray.rollout_gpus, name="")

    def generate(self, prompts, sampling):
        last = None
        for attempt in range(self.cfg.rollout.retries + 1):
            try:
                return self.rollout("generate", prompts, sampling)
            except Exception as e:  # a dead actor (RayActorError) or a crashed engine: restart, retry
                last = e
                print(f"[rl] rollout failed ({type(e).__name__}: {e}); restarting the engine (try {attempt + 1})")
                try:
                    self.rollout("close")
                except Exception:  # noqa: BLE001  (the worker may be gone already)
                    pass
                self.rollout.kill()
                self._start_rollout()
                self.rollout("sync_weights", self.actor("state_dict"))
        raise RuntimeError(f"rollout failed {self.cfg.rollout.retries + 1} times") from last

    def close(self) -> None:
        """Stop the engine and the verifier pool, end the worker actors (a pipeline runs several RL
        stages in one process) and Ray itself where this run started it."""
        for h in (self.rollout, self.reward):
            try:
                h("close")
            except Exception:  # noqa: BLE001
                pass
        for h in (self.rollout, self.reward, self.actor, self.ref, self.critic):
            if h is not None:
                h.kill()
        if self.own_ray:
            import ray
            ray.shutdown()


def fit(cfg: RLConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run RL; returns the final policy folder (`out/final`)."""
    from tqdm import tqdm

    from rl.algos import kl_coefs
    from rl.data import load_images
    from rl.evaluate import format_table, write_eval
    from rl.runlog import (MetricsLog, latest_checkpoint, load_trainer_state, over_budget, periodic,
                           save_checkpoint, set_rng_state)
    from rl.sft import batch_indices
    from rollout.sequences import build_sequences
    from rollout.types import Prompt, SamplingConfig

    out = Path(cfg.out)
    ckpt = latest_checkpoint(out) if resume else None
    run = RLRun(cfg, start_from=ckpt)
    log = MetricsLog(out)
    samples_log = MetricsLog(out, name="rollouts.jsonl", tensorboard=False)
    step = 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        run.actor("load_optim_state", state["actor"])
        if run.critic is not None:
            run.critic("load_optim_state", state["critic"])
        set_rng_state(state["rng"])
        step = state["step"]
        log.truncate_after(step)
        samples_log.truncate_after(step)
        print(f"[rl] resumed from {ckpt} at step {step}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    def checkpoint(at: int) -> None:
        models = {"policy": _Saver(run.actor)}
        state = {"actor": run.actor("optim_state")}
        if run.critic is not None:
            models["critic"] = _Saver(run.critic)
            state["critic"] = run.critic("optim_state")
        save_checkpoint(out, at, models=models, state=state, keep=cfg.keep_checkpoints)

    ro = cfg.rollout
    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc=f"rl/{cfg.algo}", dynamic_ncols=True)
    while step < cfg.steps:
        tm = Timer()
        with tm("sample"):
            idx = batch_indices(len(run.records), step, 0, batch_size=cfg.prompts_per_step, grad_accum=1, seed=cfg.seed)
            records = [run.records[i] for i in idx]
            prompts = [Prompt(r.prompt_messages, load_images(r)) for r in records]
            sampling = SamplingConfig(n=ro.n, temperature=ro.temperature, top_p=ro.top_p, max_tokens=ro.max_tokens,
                                      seed=cfg.seed * 1_000_003 + step)
        with tm("rollout"):
            completions = run.generate(prompts, sampling)
        n_tokens = sum(len(c.token_ids) for g in completions for c in g)
        with tm("reward"):
            results = run.reward("score", reward_inputs(records, completions))
        with tm("prepare"):
            batch = build_sequences(run.processor, prompts, completions)
            tasks = [records[i].task for i in batch["prompt_index"].tolist()]
            batch["mask"] = batch["response_mask"][:, 1:].float()                      # (B, T)
            batch["scores"] = torch.tensor([r.reward for r in results], dtype=torch.float32)
            batch["correct"] = torch.tensor([is_correct(r) for r in results])
            batch["kl_coef"] = kl_coefs(tasks, cfg.kl.coefs, default=cfg.kl.default)
            names = sorted(set(tasks))
            batch["task_id"] = torch.tensor([names.index(t) for t in tasks])
        with tm("logp"):
            mbs, from_engine = cfg.ppo.micro_batch_size, cfg.ppo.old_logp == "engine"
            pend = {} if from_engine else {"actor": run.actor.call("logp", batch, micro_batch_size=mbs)}
            if run.ref is not None:
                pend["ref"] = run.ref.call("logp", batch, micro_batch_size=mbs)
            if run.critic is not None:
                pend["critic"] = run.critic.call("values", batch, micro_batch_size=mbs)
            res = {k: p.result() for k, p in pend.items()}
            if from_engine:  # the sampler's own log-probs: same weights, one forward pass fewer
                batch["logp"] = engine_logp(completions, batch["mask"])
            else:
                batch["logp"], batch["entropy"] = res["actor"]["logp"], res["actor"]["entropy"]
            batch["ref_logp"] = res["ref"]["logp"] if run.ref is not None else batch["logp"]
            batch["old_logp"] = batch["logp"]
            if run.critic is not None:
                batch["values"] = batch["old_values"] = res["critic"]
        engine_gap = _engine_logp_gap(batch, completions) if ro.temperature == 1.0 and not from_engine else None
        with tm("advantage"):
            batch.update(compute_advantages(batch, algo=cfg.algo, ppo=cfg.ppo, grpo=cfg.grpo, kl_mode=cfg.kl.mode,
                                            gamma=cfg.ppo.gamma))
        with tm("update"):
            rows = [i for i in range(len(tasks)) if batch["keep"][i]]
            mb_rows = minibatch_rows(rows, minibatches=cfg.ppo.minibatches, epochs=cfg.ppo.epochs, seed=cfg.seed + step)
            actor_on = cfg.algo == "grpo" or step >= cfg.ppo.value_pretrain_steps
            pend = []
            if run.critic is not None:
                pend.append(run.critic.call("update", batch, ppo=cfg.ppo, minibatch_rows=mb_rows))
            if actor_on and mb_rows:
                pend.append(run.actor.call("update", batch, ppo=cfg.ppo, kl_mode=cfg.kl.mode, kl_kind=cfg.kl.kind,
                                           minibatch_rows=mb_rows, entropy=from_engine))
            update_metrics = {k: v for p in pend for k, v in p.result().items()}
        with tm("sync"):
            if actor_on:
                run.rollout("sync_weights", run.actor("state_dict"))
        step += 1
        metrics = {**step_metrics(batch, results, tasks, kl=run.ref is not None), **update_metrics, **tm.seconds,
                   "rollout/tokens_per_s": n_tokens / max(1e-9, tm.seconds["time/rollout"]),
                   "rollout/kept_frac": float(batch["keep"].float().mean()),
                   "train/value_pretraining": float(not actor_on)}
        if engine_gap is not None:  # the engine runs the weights the trainer has: ~1e-5 after a sync
            metrics["rollout/logp_gap_max"] = engine_gap
        metrics.update({f"verifier_pool/{k}": float(v) for k, v in run.reward("stats").items()})
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
            checkpoint(step)
        if out_of_time:
            bar.write(f"[rl] time budget of {cfg.max_minutes} min reached at step {step}")
            break
    bar.close()
    final = out / "final"
    from model.load import atomic_dir
    atomic_dir(final, lambda d: run.actor("save", str(d)))
    if run.critic is not None:
        atomic_dir(out / "final_critic", lambda d: run.critic("save", str(d)))
    if run.eval_records:
        table, gens = evaluate_run(run, 0)
        log.log(step, _eval_metrics(table))
        write_eval(out / "eval.json", table, gens)   # + eval.generations.jsonl (greedy), as SFT writes
        print(format_table(table, f"held-out after RL ({step} steps, {cfg.algo})"))
    run.close()
    log.close()
    samples_log.close()
    return final


def _engine_logp_gap(batch: dict, completions) -> float:
    """max |engine log-prob - trainer log-prob| over sampled tokens (both of the raw policy at T=1)."""
    try:
        engine = engine_logp(completions, batch["mask"])
    except ValueError:
        return float("nan")
    if not batch["mask"].any():
        return float("nan")
    return float(((engine - batch["logp"]) * batch["mask"]).abs().max())


class _Saver:
    """Adapter so save_checkpoint can save a worker's model wherever the worker lives."""

    def __init__(self, handle):
        self.handle = handle

    def save_pretrained(self, path) -> None:
        self.handle("save", str(path))


def _eval_metrics(table: dict) -> dict[str, float]:
    return {f"eval/{t}/{k}": v for t, row in table.items() for k, v in row.items()
            if k not in ("n", "n_distinct") and isinstance(v, (int, float))}


def evaluate_run(run: RLRun, limit: int = 0) -> tuple[dict, list]:
    """(table, greedy generations): held-out accuracy per task (greedy); where a reward model is
    loaded, its mean score on the greedy solutions of RM-routed prompts (`rm_score`); with
    `eval_samples` = k, the mean accuracy of k samples per prompt at the rollout temperature
    (`sampled_accuracy`) and the RM's mean score of those samples (`sampled_rm_score`)."""
    from rl.data import load_images
    from rl.evaluate import add_rm_scores, add_sampled_scores, eval_subset, judge, summarize
    from rollout.types import Prompt, SamplingConfig

    records = eval_subset(run.eval_records, limit)
    # greedy answers get the token budget the rollouts had
    responses = run.actor("generate_greedy", records, max_new_tokens=run.cfg.rollout.max_tokens)
    gens = judge(records, responses)
    table = summarize(gens)

    def rm_score(items):
        return run.reward("rm_scores", items)

    table = add_rm_scores(table, records, responses, run.cfg.reward, rm_score)
    k, ro = run.cfg.eval_samples, run.cfg.rollout
    if k:  # avg@k with the rollout engine at the training temperature; one fixed seed for every eval
        prompts = [Prompt(r.prompt_messages, load_images(r)) for r in records]
        groups = run.generate(prompts, SamplingConfig(n=k, temperature=ro.temperature, top_p=ro.top_p,
                                                      max_tokens=ro.max_tokens, seed=run.cfg.seed + 7))
        table = add_sampled_scores(table, records, [[c.text for c in g] for g in groups], run.cfg.reward, rm_score)
    return table, gens
