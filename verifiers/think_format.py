"""The `<think>{thought}</think>{solution}` format check (the reward's format gate)."""
from __future__ import annotations

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


@register("think_format")
@dataclass(frozen=True)
class ThinkFormat:
    """1 when the response has the think/solution form, else 0."""

    def __call__(self, sample: Sample) -> Score:
        ok = split_think(sample.response) is not None
        return Score(float(ok), {"format": float(ok)})
