"""Training the scalar reward model on preference records with the Bradley-Terry loss, and measuring its
held-out pairwise accuracy.

Our own loop rather than TRL's RewardTrainer, which is text-only; it follows `recipe.sft`'s shape (same
optimizer, schedule, data order as a pure function of the step, atomic checkpoints, exact resume).
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from tqdm import tqdm

from model.load import load_processor
from model.reward import RewardModel, encode_rm, solution_only
from records import DataError, VideoGeometry, load_media, load_records, message_text
from records.mixture import batch_indices
from rewards.preference import bradley_terry_loss
from training.atomic import atomic_dir
from training.optim import OptimConfig, make_optimizer, optimizer_step
from training.runlog import MetricsLog, latest_checkpoint, over_budget, periodic, save_checkpoint, start_or_resume
from verifiers.think_format import split_think


@dataclass(frozen=True)
class RMConfig:
    model: str = "runs/tiny/sft/final"    # folder to start from: a policy (fresh head) or an RM
    data: str = "runs/tiny/prefs/prefs_train.jsonl"        # preference records (chosen, rejected)
    eval_data: str | None = "runs/tiny/prefs/prefs_heldout.jsonl"  # held-out preference records
    out: str = "runs/tiny/rm"             # run folder: checkpoints/, final/, metrics.jsonl, tb/, eval.json
    steps: int = 300                      # optimizer steps
    batch_size: int = 16                  # pairs per micro-batch (2x sequences per forward)
    grad_accum: int = 1                   # micro-batches per optimizer step
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20))  # see rm.yaml
    pooling: Literal["last", "mean"] = "last"   # how values become one score (model.reward.pool_values)
    center_coef: float = 0.01             # weight of mean (r_c + r_r)^2: keeps rewards near 0 for sigmoid
    save_every: int = 100                 # checkpoint period in steps (0: only at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0                   # held-out eval period in steps (0: only at the end)
    eval_batch_size: int = 32             # pairs per eval forward
    log_every: int = 10
    seed: int = 0
    max_minutes: float = 0.0              # stop (and save) after this wall time; 0: no limit
    dtype: Literal["float32", "bfloat16"] = "float32"


def load_pairs(path: str | Path):
    """Preference records, each checked: chosen/rejected end with an assistant turn and differ."""
    records = load_records(path, require="preference")
    for rec in records:
        file, line = rec.source.rsplit(":", 1)
        for name in ("chosen", "rejected"):
            turns = getattr(rec, name)
            if turns[-1]["role"] != "assistant":
                raise DataError(file, int(line), f"{name}[{len(turns) - 1}].role",
                                f"the last {name} turn must be the assistant's, got {turns[-1]['role']!r}")
            text = message_text(turns[-1])
            if not text.strip() or ("<think>" in text and split_think(text) is None):
                raise DataError(file, int(line), name, "empty answer, or a think block without a solution after it")
        if rec.messages[-1]["role"] == "assistant":
            raise DataError(file, int(line), "messages", "a preference record's messages are the prompt only "
                                                         "(the answers go in chosen / rejected)")
        if _answer(rec.chosen) == _answer(rec.rejected):
            raise DataError(file, int(line), "rejected", "identical to chosen (after removing the think block)")
    return records


def _answer(turns: list[dict]) -> str:
    return solution_only(message_text(turns[-1]))


def _conversation(messages: list[dict], turns: list[dict]) -> list[dict]:
    """Prompt + the answer's turns, the last one reduced to its solution (what the RM sees in use)."""
    last = {"role": "assistant", "content": [{"type": "text", "text": _answer(turns)}]}
    return list(messages) + list(turns[:-1]) + [last]


def encode_pairs(processor, records) -> dict:
    """One batch of 2B sequences: the B chosen conversations, then the B rejected ones (images and
    videos as every stage reads them, `records.load_media`)."""
    media = [load_media(r, r.messages, geometry=VideoGeometry.of(processor)) for r in records]
    convs = ([_conversation(m.messages, r.chosen) for r, m in zip(records, media)]
             + [_conversation(m.messages, r.rejected) for r, m in zip(records, media)])
    images, videos = [m.images for m in media], [m.videos for m in media]
    return encode_rm(processor, convs, images + images, videos + videos)


def pair_rewards(rm, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from a batch made by `encode_pairs`."""
    device = next(rm.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in (
        "input_ids", "attention_mask", "response_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
        "video_grid_thw", "mm_token_type_ids")}
    rewards = rm(**inputs)  # (2B,)
    return rewards.chunk(2)


@torch.no_grad()
def evaluate_pairs(rm, processor, records: Sequence, *, batch_size: int = 32) -> dict:
    """Pairwise accuracy (r_c > r_r), mean margin and mean BT loss, overall and per `meta.corruption`."""
    was_training = rm.training
    rm.eval()
    margins, kinds = [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        r_c, r_r = pair_rewards(rm, encode_pairs(processor, chunk))
        margins += (r_c - r_r).tolist()
        kinds += [r.meta.get("corruption", "all") for r in chunk]
    rm.train(was_training)

    def summary(ms: list[float]) -> dict:
        t = torch.tensor(ms)
        loss, m = bradley_terry_loss(t, torch.zeros_like(t))
        return {"n": len(ms), "pairwise_accuracy": m["accuracy"].item(), "margin": m["margin"].item(),
                "loss": loss.item()}

    by_kind = defaultdict(list)
    for k, m in zip(kinds, margins):
        by_kind[k].append(m)
    out = summary(margins)
    if len(by_kind) > 1 or "all" not in by_kind:
        out["by_corruption"] = {k: summary(v) for k, v in sorted(by_kind.items())}
    return out


def train_rm(cfg: RMConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Train the RM; returns the final RM folder (`out/final`). Held-out results go to `out/eval.json`."""
    out = Path(cfg.out)
    records = load_pairs(cfg.data)
    eval_records = load_pairs(cfg.eval_data) if cfg.eval_data else []
    ckpt = latest_checkpoint(out) if resume else None
    torch.manual_seed(cfg.seed)
    rm = RewardModel.from_pretrained(ckpt or cfg.model, pooling=cfg.pooling, dtype=getattr(torch, cfg.dtype))
    processor = load_processor(ckpt or cfg.model)
    rm.train()
    opt, sched = make_optimizer(rm, cfg.optim, cfg.steps)
    log = MetricsLog(out)
    step = start_or_resume(out, ckpt, cfg, log, opt, sched)

    def checkpoint(at: int) -> None:
        save_checkpoint(out, at, models={"policy": (rm, processor)},
                        state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                        keep=cfg.keep_checkpoints)

    def run_eval(at: int) -> dict:
        result = evaluate_pairs(rm, processor, eval_records, batch_size=cfg.eval_batch_size)
        log.log(at, {f"eval/{k}": result[k] for k in ("pairwise_accuracy", "margin", "loss")})
        return result

    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="rm", dynamic_ncols=True)
    window: dict[str, list[float]] = defaultdict(list)
    while step < cfg.steps:
        t0 = time.time()
        for micro in range(cfg.grad_accum):
            recs = [records[i] for i in batch_indices(len(records), step, micro, batch_size=cfg.batch_size,
                                                       grad_accum=cfg.grad_accum, seed=cfg.seed)]
            r_c, r_r = pair_rewards(rm, encode_pairs(processor, recs))
            loss, metrics = bradley_terry_loss(r_c, r_r, center_coef=cfg.center_coef)
            (loss / cfg.grad_accum).backward()
            window["loss"].append(loss.item())
            for k, v in metrics.items():
                window[k].append(v.item())
        if not math.isfinite(window["loss"][-1]):
            opt.zero_grad(set_to_none=True)
            log.log(step, {"train/skipped_nonfinite": 1})
            step += 1
            continue
        grad_norm = optimizer_step(rm, opt, sched, cfg.optim.max_grad_norm)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
            row.update({"train/lr": sched.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                        "train/step_s": time.time() - t0})
            log.log(step, row)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['train/accuracy']:.2f}")
            window.clear()
        if eval_records and periodic(step, cfg.eval_every) and step < cfg.steps:
            result = run_eval(step)
            bar.write(f"step {step}: held-out pairwise accuracy {result['pairwise_accuracy']:.3f}")
        out_of_time = over_budget(t_start, cfg.max_minutes)
        if periodic(step, cfg.save_every) or step == cfg.steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            bar.write(f"time budget of {cfg.max_minutes} min reached at step {step}")
            break
    bar.close()

    def write_final(d: Path) -> None:
        rm.save_pretrained(d)
        processor.save_pretrained(d)

    final = atomic_dir(out / "final", write_final)
    if eval_records:
        result = {"step": step, "data": str(cfg.eval_data), **run_eval(step)}
        (out / "eval.json").write_text(json.dumps(result, indent=1))
        print(format_eval(result, f"held-out pairs after {step} RM steps"))
    log.close()
    return final


def format_eval(result: dict, title: str) -> str:
    lines = [title, f"  {'':8s} {'n':>5s} {'accuracy':>9s} {'margin':>8s}"]
    rows = [("all", result)] + list(result.get("by_corruption", {}).items())
    lines += [f"  {k:8s} {r['n']:5d} {r['pairwise_accuracy']:9.3f} {r['margin']:8.3f}" for k, r in rows]
    return "\n".join(lines)
