"""Rejection-sampling fine-tuning (`vlrl rft`): sample k responses per prompt, keep the accepted ones
as SFT records, and SFT the next model on them (Seed1.5-VL's RFT round, after the difficulty filter).

Accepted samples of one prompt:
  verifier tasks   the format gate passed and a verifier judged it fully right (reward >= 1 - 1e-6,
                   `rewards.inputs.is_correct`) with an overlap (box IoU, interval tIoU, where a
                   verifier measures one) of at least `min_overlap`, the closest first, then in
                   sample order (a threshold verifier scores tIoU 0.5 as it scores 1.0);
  RM tasks         with --rm only: best-of-k, the one formatted sample of highest reward;
then exact duplicates (same text after stripping) are dropped and at most `max_per_prompt` kept.

Outputs in D (--output-dir): rft_sft.jsonl (one SFT record per accepted sample, id `<id>-rft<j>`, j
counting the prompt's accepted samples from 0; images relative to the file), rft.json (counts and
timings), and unless --no-train the SFT run D/sft (its final model in D/sft/final).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal, Sequence

from recipe.sampling import load_reward_model, needs_rm, sample_and_score
from recipe.sft import train_sft
from records import DataError, load_records, write_records
from rewards.inputs import is_correct, overlap
from rollout.types import EngineConfig
from training.atomic import write_json


def accept_samples(texts: Sequence[str], results: Sequence, *, mode: Literal["verifier", "best_of_k"],
                   max_per_prompt: int, min_overlap: float = 0.0) -> list[int]:
    """Indices of the accepted samples of one prompt (see the module docstring), at most max_per_prompt."""
    formatted = [j for j, r in enumerate(results) if r.parts.get("format", 0.0) >= 1.0]
    if mode == "verifier":
        right = [j for j in formatted if is_correct(results[j]) and overlap(results[j]) >= min_overlap]
        candidates = sorted(right, key=lambda j: -overlap(results[j]))   # stable: ties keep sample order
    elif mode == "best_of_k":
        candidates = sorted(formatted, key=lambda j: -results[j].reward)[:1]   # sorted is stable: ties -> first
    else:
        raise ValueError(f"mode {mode!r} is not 'verifier' or 'best_of_k'")
    seen, out = set(), []
    for j in candidates:
        key = texts[j].strip()
        if key in seen:
            continue
        seen.add(key)
        out.append(j)
        if len(out) >= max_per_prompt:
            break
    return out


def sft_record(record, text: str, j: int, *, reward: float):
    """The prompt's messages plus the accepted response as the assistant turn."""
    messages = [*record.prompt_messages, {"role": "assistant", "content": [{"type": "text", "text": text}]}]
    meta = {**record.meta, "rft": {"source_id": record.id, "reward": reward}}
    return dataclasses.replace(record, id=f"{record.id}-rft{j}", messages=messages, meta=meta)


def run_rft(model: str, data: str, out_dir: str, *, k: int, reward_cfg, sft_cfg=None,
            engine: EngineConfig = EngineConfig(), replicas: int = 1, rm_path: str | None = None,
            max_per_prompt: int = 4, min_overlap: float = 0.0, max_tokens: int = 64, temperature: float = 1.0,
            seed: int = 0, progress: bool = True, route_key: str = "tasks") -> dict:
    """Sample, accept, write D/rft_sft.jsonl and D/rft.json; then, when `sft_cfg` (an SFTConfig) is
    given, SFT `model` on the accepted records into D/sft (with `reward_cfg` as its routes). Returns
    the summary (rft.json). route_key: where `reward_cfg`'s routes sit in its file."""
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1, got {max_per_prompt}")
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must lie in [0, 1], got {min_overlap}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    records = load_records(data, tasks=reward_cfg.known_tasks, route_key=route_key, require="prompt")
    rm = load_reward_model(rm_path)
    # An RM-routed prompt is best-of-k'ed only with a reward model; a route with verifiers AND the RM
    # uses the verifier rule (a correct answer exists), the RM only entering its reward.
    use = [r for r in records if rm is not None or not needs_rm(r, reward_cfg)]
    skipped = len(records) - len(use)
    if skipped:
        print(f"[rft] warning: {skipped} prompt(s) are routed to the reward model and no --rm was given: skipped")
    groups = sample_and_score(model, use, k=k, engine=engine, replicas=replicas, reward_cfg=reward_cfg, rm=rm,
                              max_tokens=max_tokens, temperature=temperature, seed=seed, progress=progress)

    accepted, tasks = [], defaultdict(Counter)
    for rec, group in zip(use, groups):
        route = reward_cfg.route(rec.task)
        mode = "verifier" if route.verifiers else "best_of_k"
        texts, results = [s.completion.text for s in group], [s.result for s in group]
        keep = accept_samples(texts, results, mode=mode, max_per_prompt=max_per_prompt, min_overlap=min_overlap)
        c = tasks[rec.task]
        c["prompts"] += 1
        c["samples"] += len(group)
        c["formatted"] += sum(r.parts.get("format", 0.0) >= 1.0 for r in results)
        c["accepted"] += len(keep)
        c["prompts_with_accepted"] += bool(keep)
        accepted += [sft_record(rec, texts[j], n, reward=results[j].reward) for n, j in enumerate(keep)]
    used = {r.id for r in use}
    for rec in records:
        if rec.id not in used:
            tasks[rec.task]["skipped_no_reward_model"] += 1

    out.mkdir(parents=True, exist_ok=True)
    sft_path = out / "rft_sft.jsonl"
    write_records(sft_path, accepted)
    summary = {"model": str(model), "data": str(data), "sft_data": str(sft_path), "k": k,
               "max_per_prompt": max_per_prompt, "min_overlap": min_overlap, "backend": engine.backend, "replicas": replicas,
               "max_tokens": max_tokens, "seed": seed,
               "counts": {"prompts": len(records), "sampled": len(use), "skipped_no_reward_model": skipped,
                          "samples": len(use) * k, "accepted": len(accepted),
                          "prompts_with_accepted": sum(c["prompts_with_accepted"] for c in tasks.values())},
               "tasks": {t: dict(c) for t, c in sorted(tasks.items())},
               "seconds_sampling": round(time.perf_counter() - t0, 1), "sft": None}
    write_json(out / "rft.json", summary)
    print(format_counts(summary))
    print(f"[rft] {len(accepted)} accepted samples from {summary['counts']['prompts_with_accepted']} of "
          f"{len(records)} prompts -> {sft_path}")
    if sft_cfg is None:
        return summary
    if not accepted:
        raise DataError(data, 0, "records", "no sample was accepted: nothing to fine-tune on "
                                            "(try a larger --k or --max-tokens, or a stronger --model)")
    scfg = dataclasses.replace(sft_cfg, model=str(model), data=str(sft_path), out=str(out / "sft"), reward=reward_cfg)
    final = train_sft(scfg, progress=progress)
    summary["sft"] = {"out": scfg.out, "final": str(final), "steps": scfg.steps}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "rft.json", summary)
    print(f"[rft] next model: {final}")
    return summary


def format_counts(summary: dict) -> str:
    lines = [f"{'task':<16} {'prompts':>8} {'samples':>8} {'formatted':>10} {'accepted':>9} {'prompts ok':>11}"]
    for task, c in summary["tasks"].items():
        lines.append(f"{task:<16} {c.get('prompts', 0):>8} {c.get('samples', 0):>8} {c.get('formatted', 0):>10} "
                     f"{c.get('accepted', 0):>9} {c.get('prompts_with_accepted', 0):>11}"
                     + (f"  ({c['skipped_no_reward_model']} skipped: no --rm)" if c.get("skipped_no_reward_model") else ""))
    return "\n".join(lines)
