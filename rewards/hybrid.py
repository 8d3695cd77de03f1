"""The hybrid reward: format gate, routing to the task's verifiers, the reward model, the pairwise
judge, and the weighted combination, with every component reported.

Per sample (Seed1.5-VL, sec. on the hybrid reward system):
    gate:    route.format_gate and the response is not `<think>{thought}</think>{solution}` -> 0
    parts:   each verifier's value on {solution}; rm(images, prompt, {solution}) when route.use_rm;
             the judge's P({solution} better than its reference) when route.use_judge
    reward = sum_k w_k * v_k / sum_k w_k  over the components k that did not abstain
A verifier abstains by returning value None; a timeout or an error is a 0, not an abstention.
When every component abstains the reward is 0 and parts["abstained"] = 1. A route without the
gate still never shows a thought to its components (verifiers.strip_think).

`RewardResult.correct` is the one definition of a correct sample (RL's positive-example loss,
RFT's acceptance, held-out accuracy): the verifiers' verdict, see `verdict`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from rewards.config import JudgeConfig, RewardConfig, TaskRoute
from rewards.pool import Call, VerifierPool
from verifiers.base import Sample
from verifiers.think_format import split_think, strip_think

# rm(list of (images, prompt, solution)) -> one score per item, on the verifiers' scale
RewardModel = Callable[[list[tuple[Sequence[Any], str, str]]], Sequence[float]]
# judge(list of (images, prompt, x, y)) -> P(x better than y) per pair, both orders averaged
PairJudge = Callable[[list[tuple[Sequence[Any], str, str, str]]], Sequence[float]]


@dataclass(frozen=True)
class RewardInput:
    """One response to score. `images` go to the reward model as given (paths or PIL images, and a
    video record's clips); `prompt` is the prompt's text, or its messages (a video record's)."""

    task: str
    response: str
    answer: str | None = None
    prompt: str | list = ""
    images: tuple[Any, ...] = ()
    image_sizes: tuple[tuple[int, int], ...] = ()   # (width, height) per image, for grounding
    meta: Mapping[str, Any] = field(default_factory=dict)
    group: int | None = None            # the samples of one prompt share it (the judge's group mode)


@dataclass(frozen=True)
class RewardResult:
    reward: float
    parts: dict[str, float]             # format, one per verifier, rm, judge, timeout, error, abstained
    correct: bool | None = None         # the verifiers' verdict (see `verdict`); None: no verifier spoke


def combine(values: Sequence[tuple[float | None, float]]) -> float | None:
    """Weighted mean of (value, weight) over the non-abstaining values; None when all abstain.
    The weights renormalise over the components present: sum w v / sum w."""
    present = [(v, w) for v, w in values if v is not None and w > 0]
    total = sum(w for _, w in present)
    return sum(v * w for v, w in present) / total if total > 0 else None


def verdict(parts: Mapping[str, float], route: TaskRoute, rulings: Mapping[str, bool] | None = None) -> bool | None:
    """Correct when the gate passed and every weighted verifier of the route that spoke judged the
    answer right; wrong when one did not or the gate failed; None when the route has no verifier or
    every one abstained. A verifier judges right by its own verdict where it gave one (`rulings`,
    part -> Score.correct: a soft IoU's threshold), else by a value of 1, so with binary verifiers
    this is "the weighted mean of the verifiers is 1". The reward model and the judge never make a
    sample correct: they hold no rule answer."""
    if not route.verifiers:
        return None
    if not parts.get("format", 0.0):
        return False
    rulings = rulings or {}
    spoke = [(vr.part, parts.get(vr.part)) for vr in route.verifiers if vr.weight > 0 and parts.get(vr.part) is not None]
    if not spoke:
        return None
    return all(rulings.get(part, value >= 1.0 - 1e-6) for part, value in spoke)


def score_batch(samples: Sequence[RewardInput], cfg: RewardConfig, *, rm: RewardModel | None = None,
                pool: VerifierPool | None = None, judge: PairJudge | None = None) -> list[RewardResult]:
    """Score every sample. Verifiers run in `pool` (one in-process pool is used when None); the
    reward model and the judge are called once each, on the gated samples whose route uses them."""
    routes = [cfg.route(s.task) for s in samples]
    for flag, given, what in (("use_rm", rm, "reward model"), ("use_judge", judge, "judge")):
        if given is None and any(getattr(r, flag) for r in routes):
            missing = sorted({s.task for s, r in zip(samples, routes) if getattr(r, flag)})
            raise ValueError(f"tasks {missing} are routed to the {what}, but no {what} was given")
    solutions = [_gate(s.response, r) for s, r in zip(samples, routes)]

    calls, owners = [], []   # owners[k] = (sample index, verifier route)
    for i, (s, r, sol) in enumerate(zip(samples, routes, solutions)):
        if sol is None:
            continue
        sample = Sample(task=s.task, response=sol, answer=s.answer,
                        image_sizes=tuple(tuple(x) for x in s.image_sizes), meta=dict(s.meta or {}))
        for vr in r.verifiers:
            calls.append(Call(vr.verifier, dict(vr.settings), sample))
            owners.append((i, vr))
    own_pool = pool is None
    pool = pool or VerifierPool(workers=0)
    try:
        outcomes = pool.run(calls)
    finally:
        if own_pool:
            pool.close()

    rm_items = [i for i, (r, sol) in enumerate(zip(routes, solutions)) if r.use_rm and sol is not None]
    rm_scores: dict[int, float] = {}
    if rm_items:
        got = list(rm([(tuple(samples[i].images), samples[i].prompt, solutions[i]) for i in rm_items]))
        if len(got) != len(rm_items):
            raise ValueError(f"reward model returned {len(got)} scores for {len(rm_items)} items")
        rm_scores = {i: float(v) for i, v in zip(rm_items, got)}
    judged = [i for i, (r, sol) in enumerate(zip(routes, solutions)) if r.use_judge and sol is not None]
    judge_scores = judge_batch(samples, solutions, judged, cfg.judge, judge) if judged else {}

    per_sample: list[list[tuple[str, float | None, float, Any]]] = [[] for _ in samples]
    for (i, vr), o in zip(owners, outcomes):
        per_sample[i].append((vr.part, o.value, vr.weight, o))
    return [_result(r, sol, per_sample[i], rm_scores.get(i), judge_scores.get(i))
            for i, (r, sol) in enumerate(zip(routes, solutions))]


def judge_batch(samples: Sequence[RewardInput], solutions: Sequence[str | None], judged: Sequence[int],
                cfg: JudgeConfig, judge: PairJudge) -> dict[int, float | None]:
    """{sample index: judge score, or None to abstain} for the `judged` samples, from one judge call.

    reference "answer": P(solution better than the sample's reference answer).
    reference "group":  mean over the other judged samples j of its group of P(solution better than
                        j's); each unordered pair is judged once (both orders), P(j > i) = 1 - P(i > j).
    """
    pairs, owners = [], []   # owners[k]: the sample indices the pair k scores, (i,) or (i, j)
    if cfg.reference == "answer":
        for i in judged:
            s = samples[i]
            ref = s.answer if s.answer is not None else (s.meta or {}).get("reference")
            if ref is not None:
                pairs.append((tuple(s.images), s.prompt, solutions[i], str(ref)))
                owners.append((i,))
    else:
        groups: dict[int, list[int]] = defaultdict(list)
        for i in judged:
            if samples[i].group is not None:
                groups[samples[i].group].append(i)
        for members in groups.values():
            for a, i in enumerate(members):
                for j in members[a + 1:]:
                    pairs.append((tuple(samples[i].images), samples[i].prompt, solutions[i], solutions[j]))
                    owners.append((i, j))
    got = list(judge(pairs)) if pairs else []
    if len(got) != len(pairs):
        raise ValueError(f"judge returned {len(got)} verdicts for {len(pairs)} pairs")
    wins: dict[int, list[float]] = defaultdict(list)
    for owner, p in zip(owners, got):
        wins[owner[0]].append(float(p))
        if len(owner) == 2:
            wins[owner[1]].append(1.0 - float(p))
    return {i: (sum(wins[i]) / len(wins[i])) if wins[i] else None for i in judged}


def _gate(response: str, route: TaskRoute) -> str | None:
    """The solution the verifiers, the RM and the judge see; None when the gate rejects the response."""
    split = split_think(response)
    if split is not None:
        return split[1]
    return None if route.format_gate else strip_think(response)


def _result(route: TaskRoute, solution: str | None, verdicts: list, rm_score: float | None,
            judge_score: float | None) -> RewardResult:
    parts: dict[str, float] = {"format": float(solution is not None)}
    if solution is None:  # gated: nothing was called; every component is recorded as 0
        parts.update({vr.part: 0.0 for vr in route.verifiers})
        if route.use_rm:
            parts["rm"] = 0.0
        if route.use_judge:
            parts["judge"] = 0.0
        return RewardResult(0.0, parts, verdict(parts, route))
    values, rulings = [], {}
    for part, value, weight, outcome in verdicts:
        if value is not None:
            parts[part] = value
            if outcome.correct is not None:
                rulings[part] = outcome.correct
                parts[f"{part}/correct"] = float(outcome.correct)
        for name, p in outcome.parts.items():
            if name != part:
                parts.setdefault(f"{part}/{name}", p)
        if outcome.status != "ok":
            parts[outcome.status] = parts.get(outcome.status, 0.0) + 1.0
        values.append((value, weight))
    if rm_score is not None:
        parts["rm"] = rm_score
        values.append((rm_score, route.rm_weight))
    if judge_score is not None:
        parts["judge"] = judge_score
        values.append((judge_score, route.judge_weight))
    reward = combine(values)
    if reward is None:
        parts["abstained"] = 1.0
    return RewardResult(0.0 if reward is None else reward, parts, verdict(parts, route, rulings))
