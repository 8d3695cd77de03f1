"""Configuration of the hybrid reward: per task, which verifiers (with weights and settings), whether
the reward model and the pairwise judge score it, and whether the think-format gate applies; plus
the verifier pool and the judge.

Built-in routes (DEFAULT_ROUTES) cover the synthetic and common tasks; `RewardConfig.tasks`
adds tasks or replaces a built-in route task by task. The tasks a run accepts in its data are
exactly the routed ones (`RewardConfig.known_tasks`). YAML:

    tasks:
      math: {verifiers: [{verifier: math, settings: {float_rounding: 4}}]}
      chart_qa: {verifiers: [{verifier: my_pkg/chart.py:ChartQA, weight: 0.7}], use_rm: true, rm_weight: 0.3}
      story: {use_judge: true}
    judge: {model: /models/judge, reference: answer}
    pool: {workers: 2, timeout_s: 10}

A route is checked when the config loads: its verifiers resolve, their settings are fields of the
verifier's dataclass and construct it, and a judged task has a judge model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from training.config import ConfigError
from verifiers.base import resolve


def check_verifier(spec: str, settings: dict[str, Any]) -> None:
    """ConfigError (naming `verifier` or `settings`) unless `spec` resolves to a verifier class that
    takes `settings`."""
    try:
        cls = resolve(spec)
    except Exception as e:  # a user's verifier file runs at import and may raise anything
        message = e.args[0] if isinstance(e, KeyError) and e.args else f"{type(e).__name__}: {e}"
        raise ConfigError(f"verifier: {message}") from None
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise ConfigError(f"settings: {', '.join(map(repr, unknown))} is not a setting of {spec!r} "
                              f"(settings: {', '.join(names) or 'none'})")
    try:
        cls(**settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"settings: {spec!r} refuses {dict(settings)}: {e}") from None


@dataclass(frozen=True)
class VerifierRoute:
    verifier: str                       # registered name, entry-point name, or path/file.py:Name
    weight: float = 1.0                 # weight in the combination (see rewards.hybrid.combine)
    settings: dict[str, Any] = field(default_factory=dict)   # the verifier's dataclass fields
    name: str = ""                      # key of its part in the result; default: `verifier`

    def __post_init__(self):
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0, got {self.weight}")
        check_verifier(self.verifier, dict(self.settings))

    @property
    def part(self) -> str:
        return self.name or self.verifier


@dataclass(frozen=True)
class TaskRoute:
    verifiers: tuple[VerifierRoute, ...] = ()
    use_rm: bool = False                # score the solution with the reward model as well
    rm_weight: float = 1.0              # weight of the reward model's score
    use_judge: bool = False             # score the solution with the pairwise judge as well (`judge`)
    judge_weight: float = 1.0           # weight of the judge's score
    format_gate: bool = True            # no `<think>..</think>solution` form -> reward 0


@dataclass(frozen=True)
class PoolConfig:
    workers: int = 2                    # worker processes; 0 runs verifiers in-process (debugging, no timeout)
    timeout_s: float = 10.0             # per verifier call; over it the call scores 0 and its worker is replaced
    start_method: Literal["forkserver", "spawn"] = "forkserver"   # never fork: the parent may hold torch threads


@dataclass(frozen=True)
class JudgeConfig:
    """The generative pairwise judge (rewards.judge.PairwiseJudge) of the routes with use_judge: a VLM
    asked which of two answers is better, in both orders. A sample's score is P(it is better)."""

    model: str = ""                     # judge VLM folder (HF layout)
    # answer: against the sample's reference (the record's answer, else meta["reference"]; none: abstain);
    # group: against each other sample of the same prompt (mean over them; a lone sample abstains)
    reference: Literal["answer", "group"] = "answer"
    batch_size: int = 8                 # sequences per judge forward
    answer_prefix: str = ""             # text after the generation prompt, before the verdict letter
    dtype: Literal["float32", "bfloat16"] = "float32"


def _route(verifier: str, **settings: Any) -> TaskRoute:
    return TaskRoute(verifiers=(VerifierRoute(verifier, settings=settings),))


DEFAULT_ROUTES: dict[str, TaskRoute] = {
    "counting": _route("counting"),
    "grounding": _route("grounding", mode="iou", iou_threshold=0.5, accept=("box",)),
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
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self):
        judged = sorted(t for t, r in self.tasks.items() if r.use_judge)
        if judged and not self.judge.model:
            raise ConfigError(f"judge.model: not set, but tasks {judged} use the judge (use_judge: true)")

    @property
    def known_tasks(self) -> frozenset[str]:
        """Every routed task: the ones records may name."""
        return frozenset(self.tasks) | (frozenset(DEFAULT_ROUTES) if self.builtin_routes else frozenset())

    @property
    def uses_judge(self) -> bool:
        return any(r.use_judge for r in self.tasks.values())

    def route(self, task: str) -> TaskRoute:
        """The route of `task`; KeyError when neither the config nor the built-ins know it."""
        if task in self.tasks:
            return self.tasks[task]
        if self.builtin_routes and task in DEFAULT_ROUTES:
            return DEFAULT_ROUTES[task]
        raise KeyError(f"no reward route for task {task!r} (routed: {', '.join(sorted(self.known_tasks))})")

    def with_verifier_settings(self, settings: Mapping[str, Mapping[str, Any]]) -> RewardConfig:
        """This config with `settings` ({verifier name: settings}) added to every route that uses
        that verifier, the built-in routes included, wherever the route does not set them itself:
        how a model's output conventions (its family's grounding coordinates) reach the verifiers
        without overriding what the config says."""
        routes = {**(DEFAULT_ROUTES if self.builtin_routes else {}), **self.tasks}
        changed = {}
        for task, route in routes.items():
            vrs = tuple(dataclasses.replace(vr, settings={**settings[vr.verifier], **vr.settings})
                        if vr.verifier in settings else vr for vr in route.verifiers)
            if vrs != route.verifiers:
                changed[task] = dataclasses.replace(route, verifiers=vrs)
        return dataclasses.replace(self, tasks={**self.tasks, **changed}) if changed else self
