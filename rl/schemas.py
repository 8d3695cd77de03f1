"""Which config class a shipped YAML file belongs to, by its file name (used by tests and tools)."""
from __future__ import annotations

from pathlib import Path


def schema_for_config(path: str | Path) -> type:
    stem = Path(path).stem
    if stem.startswith("rl"):
        from rl.rl_config import RLConfig
        return RLConfig
    if stem.startswith("sft"):
        from rl.sft import SFTConfig
        return SFTConfig
    if stem.startswith("pipeline"):
        from rl.pipeline import PipelineConfig
        return PipelineConfig
    if stem.startswith("rm"):
        from rewards.rm_train import RMConfig
        return RMConfig
    if stem.startswith("reward"):
        from rewards.config import RewardConfig
        return RewardConfig
    raise KeyError(f"{path}: no config schema for files named {stem!r}")
