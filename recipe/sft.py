"""Supervised fine-tuning of a VLM on image/video + text chat records, loss on assistant tokens only.

A compact loop of our own rather than TRL's SFTTrainer: TRL's assistant-only loss needs
`{% generation %}` markers that real Qwen2/2.5-VL templates lack, and we want the same atomic
checkpoints and exact resume (data position, RNG, optimizer) as the RL trainer.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from model.inputs import encode_sft
from model.load import load_vlm, save_vlm
from records import VideoGeometry, load_media, load_records
from records.mixture import batch_indices, check_task_weights, weighted_records
from rewards.evaluate import eval_subset, evaluate, format_table, write_eval
from training.optim import OptimConfig, make_optimizer, optimizer_step
from training.runlog import MetricsLog, latest_checkpoint, over_budget, periodic, save_checkpoint, start_or_resume


@dataclass(frozen=True)
class SFTConfig:
    model: str = "runs/tiny/model"        # HF folder of the starting model
    data: str = "runs/tiny/data/sft.jsonl"  # SFT records (last message is the assistant's)
    eval_data: str | None = None          # prompt records for held-out eval during/after training
    out: str = "runs/tiny/sft"            # run folder: checkpoints/, final/, metrics.jsonl, tb/
    steps: int = 1000                     # optimizer steps
    batch_size: int = 32                  # records per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer step
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_every: int = 200                 # checkpoint period in steps (0: only at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0                   # held-out eval period in steps (0: only at the end)
    eval_limit: int = 0                   # records used by periodic evals (0: all)
    eval_max_new_tokens: int = 48
    log_every: int = 10
    seed: int = 0
    max_minutes: float = 0.0              # stop (and save) after this wall time; 0: no limit
    dtype: Literal["float32", "bfloat16"] = "float32"
    task_weights: dict[str, int] = field(default_factory=dict)
    """Records of a task appear this many times per epoch (default 1): a slow-to-learn task
    (grounding) gets more of the batches without drawing more distinct examples."""

    def __post_init__(self):
        check_task_weights(self.task_weights)   # at load time, with the config file's name


def encode_by_modality(processor, records, geometry: VideoGeometry) -> list[dict]:
    """SFT inputs of `records` (`encode_sft`), those with videos in a batch apart from the others: a
    batch pads every row to its longest, and a video prompt is several image prompts long. The loss
    is a token mean over the whole step, so the split changes the cost, not the result."""
    out = []
    for group in ([r for r in records if not r.videos], [r for r in records if r.videos]):
        if group:
            media = [load_media(r, r.messages, geometry=geometry) for r in group]
            out.append(encode_sft(processor, [m.messages for m in media], [m.images for m in media],
                                  [m.videos for m in media]))
    return out


def train_sft(cfg: SFTConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run SFT; returns the folder of the final model (`out/final`)."""
    out = Path(cfg.out)
    records = weighted_records(load_records(cfg.data, require="target"), cfg.task_weights)
    eval_records = load_records(cfg.eval_data, require="prompt") if cfg.eval_data else []
    ckpt = latest_checkpoint(out) if resume else None
    torch.manual_seed(cfg.seed)
    model, processor = load_vlm(ckpt or cfg.model, dtype=cfg.dtype, train=True)
    opt, sched = make_optimizer(model, cfg.optim, cfg.steps)
    geometry = VideoGeometry.of(processor)
    log = MetricsLog(out)
    step = start_or_resume(out, ckpt, cfg, log, opt, sched)

    def checkpoint(at: int) -> None:
        save_checkpoint(out, at, models={"policy": (model, processor)},
                        state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                        keep=cfg.keep_checkpoints)

    def run_eval(at: int, limit: int) -> dict:
        recs = eval_subset(eval_records, limit)
        table, gens = evaluate(model, processor, recs, max_new_tokens=cfg.eval_max_new_tokens)
        log.log(at, {f"eval/{t}/{k}": v for t, row in table.items() for k, v in row.items()
                     if k != "n" and v is not None})
        return table, gens

    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="sft", dynamic_ncols=True)
    tokens, losses = 0, []
    while step < cfg.steps:
        t0 = time.time()
        loss_sum, n_tok = 0.0, 0
        micro_batches = []
        for micro in range(cfg.grad_accum):
            recs = [records[i] for i in batch_indices(len(records), step, micro, batch_size=cfg.batch_size,
                                                       grad_accum=cfg.grad_accum, seed=cfg.seed)]
            micro_batches += encode_by_modality(processor, recs, geometry)
        total_tok = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
        for batch in micro_batches:
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            # Token-mean over the whole optimizer step (not per micro-batch): sum / total tokens.
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            loss = nll / max(1, total_tok)
            loss.backward()
            loss_sum += nll.detach().item()
            n_tok += int((target != -100).sum())
        if not math.isfinite(loss_sum):
            opt.zero_grad(set_to_none=True)
            log.log(step, {"train/skipped_nonfinite": 1})
            step += 1
            continue
        grad_norm = optimizer_step(model, opt, sched, cfg.optim.max_grad_norm)
        step += 1
        tokens += n_tok
        losses.append(loss_sum / max(1, n_tok))
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = {"train/loss": sum(losses) / len(losses), "train/lr": sched.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/step_s": time.time() - t0,
                       "train/tokens": tokens}
            log.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
            losses = []
        if eval_records and periodic(step, cfg.eval_every) and step < cfg.steps:
            table, _ = run_eval(step, cfg.eval_limit)
            bar.write(format_table(table, f"step {step}"))
        out_of_time = over_budget(t_start, cfg.max_minutes)
        if periodic(step, cfg.save_every) or step == cfg.steps or out_of_time:
            checkpoint(step)
        if out_of_time:
            bar.write(f"time budget of {cfg.max_minutes} min reached at step {step}")
            break
    bar.close()
    final = save_vlm(model, processor, out / "final")
    if eval_records:
        table, gens = run_eval(step, 0)
        write_eval(out / "eval.json", table, gens)
        print(format_table(table, f"held-out after SFT ({step} steps)"))
    log.close()
    return final
