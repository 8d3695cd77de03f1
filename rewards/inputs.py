"""Bridges from prompt records and sampled responses to the hybrid reward's inputs, and the test of
a "correct" sample shared by the RL driver, the difficulty filter, RFT and held-out evaluation."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from PIL import Image

from model.families import verifier_settings
from records import load_media, message_text
from rewards.config import RewardConfig
from rewards.hybrid import RewardInput, combine


def reward_input(record, response: str, *, group: int | None = None) -> RewardInput:
    """The RewardInput of one response to a prompt record (a video record's clips loaded with
    `records.load_media`)."""
    media, prompt = rm_prompt(record)
    return RewardInput(task=record.task, response=response, answer=record.answer, prompt=prompt, images=media,
                       image_sizes=tuple(image_size(p) for p in record.images), meta=record.meta, group=group)


def reward_inputs(records, completions, prompts=None) -> list:
    """One RewardInput per completion, prompt-major: completions[i][j] answers records[i] (a
    completion is a string or has `.text`); the samples of records[i] form group i. A record with
    videos goes to the reward model as `prompts[i]` when given (its `rollout.Prompt`: the messages
    with the timestamped clips, the images and the clips), else loaded with `records.load_media`."""
    out = []
    for i, (rec, group) in enumerate(zip(records, completions)):
        media, prompt = rm_prompt(rec, None if prompts is None else prompts[i])
        sizes = tuple(image_size(p) for p in rec.images)
        out += [RewardInput(task=rec.task, response=c if isinstance(c, str) else c.text, answer=rec.answer,
                            prompt=prompt, images=media, image_sizes=sizes, meta=rec.meta, group=i)
                for c in group]
    return out


def rm_prompt(rec, prompt=None) -> tuple[tuple, str | list[dict]]:
    """(media, prompt) of a record for the reward model: image paths and the prompt's text, or for a
    record with videos its images, its clips and its expanded messages (from `prompt`, a
    `rollout.Prompt` of the record, when given)."""
    if not getattr(rec, "videos", None):
        return tuple(str(p) for p in rec.images), "\n".join(message_text(m) for m in rec.prompt_messages)
    if prompt is None:
        media = load_media(rec)
        return tuple(media.images) + tuple(media.videos), media.messages
    return tuple(prompt.images) + tuple(prompt.videos), prompt.messages


def for_model(cfg: RewardConfig, processor) -> RewardConfig:
    """`cfg` for responses of the model whose processor this is: its family's conventions (grounding
    coordinates) filled into the verifiers' settings wherever a route does not set them."""
    return cfg.with_verifier_settings(verifier_settings(processor))


@lru_cache(maxsize=4096)
def image_size(path) -> tuple[int, int]:
    """(width, height), from the file header (cached: avg@k scores each record's images k times)."""
    with Image.open(path) as im:
        return im.size


def is_correct(result) -> bool:
    """The verifiers judged the sample fully right (`RewardResult.correct`). RM and judge scores
    never count: with no verifier there is no rule answer to be right about."""
    return result.correct is True


OVERLAP_PARTS = ("iou", "tiou")   # the overlap details of the box and interval verifiers' scores


def overlap(result) -> float:
    """The lowest overlap (box IoU, interval tIoU) a verifier measured for the sample, 1.0 where none
    did: how right a threshold verifier's 1 is (tIoU 0.5 and 1.0 both score 1 at the default threshold)."""
    found = [v for k, v in result.parts.items() if k.rsplit("/", 1)[-1] in OVERLAP_PARTS]
    return min(found, default=1.0)


def verifier_score(parts: dict[str, float], verifiers: Sequence[tuple[str, float]]) -> float | None:
    """The format-gated weighted mean of the verifier parts alone (the reward model left out);
    `verifiers` = (part name, weight) of the task's route. None when every verifier abstained."""
    if not parts.get("format", 0.0):
        return 0.0
    return combine([(parts.get(name), w) for name, w in verifiers])
