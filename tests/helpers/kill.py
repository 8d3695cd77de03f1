"""A run killed right after it wrote a checkpoint, for the exact-resume tests."""
from __future__ import annotations

from typing import Callable

import pytest


def run_killed_after_checkpoint(monkeypatch, module, run: Callable[[], object], *, after: int = 1) -> None:
    """Call `run()` with `module.save_checkpoint` raising SystemExit right after it has written its
    `after`-th checkpoint (as a kill at that moment would stop the run); then restore it."""
    real = module.save_checkpoint
    saves = []

    def save_then_die(*args, **kw):
        real(*args, **kw)
        saves.append(1)
        if len(saves) == after:
            raise SystemExit(f"killed right after checkpoint {after}")

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(SystemExit):
            run()
    finally:
        monkeypatch.setattr(module, "save_checkpoint", real)
