"""Rule verifiers behind one protocol and registry (see verifiers.base)."""
from verifiers.base import Sample, Score, Verifier, load, register, registered, resolve
# Importing the shipped verifiers registers them (think_format, math, grounding, counting, ...).
from verifiers import think_format, math_answer, grounding, counting, multiple_choice, instruction  # noqa: F401
from verifiers.think_format import split_think

__all__ = ["Sample", "Score", "Verifier", "load", "register", "registered", "resolve", "split_think"]
