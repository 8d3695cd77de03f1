"""model.logprobs: chunked == unchunked == log_softmax reference, values and gradients."""
import pytest
import torch

from model.logprobs import entropy_from_logits, logp_and_entropy, token_logp


def reference(logits, labels):
    logsm = torch.log_softmax(logits.double(), -1)
    logp = logsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    logp = torch.where(labels >= 0, logp, 0.0)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 37, generator=g) * 4
    labels = torch.randint(0, 37, (3, 10), generator=g)
    labels[1, 4] = -100
    return logits, labels


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 10, 64])
def test_values_match_reference(batch, chunk_size):
    logits, labels = batch
    ref_logp, ref_ent = reference(logits, labels)
    logp, ent = logp_and_entropy(logits, labels, chunk_size=chunk_size)
    assert logp.dtype == torch.float32 and logp.shape == (3, 10)
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(token_logp(logits, labels, chunk_size=chunk_size), logp)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=chunk_size), ent)


def test_chunked_equals_unchunked_bf16(batch):
    logits, labels = batch
    logits = logits.bfloat16()
    torch.testing.assert_close(token_logp(logits, labels, chunk_size=4), token_logp(logits, labels))
    ref_logp, _ = reference(logits.float(), labels)
    torch.testing.assert_close(token_logp(logits, labels, chunk_size=4).double(), ref_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_gradients_match_autograd(batch, chunk_size):
    logits, labels = batch
    logits = logits.double()
    w1, w2 = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    logp, ent = logp_and_entropy(x, labels, chunk_size=chunk_size)
    (logp * w1 + ent * w2).sum().backward()
    y = logits.clone().requires_grad_()
    ref_logp, ref_ent = reference(y, labels)
    (ref_logp * w1 + ref_ent * w2).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-10, rtol=0)
    # logp alone: the ignore-index position gets no gradient
    x2 = logits.clone().requires_grad_()
    token_logp(x2, labels, chunk_size=chunk_size).sum().backward()
    assert (x2.grad[1, 4] == 0).all()


def test_bf16_gradient_dtype(batch):
    logits, labels = batch
    x = logits.bfloat16().requires_grad_()
    token_logp(x, labels, chunk_size=2).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    assert torch.autograd.gradcheck(lambda x: logp_and_entropy(x, labels, chunk_size=2), (x,))
