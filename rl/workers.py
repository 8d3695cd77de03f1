"""Per-rank compute: each worker owns one model (and its optimizer), takes its rank's share of a
batch, splits it into micro-batches, calls the pure math in `rl.algos`, and steps. Thin shells: the
driver decides what runs when; the math lives in `rl.algos`.

A worker runs alone (in the driver process or one Ray actor) or as one rank of a group
(`training.placement.spawn(..., workers=N)`): then its model is sharded with FSDP2 and every method
is SPMD, called on all ranks at once (see `training.distributed` for how rows are shared out and
why losses divide by the global token count over the world size). Trainers keep float32 master
weights and optimizer state; `dtype: bfloat16` is the compute dtype.

With LoRA (`lora=`, `model.lora`) a trainer's model carries adapters on its frozen base: only the
adapters train and are checkpointed, the actor's frozen base is the reference policy
(`ref_logp`), and the weights it syncs and exports are merged under the base model's names.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from model.critic import ValueModel
from model.load import load_vlm, write_vlm
from model.lora import (ADAPTER_DIR, LoRAConfig, adapter_state, adapters_off, add_adapters, full_param_meta,
                        full_params, has_adapters, merged_state_dict, write_adapter)
from model.logprobs import entropy_from_logits, logp_and_entropy, token_logp
from model.packing import forward_inputs
from rewards.config import RewardConfig
from rewards.hybrid import RewardInput, RewardResult, score_batch
from rewards.judge import TimedJudge, load_judge
from rewards.pool import VerifierPool
from rewards.rm import RewardModelScorer
from rl.algos import kl_loss, policy_loss, positive_lm_loss, value_loss
from rl.batch import RolloutBatch
from rl.config import PPOConfig
from rollout.greedy import generate_greedy
from rollout.sequences import SequenceBatch
from rollout.sync import buckets
from rollout.worker import RolloutWorker
from training.distributed import (FSDPConfig, all_reduce_floats, all_reduce_sum, free_port, full_state_dict,
                                  has_sharded_checkpoint, is_sharded, load_sharded, node_address, rank_chunks,
                                  save_sharded)
from training.ema import ParamEMA
from training.optim import OptimConfig
from training.placement import Handle, call_all
from training.trainer import Trainer, device, set_threads


EMA_DIR = "ema"   # in an actor checkpoint: the weight average (`actor_ema`), a model state of its own


def _norm(mask: Tensor, *, agg: str, world: int) -> dict:
    """Whole-minibatch token and sequence counts for `rl.algos.aggregate`, over the world size: the
    micro-batch sums of every rank divided by them, averaged over the ranks (FSDP), give the
    minibatch mean whatever the micro-batching and the number of ranks."""
    return dict(num_tokens=max(1, int(mask.sum())) / world, num_seqs=max(1, int((mask.sum(-1) > 0).sum())) / world,
                agg=agg)


class PolicyWorker(Trainer):
    """The actor (with an optimizer) or the frozen reference policy (optim=None). With `lora` the
    actor trains adapters on the frozen policy at `path`, which is then also its reference policy.
    With `ema` > 0 the actor keeps an exponential moving average of its weights (`training.ema`):
    checkpoints hold it, `use_ema` makes it the policy (for the stage's export and final eval)."""

    def __init__(self, path: str, *, optim: OptimConfig | None = None, total_steps: int = 1, dtype: str = "float32",
                 seed: int = 0, chunk_size: int = 0, temperature: float = 1.0, fsdp: FSDPConfig = FSDPConfig(),
                 lora: LoRAConfig | None = None, ema: float = 0.0):
        set_threads()
        torch.manual_seed(seed)
        self.device = device()
        self.path = path
        # a trainer keeps float32 master weights; the frozen reference runs in the compute dtype
        self.model, self.processor = load_vlm(path, dtype="float32" if optim is not None else dtype,
                                              train=optim is not None, device=str(self.device))
        if lora is not None:
            add_adapters(self.model, lora, key="actor_lora")
        self.chunk_size = chunk_size or None
        # The policy being optimised is the one the rollouts sample from: softmax(logits / T).
        self.temperature = temperature
        self._setup(optim=optim, total_steps=total_steps, dtype=dtype, fsdp=fsdp, adapters=lora is not None)
        self.ema = ParamEMA(self.model, ema) if ema and optim is not None else None

    def save_state(self, path: str) -> dict:
        """The trainer's state and, with an average, the average as a model state of its own (`ema/`)."""
        state = super().save_state(path)
        if self.ema is not None:
            with self.ema.swapped(self.model):
                save_sharded(str(Path(path) / EMA_DIR), self.model, None, only=self.checkpoint_only)
        return state

    def load_state(self, path: str, state: dict) -> None:
        if self.ema is not None:
            if not has_sharded_checkpoint(Path(path) / EMA_DIR):
                raise FileNotFoundError(f"{path}: no {EMA_DIR}/ (the weight average): this run had actor_ema off; "
                                        "start afresh or leave actor_ema as it was")
            load_sharded(str(Path(path) / EMA_DIR), self.model, None, only=self.checkpoint_only)
            self.ema.swap(self.model)   # the average into its place; the weights come next
        super().load_state(path, state)

    def use_ema(self) -> bool:
        """Make the average the policy, for good (the run's end). False when there is none."""
        if self.ema is None:
            return False
        self.ema.swap(self.model)
        self.ema = None
        return True

    def _logp(self, seq: SequenceBatch, *, entropy: bool = False, pack: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, T) token log-probs of the labels and (entropy=True) the entropy, a detached diagnostic;
        pack=True: one forward over the rows packed into one (`model.packing`), same numbers."""
        inputs, packing = forward_inputs(self.model, seq.model_inputs(), pack=pack)
        with self._autocast():
            logits = self.model(**inputs, use_cache=False).logits
        if packing is None:
            logits, labels = logits[:, :-1], seq.input_ids[:, 1:]
        else:   # (1, N, V): each position's label is the next token of its own sequence
            labels = packing.next_tokens(inputs["input_ids"])
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if entropy and not torch.is_grad_enabled():
            logp, ent = logp_and_entropy(logits, labels, chunk_size=self.chunk_size)
        else:
            logp, ent = token_logp(logits, labels, chunk_size=self.chunk_size), None
            if entropy:
                with torch.no_grad():
                    ent = entropy_from_logits(logits.detach(), chunk_size=self.chunk_size)
        if packing is not None:
            logp = packing.unpack(logp)[:, :-1]
            ent = None if ent is None else packing.unpack(ent)[:, :-1]
        return logp, ent

    @torch.no_grad()
    def logp(self, seq: SequenceBatch, *, micro_batch_size: int = 32, max_tokens: int = 0,
             pack: bool = False) -> tuple[Tensor, Tensor]:
        """(logp, entropy), each (B, T) on label positions, padded with 0; every rank computes its
        share of the rows and returns all of them. Micro-batches of `micro_batch_size` rows, or
        with `max_tokens` > 0 of about that many tokens (`training.distributed.rank_chunks`);
        `pack`: each micro-batch's rows packed into one (`ppo.pack_sequences`)."""
        return self._rows_logp(seq, micro_batch_size=micro_batch_size, max_tokens=max_tokens, entropy=True, pack=pack)

    @torch.no_grad()
    def ref_logp(self, seq: SequenceBatch, *, micro_batch_size: int = 32, max_tokens: int = 0,
                 pack: bool = False) -> Tensor:
        """(B, T) log-probs of the reference policy, as `logp`: a LoRA actor's frozen base (its
        adapters switched off for the pass: no second copy of the model), else this worker's policy
        (the frozen reference worker)."""
        with adapters_off(self.model):
            return self._rows_logp(seq, micro_batch_size=micro_batch_size, max_tokens=max_tokens, entropy=False,
                                   pack=pack)[0]

    def _rows_logp(self, seq: SequenceBatch, *, micro_batch_size: int, max_tokens: int, entropy: bool,
                   pack: bool) -> tuple[Tensor, Tensor]:
        was = self.model.training
        self.model.eval()
        B, T = seq.rows, seq.input_ids.shape[1] - 1
        logp = torch.zeros(B, T)
        ent = torch.zeros(B, T)
        for rows, real in rank_chunks(range(B), rank=self.rank, world=self.world, size=micro_batch_size,
                                      lengths=seq.lengths, max_tokens=max_tokens):
            lp, en = self._logp(seq.select(rows).to(self.device), entropy=entropy, pack=pack)
            if real:
                logp[rows, :lp.shape[1]] = lp.float().cpu()
                if en is not None:
                    ent[rows, :en.shape[1]] = en.float().cpu()
        self.model.train(was)
        return all_reduce_sum(logp), (all_reduce_sum(ent) if entropy else ent)

    def update(self, batch: RolloutBatch, *, ppo: PPOConfig, kl_mode: str, kl_kind: str,
               minibatch_rows: Sequence[Sequence[int]], use_lm: bool = True, entropy: bool = False) -> dict[str, float]:
        """PPO actor update over the given minibatches (one optimizer step each); entropy=True also
        reports the policy's token-mean entropy over the update's forwards (`response/entropy`).

        Reads old_logp, adv, ref_logp (None: no KL term), kl_coef, correct, is_weight (None: no TIS)
        of `batch`.
        Loss = policy_loss + [kl_mode == 'loss'] kl_loss + lm_coef * positive_lm_loss, each a
        token mean over the minibatch (micro-batch sums divided by the minibatch token count).
        """
        self.model.train()
        sums: dict[str, float] = {}
        skipped = 0
        for rows in minibatch_rows:
            rows = list(rows)
            norm = _norm(batch.mask[rows], agg=ppo.agg, world=self.world)
            # The LM loss is a mean over the correct samples only (VAPO's formula), not all samples.
            lm_norm = _norm(batch.mask[rows] * batch.correct[rows, None], agg=ppo.agg, world=self.world)
            n_tok = max(1, int(batch.mask[rows].sum()))          # the minibatch's tokens on all ranks
            part: dict[str, float] = {"loss": 0.0}
            for chunk, real in rank_chunks(rows, rank=self.rank, world=self.world, size=ppo.micro_batch_size,
                                           lengths=batch.seq.lengths, max_tokens=ppo.max_tokens_per_micro_batch):
                mb = batch.select(chunk).to(self.device)
                mask = mb.mask
                logp, ent = self._logp(mb.seq, entropy=entropy, pack=ppo.pack_sequences)
                loss, m = policy_loss(logp, mb.old_logp, mb.adv, mask, clip_low=ppo.clip_low,
                                      clip_high=ppo.clip_high, dual_clip=ppo.dual_clip, is_weight=mb.is_weight,
                                      **norm)
                if kl_mode == "loss" and mb.ref_logp is not None:
                    kloss, km = kl_loss(logp, mb.ref_logp, mask, mb.kl_coef, kind=kl_kind, **norm)
                    loss = loss + kloss
                    m = {**m, **{f"kl_loss_{k}": v for k, v in km.items()}}
                lm = None
                if use_lm and ppo.lm_coef > 0:
                    lm, lmm = positive_lm_loss(logp, mask, mb.correct, **lm_norm)
                    loss = loss + ppo.lm_coef * lm
                    m = {**m, **lmm}
                # a padding pass (real False) runs the collectives and counts for nothing
                (loss if real else loss * 0.0).backward()
                keep = 1.0 if real else 0.0
                part["loss"] += float(loss.detach()) * keep
                if ent is not None:
                    part["entropy"] = part.get("entropy", 0.0) + float((ent * mask).sum()) / n_tok * keep
                if lm is not None:
                    # lm is this micro-batch's share of the minibatch mean: shares add up
                    part["lm_loss"] = part.get("lm_loss", 0.0) + float(lm.detach()) * keep
                w = mask.sum().item() / n_tok * keep
                for k, v in m.items():
                    part[k] = part.get(k, 0.0) + float(v) * w
            # a rank's losses are over the token count divided by the world size: their sum is world x the mean
            part = _gather_part(part, self.world, scaled=("loss", "lm_loss"))
            if not math.isfinite(part["loss"]):
                self.opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            part["grad_norm"] = self._step()
            if self.ema is not None:
                self.ema.update(self.model)
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
        denom = max(1, len(minibatch_rows))
        out = {f"actor/{k}": v / denom for k, v in sums.items() if k != "entropy"}
        if "entropy" in sums:
            out["response/entropy"] = sums["entropy"] / denom
        out["actor/skipped_nonfinite"] = skipped
        out["actor/lr"] = self.sched.get_last_lr()[0]
        return out

    def push_weights(self, targets: list[Handle[RolloutWorker]], *, bucket_mb: float = 256.0,
                     sync_method: str = "layerwise") -> dict:
        """Send the current weights to every rollout worker in `targets`, bucket by bucket (about
        `bucket_mb` each): each sharded tensor is gathered when its bucket comes and only rank 0
        sends, so neither the driver nor any rank holds the whole model. `sync_method` (the
        engines'): 'reload' or 'layerwise', rank 0 hands each bucket of whole layers to all targets
        at once and waits; 'transfer', rank 0 broadcasts to all targets through vLLM's
        weight-transfer API (`_transfer`). A target that fails is left out of the rest of the sync and reported in
        `failed` (its index), for the driver to restart. Returns seconds, buckets, bytes, failed."""
        t0 = time.perf_counter()
        if sync_method == "transfer":
            return {**self._transfer(targets, int(bucket_mb * 2**20)), "seconds": time.perf_counter() - t0}
        n_buckets = n_bytes = 0
        alive = dict(enumerate(targets))
        failed: list[int] = []

        def send(method: str, *args) -> None:
            for i, f in zip(list(alive), call_all(list(alive.values()), method, *args)):
                try:
                    f.result()
                except Exception:  # noqa: BLE001  (a dead replica: the driver restarts it)
                    failed.append(i)
                    del alive[i]

        # with LoRA the merged weights, under the base model's names (what the engines hold)
        for bucket in buckets(full_params(self.model), int(bucket_mb * 2**20)):
            if self.rank == 0 and alive:
                send("load_weights", {k: v.to("cpu") for k, v in bucket.items()})
                n_buckets += 1
                n_bytes += sum(v.numel() * v.element_size() for v in bucket.values())
        if self.rank == 0 and alive:
            send("finish_sync")
        return {"seconds": time.perf_counter() - t0, "buckets": n_buckets, "bytes": n_bytes, "failed": failed}

    def _transfer(self, targets: list[Handle[RolloutWorker]], bucket_bytes: int) -> dict:
        """One sync through vLLM's weight-transfer API (`rollout.vllm_sync.send_weights`): rank 0 and
        the engine workers of the live targets form one group for this sync. A target that does not
        answer before the sync is left out; if the transfer itself fails, every target of it is
        reported failed (a broadcast gives no way to tell which one broke it)."""
        from rollout import vllm_sync  # vLLM: heavy and optional, loaded by the engines anyway

        meta = full_param_meta(self.model)
        source = vllm_sync.ParamSource(meta, lambda: full_params(self.model))
        n_bytes = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in meta)
        live, failed, client = list(range(len(targets))), [], None
        if self.rank == 0:
            ranks = {}
            for i, f in enumerate(call_all(targets, "transfer_ranks")):
                try:
                    ranks[i] = f.result()
                except Exception:  # noqa: BLE001  (a dead replica: the driver restarts it)
                    failed.append(i)
            live = list(ranks)
            client = vllm_sync.ReplicaClient(lambda j, name, args: getattr(targets[live[j]], name)(*args).result(),
                                             [ranks[i] for i in live])
        if self.rank == 0 and not live:
            source.drain()
            return {"buckets": 0, "bytes": 0, "failed": failed}
        backend = "nccl" if torch.cuda.is_available() else vllm_sync.GLOO
        try:
            vllm_sync.send_weights(source, client, rank=self.rank, address=node_address(), port=free_port(),
                                   bucket_bytes=bucket_bytes, backend=backend)
        except Exception:  # noqa: BLE001  (the driver restarts the targets; the restart pushes the weights)
            if self.rank != 0:
                raise
            failed += live
        return {"buckets": math.ceil(n_bytes / max(1, bucket_bytes)), "bytes": n_bytes, "failed": sorted(failed)}

    def export(self, path: str) -> None:
        """Write an HF folder of the current policy (rank 0 writes; every rank must call it). With
        LoRA: the merged model, and the adapters in its `adapter/` folder (PEFT's format, on the
        base policy)."""
        if has_adapters(self.model):
            sd, adapters = merged_state_dict(self.model, keep=self.rank == 0), adapter_state(self.model)
            if self.rank == 0:
                write_vlm(self.model, self.processor, path, state_dict=sd)
                write_adapter(self.model, Path(path) / ADAPTER_DIR, state=adapters, base=self.path)
            return
        sd = full_state_dict(self.model)
        if self.rank == 0:
            write_vlm(self.model, self.processor, path, state_dict=sd if is_sharded(self.model) else None)

    def save(self, path: str) -> None:
        self.export(path)

    def generate_greedy(self, records, *, max_new_tokens: int = 48) -> list[str]:
        """Greedy answers to prompt records (every rank decodes its share, all return all)."""
        with self._autocast():
            return generate_greedy(self.model, self.processor, records, max_new_tokens=max_new_tokens)


class CriticWorker(Trainer):
    """The shared critic: ONE value model for every task type. With `lora` its backbone trains
    adapters on a frozen base and its value head trains in full."""

    def __init__(self, path: str, *, optim: OptimConfig | None, total_steps: int = 1, dtype: str = "float32",
                 seed: int = 0, fsdp: FSDPConfig = FSDPConfig(), lora: LoRAConfig | None = None):
        set_threads()
        torch.manual_seed(seed + 1)
        self.device = device()
        self.model = ValueModel.from_pretrained(path, dtype=torch.float32).to(self.device)
        if lora is not None:
            add_adapters(self.model.backbone, lora, key="critic_lora")
        self.model.train()
        self._setup(optim=optim, total_steps=total_steps, dtype=dtype, fsdp=fsdp, checkpointed=self.model.backbone,
                    adapters=lora is not None)

    def _values(self, seq: SequenceBatch, *, pack: bool) -> Tensor:
        """(B, T) values of a micro-batch on its label positions (pack: over its rows packed into one)."""
        inputs, packing = forward_inputs(self.model, seq.model_inputs(), pack=pack)
        with self._autocast():
            v = self.model(**inputs)
        return (v if packing is None else packing.unpack(v))[:, :-1]

    @torch.no_grad()
    def values(self, seq: SequenceBatch, *, micro_batch_size: int = 32, max_tokens: int = 0,
               pack: bool = False) -> Tensor:
        """(B, T) values on label positions: values[:, t] = V(state before label token t + 1).
        Micro-batches (and `pack`) as `PolicyWorker.logp`'s."""
        B, T = seq.rows, seq.input_ids.shape[1] - 1
        out = torch.zeros(B, T)
        for rows, real in rank_chunks(range(B), rank=self.rank, world=self.world, size=micro_batch_size,
                                      lengths=seq.lengths, max_tokens=max_tokens):
            v = self._values(seq.select(rows).to(self.device), pack=pack).float().cpu()
            if real:
                out[rows, :v.shape[1]] = v
        return all_reduce_sum(out)

    def update(self, batch: RolloutBatch, *, ppo: PPOConfig, minibatch_rows: Sequence[Sequence[int]]) -> dict[str, float]:
        """Clipped value regression on batch.returns around batch.values (both (B, T))."""
        sums: dict[str, float] = {}
        for rows in minibatch_rows:
            rows = list(rows)
            norm = _norm(batch.mask[rows], agg=ppo.agg, world=self.world)
            n_tok = max(1, int(batch.mask[rows].sum()))
            part: dict[str, float] = {"loss": 0.0}
            for chunk, real in rank_chunks(rows, rank=self.rank, world=self.world, size=ppo.micro_batch_size,
                                           lengths=batch.seq.lengths, max_tokens=ppo.max_tokens_per_micro_batch):
                mb = batch.select(chunk).to(self.device)
                v = self._values(mb.seq, pack=ppo.pack_sequences)
                loss, m = value_loss(v, mb.values, mb.returns, mb.mask, clip=ppo.value_clip, **norm)
                (loss if real else loss * 0.0).backward()   # a padding pass counts for nothing
                part["loss"] += float(loss.detach()) * (1.0 if real else 0.0)
                w = mb.mask.sum().item() / n_tok * (1.0 if real else 0.0)
                for k, val in m.items():
                    part[k] = part.get(k, 0.0) + float(val) * w
            part = _gather_part(part, self.world, scaled=("loss",))
            if not math.isfinite(part["loss"]):
                self.opt.zero_grad(set_to_none=True)
                sums["skipped_nonfinite"] = sums.get("skipped_nonfinite", 0.0) + 1
                continue
            part["grad_norm"] = self._step()
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v
        denom = max(1, len(minibatch_rows))
        return {f"critic/{k}": v / denom for k, v in sums.items()}

    def export(self, path: str) -> None:
        """Write the critic folder (backbone + value head; with LoRA the merged backbone); rank 0
        writes, every rank must call it."""
        if has_adapters(self.model):
            sd = merged_state_dict(self.model, keep=self.rank == 0)
            if self.rank == 0:
                self.model.save_pretrained(path, state_dict=sd)
            return
        sd = full_state_dict(self.model)
        if self.rank == 0:
            self.model.save_pretrained(path, state_dict=sd if is_sharded(self.model) else None)

    def save(self, path: str) -> None:
        self.export(path)


def _gather_part(part: dict[str, float], world: int, *, scaled: tuple[str, ...]) -> dict[str, float]:
    """A minibatch's metrics summed over the ranks; the `scaled` ones (losses over the token count
    divided by the world size) divided by the world size back to the minibatch mean."""
    if world == 1:
        return part
    total = all_reduce_floats(part)   # every rank ran the same passes, so every rank has the same keys
    return {k: v / world if k in scaled else v for k, v in total.items()}


class RewardWorker:
    """The hybrid reward: verifier process pool + (optional) reward model and pairwise judge, scoring
    rollouts. The judge's cost (seconds, pairs judged in both orders) is counted until `take_cost`."""

    def __init__(self, cfg: RewardConfig, *, reward_model: str | None = None):
        set_threads()
        self.cfg = cfg
        self.pool = VerifierPool.from_config(cfg.pool).wait_ready()
        self.rm = None
        if reward_model:
            self.rm = RewardModelScorer(reward_model, device=str(device()))
        self.judge = TimedJudge(load_judge(cfg.judge)) if cfg.uses_judge else None

    def score(self, samples: Sequence[RewardInput]) -> list[RewardResult]:
        return score_batch(samples, self.cfg, rm=self.rm, pool=self.pool, judge=self.judge)

    def rm_scores(self, items) -> list[float]:
        return list(self.rm(items)) if self.rm is not None else []

    def stats(self) -> dict:
        return dict(self.pool.stats)

    def take_cost(self) -> dict[str, float]:
        """{judge/seconds, judge/calls} since the previous call (empty without a judge)."""
        return self.judge.take() if self.judge is not None else {}

    def close(self) -> None:
        self.pool.close()
