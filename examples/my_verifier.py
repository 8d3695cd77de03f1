"""An example third-party verifier: the solution equals the reference after normalising case and
spaces. One file, one frozen dataclass; its fields are the settings. Use it as

    vlrl score in.jsonl -o out.jsonl --verifier examples/my_verifier.py:ExactMatch

or register it under a name through the `vlrl.verifiers` entry-point group of your package.
"""
from __future__ import annotations

from dataclasses import dataclass

from verifiers.base import Sample, Score


@dataclass(frozen=True)
class ExactMatch:
    case_sensitive: bool = False    # compare letters as written
    strip_period: bool = True       # ignore one trailing "."

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)  # abstain: no reference to compare with
        got, want = self._norm(sample.response), self._norm(sample.answer)
        ok = float(got == want)
        return Score(ok, {"exact": ok, "length": float(len(got))})

    def _norm(self, text: str) -> str:
        text = " ".join(text.split())
        if self.strip_period and text.endswith("."):
            text = text[:-1]
        return text if self.case_sensitive else text.lower()
