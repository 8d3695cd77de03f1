"""build_sequences: the trainer-side layout of prompt + response ids built from completions."""
import numpy as np
import pytest
import torch
from PIL import Image

from rl.batch import RolloutBatch, micro_batches
from rollout import Completion, Prompt
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


def _clip(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (2, 84, 84, 3), dtype=np.uint8)


def _mixed_prompts():
    """Several images, a video (3 clips) and an image, text only, a video alone: one prompt each."""
    def user(*parts, text):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    img, vid = {"type": "image"}, {"type": "video"}
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    ims = [Image.new("RGB", (84, 84), c) for c in colours]
    ts = [{"type": "text", "text": f"[{t:.1f} second]"} for t in range(3)]
    return [Prompt(user(img, img, img, text="Which differs?"), ims[:3]),
            Prompt(user(ts[0], vid, ts[1], vid, ts[2], vid, img, text="When?"), [ims[3]], [_clip(k) for k in range(3)]),
            Prompt(user(text="Say a colour."), []),
            Prompt(user(ts[0], vid, text="What moves?"), [], [_clip(9)])]


def test_vision_patches_stay_with_their_row_through_micro_batches_truncation_and_selection(tiny):
    """The peers' "image features and image tokens do not match": each row's images and clips must
    travel with its tokens. A sub-batch's forward must equal the full batch's on its rows."""
    model, proc = tiny
    prompts = _mixed_prompts()
    lengths = [[3, 9], [1, 12], [5], [7, 2]]
    groups = [[_completion(range(40, 40 + n)) for n in g] for g in lengths]
    seq = build_sequences(proc, prompts, groups)
    v = seq.vision
    assert v.images_per_row.tolist() == [3, 3, 1, 1, 0, 0, 0] and v.videos_per_row.tolist() == [0, 0, 3, 3, 0, 1, 1]
    encs = [encode_prompt(proc, p) for p in prompts]
    for row, i in enumerate(seq.prompt_index.tolist()):   # one row alone: exactly its prompt's patches
        sub = seq.select([row]).vision
        for key, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if key in encs[i]:
                assert torch.equal(getattr(sub, key), encs[i][key]) and torch.equal(getattr(sub, grid), encs[i][grid])
            else:
                assert sub is None or getattr(sub, key) is None
    with torch.no_grad():
        full = model(**seq.model_inputs()).logits
        order = [6, 2, 0, 5, 3, 1, 4]                        # shuffled, as the PPO minibatches are
        batch = RolloutBatch(seq=seq, tasks=["t"] * seq.rows, task_id=torch.zeros(seq.rows, dtype=torch.long),
                             scores=torch.zeros(seq.rows), correct=torch.zeros(seq.rows, dtype=torch.bool),
                             kl_coef=torch.zeros(seq.rows))
        for size in (1, 2, 3):
            done = []
            for mb in batch.micro_batches(size, order=order):
                rows = order[len(done):len(done) + mb.rows]
                done += rows
                width = int(seq.attention_mask[rows].sum(-1).max())
                assert mb.seq.input_ids.shape[1] == width        # truncated to its longest row
                ids = mb.seq.input_ids
                n_image = int((ids == model.config.image_token_id).sum())
                n_video = int((ids == model.config.video_token_id).sum())
                vis = mb.seq.vision
                assert n_image == (0 if vis is None or vis.image_grid_thw is None else int(vis.image_grid_thw.prod(-1).sum()) // 4)
                assert n_video == (0 if vis is None or vis.video_grid_thw is None else int(vis.video_grid_thw.prod(-1).sum()) // 4)
                logits = model(**mb.seq.model_inputs()).logits
                mask = mb.seq.attention_mask.bool()
                torch.testing.assert_close(logits[mask], full[rows, :width][mask], rtol=1e-4, atol=1e-4)
            assert sorted(done) == list(range(seq.rows))
        for mb in micro_batches(seq, 3):                     # the forward-only path (logp, values)
            assert mb.rows <= 3


def test_rejects_video_count_mismatch(tiny):
    _, proc = tiny
    p = _mixed_prompts()[3]
    with pytest.raises(ValueError, match="1 video parts but 0 videos"):
        encode_prompt(proc, type(p)(p.messages, [], []))
