"""Video temporal grounding (registered as `temporal_grounding`): the answer is an interval
`[start, end]` in seconds, scored by its temporal IoU with the reference interval.

Interval forms read from the response: `[2.0, 5.5]`, `(2, 5.5)`, with an optional unit after each
number (`s`, `sec`, `second(s)`): `[2 s, 5.5 s]`. Reversed ends are sorted. pick "unique"
(default): a solution naming several different intervals is a hedge and scores 0 (see
verifiers.hedging); "last": the last interval is the answer. mode "threshold": 1 when
tIoU >= iou_threshold (default 0.5); "soft": the tIoU itself as the reward, the answer still
judged correct at tIoU >= iou_threshold (Score.correct).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from verifiers.base import Sample, Score, register
from verifiers.hedging import distinct

MAX_CHARS = 20_000   # only the tail of a longer response is searched
_NUM = r"\s*(-?\d{1,6}(?:\.\d{1,6})?)\s*(?:s|secs?|seconds?)?\s*"
_INTERVAL = re.compile(rf"[\[(]{_NUM},{_NUM}[\])]", re.I)


def parse_intervals(text: str) -> list[tuple[float, float]]:
    """Every interval (start, end), ends sorted, in `text`'s tail, in order."""
    out = []
    for m in _INTERVAL.finditer(text[-MAX_CHARS:]):
        a, b = float(m.group(1)), float(m.group(2))
        out.append((a, b) if a <= b else (b, a))
    return out


def parse_interval(text: str) -> tuple[float, float] | None:
    """(start, end), sorted, from the last interval in `text`; None if none."""
    found = parse_intervals(text)
    return found[-1] if found else None


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
    """mode "threshold": 1 when tIoU >= iou_threshold, else 0; "soft": the tIoU, the answer still
    judged correct (RFT, accuracy) at tIoU >= iou_threshold. pick "unique":
    several different intervals score 0; "last": the last interval is the answer."""

    mode: Literal["threshold", "soft"] = "threshold"
    iou_threshold: float = 0.5
    pick: Literal["unique", "last"] = "unique"

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        ref = parse_interval(str(sample.answer))
        if ref is None:
            raise ValueError(f"temporal_grounding: reference {str(sample.answer)[:80]!r} is not an interval")
        found = parse_intervals(sample.response)
        if not found or not all(math.isfinite(x) for iv in found for x in iv):
            return Score(0.0, {"parsed": 0.0})
        if self.pick == "unique" and len(distinct(found)) > 1:
            return Score(0.0, {"parsed": 1.0, "hedged": 1.0})
        pred = found[-1]
        overlap = temporal_iou(pred, ref)
        right = overlap >= self.iou_threshold
        if self.mode == "soft":   # the reward is graded, the verdict still the threshold's
            return Score(overlap, {"parsed": 1.0, "tiou": overlap}, correct=right)
        return Score(float(right), {"parsed": 1.0, "tiou": overlap})
