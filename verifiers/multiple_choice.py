"""Multiple choice (registered as `multiple_choice`): the chosen option equals the reference.

The reference is a letter ("B") or an option's text; `meta["options"]` lists the option texts
(a list, A first, or a {"A": text} mapping). The solution may give "B", "(B)", "B.", "B) text",
"\\boxed{B}", "Answer: B", or the option's text. A solution that chooses two different options
("A or B", "(A) (B)", "\\boxed{A} \\boxed{B}", the texts of two options, a letter and another
option's text) is a hedge and scores 0.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Mapping

from verifiers.base import Sample, Score, register
from verifiers.hedging import distinct

MAX_CHARS = 20_000


def _options(meta: Mapping[str, Any]) -> dict[str, str]:
    opts = meta.get("options") if meta else None
    if not opts:
        return {}
    if isinstance(opts, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in opts.items()}
    return {string.ascii_uppercase[i]: str(v) for i, v in enumerate(list(opts)[:26])}


def _norm(text: str) -> str:
    return re.sub(r"[\s.,;:!?()\[\]*`'\"$]+", " ", text).strip().lower()


def chosen_letters(text: str, letters: str) -> list[str]:
    """Every option letter the text chooses, in order of first appearance (empty if none)."""
    cls = f"[{re.escape(letters)}]"
    stripped = re.sub(r"[\s*_`$.:()\[\]]", "", text)
    if len(stripped) == 1 and stripped.upper() in letters:
        return [stripped.upper()]
    forms = (
        rf"\\boxed\{{\s*(?:\\text(?:bf)?\{{)?\s*\(?({cls})\)?\s*\}}",
        rf"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*\**\s*\(?({cls})\)?(?![A-Za-z])",
        rf"\(({cls})\)",
        rf"^\s*\**({cls})(?:[.):]|\s*$)",
        rf"(?<![A-Za-z'])({cls})[.)](?:\s|$)",
    )
    found = []
    for form in forms:
        found += [(m.start(1), m.group(1).upper()) for m in re.finditer(form, text, re.M)]
    # letters listed together: "A or B", "(A), (B)", "A/B", "A and B"
    listed = rf"(?<![A-Za-z'])\(?{cls}\)?(?:\s*(?:,|/|&|\bor\b|\band\b)\s*\(?{cls}\)?)+(?![A-Za-z'])"
    for m in re.finditer(listed, text):
        found += [(m.start() + k.start(), k.group(0).upper()) for k in re.finditer(cls, m.group(0))]
    return distinct(letter for _, letter in sorted(found))


def named_options(text: str, options: Mapping[str, str]) -> list[str]:
    """The options whose full text the solution writes, by position; an option text found only
    inside the match of a longer one ("red" in "red square") does not count."""
    norm = _norm(text)
    spans = []
    for key, option in options.items():
        needle = _norm(option)
        if needle:
            spans += [(m.start(), m.end(), key) for m in re.finditer(rf"(?<!\w){re.escape(needle)}(?!\w)", norm)]
    kept = [a for a in spans if not any(b[0] <= a[0] and a[1] <= b[1] and b[1] - b[0] > a[1] - a[0] for b in spans)]
    return distinct(key for _, _, key in sorted(kept))


@register("multiple_choice")
@dataclass(frozen=True)
class MultipleChoice:
    """1 when the solution picks the reference option and no other. letters: the option letters
    considered when meta has no options (default A-E)."""

    letters: str = "ABCDE"

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        options = _options(sample.meta)
        letters = "".join(options) if options else self.letters
        ref = str(sample.answer).strip()
        ref_letters = chosen_letters(ref, letters)
        if len(ref_letters) == 1:
            ref_letter = ref_letters[0]
        else:
            by_text = [k for k, v in options.items() if _norm(v) == _norm(ref)]
            if len(by_text) != 1:
                raise ValueError(f"multiple_choice: reference {ref[:80]!r} names no option")
            ref_letter = by_text[0]
        text = sample.response[-MAX_CHARS:]
        # an option is chosen by its letter or by its text; "B) Rome" (Rome being C) names two
        got = distinct(chosen_letters(text, letters) + named_options(text, options))
        if not got:
            return Score(0.0, {"parsed": 0.0})
        if len(got) > 1:
            return Score(0.0, {"parsed": 1.0, "hedged": 1.0})
        ok = float(got[0] == ref_letter)
        return Score(ok, {"parsed": 1.0, "choice": ok})
