"""rl.algos advantages: hand-worked values, a loop reference, the GAE paper's sum form, invariants."""
import math

import pytest
import torch

from rl.algos import (decoupled_gae, dynamic_sampling_mask, gae, group_advantages, length_adaptive_lambda,
                      token_rewards_from_scores, whiten, whiten_by_group)


@pytest.fixture(autouse=True)
def float64():
    """Reference checks run in float64 (to 1e-6 and tighter); the default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference: the GAE recursion in plain Python, one sequence at a time, holes skipped."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for i in range(B):
        lam_i = lam[i] if isinstance(lam, list) else lam
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(T)):
            if not mask[i][t]:
                continue
            delta = rewards[i][t] + gamma * next_v - values[i][t]
            adv[i][t] = delta + gamma * lam_i * next_a
            next_v, next_a = values[i][t], adv[i][t]
    return adv


def gae_paper_sum(rewards, values, gamma, lam):
    """GAE 1506.02438 eq. 16 on one contiguous episode: A_t = sum_l (gamma lam)^l delta_{t+l}, V_{T} = 0."""
    T = len(rewards)
    v_next = values[1:] + [0.0]
    delta = [rewards[t] + gamma * v_next[t] - values[t] for t in range(T)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(T - t)) for t in range(T)]


def test_gae_hand_computed():
    # gamma 0.9, lam 0.8, reward 1 on the last token, V = (.5, .6, .7):
    #   t=2: delta = 1 - .7 = .3                      A = .3
    #   t=1: delta = .9*.7 - .6 = .03                 A = .03 + .72*.3   = .246
    #   t=0: delta = .9*.6 - .5 = .04                 A = .04 + .72*.246 = .21712
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]]))


def test_gae_skips_masked_hole():
    # A hole at t=1 (its reward and value are garbage) is passed over: same as the 2-token episode.
    r = torch.tensor([[0.0, 5.0, 1.0]])
    v = torch.tensor([[0.5, float("nan"), 0.7]])
    adv, ret = gae(r, v, torch.tensor([[1, 0, 1]]), gamma=0.9, lam=0.8)
    # t=2: A = .3;  t=0: delta = .9*.7 - .5 = .13, A = .13 + .72*.3 = .346
    torch.testing.assert_close(adv, torch.tensor([[0.346, 0.0, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.846, 0.0, 1.0]]))


def test_gae_loop_vs_vectorised():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 11
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # an empty row
    lam = torch.rand(B, generator=g)
    adv, ret = gae(r, v, mask, gamma=0.97, lam=lam)
    expected = torch.tensor(gae_loop(r.tolist(), v.tolist(), mask.tolist(), 0.97, lam.tolist()))
    torch.testing.assert_close(adv, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.where(mask, expected + v, 0.0), atol=1e-12, rtol=0)


def test_gae_matches_paper_sum_form():
    g = torch.Generator().manual_seed(1)
    B, T = 4, 8
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [8, 5, 1, 3]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    adv, _ = gae(r, v, mask, gamma=0.99, lam=0.95)
    for i, L in enumerate(lengths):
        ref = gae_paper_sum(r[i, :L].tolist(), v[i, :L].tolist(), 0.99, 0.95)
        assert max(abs(a - b) for a, b in zip(adv[i, :L].tolist(), ref)) < 1e-6


def test_gae_padding_invariant():
    g = torch.Generator().manual_seed(2)
    r, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=0.9)
    pad = torch.full((3, 4), float("nan"))
    adv2, ret2 = gae(torch.cat([r, pad], 1), torch.cat([v, pad], 1), torch.cat([mask, torch.zeros(3, 4, dtype=mask.dtype)], 1),
                     gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv2[:, :5], adv)
    torch.testing.assert_close(ret2[:, :5], ret)
    assert (adv2[:, 5:] == 0).all() and (ret2[:, 5:] == 0).all()


def test_gae_lambda_one_gives_monte_carlo_returns():
    r = torch.tensor([[0.5, 0.0, 2.0, 0.0]])
    v = torch.tensor([[3.0, -1.0, 0.2, 9.0]])
    _, ret = gae(r, v, torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.5, 2.0, 2.0, 0.0]]))


def test_decoupled_gae():
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6)
    lam_actor = torch.tensor([0.9, 0.5, 0.0])
    adv, ret = decoupled_gae(r, v, mask, gamma=1.0, lam_actor=lam_actor)
    torch.testing.assert_close(adv, gae(r, v, mask, gamma=1.0, lam=lam_actor)[0])
    # lam_critic = 1, gamma = 1: the critic's target is the reward-to-go, independent of V.
    torch.testing.assert_close(ret, r.flip(1).cumsum(1).flip(1))


def test_length_adaptive_lambda():
    # alpha 0.05: l=100 -> 1 - 1/5 = 0.8; l=20 -> 0; l=10 -> -1 clamped to 0; l=0 -> 0; l=1000 -> 0.98
    lam = length_adaptive_lambda(torch.tensor([100, 20, 10, 0, 1000]), alpha=0.05)
    torch.testing.assert_close(lam, torch.tensor([0.8, 0.0, 0.0, 0.0, 0.98]))


def test_length_adaptive_equals_fixed_when_lengths_agree():
    g = torch.Generator().manual_seed(4)
    r, v = torch.randn(4, 40, generator=g), torch.randn(4, 40, generator=g)
    mask = torch.ones(4, 40)
    lam = length_adaptive_lambda(mask.sum(1), alpha=0.05)  # 1 - 1/2 = 0.5 for all
    torch.testing.assert_close(gae(r, v, mask, gamma=1.0, lam=lam), gae(r, v, mask, gamma=1.0, lam=0.5))


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 100.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, mask)
    vals = w[mask.bool()]
    assert abs(vals.mean()) < 1e-9 and abs(vals.var(unbiased=False) - 1) < 1e-6
    assert (w[~mask.bool()] == 0).all()
    w2 = whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w2[mask.bool()].mean(), torch.tensor(3.0))


def test_group_advantages_hand_computed():
    # group 0 scores (1, 0, 0): mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    # group 1 scores (1, 1, 1): all equal -> 0
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    ids = [0, 1, 0, 1, 0, 1]
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(group_advantages(scores, ids, eps=0.0 + 1e-12),
                               torch.tensor([(2 / 3) / s, 0.0, -(1 / 3) / s, 0.0, -(1 / 3) / s, 0.0]))
    torch.testing.assert_close(group_advantages(scores, ids, norm_std=False),
                               torch.tensor([2 / 3, 0.0, -1 / 3, 0.0, -1 / 3, 0.0]))


def test_group_advantages_match_grpo_formula_and_sum_to_zero():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 5, (40,), generator=g)
    scores = torch.randn(40, generator=g)
    adv = group_advantages(scores, ids, eps=1e-6)
    for k in ids.unique():
        sel = ids == k
        ref = (scores[sel] - scores[sel].mean()) / (scores[sel].std() + 1e-6)  # GRPO 2402.03300 sec. 4.1.2
        assert (adv[sel] - ref).abs().max() < 1e-6
        assert abs(adv[sel].sum()) < 1e-9
        assert abs(group_advantages(scores, ids, norm_std=False)[sel].sum()) < 1e-9


def test_group_of_one_gets_zero():
    assert group_advantages(torch.tensor([3.0, 1.0, 2.0]), [7, 8, 8])[0] == 0


def test_dynamic_sampling_mask():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    ids = [0, 0, 1, 1, 2, 2, 3]
    assert dynamic_sampling_mask(scores, ids).tolist() == [False, False, True, True, False, False, False]


def test_token_rewards_from_scores():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]])
    out = token_rewards_from_scores(torch.tensor([2.0, 3.0, 4.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0, 2.0, 0, 0], [0, 0, 0, 3.0], [0, 0, 0, 0]]))


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_gradients_do_not_flow(lam):
    v = torch.randn(2, 4, requires_grad=True)
    adv, ret = gae(torch.randn(2, 4), v, torch.ones(2, 4), gamma=1.0, lam=lam)
    assert not adv.requires_grad and not ret.requires_grad


def test_whiten_by_group_is_whiten_of_each_group():
    torch.manual_seed(0)
    x, mask = torch.randn(5, 4), (torch.rand(5, 4) > 0.3).float()
    mask[:, 0] = 1
    groups = torch.tensor([1, 0, 1, 0, 1])
    out = whiten_by_group(x, mask, groups)
    for g in (0, 1):
        rows = groups == g
        assert torch.allclose(out[rows], whiten(x[rows], mask[rows]))
    assert torch.equal(out * (1 - mask), torch.zeros_like(out))


def test_whiten_by_group_with_batch_scale_centres_each_group_and_keeps_their_ratio():
    """scale "batch": each group's mean is removed, then one std for all, so a group with small
    advantages (a nearly solved task) stays small instead of being blown up to unit variance."""
    torch.manual_seed(0)
    x, mask = torch.randn(6, 4), (torch.rand(6, 4) > 0.3).float()
    mask[:, 0] = 1
    x[:3] = 0.05 * x[:3] + 3.0                                   # group 0: biased and nearly constant
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    out = whiten_by_group(x, mask, groups, scale="batch")
    m = mask.bool()
    centred = [x[r] - x[r][m[r]].mean() for r in (slice(0, 3), slice(3, 6))]
    for r, c in zip((slice(0, 3), slice(3, 6)), centred):
        assert abs(float(out[r][m[r]].mean())) < 1e-6
        assert torch.allclose(out[r][m[r]] / c[m[r]], out[0, 0] / centred[0][0, 0])   # one common scale
    assert float((out[m] ** 2).mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(out[:3][m[:3]].std()) < 0.2 < float(whiten_by_group(x, mask, groups)[:3][m[:3]].std())
    assert torch.equal(out * (1 - mask), torch.zeros_like(out))
    with pytest.raises(ValueError, match="scale"):
        whiten_by_group(x, mask, groups, scale="task")
