"""Rule verifiers behind one protocol and registry (see verifiers.base)."""
from verifiers.base import Sample, Score, Verifier, load, register, registered, resolve
from verifiers import think_format  # noqa: F401  (registration side effects)
from verifiers.think_format import split_think

__all__ = ["Sample", "Score", "Verifier", "load", "register", "registered", "resolve", "split_think"]
