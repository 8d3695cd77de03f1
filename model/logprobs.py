"""Token log-probabilities and entropies from logits, without materialising a float32 (B, T, V)
log-softmax.

The work runs over chunks of `chunk_size` positions: each chunk is upcast to float32, reduced
with logsumexp and dropped. Backward recomputes the softmax chunk by chunk from the saved logits
(which the model holds anyway) and the per-token logsumexp, so autograd keeps no float32 (B, T, V)
copy either. The only full-size tensor created is the gradient of the logits, in their own dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def token_logp(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """log softmax(logits)[labels]: logits (B, T, V) any float dtype, labels (B, T) int -> (B, T) float32
    (float64 for float64 logits).

    Align first: for causal LM output, pass logits[:, :-1] with labels = input_ids[:, 1:]. A negative
    label (an ignore index such as -100) yields 0 with no gradient. chunk_size: positions per chunk
    (None: all T at once).
    """
    logp, _ = _LogSoftmaxStats.apply(logits, labels, chunk_size, True, False)
    return logp


def entropy_from_logits(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of softmax(logits) at each position: (B, T, V) -> (B, T) float32.

    H = -sum_v p_v log p_v with log p = x - logsumexp(x). Differentiable (an entropy bonus needs it).
    """
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _LogSoftmaxStats.apply(logits, dummy, chunk_size, False, True)
    return entropy


def logp_and_entropy(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """`token_logp` and `entropy_from_logits` in one pass over the logits (one logsumexp per chunk)."""
    return _LogSoftmaxStats.apply(logits, labels, chunk_size, True, True)


class _LogSoftmaxStats(torch.autograd.Function):
    """(logp of labels, entropy) per position, computed and differentiated chunk by chunk over T.

    With x the logits of one position, p = softmax(x), lse = logsumexp(x):
      logp_y = x_y - lse                  d logp_y / dx = onehot(y) - p
      H = -sum_v p_v log p_v              dH / dx = -p * (x - E_p[x]) = -p * (log p + H)
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_size: int | None, want_logp: bool,
                want_entropy: bool) -> tuple[Tensor, Tensor]:
        B, T, _ = logits.shape
        step = T if not chunk_size else chunk_size
        acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 logits
        valid = labels >= 0
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        lse = torch.empty(B, T, dtype=acc, device=logits.device)
        logp = torch.zeros(B, T, dtype=acc, device=logits.device)
        entropy = torch.zeros(B, T, dtype=acc, device=logits.device)
        for s in range(0, T, step):
            x = logits[:, s:s + step].to(acc)  # (B, c, V): the one upcast chunk alive at a time
            lse_c = torch.logsumexp(x, dim=-1)  # (B, c)
            lse[:, s:s + step] = lse_c
            if want_logp:
                picked = x.gather(-1, safe_labels[:, s:s + step, None]).squeeze(-1)
                logp[:, s:s + step] = torch.where(valid[:, s:s + step], picked - lse_c, 0.0)
            if want_entropy:
                # -sum p log p on the centred logits: lse - sum p x would cancel in float32.
                logsm = x - lse_c[..., None]
                entropy[:, s:s + step] = -(logsm.exp() * logsm).sum(-1)
        ctx.save_for_backward(logits, safe_labels, valid, lse, entropy)
        ctx.step = step
        ctx.want = (want_logp, want_entropy)
        ctx.mark_non_differentiable(*(t for t, w in ((logp, want_logp), (entropy, want_entropy)) if not w))
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):
        logits, labels, valid, lse, entropy = ctx.saved_tensors
        want_logp, want_entropy = ctx.want
        use_logp = want_logp and grad_logp is not None
        use_entropy = want_entropy and grad_entropy is not None
        grad = torch.zeros_like(logits)
        if not (use_logp or use_entropy):
            return grad, None, None, None, None
        T, step = logits.shape[1], ctx.step
        for s in range(0, T, step):
            sl = slice(s, s + step)
            logsm = logits[:, sl].to(lse.dtype) - lse[:, sl, None]  # (B, c, V) log p
            p = logsm.exp()
            g = torch.zeros_like(p)
            if use_logp:
                gl = torch.where(valid[:, sl], grad_logp[:, sl].to(p.dtype), 0.0)  # (B, c)
                g -= gl[..., None] * p
                g.scatter_add_(-1, labels[:, sl, None], gl[..., None])
            if use_entropy:
                # x - E_p[x] = log p + H
                g -= grad_entropy[:, sl, None].to(p.dtype) * p * (logsm + entropy[:, sl, None])
            grad[:, sl] = g.to(logits.dtype)
        return grad, None, None, None, None
