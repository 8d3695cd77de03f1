"""Counting (registered as `counting`): the integer in the solution equals the reference count.
Reads digits ("3", "3.0", "\\boxed{3}") and English number words ("three", "twenty-one")."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from verifiers.base import Sample, Score, register

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


def read_counts(text: str) -> list[int]:
    """Every count mentioned in `text`, in order of appearance."""
    out = []
    for m in _TOKEN.finditer(text[-MAX_CHARS:]):
        if m.group("num") is not None:
            out.append(int(float(m.group("num"))))
            continue
        word = m.group("word").lower().replace("-", " ")
        if " " in word and word != "a dozen":
            tens, unit = word.split()
            out.append(_TENS[tens] + WORDS[unit])
        else:
            out.append(WORDS[word])
    return out


@register("counting")
@dataclass(frozen=True)
class Counting:
    """pick: which count in the solution is the answer: "last" (default), "first", or "unique"
    (every count mentioned must agree, so hedging "2 or 3" scores 0). A `\\boxed{}` wins."""

    pick: Literal["last", "first", "unique"] = "last"

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        ref = read_counts(str(sample.answer))
        if len(ref) != 1:
            raise ValueError(f"counting: reference {str(sample.answer)[:80]!r} is not one count")
        boxed = _BOXED.findall(sample.response[-MAX_CHARS:])
        counts = read_counts(boxed[-1]) if boxed else read_counts(sample.response)
        if not counts:
            return Score(0.0, {"parsed": 0.0})
        if self.pick == "unique":
            got = counts[0] if len(set(counts)) == 1 else None
        else:
            got = counts[-1] if self.pick == "last" else counts[0]
        ok = float(got == ref[0])
        return Score(ok, {"parsed": 1.0, "count": ok})
