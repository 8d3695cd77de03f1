"""Training the scalar reward model on preference records with the Bradley-Terry loss, and measuring its
held-out pairwise accuracy.

Our own loop rather than TRL's RewardTrainer, which is text-only; it follows `recipe.sft`'s shape (same
optimizer, schedule, data order as a pure function of the step, atomic checkpoints, exact resume).
"""
from __future__ import annotations

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
from training.atomic import atomic_dir, write_json
from training.config import ConfigError, check_input
from training.distributed import (FSDPConfig, all_reduce_floats, full_state_dict, gather_dicts, is_sharded, padded_chunks,
                                  rank, shard_rows, world_size)
from training.optim import OptimConfig
from training.placement import Handle, WorkerGroup, spawn, start_ray_once, stop_ray
from training.runlog import MetricsLog, latest_checkpoint, periodic, save_checkpoint, save_or_stop, start_run
from training.trainer import Trainer, device, set_threads
from verifiers.think_format import split_think


@dataclass(frozen=True)
class RMConfig:
    model: str = ""                       # folder to start from: a policy (fresh head) or an RM (required)
    data: str = ""                        # preference records, chosen and rejected (required)
    eval_data: str | None = None          # held-out preference records
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
    workers: int = 1                      # ranks of an FSDP2 group (Ray actors) sharing each batch; 1: this process
    gpus_per_worker: float = 0.0          # GPUs per rank, on a GPU cluster
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self):
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")


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
    found: dict[int, float] = {}   # each rank of a sharded RM scores its share of the pairs
    mine = shard_rows(range(len(records)), rank=rank(), world=world_size())
    for rows, real in padded_chunks(mine, batch_size, total=len(records), world=world_size()):
        r_c, r_r = pair_rewards(rm, encode_pairs(processor, [records[i] for i in rows]))
        if real:
            found.update(zip(rows, (r_c - r_r).tolist()))
    rm.train(was_training)
    found = gather_dicts(found)
    margins = [found[i] for i in range(len(records))]
    kinds = [r.meta.get("corruption", "all") for r in records]

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


class RMWorker(Trainer):
    """One rank of reward-model training: the RM and its optimizer; `train_step(step)` trains on the
    rank's share of that step's pairs (the batch is a pure function of the step)."""

    def __init__(self, cfg: RMConfig, start: str):
        set_threads()
        torch.manual_seed(cfg.seed)
        self.cfg, self.device = cfg, device()
        self.records = load_pairs(cfg.data)
        self.model = RewardModel.from_pretrained(start, pooling=cfg.pooling, dtype=torch.float32).to(self.device)
        self.processor = load_processor(start)
        self.model.train()
        self._setup(optim=cfg.optim, total_steps=cfg.steps, dtype=cfg.dtype, fsdp=cfg.fsdp,
                    checkpointed=self.model.critic.backbone)

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step of the Bradley-Terry loss, a mean over the step's pairs: each rank's
        share weighs its pairs' count over the micro-batch's (FSDP averages the ranks' gradients,
        hence the world size). Returns the step's mean loss and metrics per micro-batch (summed
        over micro-batches), the gradient norm, and whether a non-finite loss skipped the step."""
        cfg = self.cfg
        sums: dict[str, float] = defaultdict(float)
        for micro in range(cfg.grad_accum):
            idx = batch_indices(len(self.records), step, micro, batch_size=cfg.batch_size,
                                grad_accum=cfg.grad_accum, seed=cfg.seed)
            mine = shard_rows(idx, rank=self.rank, world=self.world)
            with self._autocast():   # a rank without pairs of its own pads with a pass that counts for nothing
                r_c, r_r = pair_rewards(self.model, encode_pairs(self.processor, [self.records[i] for i in mine or idx[:1]]))
            loss, metrics = bradley_terry_loss(r_c.float(), r_r.float(), center_coef=cfg.center_coef)
            share = len(mine) / len(idx)                  # 1 on a single rank
            (loss * (share * self.world / cfg.grad_accum)).backward()
            sums["loss"] += loss.item() * share
            for k, v in metrics.items():
                sums[k] += v.item() * share
        sums = all_reduce_floats(dict(sums))
        if not math.isfinite(sums["loss"]):
            self.opt.zero_grad(set_to_none=True)
            return {**sums, "skipped": 1.0}
        return {**sums, "grad_norm": self._step(), "lr": self.sched.get_last_lr()[0], "skipped": 0.0}

    def evaluate(self, records: Sequence, batch_size: int) -> dict:
        with self._autocast():
            return evaluate_pairs(self.model, self.processor, records, batch_size=batch_size)

    def export(self, path: str) -> None:
        """Write the RM folder (rank 0 writes; every rank must call it)."""
        sd = full_state_dict(self.model)
        if self.rank == 0:
            self.model.save_pretrained(path, state_dict=sd if is_sharded(self.model) else None)
            self.processor.save_pretrained(path)


def train_rm(cfg: RMConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Train the RM; returns the final RM folder (`out/final`). Held-out results go to `out/eval.json`.
    With `workers` > 1 the RM is sharded over a group of Ray actors."""
    check_input("model", cfg.model, kind="model")
    check_input("data", cfg.data, kind="data")
    check_input("eval_data", cfg.eval_data, kind="data", required=False)
    out = Path(cfg.out)
    load_pairs(cfg.data)   # a bad record stops the run before any worker starts
    eval_records = load_pairs(cfg.eval_data) if cfg.eval_data else []
    ckpt = latest_checkpoint(out) if resume else None
    own_ray = cfg.workers > 1 and start_ray_once()
    worker: Handle[RMWorker] | WorkerGroup[RMWorker] = spawn(
        RMWorker, cfg, cfg.model, workers=cfg.workers, use_ray=cfg.workers > 1, num_gpus=cfg.gpus_per_worker)
    log = MetricsLog(out)
    step = start_run(out, ckpt, cfg, log, lambda c, state: worker.load_state(str(c / "model"), state["model"]).result())

    def checkpoint(at: int) -> None:
        save_checkpoint(out, at, lambda d: {"model": worker.save_state(str(d / "model")).result()},
                        keep=cfg.keep_checkpoints)

    def run_eval(at: int) -> dict:
        result = worker.evaluate(eval_records, cfg.eval_batch_size).result()
        log.log(at, {f"eval/{k}": result[k] for k in ("pairwise_accuracy", "margin", "loss")})
        return result

    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="rm", dynamic_ncols=True)
    window: dict[str, list[float]] = defaultdict(list)
    try:
        while step < cfg.steps:
            t0 = time.time()
            m = worker.train_step(step).result()
            if m["skipped"]:
                log.log(step, {"train/skipped_nonfinite": 1})
                step += 1
                continue
            for k in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected"):
                window[k].append(m[k] / cfg.grad_accum)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                row = {f"train/{k}": sum(v) / len(v) for k, v in window.items()}
                row.update({"train/lr": m["lr"], "train/grad_norm": m["grad_norm"], "train/step_s": time.time() - t0})
                log.log(step, row)
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['train/accuracy']:.2f}")
                window.clear()
            if eval_records and periodic(step, cfg.eval_every) and step < cfg.steps:
                result = run_eval(step)
                bar.write(f"step {step}: held-out pairwise accuracy {result['pairwise_accuracy']:.3f}")
            if save_or_stop(step, steps=cfg.steps, save_every=cfg.save_every, t_start=t_start,
                            max_minutes=cfg.max_minutes, checkpoint=checkpoint, say=bar.write):
                break
        bar.close()
        final = atomic_dir(out / "final", lambda d: worker.export(str(d)).result())
        if eval_records:
            result = {"step": step, "data": str(cfg.eval_data), **run_eval(step)}
            write_json(out / "eval.json", result)
            print(format_eval(result, f"held-out pairs after {step} RM steps"))
    finally:
        log.close()
        worker.kill()
        if own_ray:
            stop_ray()
    return final


def format_eval(result: dict, title: str) -> str:
    lines = [title, f"  {'':8s} {'n':>5s} {'accuracy':>9s} {'margin':>8s}"]
    rows = [("all", result)] + list(result.get("by_corruption", {}).items())
    lines += [f"  {k:8s} {r['n']:5d} {r['pairwise_accuracy']:9.3f} {r['margin']:8.3f}" for k, r in rows]
    return "\n".join(lines)
