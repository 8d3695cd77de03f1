"""Counting (registered as `counting`): the solution states one count, equal to the reference.
Reads digits ("3", "3.0", "\\boxed{3}") and English number words ("three", "twenty-one").

A solution that mentions two different counts ("2 or 3", "\\boxed{3} 4", "3, one of them red")
or qualifies its count ("at least 3", "3 or more", "~3") is a hedge and scores 0 (the default
`pick: unique`); the reasoning belongs in the think block, which the verifier never sees.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from verifiers.base import Sample, Score, register
from verifiers.hedging import distinct, qualified

MAX_CHARS = 20_000
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
WORDS = {w: i for i, w in enumerate(_UNITS)} | _TENS | {"none": 0, "a dozen": 12, "dozen": 12}
_WORD_RE = "|".join(sorted((re.escape(w) for w in WORDS), key=len, reverse=True))
_TOKEN = re.compile(
    rf"(?<![\w.])(?P<num>-?\d{{1,9}}(?:\.0+)?)(?![\d.]*\d)|\b(?P<word>(?:{'|'.join(_TENS)})[- ](?:{'|'.join(_UNITS[1:10])})|{_WORD_RE})\b",
    re.I)
_BOXED = re.compile(r"\\boxed\{([^{}]{0,100})\}")


def count_mentions(text: str) -> list[tuple[int, int, int]]:
    """(count, start, end) of every count mentioned in `text`, in order of appearance."""
    out = []
    for m in _TOKEN.finditer(text):
        if m.group("num") is not None:
            out.append((int(float(m.group("num"))), m.start(), m.end()))
            continue
        word = m.group("word").lower().replace("-", " ")
        if " " in word and word != "a dozen":
            tens, unit = word.split()
            value = _TENS[tens] + WORDS[unit]
        else:
            value = WORDS[word]
        out.append((value, m.start(), m.end()))
    return out


def read_counts(text: str) -> list[int]:
    """Every count mentioned in `text`, in order of appearance."""
    return [c for c, _, _ in count_mentions(text)]


@register("counting")
@dataclass(frozen=True)
class Counting:
    """pick: "unique" (default): every count the solution mentions must be the same number and none
    may be qualified, else the hedge scores 0. "last" / "first": take that count and ignore the rest
    (a `\\boxed{}` wins): for free text that mentions other numbers; these two pay hedges."""

    pick: Literal["last", "first", "unique"] = "unique"

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        ref = read_counts(str(sample.answer))
        if len(ref) != 1:
            raise ValueError(f"counting: reference {str(sample.answer)[:80]!r} is not one count")
        text = sample.response[-MAX_CHARS:]
        if self.pick == "unique":
            mentions = count_mentions(text)
            if not mentions:
                return Score(0.0, {"parsed": 0.0})
            if len(distinct(c for c, _, _ in mentions)) > 1 or any(qualified(text, s, e) for _, s, e in mentions):
                return Score(0.0, {"parsed": 1.0, "hedged": 1.0})
            got = mentions[0][0]
        else:
            boxed = _BOXED.findall(text)
            counts = read_counts(boxed[-1]) if boxed else read_counts(text)
            if not counts:
                return Score(0.0, {"parsed": 0.0})
            got = counts[-1] if self.pick == "last" else counts[0]
        ok = float(got == ref[0])
        return Score(ok, {"parsed": 1.0, "count": ok})
