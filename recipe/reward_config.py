"""The reward routes a command scores with, read from whichever config file holds them: a reward
config, the `reward` section of an RL or SFT config, or `rl.reward` of a pipeline config. So one
file routes a new task for `data check`, `sft`, `rl`, `eval`, `score`, `filter` and `rft` alike."""
from __future__ import annotations

from rewards.config import RewardConfig
from training.config import load_section

SECTIONS = ("reward", "rl.reward")


def load_reward_config(path: str | None, overrides: list[str] = ()) -> tuple[RewardConfig, str]:
    """(the routes, the dotted key their tasks sit under in `path`, e.g. "reward.tasks"). Overrides are
    relative to the routes' section (`pool.workers=0`). Without a file: the built-in routes."""
    cfg, key = load_section(RewardConfig, path, list(overrides), SECTIONS)
    if path is None:
        return cfg, "reward.tasks"
    return cfg, f"{key}.tasks" if key else "tasks"
