"""The generative pairwise judge: both-order averaging cancels position bias; a smoke test on the tiny VLM."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from rewards.judge import PairwiseJudge, ReferenceJudge
from rewards.preference import both_order_preference


class AlwaysSaysA(torch.nn.Module):
    """A judge model whose verdict logits favour "A" whatever it is shown."""

    def __init__(self, vocab, a_id, b_id):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.vocab, self.a_id, self.b_id = vocab, a_id, b_id

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.a_id], logits[..., self.b_id] = 4.0, 1.0
        return SimpleNamespace(logits=logits)


def test_both_order_preference_math():
    lp = lambda *v: torch.log(torch.tensor(v))  # noqa: E731
    # Judge prefers x in both orders: 0.8 as A, 0.6 as B -> (0.8 + 0.6) / 2.
    got = both_order_preference(lp(0.8), lp(0.2), lp(0.4), lp(0.6))
    torch.testing.assert_close(got, torch.tensor([0.7]))
    # Position bias only (always 0.9 for A): exactly 0.5.
    torch.testing.assert_close(both_order_preference(lp(0.9), lp(0.1), lp(0.9), lp(0.1)), torch.tensor([0.5]))


def test_position_bias_cancels_with_a_stub_that_always_says_a(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    model = AlwaysSaysA(len(tok), tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B"))
    judge = PairwiseJudge(model, processor)
    img = Image.new("RGB", (84, 84), "red")
    items = [([img], "Describe the image.", "A red square.", "A blue circle."),
             ([img], "Describe the image.", "A blue circle.", "A red square.")]
    one_order = judge.letter_logp(items)
    assert (one_order[:, 0] > one_order[:, 1]).all()  # the stub says "A" in each single order
    assert judge.compare(items) == pytest.approx([0.5, 0.5], abs=1e-6)


def test_tiny_judge_smoke(tiny):
    model, processor = tiny
    judge = PairwiseJudge(model, processor, batch_size=2)
    img = Image.new("RGB", (84, 84), "blue")
    x, y = "A blue square.", "A red circle and a green square."
    fwd = judge.compare([([img], "Describe the image.", x, y)] * 3)
    back = judge.compare([([img], [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                 "text": "Describe the image."}]}], y, x)])
    assert all(0.0 < p < 1.0 for p in fwd) and fwd[0] == pytest.approx(fwd[2], abs=1e-6)
    # Both-order averaging makes the verdict antisymmetric: P(x > y) + P(y > x) = 1.
    assert fwd[0] + back[0] == pytest.approx(1.0, abs=1e-5)
    ref = ReferenceJudge(judge, lambda images, prompt: y)
    assert ref([([img], "Describe the image.", x)]) == pytest.approx(fwd[:1], abs=1e-5)
    ref_self = ReferenceJudge(judge, lambda images, prompt: x)
    assert ref_self([([img], "Describe the image.", x)]) == pytest.approx([0.5], abs=1e-5)  # as good as itself


def test_multi_token_label_is_refused(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="tokens"):
        PairwiseJudge(torch.nn.Linear(1, 1), processor, labels=("Answer one", "B"))
