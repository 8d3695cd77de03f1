"""PPO losses for the actor and the critic, and VAPO's positive-example LM loss.

Each returns (loss, metrics): `loss` a scalar reduced by `aggregate`, `metrics` a dict of detached
0-dim tensors (no .item() here, so nothing forces a device sync; the worker converts once).
Values at masked positions are never read: they may be padding garbage, even NaN.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rl.algos.aggregate import Agg, aggregate, masked_mean

# log(pi/pi_old) is clamped before exp: a ratio of e^20 is already far outside any clip range.
LOG_RATIO_CLIP = 20.0


def policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, clip_low: float, clip_high: float,
                dual_clip: float | None = None, agg: Agg = "token_mean", num_tokens: float | Tensor | None = None,
                num_seqs: float | Tensor | None = None, is_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate of PPO (Schulman et al. 1707.06347 eq. 7), negated to a loss:

        l_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t),   r_t = pi(a_t|s_t) / pi_old(a_t|s_t)

    with DAPO's decoupled bounds (2503.14476 "Clip-Higher": clip_low 0.2, clip_high 0.28). With
    `dual_clip` = c > 1 (Ye et al. 1912.09729, dual-clip PPO), tokens with A_t < 0 are further bounded:
    l_t = min(l_t, -c A_t), so a huge ratio on a bad action cannot blow the loss up. With `is_weight`
    (B, T) each l_t is multiplied by it (`truncated_is_weight`: the sampler's policy corrected
    towards pi_old, which the ratio and its clip are taken against).

    logp (with grad), old_logp, adv, mask: (B, T). `agg`, `num_tokens`, `num_seqs` as in `aggregate`.
    Metrics (token fractions over the micro-batch): clip_frac_low (A<0, r<1-clip_low),
    clip_frac_high (A>0, r>1+clip_high), dual_clip_frac (A<0, r>c), approx_kl (k3 estimate of
    KL(pi_old || pi)), ratio_mean.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = mask.bool()
    adv = torch.where(mask, adv.detach(), torch.zeros_like(adv))
    log_ratio = torch.where(mask, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP))  # (B, T)
    surrogate = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tokens = torch.maximum(surrogate, clipped)  # (B, T)
    if dual_clip is not None:
        loss_tokens = torch.where(adv < 0, torch.minimum(loss_tokens, -adv * dual_clip), loss_tokens)
    if is_weight is not None:
        loss_tokens = loss_tokens * is_weight.detach().to(loss_tokens.dtype)
    loss = aggregate(loss_tokens, mask, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)

    with torch.no_grad():
        metrics = {
            "clip_frac_low": masked_mean(((adv < 0) & (ratio < 1.0 - clip_low)).float(), mask),
            "clip_frac_high": masked_mean(((adv > 0) & (ratio > 1.0 + clip_high)).float(), mask),
            "dual_clip_frac": masked_mean(((adv < 0) & (ratio > (dual_clip or torch.inf))).float(), mask),
            # k3 with log(pi_old/pi) = -log_ratio: (pi/pi_old - 1) - log(pi/pi_old) >= 0.
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def truncated_is_weight(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Truncated importance weights (TIS; Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): w_t = min(pi_old(a_t|s_t) / pi_sampler(a_t|s_t), cap), 1 off
    the response. pi_old is the trainer's policy before the update, pi_sampler the engine's that
    drew the tokens (older weights with async rollouts, other numerics in bf16). All (B, T)."""
    log_w = torch.where(mask.bool(), old_logp - sampler_logp, torch.zeros_like(old_logp))
    return torch.exp(log_w.clamp(max=math.log(cap))).detach()


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None,
               agg: Agg = "token_mean", num_tokens: float | Tensor | None = None,
               num_seqs: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO as implemented in OpenAI baselines; the c1 L^VF term of 1707.06347 eq. 9):

        l_t = 1/2 * max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -clip, clip) - R_t)^2)

    The 1/2 makes the gradient V_t - R_t. clip=None drops the clipped term: l_t = 1/2 (V_t - R_t)^2.
    values (with grad), old_values, returns, mask: (B, T). `agg`, `num_tokens`, `num_seqs` as in
    `aggregate`. Metrics: clip_frac (tokens where the clipped error is the larger one, i.e. the
    gradient is cut), explained_variance.
    """
    mask = mask.bool()
    zero = torch.zeros_like(values)
    returns = torch.where(mask, returns.detach().to(values.dtype), zero)
    values_m = torch.where(mask, values, zero)
    unclipped = (values_m - returns) ** 2
    if clip is None:
        loss_tokens = unclipped
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old_values = torch.where(mask, old_values.detach().to(values.dtype), zero)
        clipped = (old_values + (values_m - old_values).clamp(-clip, clip) - returns) ** 2
        loss_tokens = torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).float(), mask).detach()
    loss = aggregate(0.5 * loss_tokens, mask, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss, {"clip_frac": clip_frac, "explained_variance": explained_variance(values, returns, mask)}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over the set `mask` entries of (B, T) tensors; 1 is a perfect critic,
    <= 0 no better than a constant. Defined as 0 when Var[R] = 0. Detached 0-dim tensor.
    """
    with torch.no_grad():
        mask = mask.bool()
        values, returns = values.to(returns.dtype), returns
        var_r = _masked_var(returns, mask)
        var_err = _masked_var(returns - values, mask)
        return torch.where(var_r > 0, 1.0 - var_err / var_r.clamp(min=torch.finfo(var_r.dtype).tiny),
                           torch.zeros_like(var_r))


def positive_lm_loss(logp: Tensor, mask: Tensor, correct: Tensor, *, agg: Agg = "token_mean",
                     num_tokens: float | Tensor | None = None,
                     num_seqs: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """VAPO's positive-example LM loss (2504.05118, "Positive Example LM Loss"): the NLL of the
    responses that scored correct,

        L_NLL = -1 / sum_{o_i in T} |o_i| * sum_{o_i in T} sum_t log pi(a_t|s_t),   T = correct samples,

    added by the caller as L_PPO + mu * L_NLL (mu ~ 0.1; the weight is the caller's, not here).
    logp (with grad), mask: (B, T); correct: (B,) bool. The aggregation runs over the correct
    samples' tokens only, so with `agg`="token_mean" this is the formula above; `num_tokens` /
    `num_seqs`, if given, must count correct samples' tokens / correct samples of the whole step.
    No correct sample gives an exact 0 (never NaN). Metrics: correct_frac.
    """
    positive = mask.bool() & correct.bool().to(mask.device)[:, None]  # (B, T)
    loss = aggregate(-logp, positive, agg=agg, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss, {"correct_frac": correct.float().mean().detach()}


def _masked_var(x: Tensor, mask: Tensor) -> Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)
