"""Bridges from prompt records and sampled completions to the hybrid reward's inputs, and the one
definition of a "correct" sample, shared by the RL driver, the difficulty filter and RFT."""
from __future__ import annotations

from typing import Sequence

from PIL import Image

from records import load_media, message_text
from rewards.hybrid import RewardInput, combine

# Parts of a RewardResult that are not a verifier's verdict.
NON_VERIFIER_PARTS = frozenset({"format", "rm", "timeout", "error", "abstained"})


def reward_inputs(records, completions, prompts=None) -> list:
    """One RewardInput per completion, prompt-major: completions[i][j] answers records[i]. A record
    with videos goes to the reward model as `prompts[i]` (its `rollout.Prompt`: the messages with the
    timestamped clips, the images and the clips), else loaded with `records.load_media`."""
    out = []
    for i, (rec, group) in enumerate(zip(records, completions)):
        sizes = tuple(image_size(p) for p in rec.images)
        media, prompt = rm_prompt(rec, None if prompts is None else prompts[i])
        for c in group:
            out.append(RewardInput(task=rec.task, response=c.text, answer=rec.answer, prompt=prompt,
                                   images=media, image_sizes=sizes, meta=rec.meta))
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
