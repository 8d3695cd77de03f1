"""Held-out evaluation: greedy decoding, then per task the training reward's mean and an accuracy,
both from the training route (`rewards.hybrid.score_batch`): one scorer for training and eval.

Per task: `reward` (mean reward of the responses; left out where the route's reward model or judge
was not given), `accuracy` (share of responses the route's verifiers judge correct,
`RewardResult.correct`; None for tasks without a rule answer, e.g. caption), `format` (share with
the think form) and, where the reward model scored them, `rm_score`. A held-out file may repeat a
prompt (a small kind of scene drawn many times): `distinct_accuracy` weighs each distinct prompt
once, next to `accuracy` over every record.
"""
from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from records import prompt_key
from rewards.config import RewardConfig
from rewards.hybrid import PairJudge, RewardInput, RewardModel, RewardResult, score_batch
from rewards.inputs import reward_input
from rewards.pool import VerifierPool
from rollout.greedy import generate_greedy
from training.atomic import write_json, write_jsonl
from verifiers import split_think

# inputs -> results: score_batch with a config, a pool, a reward model, a judge (or a reward worker's)
Scorer = Callable[[list[RewardInput]], list[RewardResult]]


@dataclass
class Generation:
    id: str
    task: str
    response: str
    answer: str | None
    formatted: bool
    correct: bool | None
    prompt: str = ""                # prompt_key: generations of one prompt share it
    reward: float | None = None     # the training reward; None where a component was not available
    rm: float | None = None         # the reward model's part, for RM-routed tasks


def local_scorer(reward_cfg: RewardConfig, *, rm: RewardModel | None = None, judge: PairJudge | None = None,
                 pool: VerifierPool | None = None) -> Scorer:
    """score_batch with `reward_cfg`. A route's reward model or judge that is not given is left out
    of the score, and that task's reward is then not reported (`judge` below)."""
    tasks = {t: dataclasses.replace(reward_cfg.route(t), use_rm=reward_cfg.route(t).use_rm and rm is not None,
                                    use_judge=reward_cfg.route(t).use_judge and judge is not None)
             for t in reward_cfg.known_tasks}
    cfg = dataclasses.replace(reward_cfg, tasks=tasks, builtin_routes=False)
    return lambda inputs: score_batch(inputs, cfg, rm=rm, pool=pool, judge=judge)


def eval_subset(records: Sequence, limit: int) -> list:
    """`limit` records spread evenly over `records` (all when limit is 0 or covers them): a held-out
    file grouped by task still gives every task its share in a periodic eval."""
    if not limit or limit >= len(records):
        return list(records)
    return [records[i * len(records) // limit] for i in range(limit)]


def judge(records, responses: Sequence[str], reward_cfg: RewardConfig | None = None, *, scorer: Scorer | None = None,
          groups: Sequence[int] | None = None) -> list[Generation]:
    """Score each response with the training route of its record's task. `scorer` defaults to the
    routes' verifiers in this process; `groups[i]` ties the samples of one prompt (the judge's group mode)."""
    cfg = reward_cfg or RewardConfig()
    scorer = scorer or local_scorer(cfg)
    groups = groups if groups is not None else [None] * len(records)
    results = scorer([reward_input(rec, resp, group=g) for rec, resp, g in zip(records, responses, groups)])
    gens = []
    for rec, resp, res in zip(records, responses, results):
        route = cfg.route(rec.task)
        complete = (not route.use_rm or "rm" in res.parts) and (not route.use_judge or "judge" in res.parts)
        gens.append(Generation(rec.id, rec.task, resp, rec.answer, split_think(resp) is not None, res.correct,
                               prompt_key(rec), res.reward if complete else None,
                               res.parts.get("rm") if route.use_rm else None))
    return gens


def summarize(gens: list[Generation]) -> dict[str, dict]:
    """{task: {n, format, accuracy (or None), reward?, rm_score?}} plus an 'all' row; with prompt keys,
    also `n_distinct` (distinct prompts) and, for judged tasks, `distinct_accuracy`: the mean over
    distinct prompts of each prompt's accuracy, so a prompt repeated nine times weighs as much as
    one seen once. `reward` is present where every response of the row has one."""
    by = defaultdict(list)
    for g in gens:
        by[g.task].append(g)
        by["all"].append(g)
    table = {}
    for task, gs in sorted(by.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        judged = [g.correct for g in gs if g.correct is not None]
        row = table[task] = {"n": len(gs), "format": sum(g.formatted for g in gs) / len(gs),
                             "accuracy": (sum(judged) / len(judged)) if judged else None}
        if all(g.reward is not None for g in gs):
            row["reward"] = sum(g.reward for g in gs) / len(gs)
        rms = [g.rm for g in gs if g.rm is not None]
        if rms and task != "all":
            row["rm_score"] = sum(rms) / len(rms)
        if all(g.prompt for g in gs):
            per_prompt = defaultdict(list)
            for g in gs:
                per_prompt[g.prompt].append(g.correct)
            row["n_distinct"] = len(per_prompt)
            judged_per_prompt = ([c for c in cs if c is not None] for cs in per_prompt.values())
            means = [sum(c) / len(c) for c in judged_per_prompt if c]
            if means:
                row["distinct_accuracy"] = sum(means) / len(means)
    return table


def add_sampled_scores(table: dict, records, samples: Sequence[Sequence[str]], reward_cfg, score=None, *,
                       scorer: Scorer | None = None) -> dict:
    """Add avg@k over every record's k sampled responses to `table`'s rows: `sampled_accuracy` for
    tasks with a rule answer, `sampled_rm_score` where the reward model scored them and
    `sampled_reward`. `scorer` scores (e.g. through a reward worker); else the routes' verifiers
    here plus `score`, a reward-model callable (see add_rm_scores). The sampled RM score is what RL
    maximises; the greedy one can swing on choices the policy makes near 50/50."""
    cfg = reward_cfg or RewardConfig()
    flat_records = [r for r, group in zip(records, samples) for _ in group]
    flat = [s for group in samples for s in group]
    groups = [i for i, group in enumerate(samples) for _ in group]
    sampled = summarize(judge(flat_records, flat, cfg, scorer=scorer or local_scorer(cfg, rm=score), groups=groups))
    for task, row in sampled.items():
        if row["accuracy"] is not None:
            table[task]["sampled_accuracy"] = row["accuracy"]
        if "rm_score" in row:
            table[task]["sampled_rm_score"] = row["rm_score"]
        if "reward" in row:
            table[task]["sampled_reward"] = row["reward"]
    return table


def add_rm_scores(table: dict, records, responses: Sequence[str], reward_cfg, score) -> dict:
    """Score the responses of RM-routed tasks again, now with the reward model: their rows get
    `rm_score` (its mean; an unformatted response scores 0, the gate applies) and `reward`.

    score: callable on a list of (image paths, prompt text, solution) -> list of floats.
    """
    routed = [(rec, resp) for rec, resp in zip(records, responses)
              if rec.task in reward_cfg.known_tasks and reward_cfg.route(rec.task).use_rm]
    if not routed:
        return table
    rows = summarize(judge([r for r, _ in routed], [x for _, x in routed], reward_cfg,
                           scorer=local_scorer(reward_cfg, rm=score)))
    for task, row in rows.items():
        if task != "all":
            table[task]["rm_score"] = row["rm_score"]
            if "reward" in row:
                table[task]["reward"] = row["reward"]
    return table


def repeats_prompts(row: dict) -> bool:
    """Whether a table row counts fewer distinct prompts than records (its file repeats some)."""
    return row.get("n_distinct", row.get("n", 0)) < row.get("n", 0)


def format_table(table: dict[str, dict], title: str = "") -> str:
    lines = [title] if title else []
    with_reward = any("reward" in row for row in table.values())
    with_rm = any("rm_score" in row for row in table.values())
    with_sampled = any("sampled_accuracy" in row for row in table.values())
    with_distinct = any(repeats_prompts(row) for row in table.values())
    w = max([12] + [len(t) for t in table])   # the task column fits the longest name ("spot_difference")
    lines.append(f"{'task':<{w}} {'n':>5} {'accuracy':>9} {'format':>7}" + (f" {'reward':>7}" if with_reward else "")
                 + (f" {'rm_score':>9}" if with_rm else "")
                 + (f" {'sampled':>8}" if with_sampled else "")
                 + (f" {'distinct prompts':>16}" if with_distinct else ""))
    for task, row in table.items():
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        line = f"{task:<{w}} {row['n']:>5} {acc:>9} {100 * row['format']:>6.1f}%"
        if with_reward:
            line += f" {row['reward']:>7.3f}" if "reward" in row else f" {'-':>7}"
        if with_rm:
            line += f" {row['rm_score']:>9.3f}" if "rm_score" in row else f" {'-':>9}"
        if with_sampled:
            if "sampled_accuracy" in row:
                line += f" {100 * row['sampled_accuracy']:>7.1f}%"
            else:
                line += f" {row['sampled_rm_score']:>8.3f}" if "sampled_rm_score" in row else f" {'-':>8}"
        if with_distinct:
            acc = f"{100 * row['distinct_accuracy']:.1f}% of " if "distinct_accuracy" in row else ""
            line += f" {acc + str(row.get('n_distinct', '-')):>16}"
        lines.append(line)
    return "\n".join(lines)


def evaluate(model, processor, records, *, batch_size: int = 64, max_new_tokens: int = 48,
             reward_cfg: RewardConfig | None = None, scorer: Scorer | None = None):
    """(table, generations) for prompt records: greedy answers scored by the training routes."""
    responses = generate_greedy(model, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    gens = judge(records, responses, reward_cfg, scorer=scorer)
    return summarize(gens), gens


def write_eval(out: str | os.PathLike, table: dict, gens: list[Generation]) -> None:
    """eval.json (the table) and generations.jsonl, each written atomically."""
    out = Path(out)
    write_json(out, table)
    write_jsonl(out.with_name(out.stem + ".generations.jsonl"), (g.__dict__ for g in gens))
