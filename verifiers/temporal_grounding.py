"""Video temporal grounding (registered as `temporal_grounding`): the answer is an interval
`[start, end]` in seconds, scored by its temporal IoU with the reference interval.

Interval forms read from the response (the last one wins): `[2.0, 5.5]`, `(2, 5.5)`, with an
optional unit after each number (`s`, `sec`, `second(s)`): `[2 s, 5.5 s]`. Reversed ends are
sorted. mode "threshold": 1 when tIoU >= iou_threshold (default 0.5); "soft": the tIoU itself.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from verifiers.base import Sample, Score, register

MAX_CHARS = 20_000   # only the tail of a longer response is searched
_NUM = r"\s*(-?\d{1,6}(?:\.\d{1,6})?)\s*(?:s|secs?|seconds?)?\s*"
_INTERVAL = re.compile(rf"[\[(]{_NUM},{_NUM}[\])]", re.I)


def parse_interval(text: str) -> tuple[float, float] | None:
    """(start, end), sorted, from the last interval in `text`; None if none."""
    last = None
    for last in _INTERVAL.finditer(text[-MAX_CHARS:]):
        pass
    if last is None:
        return None
    a, b = float(last.group(1)), float(last.group(2))
    return (a, b) if a <= b else (b, a)


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """|a ∩ b| / |a ∪ b| of two intervals; two equal points score 1, two different points 0."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    if union <= 0:
        return float(a == b)
    return inter / union


@register("temporal_grounding")
@dataclass(frozen=True)
class TemporalGrounding:
    """mode "threshold": 1 when tIoU >= iou_threshold, else 0; "soft": the tIoU."""

    mode: Literal["threshold", "soft"] = "threshold"
    iou_threshold: float = 0.5

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        ref = parse_interval(str(sample.answer))
        if ref is None:
            raise ValueError(f"temporal_grounding: reference {str(sample.answer)[:80]!r} is not an interval")
        pred = parse_interval(sample.response)
        if pred is None or not all(math.isfinite(x) for x in pred):
            return Score(0.0, {"parsed": 0.0})
        overlap = temporal_iou(pred, ref)
        value = overlap if self.mode == "soft" else float(overlap >= self.iou_threshold)
        return Score(value, {"parsed": 1.0, "tiou": overlap})
