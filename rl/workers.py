"""Per-rank compute: each worker owns one model (and its optimizer), splits a batch into
micro-batches, calls the pure math in `rl.algos`, and steps. Thin shells: the driver decides
what runs when; the math lives in `rl.algos`.

The same classes run in the driver process or as Ray actors (see `rl.placement`).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import Tensor

from model.critic import ValueModel
from model.load import load_vlm
from model.logprobs import entropy_from_logits, logp_and_entropy, token_logp
from rewards.config import RewardConfig
from rewards.hybrid import RewardInput, RewardResult, score_batch
from rewards.judge import TimedJudge, load_judge
from rewards.pool import VerifierPool
from rewards.rm import RewardModelScorer
from rl.algos import kl_loss, policy_loss, positive_lm_loss, value_loss
from rl.batch import RolloutBatch, micro_batches
from rl.config import PPOConfig
from rollout.greedy import generate_greedy
from rollout.sequences import SequenceBatch
from training.optim import OptimConfig, make_optimizer, optimizer_step


def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _device() -> torch.device:
    """The GPU Ray (or CUDA_VISIBLE_DEVICES) gave this process, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _norm(mask: Tensor, *, agg: str) -> dict:
    """Whole-minibatch token and sequence counts for `rl.algos.aggregate` (micro-batch sums divided
    by them give the minibatch mean whatever the micro-batching)."""
    return dict(num_tokens=max(1, int(mask.sum())), num_seqs=max(1, int((mask.sum(-1) > 0).sum())), agg=agg)


class PolicyWorker:
    """The actor (with an optimizer) or the frozen reference policy (optim=None)."""

    def __init__(self, path: str, *, optim: OptimConfig | None = None, total_steps: int = 1, dtype: str = "float32",
                 seed: int = 0, chunk_size: int = 0, temperature: float = 1.0):
        _threads()
        torch.manual_seed(seed)
        self.device = _device()
        self.model, self.processor = load_vlm(path, dtype=dtype, train=optim is not None, device=str(self.device))
        self.chunk_size = chunk_size or None
        # The policy being optimised is the one the rollouts sample from: softmax(logits / T).
        self.temperature = temperature
        self.opt = self.sched = None
        if optim is not None:
            self.opt, self.sched = make_optimizer(self.model, optim, total_steps)
            self.max_grad_norm = optim.max_grad_norm
        else:
            self.model.requires_grad_(False)

    def _logp(self, seq: SequenceBatch, *, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Token log-probs of the labels and (entropy=True) the entropy, a detached diagnostic."""
        logits = self.model(**seq.model_inputs(), use_cache=False).logits[:, :-1]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        labels = seq.input_ids[:, 1:]
        if entropy and not torch.is_grad_enabled():
            return logp_and_entropy(logits, labels, chunk_size=self.chunk_size)
        logp = token_logp(logits, labels, chunk_size=self.chunk_size)
        if not entropy:
            return logp, None
        with torch.no_grad():
            return logp, entropy_from_logits(logits.detach(), chunk_size=self.chunk_size)

    @torch.no_grad()
    def logp(self, seq: SequenceBatch, *, micro_batch_size: int = 32) -> tuple[Tensor, Tensor]:
        """(logp, entropy), each (B, T) on label positions, padded with 0."""
        was = self.model.training
        self.model.eval()
        B, T = seq.rows, seq.input_ids.shape[1] - 1
        logp = torch.zeros(B, T)
        ent = torch.zeros(B, T)
        row = 0
        for mb in micro_batches(seq, micro_batch_size):
            lp, en = self._logp(mb.to(self.device), entropy=True)
            n, t = lp.shape
            logp[row:row + n, :t] = lp.float().cpu()
            ent[row:row + n, :t] = en.float().cpu()
            row += n
        self.model.train(was)
        return logp, ent

    def update(self, batch: RolloutBatch, *, ppo: PPOConfig, kl_mode: str, kl_kind: str,
               minibatch_rows: Sequence[Sequence[int]], use_lm: bool = True, entropy: bool = False) -> dict[str, float]:
        """PPO actor update over the given minibatches (one optimizer step each); entropy=True also
        reports the policy's token-mean entropy over the update's forwards (`response/entropy`).

        Reads old_logp, adv, ref_logp (None: no KL term), kl_coef, correct of `batch`.
        Loss = policy_loss + [kl_mode == 'loss'] kl_loss + lm_coef * positive_lm_loss, each a
        token mean over the minibatch (micro-batch sums divided by the minibatch token count).
        """
        self.model.train()
        sums: dict[str, float] = {}
        steps = skipped = 0
        for rows in minibatch_rows:
            norm = _norm(batch.mask[list(rows)], agg=ppo.agg)
            # The LM loss is a mean over the correct samples only (VAPO's formula), not all samples.
            lm_norm = _norm(batch.mask[list(rows)] * batch.correct[list(rows), None], agg=ppo.agg)
            n_tok = norm["num_tokens"]
            total = 0.0
            for mb in batch.micro_batches(ppo.micro_batch_size, order=rows):
                mb = mb.to(self.device)
                mask = mb.mask
                logp, ent = self._logp(mb.seq, entropy=entropy)
                if ent is not None:
                    sums["entropy"] = sums.get("entropy", 0.0) + float((ent * mask).sum()) / n_tok
                loss, m = policy_loss(logp, mb.old_logp, mb.adv, mask, clip_low=ppo.clip_low,
                                      clip_high=ppo.clip_high, dual_clip=ppo.dual_clip, **norm)
                if kl_mode == "loss" and mb.ref_logp is not None:
                    kloss, km = kl_loss(logp, mb.ref_logp, mask, mb.kl_coef, kind=kl_kind, **norm)
                    loss = loss + kloss
                    m = {**m, **{f"kl_loss_{k}": v for k, v in km.items()}}
                if use_lm and ppo.lm_coef > 0:
                    lm, lmm = positive_lm_loss(logp, mask, mb.correct, **lm_norm)
                    loss = loss + ppo.lm_coef * lm
                    m = {**m, **lmm}
                    # lm is this micro-batch's share of the minibatch mean: shares add up
                    sums["lm_loss"] = sums.get("lm_loss", 0.0) + float(lm.detach())
                loss.backward()
                total += float(loss.detach())
                w = mask.sum().item() / max(1, n_tok)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * w
            if not math.isfinite(total):
                self.opt.zero_grad(set_to_none=True)
                skipped += 1
                continue
            gn = optimizer_step(self.model, self.opt, self.sched, self.max_grad_norm)
            steps += 1
            sums["loss"] = sums.get("loss", 0.0) + total
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gn)
        denom = max(1, len(minibatch_rows))
        out = {f"actor/{k}": v / denom for k, v in sums.items() if k != "entropy"}
        if "entropy" in sums:
            out["response/entropy"] = sums["entropy"] / denom
        out["actor/skipped_nonfinite"] = skipped
        out["actor/lr"] = self.sched.get_last_lr()[0]
        return out

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    def optim_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_optim_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def generate_greedy(self, records, *, max_new_tokens: int = 48) -> list[str]:
        return generate_greedy(self.model, self.processor, records, max_new_tokens=max_new_tokens)


class CriticWorker:
    """The shared critic: ONE value model for every task type."""

    def __init__(self, path: str, *, optim: OptimConfig, total_steps: int = 1, dtype: str = "float32", seed: int = 0):
        _threads()
        torch.manual_seed(seed + 1)
        self.device = _device()
        self.model = ValueModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.train()
        self.opt, self.sched = make_optimizer(self.model, optim, total_steps)
        self.max_grad_norm = optim.max_grad_norm

    @torch.no_grad()
    def values(self, seq: SequenceBatch, *, micro_batch_size: int = 32) -> Tensor:
        """(B, T) values on label positions: values[:, t] = V(state before label token t + 1)."""
        B, T = seq.rows, seq.input_ids.shape[1] - 1
        out = torch.zeros(B, T)
        row = 0
        for mb in micro_batches(seq, micro_batch_size):
            v = self.model(**mb.model_inputs(self.device))[:, :-1].cpu()
            out[row:row + v.shape[0], :v.shape[1]] = v
            row += v.shape[0]
        return out

    def update(self, batch: RolloutBatch, *, ppo: PPOConfig, minibatch_rows: Sequence[Sequence[int]]) -> dict[str, float]:
        """Clipped value regression on batch.returns around batch.values (both (B, T))."""
        sums: dict[str, float] = {}
        for rows in minibatch_rows:
            norm = _norm(batch.mask[list(rows)], agg=ppo.agg)
            n_tok = norm["num_tokens"]
            total = 0.0
            for mb in batch.micro_batches(ppo.micro_batch_size, order=rows):
                mb = mb.to(self.device)
                v = self.model(**mb.seq.model_inputs())[:, :-1]
                loss, m = value_loss(v, mb.values, mb.returns, mb.mask, clip=ppo.value_clip, **norm)
                loss.backward()
                total += float(loss.detach())
                w = mb.mask.sum().item() / max(1, n_tok)
                for k, val in m.items():
                    sums[k] = sums.get(k, 0.0) + float(val) * w
            if not math.isfinite(total):
                self.opt.zero_grad(set_to_none=True)
                sums["skipped_nonfinite"] = sums.get("skipped_nonfinite", 0.0) + 1
                continue
            gn = optimizer_step(self.model, self.opt, self.sched, self.max_grad_norm)
            sums["loss"] = sums.get("loss", 0.0) + total
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(gn)
        denom = max(1, len(minibatch_rows))
        return {f"critic/{k}": v / denom for k, v in sums.items()}

    def save(self, path: str) -> None:
        self.model.save_pretrained(path)

    def optim_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_optim_state(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


class RewardWorker:
    """The hybrid reward: verifier process pool + (optional) reward model and pairwise judge, scoring
    rollouts. The judge's cost (seconds, pairs judged in both orders) is counted until `take_cost`."""

    def __init__(self, cfg: RewardConfig, *, reward_model: str | None = None):
        _threads()
        self.cfg = cfg
        self.pool = VerifierPool.from_config(cfg.pool).wait_ready()
        self.rm = None
        if reward_model:
            self.rm = RewardModelScorer(reward_model)
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
