"""Multiple choice (registered as `multiple_choice`): the chosen option equals the reference.

The reference is a letter ("B") or an option's text; `meta["options"]` lists the option texts
(a list, A first, or a {"A": text} mapping). The solution may give "B", "(B)", "B.", "B) text",
"\\boxed{B}", "Answer: B", or the option's text.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Mapping

from verifiers.base import Sample, Score, register

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


def _letter(text: str, letters: str) -> str | None:
    """The chosen letter, by decreasing confidence of the form; None if no form matches."""
    cls = f"[{letters}]"
    stripped = re.sub(r"[\s*_`$.:()\[\]]", "", text)
    if len(stripped) == 1 and stripped.upper() in letters:
        return stripped.upper()
    forms = (
        rf"\\boxed\{{\s*(?:\\text\{{)?\(?({cls})\)?",
        rf"(?i:answer|option|choice)(?:\s+is)?\s*:?\s*\**\s*\(?({cls})\)?(?![A-Za-z])",
        rf"\(({cls})\)",
        rf"^\s*\**({cls})(?:[.):]|\s*$)",
        rf"(?<![A-Za-z'])({cls})[.)](?:\s|$)",
    )
    for form in forms:
        found = re.findall(form, text, re.M)
        if found:
            return found[-1].upper()
    return None


@register("multiple_choice")
@dataclass(frozen=True)
class MultipleChoice:
    """1 when the solution picks the reference option. letters: the option letters considered when
    meta has no options (default A-E)."""

    letters: str = "ABCDE"

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        options = _options(sample.meta)
        letters = "".join(options) if options else self.letters
        ref = str(sample.answer).strip()
        ref_letter = _letter(ref, letters)
        if ref_letter is None:
            by_text = [k for k, v in options.items() if _norm(v) == _norm(ref)]
            if len(by_text) != 1:
                raise ValueError(f"multiple_choice: reference {ref[:80]!r} names no option")
            ref_letter = by_text[0]
        text = sample.response[-MAX_CHARS:]
        got = _letter(text, letters)
        if got is None and options:
            # the option's text instead of its letter: exactly one option's text may appear
            norm = _norm(text)
            hits = [k for k, v in options.items() if _norm(v) and re.search(rf"\b{re.escape(_norm(v))}\b", norm)]
            got = hits[0] if len(hits) == 1 else None
        if got is None:
            return Score(0.0, {"parsed": 0.0})
        ok = float(got == ref_letter)
        return Score(ok, {"parsed": 1.0, "choice": ok})
