"""Configuration of the hybrid reward: per task, which verifiers (with weights and settings), whether
the reward model scores it, and whether the think-format gate applies; plus the verifier pool.

Built-in routes (DEFAULT_ROUTES) cover the synthetic and common tasks; `RewardConfig.tasks`
adds tasks or replaces a built-in route task by task. YAML:

    tasks:
      math: {verifiers: [{verifier: math, settings: {float_rounding: 4}}]}
      chart_qa: {verifiers: [{verifier: my_pkg/chart.py:ChartQA, weight: 0.7}], use_rm: true, rm_weight: 0.3}
    pool: {workers: 2, timeout_s: 10}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class VerifierRoute:
    verifier: str                       # registered name, entry-point name, or path/file.py:Name
    weight: float = 1.0                 # weight in the combination (see rewards.hybrid.combine)
    settings: dict[str, Any] = field(default_factory=dict)   # the verifier's dataclass fields
    name: str = ""                      # key of its part in the result; default: `verifier`

    @property
    def part(self) -> str:
        return self.name or self.verifier


@dataclass(frozen=True)
class TaskRoute:
    verifiers: tuple[VerifierRoute, ...] = ()
    use_rm: bool = False                # score the solution with the reward model as well
    rm_weight: float = 1.0              # weight of the reward model's score
    format_gate: bool = True            # no `<think>..</think>solution` form -> reward 0


@dataclass(frozen=True)
class PoolConfig:
    workers: int = 2                    # worker processes; 0 runs verifiers in-process (debugging, no timeout)
    timeout_s: float = 10.0             # per verifier call; over it the call scores 0 and its worker is replaced
    start_method: Literal["forkserver", "spawn"] = "forkserver"   # never fork: the parent may hold torch threads


def _route(verifier: str, **settings: Any) -> TaskRoute:
    return TaskRoute(verifiers=(VerifierRoute(verifier, settings=settings),))


DEFAULT_ROUTES: dict[str, TaskRoute] = {
    "counting": _route("counting"),
    "grounding": _route("grounding", mode="iou", iou_threshold=0.5),
    "math": _route("math"),
    "multiple_choice": _route("multiple_choice"),
    "instruction": _route("instruction"),
    "video_temporal": _route("temporal_grounding", mode="threshold", iou_threshold=0.5),
    "video_count": _route("counting"),
    "spot_difference": _route("grid_cell"),
    "puzzle": _route("multiple_choice"),
    "caption": TaskRoute(use_rm=True),
    "general": TaskRoute(use_rm=True),
}


@dataclass(frozen=True)
class RewardConfig:
    tasks: dict[str, TaskRoute] = field(default_factory=dict)   # added or replaced routes
    builtin_routes: bool = True         # start from DEFAULT_ROUTES
    pool: PoolConfig = field(default_factory=PoolConfig)

    def route(self, task: str) -> TaskRoute:
        """The route of `task`; KeyError when neither the config nor the built-ins know it."""
        if task in self.tasks:
            return self.tasks[task]
        if self.builtin_routes and task in DEFAULT_ROUTES:
            return DEFAULT_ROUTES[task]
        known = sorted(set(self.tasks) | (set(DEFAULT_ROUTES) if self.builtin_routes else set()))
        raise KeyError(f"no reward route for task {task!r} (known: {', '.join(known)})")
