"""build_sequences: the trainer-side layout of prompt + response ids built from completions."""
import pytest
import torch

from rollout import Completion
from rollout.sequences import build_sequences, encode_prompt, engine_logp, vision_token_ids
from tests.rollout_checks import make_prompts


def _completion(ids):
    return Completion(token_ids=list(ids), logp=[-1.0] * len(ids), text="", finish_reason="length")


def test_layout(tiny, suite_dir):
    _, proc = tiny
    prompts = make_prompts(suite_dir, k=2)  # two image prompts, then a text-only one
    groups = [[_completion([40, 41]), _completion([42])], [_completion([43, 44, 45])],
              [_completion([46]), _completion([47, 48])]]
    b = build_sequences(proc, prompts, groups)
    assert b.prompt_index.tolist() == [0, 0, 1, 2, 2]
    pad = proc.tokenizer.pad_token_id
    encs = [encode_prompt(proc, p) for p in prompts]
    for row, (i, c) in enumerate((i, c) for i, g in enumerate(groups) for c in g):
        prompt_ids = encs[i]["input_ids"][0].tolist()
        P, R = len(prompt_ids), len(c.token_ids)
        assert b.input_ids[row, :P + R].tolist() == prompt_ids + c.token_ids
        assert (b.input_ids[row, P + R:] == pad).all()                      # right padding
        assert b.attention_mask[row].tolist() == [1] * (P + R) + [0] * (b.input_ids.shape[1] - P - R)
        assert b.response_mask[row].nonzero().flatten().tolist() == list(range(P, P + R))
        image_tokens = b.input_ids[row] == tiny[0].config.image_token_id
        assert torch.equal(b.mm_token_type_ids[row].bool(), image_tokens)
    # each image row carries its prompt's image once per sample; the text-only prompt carries none
    expected = torch.cat([encs[0]["pixel_values"]] * 2 + [encs[1]["pixel_values"]])
    assert torch.equal(b.vision.pixel_values, expected)
    assert torch.equal(b.vision.image_grid_thw, torch.cat([encs[0]["image_grid_thw"]] * 2 + [encs[1]["image_grid_thw"]]))


def test_engine_logp_lands_on_the_label_positions_of_its_row(tiny, suite_dir):
    """ppo.old_logp "engine": each completion's log-probs sit where the trainer's token_logp of the
    same tokens would (label positions response_mask[:, 1:]), rows in build_sequences order."""
    _, proc = tiny
    prompts = make_prompts(suite_dir, k=2)
    groups = [[Completion([40, 41], [-0.1, -0.2], "", "stop"), Completion([42], [-0.3], "", "stop")],
              [Completion([43, 44, 45], [-0.4, -0.5, -0.6], "", "stop")], [Completion([46], [-0.7], "", "stop")]]
    b = build_sequences(proc, prompts, groups)
    mask = b.label_mask
    out = engine_logp(groups, mask)
    assert out.shape == mask.shape and (out[mask == 0] == 0).all()
    assert out[mask.bool()].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7])  # row-major
    # the label of position t is input_ids[t + 1]: the first response token is predicted at P - 1
    P = len(encode_prompt(proc, prompts[0])["input_ids"][0])
    assert out[0, P - 1].item() == pytest.approx(-0.1)
    groups[1][0].logp.pop()
    with pytest.raises(ValueError, match="row 2: the engine returned 2 log-probs for 3 response tokens"):
        engine_logp(groups, mask)


def test_rejects_vision_tokens_in_a_response(tiny, suite_dir):
    _, proc = tiny
    prompts = make_prompts(suite_dir, k=1)[:1]
    with pytest.raises(ValueError, match="vision token"):
        build_sequences(proc, prompts, [[_completion([40, vision_token_ids(proc)[0]])]])


def test_rejects_image_count_mismatch(tiny, suite_dir):
    _, proc = tiny
    p = make_prompts(suite_dir, k=1)[0]
    with pytest.raises(ValueError, match="image parts"):
        encode_prompt(proc, type(p)(p.messages, []))
