"""Difficulty statistics of prompts from k sampled responses each (pure: plain floats, no model).

Seed1.5-VL's RFT rounds keep the prompts a model neither always solves nor never solves:

    pass_rate(prompt) = (1/k) sum_j score_j      score_j in [0, 1]: the format-gated verifier score of sample j
    difficulty        = 1 - pass_rate
    keep  iff  low <= pass_rate <= high          (inclusive at both ends, up to EPS)

Prompts without a rule answer (RLHF, reward-model scored) have no pass rate; they are kept when the
rewards of their k samples differ (population std >= min_std): a group that all scores alike gives
group-relative RL no signal, the same reason the solved and the hopeless are dropped.
"""
from __future__ import annotations

import math
from typing import Sequence

EPS = 1e-9   # band edges are inclusive; pass rates like 1/8 + 7/8 sums may miss an edge by rounding


def parse_band(text: str) -> tuple[float, float]:
    """'0.1,0.9' -> (0.1, 0.9); ValueError unless 0 <= low <= high <= 1."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ValueError(f"band {text!r}: expected LOW,HIGH, e.g. 0.1,0.9")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"band {text!r}: LOW and HIGH must be numbers") from None
    if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
        raise ValueError(f"band {text!r}: LOW and HIGH must lie in [0, 1]")
    if low > high:
        raise ValueError(f"band {text!r}: LOW ({low}) is above HIGH ({high})")
    return low, high


def pass_rate(scores: Sequence[float]) -> float:
    """Mean score of the k samples of one prompt."""
    if not scores:
        raise ValueError("pass_rate of no samples")
    return sum(scores) / len(scores)


def score_std(scores: Sequence[float]) -> float:
    """Population standard deviation of the k scores of one prompt (0 for one sample)."""
    m = sum(scores) / len(scores)
    return math.sqrt(sum((s - m) ** 2 for s in scores) / len(scores))


def in_band(rate: float, *, low: float, high: float) -> bool:
    """low <= rate <= high, both ends inclusive."""
    return low - EPS <= rate <= high + EPS


def select_by_spread(stds: Sequence[float], *, min_std: float) -> list[bool]:
    """keep[i]: the prompt's k rewards differ by at least min_std (population std)."""
    return [s >= min_std - EPS for s in stds]


def histogram_edges(k: int) -> list[float]:
    """Bin edges over [0, 1] with one bin centred on each attainable pass rate j/k, j = 0..k:
    [0, 1/2k, 3/2k, ..., 1 - 1/2k, 1]."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [0.0] + [(j + 0.5) / k for j in range(k)] + [1.0]


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin [edges[i], edges[i+1]); the last bin is closed. Values outside are clipped in."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        i = 0
        while i < len(counts) - 1 and v >= edges[i + 1]:
            i += 1
        counts[i] += 1
    return counts
