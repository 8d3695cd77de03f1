"""The same frames reach every stage: SFT batches, the critic, the reward model (and its route from a
record), the pairwise judge, and the RL driver's start-time check of the engine's image and video limits."""
import dataclasses

import numpy as np
import pytest
import torch

from model.critic import ValueModel
from model.inputs import IGNORE, encode_sft
from model.reward import RewardModel
from recipe.sft import encode_by_modality
from records import VideoGeometry, load_media, load_records, message_text
from rewards.inputs import reward_inputs
from rewards.judge import PairwiseJudge, media_and_question
from rewards.rm import RewardModelScorer
from rl.rollout_step import check_media_limits
from rollout import Completion, EngineConfig
from rollout.sequences import prompt_from_record
from training.config import ConfigError


@pytest.fixture(scope="module")
def extra_records(extra_suite_dir):
    return load_records(extra_suite_dir / "sft.jsonl", require="target")


def _pick(records, *tasks):
    return [next(r for r in records if r.task == t) for t in tasks]


def test_sft_labels_and_the_split_by_modality_change_nothing_but_the_cost(tiny, extra_records):
    """Labels cover the assistant turn exactly on video and two-image records; a step's token-mean
    NLL is the same whether its video records share the image records' batch or not."""
    model, proc = tiny
    recs = _pick(extra_records, "video_temporal", "spot_difference", "video_count", "puzzle")
    media = [load_media(r, r.messages, geometry=VideoGeometry.of(proc)) for r in recs]
    one = encode_sft(proc, [m.messages for m in media], [m.images for m in media], [m.videos for m in media])
    for i, r in enumerate(recs):
        labelled = one["labels"][i][one["labels"][i] != IGNORE]
        assert proc.tokenizer.decode(labelled) == r.target + "<|im_end|>\n"
    split = encode_by_modality(proc, recs, VideoGeometry.of(proc))
    assert [int((b["video_grid_thw"] if "video_grid_thw" in b else torch.zeros(0)).shape[0]) for b in split] == [
        0, sum(len(m.videos) for m in media)]

    def nll(batches):
        total, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                b = dict(b)
                labels = b.pop("labels")
                logits = model(**b).logits[:, :-1]
                total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           labels[:, 1:].reshape(-1), reduction="sum").item()
                count += int((labels[:, 1:] != IGNORE).sum())
        return total / count
    assert nll(split) == pytest.approx(nll([one]), rel=1e-5)


def test_critic_and_reward_model_see_each_rows_own_video(tiny_model_dir, tiny, extra_records):
    """Values and RM scores of a row do not depend on the rows batched with it, and change with its
    frames: the clips reach the backbone with their row."""
    _, proc = tiny
    recs = _pick(extra_records, "video_temporal", "spot_difference", "video_count")
    media = [load_media(r, r.messages) for r in recs]
    torch.manual_seed(0)
    critic = ValueModel.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        critic.value_head.weight.normal_(std=0.3)

    def values(ms):
        b = encode_sft(proc, [m.messages for m in ms], [m.images for m in ms], [m.videos for m in ms])
        with torch.no_grad():
            v = critic(b["input_ids"], b["attention_mask"], **{k: b[k] for k in (
                "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids") if k in b})
        return [v[i][b["attention_mask"][i].bool()] for i in range(len(ms))]
    together = values(media)
    for i, m in enumerate(media):
        torch.testing.assert_close(values([m])[0], together[i], rtol=1e-4, atol=1e-4)
    black = dataclasses.replace(media[0], videos=[np.zeros_like(c) for c in media[0].videos])
    assert not torch.allclose(values([black])[0], together[0])

    rm = RewardModel(critic)
    out = tiny_model_dir.parent / "rm_video"
    rm.save_pretrained(out)
    proc.save_pretrained(out)
    scorer = RewardModelScorer(out, batch_size=8)
    prompts = [prompt_from_record(r) for r in recs]
    items = [inp for inp in reward_inputs(recs, [[Completion([1], [0.0], "x", "stop")] for _ in recs], prompts)]
    assert isinstance(items[0].prompt, list) and len(items[0].images) == len(prompts[0].videos)
    batch = scorer([(it.images, it.prompt, "row 1, column 1") for it in items])
    alone = [scorer([(it.images, it.prompt, "row 1, column 1")])[0] for it in items]
    assert batch == pytest.approx(alone, abs=1e-5)
    blank = [np.zeros_like(c) for c in items[0].images]
    assert scorer([(tuple(blank), items[0].prompt, "row 1, column 1")])[0] != pytest.approx(alone[0], abs=1e-6)


def test_the_judge_sees_a_video_records_clips_with_their_timestamps(tiny, extra_records):
    """A video record reaches the judge as the reward model gets it: its clips, each after its
    timestamp, then the question; the verdict is antisymmetric and depends on the frames."""
    model, proc = tiny
    (rec,) = _pick(extra_records, "video_count")
    (item,) = reward_inputs([rec], [["2"]])
    media, question = media_and_question(item.prompt, 0)
    assert [p["type"] for p in media] == ["text", "video"] * len(item.images)
    assert question == message_text(rec.prompt_messages[-1]).strip()
    judge = PairwiseJudge(model, proc, batch_size=2)
    fwd = judge.compare([(item.images, item.prompt, "2", "3")])[0]
    back = judge.compare([(item.images, item.prompt, "3", "2")])[0]
    assert 0.0 < fwd < 1.0 and fwd + back == pytest.approx(1.0, abs=1e-5)
    blank = tuple(np.zeros_like(c) for c in item.images)
    seen = judge.letter_logp([(item.images, item.prompt, "2", "3")])
    unseen = judge.letter_logp([(blank, item.prompt, "2", "3")])
    assert (seen - unseen).abs().max() > 1e-3   # 0.19 on the tiny model


def test_rl_refuses_prompts_over_the_engine_limits_at_start(extra_suite_dir):
    recs = load_records(extra_suite_dir / "rl.jsonl", require="prompt")
    geometry = VideoGeometry()
    ok = EngineConfig(backend="vllm", max_images_per_prompt=2, max_video_clips_per_prompt=7)
    check_media_limits(recs, ok, geometry)
    check_media_limits(recs, EngineConfig(backend="hf"), geometry)        # the HF engine has no such limit
    with pytest.raises(ConfigError, match=r"rollout.max_images_per_prompt: 1, but the prompt at .*rl.jsonl:\d+ "
                                          r"\(rl-spot_difference-\d+\) takes 2"):
        check_media_limits(recs, dataclasses.replace(ok, max_images_per_prompt=1), geometry)
    with pytest.raises(ConfigError, match=r"rollout.max_video_clips_per_prompt: 3, but the prompt .* takes [4-7]"):
        check_media_limits(recs, dataclasses.replace(ok, max_video_clips_per_prompt=3), geometry)
