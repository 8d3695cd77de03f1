"""Rule verifiers behind one protocol and registry (see verifiers.base)."""
# Importing the shipped verifiers registers them (think_format, math, grounding, counting, ...).
from verifiers import (counting, grid_cell, grounding, instruction, math_answer, multiple_choice,  # noqa: F401
                       temporal_grounding, think_format)
from verifiers.base import Sample, Score, Verifier, load, register, registered, resolve
from verifiers.think_format import split_think, strip_think

__all__ = ["Sample", "Score", "Verifier", "load", "register", "registered", "resolve", "split_think", "strip_think"]
