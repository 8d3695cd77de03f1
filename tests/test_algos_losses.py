"""rl.algos losses and aggregation: hand-worked values, paper cross-checks, padding and gradient invariants."""
import pytest
import torch

from model.logprobs import token_logp
from rl.algos import aggregate, explained_variance, kl_loss, policy_loss, positive_lm_loss, value_loss

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---- aggregate ------------------------------------------------------------------------------

def test_aggregate_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token_mean: 10 / 4;  seq_mean_token_mean: (6/3 + 4/1) / 2;  seq_mean_token_sum: (6 + 4) / 2
    assert aggregate(loss, mask, agg="token_mean").item() == pytest.approx(2.5)
    assert aggregate(loss, mask, agg="seq_mean_token_mean").item() == pytest.approx(3.0)
    assert aggregate(loss, mask, agg="seq_mean_token_sum").item() == pytest.approx(5.0)
    with pytest.raises(ValueError):
        aggregate(loss, mask, agg="bogus")


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_micro_batches_with_global_counts_equal_full_batch(agg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g, requires_grad=True)
    mask = torch.rand(6, 7, generator=g) > 0.4
    full = aggregate(x, mask, agg=agg)
    (g_full,) = torch.autograd.grad(full, x)
    counts = dict(num_tokens=mask.sum(), num_seqs=mask.any(1).sum())
    parts = [aggregate(x[s], mask[s], agg=agg, **counts) for s in (slice(0, 2), slice(2, 6))]
    (g_acc,) = torch.autograd.grad(sum(parts), x)
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(g_acc, g_full)


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_empty_mask_is_zero_and_nan_is_masked(agg):
    x = torch.full((2, 3), float("nan"), requires_grad=True)
    out = aggregate(x, torch.zeros(2, 3, dtype=torch.bool), agg=agg)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert (x.grad == 0).all()


# ---- policy loss ----------------------------------------------------------------------------

def test_policy_loss_hand_computed():
    # clip_low 0.2, clip_high 0.28, dual clip c = 2; per token l = -min(rA, clip(r, .8, 1.28) A):
    #   r=1.5, A=+1:  -min(1.5, 1.28)  = -1.28   (clipped high)
    #   r=0.5, A=-1:  -min(-0.5, -0.8) =  0.8    (clipped low)
    #   r=1.1, A=+2:  -min(2.2, 2.2)   = -2.2
    #   r=3.0, A=-1:  -min(-3, -1.28)  =  3.0    -> dual clip: min(3.0, c*|A| = 2) = 2
    ratio = torch.tensor([[1.5, 0.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    loss, m = policy_loss(ratio.log(), old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 2.2 + 3.0) / 4)
    loss, m = policy_loss(ratio.log(), old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=2.0)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 2.2 + 2.0) / 4)
    assert m["clip_frac_high"].item() == pytest.approx(0.25)
    assert m["clip_frac_low"].item() == pytest.approx(0.25)
    assert m["dual_clip_frac"].item() == pytest.approx(0.25)
    # approx_kl = mean of (r - 1) - log r
    assert m["approx_kl"].item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item())


def ppo_reference(logp, old_logp, adv, mask, eps_low, eps_high, c=None):
    """PPO 1707.06347 eq. 7 with DAPO's decoupled clip, token-mean over response tokens (DAPO eq. for
    the token-level loss), dual clip as in 1912.09729: max(min(rA, clip(r)A), cA) for A < 0."""
    total, n = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            r = float(torch.exp(logp[i, t] - old_logp[i, t]))
            a = float(adv[i, t])
            obj = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if c is not None and a < 0:
                obj = max(obj, c * a)
            total += -obj
            n += 1
    return total / n


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_matches_paper_formula(dual_clip):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 9
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.8  # ratios well beyond the clip range
    adv = torch.randn(B, T, generator=g) * 2
    mask = torch.rand(B, T, generator=g) > 0.25
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    assert abs(loss.item() - ppo_reference(logp, old, adv, mask, 0.2, 0.28, dual_clip)) < 1e-6


def test_clip_higher_is_asymmetric():
    # A > 0: gradient survives up to r = 1 + clip_high and is cut beyond.
    # A < 0: gradient is cut below r = 1 - clip_low.
    def grad_at(r, a):
        logp = torch.tensor([[float(torch.log(torch.tensor(r)))]], requires_grad=True)
        loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[a]]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
        loss.backward()
        return logp.grad.item()

    assert grad_at(1.25, +1.0) != 0  # inside (1 + 0.2, 1 + 0.28]: a symmetric 0.2 clip would have cut it
    assert grad_at(1.30, +1.0) == 0
    assert grad_at(0.75, -1.0) == 0  # below 1 - 0.2
    assert grad_at(0.85, -1.0) != 0
    # The symmetric clip cuts r = 1.25 already.
    logp = torch.tensor([[float(torch.log(torch.tensor(1.25)))]], requires_grad=True)
    policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip_low=0.2, clip_high=0.2)[0].backward()
    assert logp.grad.item() == 0


def test_dual_clip_bounds_negative_advantage_loss():
    g = torch.Generator().manual_seed(2)
    logp = (torch.randn(4, 50, generator=g) * 5).requires_grad_()  # ratios up to e^15
    adv = -torch.rand(4, 50, generator=g)  # all negative
    c = 3.0
    loss, m = policy_loss(logp, torch.zeros(4, 50), adv, torch.ones(4, 50), clip_low=0.2, clip_high=0.28,
                          dual_clip=c, agg="seq_mean_token_sum")
    # Each token is bounded by c |A|, so the sequence sums are too.
    assert loss.item() <= (c * adv.abs()).sum(1).mean().item() + 1e-9
    loss.backward()
    big = logp.detach().exp() > c
    assert big.any() and (logp.grad[big] == 0).all()
    with pytest.raises(ValueError):
        policy_loss(logp, logp, adv, torch.ones(4, 50), clip_low=0.2, clip_high=0.2, dual_clip=0.5)


# ---- value loss -----------------------------------------------------------------------------

def test_value_loss_hand_computed():
    # clip 0.2. token 0: V=1, V_old=.5, R=2: unclipped (1-2)^2 = 1; clipped V = .7: (.7-2)^2 = 1.69 -> 1.69
    #           token 1: V=2, V_old=2, R=1: both (2-1)^2 = 1
    # loss = 1/2 * (1.69 + 1) / 2
    v, old, ret, mask = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 2.0]]), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2)
    loss, m = value_loss(v, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 2.69 / 2)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    loss, _ = value_loss(v, old, ret, mask, clip=None)
    assert loss.item() == pytest.approx(0.5 * 2 / 2)


def test_value_loss_gradient_is_error():
    v = torch.tensor([[1.0, 3.0]], requires_grad=True)
    loss, _ = value_loss(v, v.detach(), torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), clip=None, agg="seq_mean_token_sum")
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[1.0, 2.0]]))  # the 1/2 makes d/dV = V - R


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask).item() == pytest.approx(0.0)
    assert explained_variance(ret, torch.ones_like(ret), mask).item() == 0.0  # Var[R] = 0


# ---- positive-example LM loss -----------------------------------------------------------------

def test_positive_lm_loss():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, m = positive_lm_loss(logp, mask, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(1.5)  # (1 + 2) / 2 tokens of the correct sample
    assert m["correct_frac"].item() == 0.5
    none, _ = positive_lm_loss(logp, mask, torch.tensor([False, False]))
    assert none.item() == 0.0 and not torch.isnan(none)
    none.backward()
    assert (logp.grad == 0).all()


# ---- invariants across all losses -------------------------------------------------------------

def all_losses(logp, old, ref, adv, values, old_values, returns, mask, coefs, correct, agg):
    return torch.stack([
        policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg)[0],
        value_loss(values, old_values, returns, mask, clip=0.2, agg=agg)[0],
        kl_loss(logp, ref, mask, coefs, agg=agg)[0],
        positive_lm_loss(logp, mask, correct, agg=agg)[0],
    ])


@pytest.mark.parametrize("agg", AGGS)
def test_padding_does_not_change_any_loss(agg):
    g = torch.Generator().manual_seed(3)
    B, T = 4, 6
    t = lambda: torch.randn(B, T, generator=g)  # noqa: E731
    logp, old, ref, adv, values, old_values, returns = (-t().abs(), -t().abs(), -t().abs(), t(), t(), t(), t())
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0]])
    coefs, correct = torch.tensor([0.1, 0.0, 0.05, 0.2]), torch.tensor([True, False, True, True])
    base = all_losses(logp, old, ref, adv, values, old_values, returns, mask, coefs, correct, agg)

    # Garbage (NaN, inf) at masked positions, 3 extra right-pad columns and one all-padding row.
    def pad(x, fill):
        x = torch.where(mask.bool(), x, fill)
        x = torch.cat([x, torch.full((B, 3), fill)], 1)
        return torch.cat([x, torch.full((1, T + 3), fill)], 0)
    big_mask = torch.cat([torch.cat([mask, torch.zeros(B, 3, dtype=mask.dtype)], 1), torch.zeros(1, T + 3, dtype=mask.dtype)], 0)
    padded = all_losses(pad(logp, -1e4), pad(old, float("nan")), pad(ref, float("-inf")), pad(adv, float("nan")),
                        pad(values, float("inf")), pad(old_values, float("nan")), pad(returns, float("nan")),
                        big_mask, torch.cat([coefs, torch.tensor([0.3])]), torch.cat([correct, torch.tensor([True])]), agg)
    torch.testing.assert_close(padded, base, rtol=0, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_gradients_reach_only_response_tokens(agg):
    g = torch.Generator().manual_seed(4)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0]])
    logp = token_logp(logits, labels, chunk_size=3)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    ref = torch.where(mask.bool(), logp.detach() - 0.5, float("nan"))
    adv = torch.randn(B, T, generator=g)
    loss = (policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, agg=agg)[0]
            + kl_loss(logp, ref, mask, torch.tensor([0.1, 0.2, 0.3]), agg=agg)[0]
            + 0.1 * positive_lm_loss(logp, mask, torch.tensor([True, True, False]), agg=agg)[0])
    loss.backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, T)
    assert (grad_norm[~mask.bool()] == 0).all()
    assert (grad_norm[mask.bool()] > 0).any()
    assert torch.isfinite(logits.grad).all()
