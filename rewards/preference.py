"""Preference math of the reward model: the Bradley-Terry pairwise loss and the both-order preference
of a generative pairwise judge.

Plain functions on tensors; no model, no config.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, *, center_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise loss of a scalar reward model under the Bradley-Terry model
    P(chosen > rejected) = sigmoid(r_c - r_r) (Bradley & Terry 1952; InstructGPT 2203.02155 eq. 1):

        loss = mean_i -log sigmoid(r_c,i - r_r,i)  +  center_coef * mean_i (r_c,i + r_r,i)^2

    r_chosen, r_rejected: (B,). The BT term is shift-invariant, so the reward level is arbitrary; the
    optional centering term (Eisenstein et al. 2312.09244, TRL's `center_rewards_coefficient`) pins the
    mean reward near 0, which makes sigmoid(r) a usable [0, 1] score. Metrics: detached 0-dim tensors.
    """
    margin = r_chosen - r_rejected  # (B,)
    loss = -F.logsigmoid(margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    metrics = {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach(),
               "reward_chosen": r_chosen.mean().detach(), "reward_rejected": r_rejected.mean().detach()}
    return loss, metrics


def both_order_preference(logp_a_xy: Tensor, logp_b_xy: Tensor, logp_a_yx: Tensor, logp_b_yx: Tensor) -> Tensor:
    """P(x better than y) from a pairwise judge asked twice, with x shown as answer A and then as answer B:

        p_xy = sigmoid(logp(A) - logp(B))   asked (A = x, B = y)
        p_yx = sigmoid(logp(B) - logp(A))   asked (A = y, B = x)
        P    = (p_xy + p_yx) / 2

    Each p is the judge's probability of the verdict letter renormalised over {A, B}; averaging the two
    orders cancels a constant position bias (a judge that always says "A" gives exactly 0.5; MT-Bench,
    Zheng et al. 2306.05685, swaps positions for the same reason). All inputs (B,) -> (B,).
    """
    p_xy = torch.sigmoid(logp_a_xy - logp_b_xy)
    p_yx = torch.sigmoid(logp_b_yx - logp_a_yx)
    return (p_xy + p_yx) / 2
