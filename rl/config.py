"""Configuration of an RL run (`vlrl rl`): PPO with a shared critic (default) or GRPO."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.lora import LoRAConfig
from records.mixture import check_task_weights
from rewards.config import RewardConfig
from rollout.types import EngineConfig, Sampling
from training.config import ConfigError, check_input
from training.distributed import FSDPConfig
from training.optim import OptimConfig


@dataclass(frozen=True)
class RolloutConfig(EngineConfig, Sampling):
    """The rollout engine (`EngineConfig`'s fields: backend, max_model_len, tensor_parallel_size, ...)
    and how each step samples (`Sampling`'s: n, temperature, top_p, top_k, max_tokens). The engine
    loads the run's policy; its dtype defaults to the run's `dtype`."""

    max_tokens: int = 48                      # response length limit (RL's default; the Sampling field)
    replicas: int = 1                         # engines; a step's prompts are spread over them
    sync_bucket_mb: float = 256.0             # weight sync: the trainer sends whole layers in buckets of about this size
    retries: int = 2                          # a replica that dies is restarted and its share retried
    # `rollout.async` (spelt async_ in Python): the rollout of step k+1 runs on the engines while the
    # trainers update on step k, so the engines sample with the weights of one step before (the
    # truncated importance weight `ppo.tis_cap` corrects for it). Puts the workers in Ray actors.
    # Steps before a checkpoint or a periodic eval do not overlap, so a resumed run is exact.
    async_: bool = False

    def __post_init__(self):
        if self.replicas < 1:
            raise ConfigError(f"rollout.replicas: must be >= 1, got {self.replicas}")


@dataclass(frozen=True)
class KLConfig:
    coefs: dict[str, float] = field(default_factory=dict)   # per task; missing tasks use `default`
    default: float = 0.0
    mode: Literal["reward", "loss"] = "reward"  # reward: -beta*k1 per token before GAE; loss: +beta*k3
    kind: Literal["k1", "k2", "k3"] = "k3"      # estimator used in "loss" mode


@dataclass(frozen=True)
class PPOConfig:
    clip_low: float = 0.2                      # eps_low
    clip_high: float = 0.28                    # eps_high (clip-higher, DAPO)
    dual_clip: float | None = None             # c > 1 bounds the loss of negative advantages
    value_clip: float | None = 0.5             # critic clipping around the old values; null disables
    epochs: int = 1                            # passes over each rollout batch
    minibatches: int = 2                       # optimizer steps per epoch
    micro_batch_size: int = 32                 # sequences per forward/backward (at most, with a token budget)
    # Token-budget micro-batching: > 0 groups the rows longest first into micro-batches of about
    # this many tokens (rows x the longest row, padding included) instead of `micro_batch_size`
    # rows padded to the longest; a longer row goes alone. Same losses and log-probs, fewer padded
    # tokens when lengths vary (video next to image prompts, short and long answers). 0: off.
    max_tokens_per_micro_batch: int = 0
    # Sequence packing: each micro-batch's rows run as one row without padding (`model.packing`:
    # every sequence attends to itself only, with its own M-RoPE positions), in the log-prob and
    # value passes and the updates. Same numbers. Pays where attention is flash attention's varlen
    # kernel (GPU); with sdpa/eager (CPU) attention spans the whole packed row, masked. false: padded.
    pack_sequences: bool = False
    agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    gamma: float = 1.0
    lam_actor: float = 0.95                    # fixed actor lambda (used when lam_alpha == 0)
    lam_alpha: float = 0.05                    # length-adaptive lambda 1 - 1/(alpha*len) (VAPO); 0 disables
    lam_critic: float = 1.0                    # decoupled GAE: critic targets with lambda 1 (VC-PPO)
    whiten_adv: bool = True
    # batch: one mean and std; task: each task type centred and scaled on its own (no task's
    # advantages share a sign); task_center: each task centred, one std over the batch (a nearly
    # solved task keeps its small advantages)
    whiten_by: Literal["batch", "task", "task_center"] = "task"
    lm_coef: float = 0.1                       # positive-example LM loss weight mu (VAPO); 0 disables
    value_pretrain_steps: int = 0              # critic-only steps on the frozen policy before actor updates
    entropy_chunk: int = 0                     # chunk size for log-prob/entropy (0: whole sequence)
    # The behaviour policy's log-probs (the ratio's denominator): "trainer" recomputes them with the
    # actor (robust to engine/trainer numeric gaps, as in bf16 on GPU); "engine" takes the rollout
    # engine's, saving one forward pass per step where both run the same float32 weights (the
    # `rollout/logp_gap_max` metric of a "trainer" run measures the gap). Needs temperature 1.
    old_logp: Literal["trainer", "engine"] = "trainer"
    # Truncated importance sampling (TIS): each token's policy loss is weighted by
    # min(pi_trainer_old / pi_engine, tis_cap), the engine's sampling policy corrected towards the
    # trainer's (one step behind with rollout.async; numerics, as bf16 on GPU, otherwise). Applies
    # with old_logp "trainer" at temperature 1 (the engine's log-probs are the raw policy's); 0: off.
    tis_cap: float = 2.0

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        if self.tis_cap < 0:
            raise ConfigError(f"tis_cap: must be >= 0 (0: off), got {self.tis_cap}")
        if self.max_tokens_per_micro_batch < 0:
            raise ConfigError(f"max_tokens_per_micro_batch: must be >= 0 (0: off), got "
                              f"{self.max_tokens_per_micro_batch}")


@dataclass(frozen=True)
class GRPOConfig:
    norm_std: bool = True                      # GRPO; false gives Dr.GRPO's unnormalised advantages
    # DAPO dynamic sampling: train only on groups whose scores are not all equal (the others have no
    # advantage), drawing rounds of new prompts until `prompts_per_step` such groups are found
    dynamic_sampling: bool = False
    max_extra_draws: int = 3                   # refill rounds per step at most; then the groups found so far

    def __post_init__(self):
        if self.max_extra_draws < 0:
            raise ConfigError(f"max_extra_draws: must be >= 0 (0: drop, no refill), got {self.max_extra_draws}")


@dataclass(frozen=True)
class RayConfig:
    """Where the workers run. With one worker of each kind and `enabled: false` they live in the
    driver process; any worker count or `rollout.replicas` above 1 (or `enabled: true`) puts every
    worker in a Ray actor."""

    enabled: bool = False                      # Ray actors even with one worker of each kind
    address: str | None = None                 # None/"local": start a local cluster; else join this one
    num_cpus: int = 2                          # local cluster size
    actor_workers: int = 1                     # ranks of the actor's FSDP2 group
    critic_workers: int = 1                    # ranks of the shared critic's FSDP2 group
    ref_workers: int = 1                       # ranks of the reference policy's group (forward only)
    reward_workers: int = 1                    # reward workers; a step's samples are split over them
    actor_gpus: float = 0.0                    # GPUs per trainer rank (actor, critic, reference), on a GPU cluster
    rollout_gpus: float = 0.0                  # GPUs per rollout replica (>= rollout.tensor_parallel_size on GPUs)
    reward_gpus: float = 0.0                   # GPUs per reward worker (its reward model), on a GPU cluster
    # split: trainers and engines get GPUs of their own; colocated: they share GPUs and the engines
    # sleep (free weights and KV cache) while the trainers update
    placement: Literal["split", "colocated"] = "split"
    max_restarts: int = 3                      # restarts of dead workers (rollout, reward, trainer groups) per run
    timeout_s: float = 600.0                   # bound on every ray.get

    def __post_init__(self):
        if self.placement == "colocated" and any(g > 1 for g in (self.actor_gpus, self.rollout_gpus, self.reward_gpus)):
            raise ConfigError("ray.placement: colocated workers share GPUs: actor_gpus, rollout_gpus and reward_gpus "
                              "are the fractions of a GPU each takes (<= 1)")
        for key in ("actor_workers", "critic_workers", "ref_workers", "reward_workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"ray.{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_restarts < 0:
            raise ConfigError(f"ray.max_restarts: must be >= 0, got {self.max_restarts}")


@dataclass(frozen=True)
class PlanConfig:
    """The cluster `vlrl plan` checks the run against (its flags override these)."""

    model_config: str | None = None            # the policy's config.json where `policy` is not on this machine
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory_gib: float = 80.0


@dataclass(frozen=True)
class RLConfig:
    algo: Literal["ppo", "grpo"] = "ppo"
    policy: str = ""                           # the SFT model (HF folder); also the reference policy (required)
    critic: str | None = None                  # critic folder; default: start from the policy
    reward_model: str | None = None            # RM folder for tasks routed to it (caption, general)
    data: str = ""                             # prompt records (mixed tasks; required)
    eval_data: str | None = None               # held-out prompt records (none: no held-out eval)
    out: str = "runs/tiny/rl"
    steps: int = 100                           # RL steps (rollout + update)
    prompts_per_step: int = 16
    task_weights: dict[str, int] = field(default_factory=dict)   # prompts of task t repeated w times (mixture)
    # true: each step deals its prompts to the tasks in turn (16 prompts over 9 tasks: one or two each,
    # task t taking task_weights[t] turns), so no step leaves a task out or floods it; false: shuffled
    # draws from the whole pool, where a task's share of a step varies from step to step
    balance_tasks: bool = False
    seed: int = 0
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    actor_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0, schedule="constant"))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, schedule="constant"))
    # LoRA actor (PEFT): adapters on the frozen policy, which is then the reference policy (no
    # reference workers); the rollouts get the merged weights. null: the whole actor trains.
    actor_lora: LoRAConfig | None = None
    critic_lora: LoRAConfig | None = None      # the critic's own adapters (its value head trains in full); null: full
    # decay of an exponential moving average of the actor's weights, updated after every optimizer
    # step (0: none). The rollouts use the weights; the stage's policy (final/) and its final held-out
    # eval are the average, so the stage ends on what its last ~1/(1-decay) steps agree on rather than
    # wherever its last update left near-tied answers. Checkpoints hold it (resume stays exact).
    actor_ema: float = 0.0
    ray: RayConfig = field(default_factory=RayConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)   # how trainer groups of more than one rank shard
    plan: PlanConfig = field(default_factory=PlanConfig)
    save_every: int = 20
    keep_checkpoints: int = 2
    log_samples: int = 4                       # prompts per step whose samples go to rollouts.jsonl
    eval_every: int = 0                        # held-out eval period (0: only at the end)
    eval_limit: int = 0                        # records in a periodic eval, spread over the file (0: all)
    eval_samples: int = 0                      # k > 0 adds avg@k at the rollout temperature to every eval
    # who decodes the greedy held-out answers: "actor" (the trainer's generate, as `vlrl eval` and SFT's
    # eval do) or "engine" (the rollout engines at temperature 0, beside their avg@k samples: far
    # faster with vLLM, and how peers validate; the same float32 weights, so the same answers but for
    # rare near-ties of two tokens' logits)
    eval_greedy: Literal["actor", "engine"] = "actor"
    max_minutes: float = 0.0                   # stop (and save) after this wall time; 0: no limit
    # Compute dtype of the trainers. The actor and the critic keep float32 master weights and
    # optimizer state whatever it is (a bfloat16 update at lr 1e-6 mostly rounds away).
    dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def use_ray(self) -> bool:
        """Whether the workers live in Ray actors (see RayConfig)."""
        r = self.ray
        return r.enabled or self.rollout.async_ or self.rollout.replicas > 1 or max(r.actor_workers, r.critic_workers, r.ref_workers,
                                                               r.reward_workers) > 1

    def __post_init__(self):
        check_task_weights(self.task_weights)   # at load time, with the config file's name
        for key, tasks in (("task_weights", self.task_weights), ("kl.coefs", self.kl.coefs)):
            unrouted = sorted(set(tasks) - self.reward.known_tasks)
            if unrouted:
                raise ConfigError(f"{key}: task(s) {unrouted} have no reward route (route them under reward.tasks)")
        if self.ray.placement == "colocated" and self.rollout.tensor_parallel_size > 1:
            raise ConfigError("rollout.tensor_parallel_size: with ray.placement colocated each replica runs on one "
                              "GPU it shares with the trainers (tensor_parallel_size 1)")
        if self.ray.placement == "split" and self.ray.rollout_gpus and \
                self.ray.rollout_gpus < self.rollout.tensor_parallel_size:
            raise ConfigError(f"ray.rollout_gpus: a replica with rollout.tensor_parallel_size "
                              f"{self.rollout.tensor_parallel_size} needs that many GPUs, got {self.ray.rollout_gpus}")
        if self.rollout.sync_method == "transfer" and self.ray.placement == "colocated" and self.ray.actor_gpus:
            raise ConfigError("rollout.sync_method: 'transfer' joins trainer rank 0 and the engines in one NCCL "
                              "group, which cannot hold two ranks on one GPU; colocated trainers and engines share "
                              "GPUs: use ray.placement split, or sync_method layerwise")
        if not 0.0 <= self.actor_ema < 1.0:
            raise ConfigError(f"actor_ema: the average's decay lies in [0, 1) (0: no average), got {self.actor_ema}")
        if self.critic_lora is not None and self.algo != "ppo":
            raise ConfigError(f"critic_lora: algo {self.algo} has no critic (remove critic_lora)")
        if self.rollout.async_:
            if self.ray.placement == "colocated":
                raise ConfigError("rollout.async: colocated engines sleep while the trainers update; async rollouts "
                                  "need engines of their own (ray.placement: split)")
            if self.ppo.old_logp != "trainer" or self.rollout.temperature != 1.0 or self.ppo.tis_cap == 0:
                raise ConfigError("rollout.async: the engines sample one step behind the trainer; the correction "
                                  "needs ppo.old_logp 'trainer', rollout.temperature 1 and ppo.tis_cap > 0, got "
                                  f"{self.ppo.old_logp!r}, {self.rollout.temperature}, {self.ppo.tis_cap}")
        if self.ppo.old_logp == "engine" and self.rollout.temperature != 1.0:
            raise ConfigError("ppo.old_logp: 'engine' needs rollout.temperature 1 (the engine returns the raw "
                              f"policy's log-probs, the trainer optimises softmax(logits/T)); got {self.rollout.temperature}")

    def check_inputs(self) -> None:
        """ConfigError naming the key of an input that is not set or does not exist (before any
        worker starts)."""
        check_input("policy", self.policy, kind="model")
        check_input("critic", self.critic, kind="model", required=False)
        check_input("reward_model", self.reward_model, kind="model", required=False)
        check_input("reward.judge.model", self.reward.judge.model, kind="model", required=self.reward.uses_judge)
        check_input("data", self.data, kind="data")
        check_input("eval_data", self.eval_data, kind="data", required=False)

    def check_sources(self, tasks) -> None:
        """ConfigError when `tasks` (those in the run's data) are routed to the reward model but no
        `reward_model` is set."""
        needs_rm = sorted(t for t in set(tasks) if self.reward.route(t).use_rm)
        if needs_rm and not self.reward_model:
            raise ConfigError(f"reward_model: not set, but tasks {needs_rm} in the data are routed to the reward "
                              "model (use_rm); set reward_model to an RM folder, or route them to verifiers "
                              f"under reward.tasks.{needs_rm[0]}")
