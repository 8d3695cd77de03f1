"""The verifier protocol and registry.

A verifier is a small frozen dataclass whose fields are its settings. Calling it on a `Sample`
returns a `Score`: a value in [0, 1] (or `None` to abstain) plus named parts for logging, and,
from a graded verifier, its verdict on the answer.
Verifiers are pure: deterministic, no printing, no I/O. Timeouts, process pools and turning
exceptions into a zero score belong to the caller (rewards.pool), once.

Registration: `@register("name")` on the class. Outside code registers through the entry-point
group `vlrl.verifiers` (value `module:Class`) or a `path/to/file.py:Name` spec given to `load()`.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

ENTRY_POINT_GROUP = "vlrl.verifiers"


@dataclass(frozen=True)
class Sample:
    """What a verifier sees. `response` is the solution part when the caller applied the format gate."""

    task: str
    response: str
    answer: str | None = None
    image_sizes: tuple[tuple[int, int], ...] = ()   # (width, height) of each image, in pixels
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """value in [0, 1], or None when the verifier abstains (it has no opinion on this sample).
    `correct` is the verifier's verdict where its value is graded (a soft IoU rewards 0.6 for a box it
    calls right at IoU >= 0.5); None: the answer is right exactly when the value is 1."""

    value: float | None
    parts: Mapping[str, float] = field(default_factory=dict)
    correct: bool | None = None

    @property
    def abstained(self) -> bool:
        return self.value is None


@runtime_checkable
class Verifier(Protocol):
    name: ClassVar[str]
    def __call__(self, sample: Sample) -> Score: ...


_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register a verifier class under `name` (duplicates are an error)."""
    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"verifier {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def _load_file_spec(spec: str) -> type:
    path_s, _, attr = spec.rpartition(":")
    path = Path(path_s).resolve()
    if not path.is_file():
        raise ValueError(f"verifier spec {spec!r}: file {path} not found")
    mod_name = f"vlrl_user_verifier_{abs(hash(str(path)))}"
    if mod_name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    module = sys.modules[mod_name]
    if not hasattr(module, attr):
        raise ValueError(f"verifier spec {spec!r}: {path.name} defines no {attr!r}")
    return getattr(module, attr)


def _load_entry_points() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            cls = ep.load()
            if ep.name not in _REGISTRY:
                register(ep.name)(cls)


def resolve(name_or_spec: str) -> type:
    """A verifier class from a registered name, an entry-point name or a `file.py:Name` spec."""
    if name_or_spec in _REGISTRY:
        return _REGISTRY[name_or_spec]
    if ".py:" in name_or_spec:
        return _load_file_spec(name_or_spec)
    _load_entry_points()
    if name_or_spec in _REGISTRY:
        return _REGISTRY[name_or_spec]
    raise KeyError(f"unknown verifier {name_or_spec!r} (registered: {', '.join(sorted(_REGISTRY))})")


def load(name_or_spec: str, **settings: Any) -> Verifier:
    """Instantiate a verifier with its settings (the dataclass fields)."""
    cls = resolve(name_or_spec)
    try:
        return cls(**settings)
    except TypeError as e:
        raise ValueError(f"verifier {name_or_spec!r}: bad settings {settings}: {e}") from None


def registered() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)
