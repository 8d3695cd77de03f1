"""Test-only verifiers, loaded by `file.py:Name` spec: misbehaving ones and an echo of what they saw."""
import os
import time
from dataclasses import dataclass

from verifiers.base import Sample, Score


@dataclass(frozen=True)
class Hang:
    """Sleeps forever on the response "hang"; 1 otherwise."""

    def __call__(self, sample: Sample) -> Score:
        while sample.response == "hang":
            time.sleep(0.5)
        return Score(1.0)


@dataclass(frozen=True)
class Raise:
    def __call__(self, sample: Sample) -> Score:
        raise RuntimeError("verifier bug")


@dataclass(frozen=True)
class Die:
    def __call__(self, sample: Sample) -> Score:
        os._exit(3)


@dataclass(frozen=True)
class BadValue:
    value: float | None = 2.0
    correct: object = None   # a verdict beside the value; not a bool, or beside None, is an error

    def __call__(self, sample: Sample) -> Score:
        return Score(self.value, correct=self.correct)


@dataclass(frozen=True)
class Echo:
    """1 when the response is exactly meta["expect"] (so a test sees what the verifier saw); abstains on "abstain"."""

    def __call__(self, sample: Sample) -> Score:
        if sample.response == "abstain":
            return Score(None)
        return Score(float(sample.response == sample.meta.get("expect")), {"length": float(len(sample.response))})
