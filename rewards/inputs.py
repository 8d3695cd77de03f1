"""Bridges from prompt records and sampled responses to the hybrid reward's inputs, and the test of
a "correct" sample shared by the RL driver, the difficulty filter, RFT and held-out evaluation."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from PIL import Image

from model.families import verifier_settings
from records import message_text
from rewards.config import RewardConfig
from rewards.hybrid import RewardInput, combine


def reward_input(record, response: str, *, group: int | None = None) -> RewardInput:
    """The RewardInput of one response to a prompt record."""
    return RewardInput(task=record.task, response=response, answer=record.answer,
                       prompt="\n".join(message_text(m) for m in record.prompt_messages),
                       images=tuple(str(p) for p in record.images),
                       image_sizes=tuple(image_size(p) for p in record.images), meta=record.meta, group=group)


def reward_inputs(records, completions) -> list:
    """One RewardInput per completion, prompt-major: completions[i][j] answers records[i] (a
    completion is a string or has `.text`); the samples of records[i] form group i."""
    return [reward_input(rec, c if isinstance(c, str) else c.text, group=i)
            for i, (rec, group) in enumerate(zip(records, completions)) for c in group]


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


def verifier_score(parts: dict[str, float], verifiers: Sequence[tuple[str, float]]) -> float | None:
    """The format-gated weighted mean of the verifier parts alone (the reward model left out);
    `verifiers` = (part name, weight) of the task's route. None when every verifier abstained."""
    if not parts.get("format", 0.0):
        return 0.0
    return combine([(parts.get(name), w) for name, w in verifiers])
