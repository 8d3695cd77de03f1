"""Run hygiene shared by every trainer: metrics (JSONL + TensorBoard), atomic checkpoints, resume.

Checkpoint layout under a run folder:
    checkpoints/step-000100/{model files..., trainer_state.pt}
    checkpoints/latest            (text: the name of the newest complete checkpoint)
A checkpoint folder is complete once renamed into place; `latest` is replaced atomically after.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training.atomic import atomic_dir, write_lines, write_text
from training.config import config_changes, to_dict


class MetricsLog:
    """Appends one JSON object per step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, *, name: str = "metrics.jsonl", tensorboard: bool = True):
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may be absent
                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any], *, rows: list[dict] | None = None) -> None:
        """One row {step, time, **metrics}; or, with `rows`, one line per row tagged with the step."""
        stamp = {"step": step, "time": round(time.time(), 3)}
        with open(self.path, "a") as f:
            for row in rows if rows is not None else [metrics]:
                f.write(json.dumps({**stamp, **row}) + "\n")
        if rows is not None:
            return
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be logged again)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_lines(self.path, (line + "\n" for line in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def periodic(step: int, every: int) -> bool:
    """True on every `every`-th step (never when every is 0)."""
    return bool(every) and step % every == 0


def over_budget(t_start: float, max_minutes: float) -> bool:
    """True once `max_minutes` of wall time have passed since t_start (never when it is 0)."""
    return bool(max_minutes) and (time.time() - t_start) / 60 >= max_minutes


def save_or_stop(step: int, *, steps: int, save_every: int, t_start: float, max_minutes: float,
                 checkpoint: Callable[[int], None], say: Callable[[str], None]) -> bool:
    """The end of a training step: checkpoint when the period comes, at the last step or when the
    time budget is spent; True (stop now) when it is spent, which `say` reports."""
    out_of_time = over_budget(t_start, max_minutes)
    if periodic(step, save_every) or step == steps or out_of_time:
        checkpoint(step)
    if out_of_time:
        say(f"time budget of {max_minutes} min reached at step {step}")
    return out_of_time


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ptr = Path(run_dir) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    ckpt = ptr.parent / ptr.read_text().strip()
    return ckpt if (ckpt / "trainer_state.pt").is_file() else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, write: Callable[[Path], dict], *, keep: int = 2) -> Path:
    """Write checkpoint `step` of the run: `write(folder)` saves the models and optimizers into the
    folder (each trainer its own way: an HF folder, or the shards of every rank) and returns the
    rest of the trainer state, saved with the step and the RNG in `trainer_state.pt`. The folder
    appears complete or not at all; checkpoints beyond the newest `keep` are removed."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:06d}"

    def write_all(d: Path) -> None:
        state = write(d)
        torch.save({**state, "step": step, "rng": rng_state()}, d / "trainer_state.pt")

    path = atomic_dir(root / name, write_all)
    write_text(root / "latest", name)
    ckpts = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def warn_changed_config(out: Path, cfg: Any, *, prefix: str = "") -> list[str]:
    """On a resume: print the settings that differ from those the run in `out` started with
    (`out/config.json`), since the steps already done keep theirs; returns those lines."""
    path = Path(out) / "config.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    # through JSON, so tuples compare as the lists the file holds
    changes = config_changes(old, json.loads(json.dumps(to_dict(cfg))))
    if changes:
        print(f"{prefix}resuming the run in {out} with settings other than it started with ({path}); the steps "
              "already done keep theirs (give another output folder to start afresh):\n  " + "\n  ".join(changes))
    return changes


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


def start_run(out: Path, ckpt: Path | None, cfg: Any, log: MetricsLog, load: Callable[[Path, dict], None]) -> int:
    """Resume from `ckpt` (`load(ckpt, trainer state)` restores the trainers; the RNG and the step
    come from the trainer state, log rows past it are dropped), or record the config of a fresh run
    in `out/config.json`. Returns the step to continue from."""
    if ckpt is None:
        write_text(Path(out) / "config.json", json.dumps(to_dict(cfg), indent=1))
        return 0
    warn_changed_config(out, cfg)
    state = load_trainer_state(ckpt)
    load(ckpt, state)
    set_rng_state(state["rng"])
    log.truncate_after(state["step"])
    print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"]
