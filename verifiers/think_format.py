"""The `<think>{thought}</think>{solution}` format check (the reward's format gate)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from verifiers.base import Sample, Score, register

OPEN, CLOSE = "<think>", "</think>"


def split_think(response: str) -> tuple[str, str] | None:
    """(thought, solution) when `response` is exactly one leading think block and a non-empty
    solution; None otherwise. Leading/trailing whitespace around the whole response is allowed."""
    text = response.strip()
    if not text.startswith(OPEN) or text.count(OPEN) != 1 or text.count(CLOSE) != 1:
        return None
    thought, _, solution = text[len(OPEN):].partition(CLOSE)
    solution = solution.strip()
    if not solution:
        return None
    return thought.strip(), solution


_BLOCK = re.compile(re.escape(OPEN) + ".*?" + re.escape(CLOSE), re.S)


def strip_think(response: str) -> str:
    """The response without its thoughts, whatever its form: every `<think>..</think>` block goes,
    text before a stray `</think>` is thought (a template that opens the block in the prompt), and
    an unclosed `<think>` takes the rest. Numbers inside a thought never reach a verifier."""
    text = _BLOCK.sub(" ", response)
    if CLOSE in text:
        text = text[text.rfind(CLOSE) + len(CLOSE):]
    if OPEN in text:
        text = text[:text.find(OPEN)]
    return text.strip()


@register("think_format")
@dataclass(frozen=True)
class ThinkFormat:
    """1 when the response has the think/solution form, else 0."""

    def __call__(self, sample: Sample) -> Score:
        ok = split_think(sample.response) is not None
        return Score(float(ok), {"format": float(ok)})
