"""rl.algos KL: estimator values, unbiasedness against the exact KL, per-task coefficients."""
import math

import pytest
import torch

from rl.algos import kl, kl_coefs, kl_loss, kl_penalty_rewards, policy_loss


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_kl_hand_computed():
    # pi = 0.5, pi_ref = 0.25 for the sampled token: log r = log(pi_ref/pi) = -log 2
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl(logp, ref, kind="k1").item() == pytest.approx(math.log(2))
    assert kl(logp, ref, kind="k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl(logp, ref, kind="k3").item() == pytest.approx(0.5 + math.log(2) - 1)  # r - 1 - log r
    with pytest.raises(ValueError):
        kl(logp, ref, kind="k4")


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_estimators_match_exact_kl(kind):
    """E_{a~pi}[k(a)] = KL(pi || pi_ref) exactly for k1 and k3 (Schulman 2020), summed over a vocabulary."""
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(5, 13, generator=g), torch.randn(5, 13, generator=g)
    logp, ref = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    exact = (logp.exp() * (logp - ref)).sum(-1)  # KL(pi || pi_ref) per row
    # max_value=inf: the estimator itself, without the numerical guard (which bites only for huge ratios)
    expected = (logp.exp() * kl(logp, ref, kind=kind, max_value=float("inf"))).sum(-1)
    assert (expected - exact).abs().max() < 1e-6


def test_k2_is_close_for_close_distributions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(13, generator=g)
    logp, ref = logits.log_softmax(-1), (logits + 0.01 * torch.randn(13, generator=g)).log_softmax(-1)
    exact = (logp.exp() * (logp - ref)).sum()
    approx = (logp.exp() * kl(logp, ref, kind="k2")).sum()
    assert abs(approx - exact) < 2e-2 * exact  # k2 is biased at third order in the log-ratio


def test_k3_is_clamped_and_finite():
    logp = torch.tensor([0.0, 0.0, -50.0], requires_grad=True)
    ref = torch.tensor([-1e9, 50.0, 0.0])
    out = kl(logp, ref, kind="k3")
    assert torch.isfinite(out).all() and (out <= 10.0).all() and (out >= 0).all()
    out.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_coefs():
    c = kl_coefs(["caption", "counting", "unknown"], {"caption": 0.05, "counting": 0.0}, default=0.01)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, torch.tensor([0.05, 0.0, 0.01], dtype=torch.float32))


def test_kl_penalty_rewards():
    # beta 0.5 on sample 0: r_t - 0.5 * (logp - ref); sample 1 has beta 0 and a NaN ref: untouched.
    rewards = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0], [float("nan"), float("-inf")]])
    mask = torch.tensor([[1, 1], [1, 1]])
    out = kl_penalty_rewards(rewards, logp, ref, mask, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out, torch.tensor([[-0.25, 1.5], [0.0, 1.0]]))
    # masked tokens get no penalty
    out = kl_penalty_rewards(rewards, logp, ref, torch.tensor([[1, 0], [1, 1]]), torch.tensor([0.5, 0.0]))
    assert out[0, 1] == 1.0


def test_kl_loss_per_sample_coefficient():
    g = torch.Generator().manual_seed(2)
    logp, ref = -torch.rand(2, 4, generator=g), -torch.rand(2, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    loss, m = kl_loss(logp, ref, mask, torch.tensor([0.1, 0.0]))
    per_token = kl(logp, ref, kind="k3")
    # token-mean over all 7 response tokens; sample 1 counts in the denominator with exact zeros
    assert abs(loss.item() - 0.1 * per_token[0, :3].sum().item() / 7) < 1e-12
    assert abs(m["kl"].item() - per_token[0, :3].mean().item()) < 1e-12


def test_zero_coefficient_is_exactly_no_kl():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 5
    logp = (-torch.rand(B, T, generator=g)).requires_grad_()
    old, adv = logp.detach() - 0.1, torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    weird_ref = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30])[None].expand(B, T)
    pg, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    (g_pg,) = torch.autograd.grad(pg, logp, retain_graph=True)
    for kind in ("k1", "k2", "k3"):
        kl_l, m = kl_loss(logp, weird_ref, mask, torch.zeros(B), kind=kind)
        total = pg + kl_l
        (g_total,) = torch.autograd.grad(total, logp, retain_graph=True)
        assert kl_l.item() == 0.0 and m["kl"].item() == 0.0
        assert torch.equal(total, pg) and torch.equal(g_total, g_pg)
