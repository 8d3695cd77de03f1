"""Loss aggregation: the one place that turns per-token losses into a scalar.

Every loss in `rl.algos` calls `aggregate`, so token-mean vs sequence-mean is decided here only.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Agg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is set. Masked entries may hold NaN/inf: they are selected out, not multiplied."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over set `mask` entries; 0 where nothing is set (never NaN)."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def aggregate(loss_tokens: Tensor, mask: Tensor, *, agg: Agg,
              num_tokens: float | Tensor | None = None, num_seqs: float | Tensor | None = None) -> Tensor:
    """Reduce per-token losses `loss_tokens` (B, T) over the response tokens `mask` (B, T) to a scalar.

    Modes (t runs over response tokens of sequence i, |o_i| its length, B' the number of sequences
    with at least one response token):
      token_mean           sum_i sum_t l_it / sum_i |o_i|        (DAPO 2503.14476 token-level loss; VAPO)
      seq_mean_token_mean  1/B' sum_i (1/|o_i| sum_t l_it)      (PPO / GRPO 2402.03300 eq. 3)
      seq_mean_token_sum   1/B' sum_i sum_t l_it                (Dr.GRPO 2503.20783 without a length norm)

    Gradient accumulation: an optimizer step over several micro-batches (and ranks) equals the
    full-batch loss only if every micro-batch divides by the *global* count. Pass
    `num_tokens` = response tokens in the whole step (token_mean) or `num_seqs` = sequences with at
    least one response token in the whole step (seq_* modes) and then SUM (do not average) the
    micro-batch losses. Where data-parallel ranks AVERAGE gradients (DDP/FSDP), pass the global count
    divided by the world size. Each mode reads only the count it needs, so a worker may pass both.
    Without them the micro-batch's own counts are used.

    A count of zero yields 0 (still connected to the graph), never NaN.
    """
    mask = mask.bool()
    if agg == "token_mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return masked_sum(loss_tokens, mask) / _at_least_one(denom, loss_tokens)
    per_seq = masked_sum(loss_tokens, mask, dim=-1)  # (B,)
    has_tokens = mask.any(dim=-1)  # (B,)
    if agg == "seq_mean_token_mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1).to(per_seq.dtype)
    elif agg != "seq_mean_token_sum":
        raise ValueError(f"unknown agg {agg!r}")
    denom = has_tokens.sum() if num_seqs is None else num_seqs
    return per_seq.sum() / _at_least_one(denom, loss_tokens)


def _at_least_one(count: float | Tensor, like: Tensor) -> Tensor:
    # An empty batch divides a zero sum by 1; a positive (possibly fractional, per-rank) count is kept.
    count = torch.as_tensor(count, dtype=like.dtype, device=like.device)
    return torch.where(count > 0, count, torch.ones_like(count))
