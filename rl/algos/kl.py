"""KL(pi || pi_ref) per token and its two uses with a per-sample (per-task) coefficient: as a reward
penalty before GAE, or as a loss term.

A coefficient of 0 means exactly no KL for that sample: its terms are selected out with
`torch.where`, so even a NaN/inf `ref_logp` there cannot leak into rewards, losses or gradients.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from rl.algos.aggregate import Agg, aggregate, masked_mean

KLKind = Literal["k1", "k2", "k3"]


def kl(logp: Tensor, ref_logp: Tensor, *, kind: KLKind, log_ratio_clip: float = 20.0,
       max_value: float = 10.0) -> Tensor:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi (J. Schulman,
    "Approximating KL Divergence", 2020), with log r = ref_logp - logp:

      k1 = -log r                  unbiased, high variance, can be negative
      k2 = (log r)^2 / 2           biased, low variance
      k3 = (r - 1) - log r         unbiased, >= 0 (the GRPO 2402.03300 eq. 4 term)

    logp, ref_logp: (B, T). Returns (B, T). For k3 only (it exponentiates), log r is clamped to
    [-log_ratio_clip, log_ratio_clip] and the result to at most `max_value`.
    """
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=max_value)
    raise ValueError(f"unknown KL kind {kind!r}")


def kl_coefs(tasks: Sequence[str], table: Mapping[str, float], *, default: float = 0.0) -> Tensor:
    """The KL coefficient of each sample's task: (B,) float32; tasks missing from `table` get `default`."""
    return torch.tensor([float(table.get(task, default)) for task in tasks], dtype=torch.float32)


def kl_penalty_rewards(rewards: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, coefs: Tensor, *,
                       kind: KLKind = "k1") -> Tensor:
    """Token rewards with the KL penalty folded in: r_t - beta_i * KL_t on response tokens
    (InstructGPT 2203.02155 eq. 2, per-token as in PPO-for-RLHF implementations).

    rewards, logp, ref_logp, mask: (B, T); coefs: (B,) beta_i. Use before GAE. Returns (B, T),
    detached: a reward is a constant for the policy gradient.
    """
    penalty, _, _ = _weighted_kl(logp.detach(), ref_logp, mask, coefs, kind=kind)  # (B, T)
    return rewards.detach() - penalty


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, coefs: Tensor, *, kind: KLKind = "k3",
            agg: Agg = "token_mean", num_tokens: float | Tensor | None = None,
            num_seqs: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """KL as a loss term, agg_{i,t}(beta_i * KL_t) (GRPO 2402.03300 eq. 3 with k3), beta per sample.

    logp (with grad), ref_logp, mask: (B, T); coefs: (B,). `agg`, `num_tokens`, `num_seqs` as in
    `aggregate` (a sample with beta = 0 still counts in the denominator: it contributes an exact 0).
    Returns (loss, metrics): metrics["kl"] is the unweighted mean KL over tokens of samples with
    beta != 0 (0 when there are none).
    """
    weighted, per_token, active = _weighted_kl(logp, ref_logp, mask, coefs, kind=kind)
    loss = aggregate(weighted, mask, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss, {"kl": masked_mean(per_token.detach(), active)}


def _weighted_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, coefs: Tensor, *,
                 kind: KLKind) -> tuple[Tensor, Tensor, Tensor]:
    """(beta_i * KL_t, KL_t, active) with exact zeros where the mask is unset or beta_i = 0.

    Where a term is inactive, ref_logp is replaced by logp before the estimator runs, so a NaN/inf
    there cannot reach the gradient through 0 * NaN.
    """
    coefs = coefs.to(device=logp.device, dtype=logp.dtype)[:, None]  # (B, 1)
    active = mask.bool() & (coefs != 0)  # (B, T)
    ref_logp = torch.where(active, ref_logp.detach().to(logp.dtype), logp.detach())
    per_token = kl(logp, ref_logp, kind=kind)  # (B, T)
    weighted = torch.where(active, coefs * per_token, torch.zeros_like(per_token))
    return weighted, per_token, active
