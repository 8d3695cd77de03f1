"""The difficulty filter (`vlrl filter`): sample k responses per prompt with a model, score them with
the hybrid reward, write each prompt's pass rate into its record, keep the prompts inside the band.

Per prompt, by its task's reward route (rl.algos.difficulty has the statistics):
  verifier mode  the route has verifiers and some sample got a verdict: score_j = format-gated weighted
                 mean of the verifier parts (the RM left out; an abstaining sample counts 0, as its
                 RL reward would); pass_rate = mean_j score_j; keep iff low <= pass_rate <= high.
  RM mode        otherwise, when the route uses the reward model: keep iff std_j reward_j >= min_std.
                 pass_rate and difficulty are null (no rule answer to pass).
  no RM given    RM-routed prompts are not sampled; they go to the dropped file (reason
                 "no_reward_model") and a warning gives their count.

Outputs, each written atomically, for OUT = path/name.jsonl:
  path/name.jsonl           kept records, meta.pass_rate / meta.difficulty (/ meta.reward_std) set
  path/name.dropped.jsonl   the other records, the same meta plus meta.drop_reason
  path/name.filter.json     counts per task and reason, the pass-rate histogram before/after, timings
  path/name.filter.png      that histogram
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from recipe.sampling import load_reward_model, needs_rm, sample_and_score
from records import load_records, write_records
from rewards.inputs import verifier_score
from rl.algos import difficulty
from rollout.types import EngineConfig
from training.atomic import write_json


@dataclass(frozen=True)
class Verdict:
    """The filter's judgement of one prompt."""

    keep: bool
    reason: str                      # in_band | below_band | above_band | reward_spread | flat_reward | no_reward_model
    pass_rate: float | None = None   # verifier mode only
    reward_std: float | None = None  # RM mode only
    reward_mean: float | None = None


def judge_group(results: Sequence, route, *, low: float, high: float, min_std: float) -> Verdict:
    """Verdict of one prompt from the RewardResults of its k samples and its task's TaskRoute."""
    weights = [(vr.part, vr.weight) for vr in route.verifiers]
    scores = [verifier_score(r.parts, weights) for r in results] if weights else []
    verdicts = [s for s, r in zip(scores, results) if s is not None and r.parts.get("format")]
    if weights and (verdicts or not route.use_rm):
        rate = difficulty.pass_rate([0.0 if s is None else s for s in scores])
        if difficulty.in_band(rate, low=low, high=high):
            return Verdict(True, "in_band", pass_rate=rate)
        return Verdict(False, "below_band" if rate < low else "above_band", pass_rate=rate)
    rewards = [r.reward for r in results]
    std, mean = difficulty.score_std(rewards), sum(rewards) / len(rewards)
    keep = difficulty.select_by_spread([std], min_std=min_std)[0]
    return Verdict(keep, "reward_spread" if keep else "flat_reward", reward_std=std, reward_mean=mean)


def annotate(record, verdict: Verdict, *, dropped: bool):
    """A copy of the record with the verdict in its meta."""
    meta = {**record.meta, "pass_rate": verdict.pass_rate,
            "difficulty": None if verdict.pass_rate is None else 1.0 - verdict.pass_rate}
    if verdict.reward_std is not None:
        meta["reward_std"], meta["reward_mean"] = verdict.reward_std, verdict.reward_mean
    if dropped:
        meta["drop_reason"] = verdict.reason
    return dataclasses.replace(record, meta=meta)


def summarize(records, verdicts: Sequence[Verdict], *, k: int) -> dict:
    """Counts per task and reason, and the pass-rate histogram of verifier-scored prompts before
    (all of them) and after (the kept) the filter."""
    tasks: dict[str, Counter] = defaultdict(Counter)
    rates: dict[str, list[float]] = defaultdict(list)
    for rec, v in zip(records, verdicts):
        c = tasks[rec.task]
        c["total"] += 1
        c["kept" if v.keep else "dropped"] += 1
        c[v.reason] += 1
        if v.pass_rate is not None:
            rates[rec.task].append(v.pass_rate)
    edges = difficulty.histogram_edges(k)
    before = [v.pass_rate for v in verdicts if v.pass_rate is not None]
    after = [v.pass_rate for v in verdicts if v.pass_rate is not None and v.keep]
    per_task = {t: {**dict(sorted(c.items())), "kept": c["kept"], "dropped": c["dropped"],
                    "mean_pass_rate": (sum(rates[t]) / len(rates[t])) if rates[t] else None}
                for t, c in sorted(tasks.items())}
    return {
        "counts": {"total": len(verdicts), "kept": sum(v.keep for v in verdicts),
                   "dropped": sum(not v.keep for v in verdicts),
                   "by_reason": dict(sorted(Counter(v.reason for v in verdicts).items()))},
        "tasks": per_task,
        "histogram": {"edges": edges, "labels": [f"{j}/{k}" for j in range(k + 1)],
                      "before": difficulty.histogram(before, edges), "after": difficulty.histogram(after, edges)},
    }


def format_histogram(hist: dict) -> str:
    width = max(len(s) for s in hist["labels"])
    lines = [f"{'pass rate':>{max(9, width)}} {'before':>7} {'after':>7}"]
    for label, b, a in zip(hist["labels"], hist["before"], hist["after"]):
        lines.append(f"{label:>{max(9, width)}} {b:>7} {a:>7}")
    return "\n".join(lines)


def format_counts(summary: dict) -> str:
    lines = [f"{'task':<16} {'total':>6} {'kept':>6} {'dropped':>8} {'mean pass':>10}"]
    for task, row in summary["tasks"].items():
        mp = "-" if row["mean_pass_rate"] is None else f"{row['mean_pass_rate']:.3f}"
        lines.append(f"{task:<16} {row['total']:>6} {row['kept']:>6} {row['dropped']:>8} {mp:>10}")
    c = summary["counts"]
    lines.append(f"{'all':<16} {c['total']:>6} {c['kept']:>6} {c['dropped']:>8}")
    lines.append("dropped by reason: " + (", ".join(f"{r} {n}" for r, n in c["by_reason"].items()
                                                  if r not in ("in_band", "reward_spread")) or "none"))
    return "\n".join(lines)


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Where `vlrl filter --output OUT` writes: OUT and its siblings named after OUT's stem."""
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return {"kept": out, "dropped": out.with_name(stem + ".dropped.jsonl"),
            "summary": out.with_name(stem + ".filter.json"), "plot": out.with_name(stem + ".filter.png")}


def plot_histogram(hist: dict, path: Path, *, title: str) -> None:
    """Grouped bars before/after per pass-rate bin, written atomically (PNG)."""
    import matplotlib  # optional at import time: only plots need it (slow to import)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(hist["labels"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * n + 2), 3.2))
    x = list(range(n))
    ax.bar([i - 0.2 for i in x], hist["before"], width=0.4, label="before", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], hist["after"], width=0.4, label="kept", color="#2f6fb0")
    ax.set_xticks(x, hist["labels"])
    ax.set_xlabel("pass rate")
    ax.set_ylabel("prompts")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def run_filter(model: str, data: str, out: str, *, k: int, band: tuple[float, float], reward_cfg,
               engine: EngineConfig = EngineConfig(), replicas: int = 1, rm_path: str | None = None,
               min_std: float = 0.05, max_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
               progress: bool = True, route_key: str = "tasks") -> dict:
    """Filter `data` by difficulty under `model`; writes the outputs listed in the module docstring and
    returns the summary. route_key: where `reward_cfg`'s routes sit in its file (named by the error
    for a record of an unrouted task)."""
    t0 = time.perf_counter()
    low, high = band
    records = load_records(data, tasks=reward_cfg.known_tasks, route_key=route_key, require="prompt")
    rm = load_reward_model(rm_path)
    scorable = [i for i, r in enumerate(records) if rm is not None or not needs_rm(r, reward_cfg)]
    skipped = len(records) - len(scorable)
    if skipped:
        print(f"[filter] warning: {skipped} prompt(s) are routed to the reward model and no --rm was given: "
              f"not sampled, written to the dropped file (reason no_reward_model)")
    groups = sample_and_score(model, [records[i] for i in scorable], k=k, engine=engine, replicas=replicas,
                              reward_cfg=reward_cfg,
                              rm=rm, max_tokens=max_tokens, temperature=temperature, seed=seed, progress=progress)
    verdicts = [Verdict(False, "no_reward_model")] * len(records)
    for i, group in zip(scorable, groups):
        verdicts[i] = judge_group([s.result for s in group], reward_cfg.route(records[i].task),
                                  low=low, high=high, min_std=min_std)

    paths = output_paths(out)
    kept = [annotate(r, v, dropped=False) for r, v in zip(records, verdicts) if v.keep]
    dropped = [annotate(r, v, dropped=True) for r, v in zip(records, verdicts) if not v.keep]
    write_records(paths["kept"], kept)
    write_records(paths["dropped"], dropped)
    summary = {"model": str(model), "data": str(data), "output": str(paths["kept"]),
               "dropped_file": str(paths["dropped"]), "k": k, "band": [low, high], "min_std": min_std,
               "backend": engine.backend, "replicas": replicas, "max_tokens": max_tokens, "temperature": temperature,
               "seed": seed,
               **summarize(records, verdicts, k=k), "seconds": round(time.perf_counter() - t0, 1)}
    plot_histogram(summary["histogram"], paths["plot"],
                   title=f"pass rate over k={k} samples; band [{low:g}, {high:g}]")
    write_json(paths["summary"], summary)
    print(format_histogram(summary["histogram"]))
    print(format_counts(summary))
    print(f"[filter] kept {len(kept)} of {len(records)} -> {paths['kept']} (dropped -> {paths['dropped']}, "
          f"summary {paths['summary']}, {summary['seconds']} s)")
    return summary
