"""Advantage estimators: token-level GAE (plain, decoupled, length-adaptive) for PPO with a critic,
and group-normalised outcome advantages for the critic-free baselines (GRPO, Dr.GRPO, DAPO).

All inputs are treated as constants (detached): advantages and returns are targets, not losses.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rl.algos.aggregate import masked_mean


def token_rewards_from_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Place each sequence's scalar score (B,) on its last response token: returns (B, T).

    A sequence with no response token gets no reward anywhere.
    """
    mask = mask.bool()
    T = mask.shape[-1]
    # Index of the last set position: the first set one when the row is read backwards.
    last = T - 1 - mask.flip(-1).to(torch.int8).argmax(dim=-1)  # (B,)
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rewards.scatter_(-1, last[:, None], scores.detach()[:, None])
    return torch.where(mask, rewards, torch.zeros_like(rewards))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float,
        lam: float | Tensor) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 1506.02438 eq. 16).

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}        returns_t = A_t + V(s_t)

    rewards, values, mask: (B, T); `mask` is 1 on response tokens; values[:, t] = V(s_t), the state
    in which token t is generated (ValueModel output shifted like logits). `lam` is a float or a per-sample
    tensor (B,) (length-adaptive lambda). t+1 means the next *response* token: masked positions are
    passed over, not treated as episode ends, and after the last response token V = 0, A = 0 (the
    episode ends there; nothing is bootstrapped). Rewards and values at masked positions are
    ignored (may be NaN); adv and returns are 0 there. No whitening here (see `whiten`).
    Returns (adv, returns), both (B, T).
    """
    mask = mask.bool()
    rewards, values = rewards.detach(), values.detach()
    B, T = rewards.shape
    lam = torch.as_tensor(lam, dtype=values.dtype, device=values.device).detach().expand(B)  # (B,)
    zero = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value, next_adv = zero, zero
    adv = torch.zeros_like(values)
    # The recursion runs backwards in time, vectorised over the batch:
    #   for t in reversed(range(T)):
    #       if mask[i, t]: adv[i, t] = r[i, t] + gamma * next_v - v[i, t] + gamma * lam[i] * next_a
    #                      next_v, next_a = v[i, t], adv[i, t]
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a, zero)
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, a, next_adv)
    returns = torch.where(mask, adv + values, torch.zeros_like(adv))
    return adv, returns


def decoupled_gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float,
                  lam_actor: float | Tensor, lam_critic: float = 1.0) -> tuple[Tensor, Tensor]:
    """Decoupled GAE (VC-PPO 2503.01491; VAPO 2504.05118, "Decoupled-GAE"): the actor's advantages use
    `lam_actor` (float or (B,)), the critic's regression targets use `lam_critic` (1.0: Monte Carlo
    returns, unbiased for the value model). Shapes as in `gae`. Returns (adv, returns), (B, T).
    """
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=lam_actor)
    _, returns = gae(rewards, values, mask, gamma=gamma, lam=lam_critic)
    return adv, returns


def length_adaptive_lambda(lengths: Tensor, *, alpha: float) -> Tensor:
    """Per-sample lambda_actor = 1 - 1 / (alpha * length) (VAPO 2504.05118, "Length-Adaptive GAE"), clamped to [0, 1].

    lengths: (B,) response lengths in tokens. Returns (B,) floats. A zero length gives 0.
    """
    lengths = lengths.detach()
    if not lengths.is_floating_point():
        lengths = lengths.to(torch.get_default_dtype())
    return (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0)


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the set `mask` entries of x (B, T); masked entries become 0.

    Uses the population variance. shift_mean=False adds the mean back (scale only), as PPO
    implementations do for advantages when the sign of the mean should be kept.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


def whiten_by_group(x: Tensor, mask: Tensor, groups: Tensor | Sequence[int], *, scale: str = "group",
                    eps: float = 1e-8) -> Tensor:
    """Each group of rows centred on its own mean (x, mask: (B, T); groups: (B,) ints), then scaled
    to unit variance per group (scale "group": `whiten` of each group) or by one std over the whole
    centred batch (scale "batch").

    With one shared critic for several task types, a value bias of one task (its values above or
    below its returns) makes that task's advantages share a sign; batch whitening keeps that sign,
    and the policy then pushes down (or up) every token of the task, EOS and closing brackets
    included. Centring per task type removes each task's mean before the step. Scaling per group
    also blows a nearly solved task's small advantages up to unit variance, its noise included (the
    objection Dr.GRPO raises against GRPO's per-group std); one batch std keeps the tasks' relative
    magnitudes, so the tasks that are still being learned get the larger share of the step.
    """
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    ids = torch.as_tensor(groups, device=x.device)
    out = torch.zeros_like(x)
    for g in torch.unique(ids):
        rows = ids == g
        if scale == "group":
            out[rows] = whiten(x[rows], mask[rows], eps=eps)
        else:
            m = mask[rows].bool()
            out[rows] = torch.where(m, x[rows] - masked_mean(x[rows], m), torch.zeros_like(x[rows]))
    if scale == "batch":
        bm = mask.bool()
        out = torch.where(bm, out * torch.rsqrt(masked_mean(out ** 2, bm) + eps), torch.zeros_like(out))
    return out


def group_advantages(scores: Tensor, group_ids: Tensor | Sequence[int], *, norm_std: bool = True,
                     eps: float = 1e-6) -> Tensor:
    """Outcome advantages normalised within each prompt's group of G samples; returns (B,).

    GRPO (Shao et al. 2402.03300 sec. 4.1.2):  A_i = (r_i - mean_g r) / (std_g r + eps)
    Dr.GRPO (Liu et al. 2503.20783, norm_std=False):  A_i = r_i - mean_g r

    scores: (B,); group_ids: (B,) ints, equal for samples of the same prompt (any order). std is the
    unbiased sample std (torch.std, as GRPO implementations use); a group of one sample gets A = 0.
    Broadcast to tokens with adv[:, None] * mask.
    """
    scores = scores.detach()
    ids = torch.as_tensor(group_ids, device=scores.device)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    n = counts.to(scores.dtype)  # (G_count,)
    sums = torch.zeros_like(n).index_add_(0, inverse, scores)
    mean = (sums / n)[inverse]  # (B,)
    centred = scores - mean
    if not norm_std:
        return centred
    sq = torch.zeros_like(n).index_add_(0, inverse, centred**2)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))[inverse]  # (B,)
    return centred / (std + eps)


def dynamic_sampling_mask(scores: Tensor, group_ids: Tensor | Sequence[int]) -> Tensor:
    """DAPO dynamic sampling (2503.14476, the constraint 0 < |{o_i correct}| < G of its objective): keep a group only if its scores are not all equal.

    scores, group_ids: (B,). Returns a bool (B,): True for samples of groups that carry a learning
    signal (not all-correct, not all-wrong). Single-sample groups are dropped.
    """
    scores = scores.detach()
    ids = torch.as_tensor(group_ids, device=scores.device)
    _, inverse = torch.unique(ids, return_inverse=True)
    G = int(inverse.max()) + 1 if inverse.numel() else 0
    hi = torch.full((G,), -torch.inf, dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, inverse, scores, reduce="amax")
    lo = torch.full((G,), torch.inf, dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, inverse, scores, reduce="amin")
    return (hi > lo)[inverse]
