"""Instruction following (registered as `instruction`): rule checks on the solution text.

Rules come from the verifier's settings and from `meta["rules"]` of the sample (the sample's
rules win key by key): max/min words, max/min characters, required and forbidden keywords,
JSON-parsable. Score: 1 when every rule holds ("all"), or the fraction that hold ("mean").
Abstains when no rule applies.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, Literal

from verifiers.base import Sample, Score, register

MAX_JSON_CHARS = 1_000_000
_RULES = ("max_words", "min_words", "max_chars", "min_chars", "required", "forbidden", "json")


def _keywords(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@register("instruction")
@dataclass(frozen=True)
class Instruction:
    max_words: int | None = None
    min_words: int | None = None
    max_chars: int | None = None
    min_chars: int | None = None
    required: tuple[str, ...] = ()      # each keyword must appear
    forbidden: tuple[str, ...] = ()     # none may appear
    json: bool = False                  # the whole solution parses as JSON (``` fences allowed)
    case_sensitive: bool = False
    aggregate: Literal["all", "mean"] = "all"

    def __call__(self, sample: Sample) -> Score:
        rules = {f.name: getattr(self, f.name) for f in fields(self) if f.name in _RULES}
        extra = sample.meta.get("rules", {}) if sample.meta else {}
        if not isinstance(extra, dict):
            raise ValueError("instruction: meta['rules'] must be a mapping")
        unknown = set(extra) - set(_RULES)
        if unknown:
            raise ValueError(f"instruction: unknown rule(s) {sorted(unknown)} (known: {', '.join(_RULES)})")
        rules.update(extra)
        text = sample.response
        parts = self._check(text, rules)
        if not parts:
            return Score(None)
        value = min(parts.values()) if self.aggregate == "all" else sum(parts.values()) / len(parts)
        return Score(value, parts)

    def _check(self, text: str, rules: dict[str, Any]) -> dict[str, float]:
        parts: dict[str, float] = {}
        n_words = len(text.split())
        if rules.get("max_words") is not None:
            parts["max_words"] = float(n_words <= int(rules["max_words"]))
        if rules.get("min_words") is not None:
            parts["min_words"] = float(n_words >= int(rules["min_words"]))
        if rules.get("max_chars") is not None:
            parts["max_chars"] = float(len(text) <= int(rules["max_chars"]))
        if rules.get("min_chars") is not None:
            parts["min_chars"] = float(len(text) >= int(rules["min_chars"]))
        hay = text if self.case_sensitive else text.lower()

        def has(word: str) -> bool:
            return (word if self.case_sensitive else word.lower()) in hay

        required, forbidden = _keywords(rules.get("required")), _keywords(rules.get("forbidden"))
        if required:
            parts["required"] = float(all(has(w) for w in required))
        if forbidden:
            parts["forbidden"] = float(not any(has(w) for w in forbidden))
        if rules.get("json"):
            parts["json"] = float(_is_json(text))
        return parts


def _is_json(text: str) -> bool:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.S)
    if fenced:
        body = fenced.group(1)
    if len(body) > MAX_JSON_CHARS:
        return False
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True
