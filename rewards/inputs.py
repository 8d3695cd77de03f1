"""Bridges from prompt records and sampled completions to the hybrid reward's inputs, and the one
definition of a "correct" sample, shared by the RL driver, the difficulty filter and RFT."""
from __future__ import annotations

from typing import Sequence

from PIL import Image

from model.families import verifier_settings
from records import message_text
from rewards.config import RewardConfig
from rewards.hybrid import RewardInput, combine

# Parts of a RewardResult that are not a verifier's verdict.
NON_VERIFIER_PARTS = frozenset({"format", "rm", "timeout", "error", "abstained"})


def reward_inputs(records, completions) -> list:
    """One RewardInput per completion, prompt-major: completions[i][j] answers records[i]."""
    out = []
    for rec, group in zip(records, completions):
        sizes = tuple(image_size(p) for p in rec.images)
        prompt = "\n".join(message_text(m) for m in rec.prompt_messages)
        for c in group:
            out.append(RewardInput(task=rec.task, response=c.text, answer=rec.answer, prompt=prompt,
                                   images=tuple(str(p) for p in rec.images), image_sizes=sizes, meta=rec.meta))
    return out


def for_model(cfg: RewardConfig, processor) -> RewardConfig:
    """`cfg` for responses of the model whose processor this is: its family's conventions (grounding
    coordinates) filled into the verifiers' settings wherever a route does not set them."""
    return cfg.with_verifier_settings(verifier_settings(processor))


def image_size(path) -> tuple[int, int]:
    """(width, height), from the file header."""
    with Image.open(path) as im:
        return im.size


def is_correct(result) -> bool:
    """A verifier judged the sample fully right (format gate passed, reward 1). RM-only scores never
    count: with no verifier part there is no rule answer to be right about."""
    verifier_parts = [v for k, v in result.parts.items() if k not in NON_VERIFIER_PARTS]
    return bool(verifier_parts) and result.reward >= 1.0 - 1e-6


def verifier_score(parts: dict[str, float], verifiers: Sequence[tuple[str, float]]) -> float | None:
    """The format-gated weighted mean of the verifier parts alone (the reward model left out);
    `verifiers` = (part name, weight) of the task's route. None when every verifier abstained."""
    if not parts.get("format", 0.0):
        return 0.0
    return combine([(parts.get(name), w) for name, w in verifiers])
