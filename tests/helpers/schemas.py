"""Which config class a shipped YAML file belongs to, by its file name (used by tests and tools)."""
from __future__ import annotations

from pathlib import Path

from recipe.pipeline import PipelineConfig
from recipe.sft import SFTConfig
from rewards.config import RewardConfig
from rewards.rm_train import RMConfig
from rl.config import RLConfig


def schema_for_config(path: str | Path) -> type:
    stem = Path(path).stem
    if stem.startswith("rl"):
        return RLConfig
    if stem.startswith("sft"):
        return SFTConfig
    if stem.startswith("pipeline"):
        return PipelineConfig
    if stem.startswith("rm"):
        return RMConfig
    if stem.startswith("reward"):
        return RewardConfig
    raise KeyError(f"{path}: no config schema for files named {stem!r}")
