"""Held-out evaluation: greedy decoding, then per-task accuracy and format rate.

Accuracy uses the task's rule verifier on the solution part of a well-formatted response
(exact integer for counting, IoU >= 0.5 for grounding, equivalence for math). Tasks without a
rule answer (caption) report the format rate only (and a reward-model score when one is given).
A held-out file may repeat a prompt (a small kind of scene drawn many times): `distinct_accuracy`
weighs each distinct prompt once, next to `accuracy` over every record.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image

import verifiers
from records import prompt_key
from rewards.inputs import rm_prompt
from rollout.greedy import generate_greedy
from training.atomic import write_json, write_jsonl
from verifiers import Sample, split_think

# task -> (verifier name, settings) deciding "correct"; a score >= 0.5 counts as correct.
ACCURACY_CHECKS: dict[str, tuple[str, dict]] = {
    "counting": ("counting", {}),
    "grounding": ("grounding", {"mode": "hit", "iou_threshold": 0.5}),
    "math": ("math", {}),
    "multiple_choice": ("multiple_choice", {}),
    "instruction": ("instruction", {}),
    "video_temporal": ("temporal_grounding", {"mode": "threshold", "iou_threshold": 0.5}),
    "video_count": ("counting", {}),
    "spot_difference": ("grid_cell", {}),
    "puzzle": ("multiple_choice", {}),
}


@dataclass
class Generation:
    id: str
    task: str
    response: str
    answer: str | None
    formatted: bool
    correct: bool | None
    prompt: str = ""    # prompt_key: generations of one prompt share it


def eval_subset(records: Sequence, limit: int) -> list:
    """`limit` records spread evenly over `records` (all when limit is 0 or covers them): a held-out
    file grouped by task still gives every task its share in a periodic eval."""
    if not limit or limit >= len(records):
        return list(records)
    return [records[i * len(records) // limit] for i in range(limit)]


def add_sampled_scores(table: dict, records, samples: Sequence[Sequence[str]], reward_cfg, score=None) -> dict:
    """Add avg@k over every record's k sampled responses to `table`'s rows: `sampled_accuracy` for
    tasks with a rule answer and, given an RM `score` callable (see add_rm_scores),
    `sampled_rm_score` for RM-routed tasks. The sampled RM score is what RL maximises; the greedy
    one can swing on choices the policy makes near 50/50."""
    flat_records = [r for r, group in zip(records, samples) for _ in group]
    flat = [s for group in samples for s in group]
    sampled = summarize(judge(flat_records, flat))
    if score is not None:
        sampled = add_rm_scores(sampled, flat_records, flat, reward_cfg, score)
    for task, row in sampled.items():
        if row["accuracy"] is not None:
            table[task]["sampled_accuracy"] = row["accuracy"]
        if "rm_score" in row:
            table[task]["sampled_rm_score"] = row["rm_score"]
    return table


def judge(records, responses: Sequence[str]) -> list[Generation]:
    """Format and correctness of each response (pure: no model involved)."""
    checks = {}
    gens = []
    for rec, resp in zip(records, responses):
        parts = split_think(resp)
        correct = None
        if rec.task in ACCURACY_CHECKS and rec.answer is not None:
            if rec.task not in checks:
                name, settings = ACCURACY_CHECKS[rec.task]
                checks[rec.task] = verifiers.load(name, **settings)
            if parts is None:
                correct = False
            else:
                sizes = tuple(_image_size(p) for p in rec.images)
                score = checks[rec.task](Sample(rec.task, parts[1], rec.answer, sizes, rec.meta))
                correct = score.value is not None and score.value >= 0.5
        gens.append(Generation(rec.id, rec.task, resp, rec.answer, parts is not None, correct, prompt_key(rec)))
    return gens


@lru_cache(maxsize=4096)
def _image_size(path) -> tuple[int, int]:
    """(width, height) from the header; cached: avg@k judges each record's images k times."""
    with Image.open(path) as im:
        return im.size


def summarize(gens: list[Generation]) -> dict[str, dict]:
    """{task: {n, format, accuracy (or None)}} plus an 'all' row; with prompt keys, also
    `n_distinct` (distinct prompts) and, for judged tasks, `distinct_accuracy`: the mean over distinct
    prompts of each prompt's accuracy, so a prompt repeated nine times weighs as much as one seen once."""
    by = defaultdict(list)
    for g in gens:
        by[g.task].append(g)
        by["all"].append(g)
    table = {}
    for task, gs in sorted(by.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        judged = [g.correct for g in gs if g.correct is not None]
        row = table[task] = {"n": len(gs), "format": sum(g.formatted for g in gs) / len(gs),
                             "accuracy": (sum(judged) / len(judged)) if judged else None}
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


def repeats_prompts(row: dict) -> bool:
    """Whether a table row counts fewer distinct prompts than records (its file repeats some)."""
    return row.get("n_distinct", row.get("n", 0)) < row.get("n", 0)


def format_table(table: dict[str, dict], title: str = "") -> str:
    lines = [title] if title else []
    with_rm = any("rm_score" in row for row in table.values())
    with_sampled = any("sampled_accuracy" in row for row in table.values())
    with_distinct = any(repeats_prompts(row) for row in table.values())
    w = max([12] + [len(t) for t in table])   # the task column fits the longest name ("spot_difference")
    lines.append(f"{'task':<{w}} {'n':>5} {'accuracy':>9} {'format':>7}" + (f" {'rm_score':>9}" if with_rm else "")
                 + (f" {'sampled':>8}" if with_sampled else "")
                 + (f" {'distinct prompts':>16}" if with_distinct else ""))
    for task, row in table.items():
        acc = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        line = f"{task:<{w}} {row['n']:>5} {acc:>9} {100 * row['format']:>6.1f}%"
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


def add_rm_scores(table: dict, records, responses: Sequence[str], reward_cfg, score) -> dict:
    """Add `rm_score` (mean reward-model score of the greedy solutions, 0 for an unformatted
    response: the format gate applies) to the rows of tasks routed to the reward model.

    score: callable on a list of (image paths, prompt text, solution) -> list of floats.
    """
    items, owners = [], []
    for rec, resp in zip(records, responses):
        try:
            route = reward_cfg.route(rec.task)
        except KeyError:
            continue
        if route.use_rm:
            parts = split_think(resp)
            media, prompt = rm_prompt(rec)
            items.append((list(media), prompt, parts[1] if parts else resp))
            owners.append((rec.task, parts is not None))
    scores = list(score(items)) if items else []
    by = defaultdict(list)
    for (task, formatted), s in zip(owners, scores):
        by[task].append(float(s) if formatted else 0.0)
    for task, ss in by.items():
        table[task]["rm_score"] = sum(ss) / len(ss)
    return table


def evaluate(model, processor, records, *, batch_size: int = 64, max_new_tokens: int = 48):
    """(table, generations) for prompt records."""
    responses = generate_greedy(model, processor, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    gens = judge(records, responses)
    return summarize(gens), gens


def write_eval(out: str | os.PathLike, table: dict, gens: list[Generation]) -> None:
    """eval.json (the table) and generations.jsonl, each written atomically."""
    out = Path(out)
    write_json(out, table)
    write_jsonl(out.with_name(out.stem + ".generations.jsonl"), (g.__dict__ for g in gens))
