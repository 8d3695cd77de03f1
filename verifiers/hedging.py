"""What makes an answer a hedge, shared by the verifiers: several different final answers, or one
answer qualified so that it no longer commits to a value ("at least 3", "3 or more", "~3").

A hedge scores 0 whichever candidate is right, so a policy gains nothing by listing candidates.
"""
from __future__ import annotations

import re

# A qualifier right before a value: it states a range or an estimate, not the value.
_BEFORE = re.compile(
    r"(?:\b(?:at\s+least|at\s+most|no\s+(?:more|less|fewer)\s+than|more\s+than|less\s+than|fewer\s+than|"
    r"greater\s+than|over|under|above|below|about|around|approximately|approx\.?|roughly|nearly|almost|"
    r"close\s+to|up\s+to|between|maybe|perhaps|probably|possibly|either)"
    r"|[<>~\u2248\u2264\u2265\u2272\u2273]|\\(?:ge|le|geq|leq|gt|lt|approx|sim|lesssim|gtrsim))"
    r"[\s*_$:(\[{]*$", re.I)
# ... or right after it.
_AFTER = re.compile(r"^[\s*_$)\]}]*(?:\+(?!\s*\d)|\\pm|\u00b1|-?ish\b|or\s+(?:more|fewer|less|so|above|below)\b|"
                    r"and\s+(?:up|above|more|over)\b|at\s+(?:least|most)\b)", re.I)
CONTEXT = 30   # characters looked at on each side of a value


def qualified(text: str, start: int, end: int) -> bool:
    """Whether the value at text[start:end] is hedged by a qualifier next to it."""
    return bool(_BEFORE.search(text[max(0, start - CONTEXT):start]) or _AFTER.match(text[end:end + CONTEXT]))


def distinct(values) -> list:
    """The distinct values in order of first appearance (values must be hashable)."""
    seen: dict = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)
