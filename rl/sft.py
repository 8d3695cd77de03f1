"""Supervised fine-tuning of a VLM on image+text chat records, loss on assistant tokens only.

A compact loop of our own rather than TRL's SFTTrainer: TRL's assistant-only loss needs
`{% generation %}` markers that real Qwen2/2.5-VL templates lack, and we want the same atomic
checkpoints and exact resume (data position, RNG, optimizer) as the RL trainer.
"""
from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import torch



@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4                      # peak learning rate (3e-4 learns the tiny VLM; 2e-3 collapsed)
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.98)
    warmup_steps: int = 30                # linear warm-up from 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1             # final lr = lr * min_lr_ratio (cosine, linear)
    max_grad_norm: float = 1.0            # gradient clipping; 0 disables
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name prefix, the longest prefix wins; 0 freezes those
    parameters. Qwen2-VL's parts: `model.visual` (vision tower and merger), `model.language_model`,
    `lm_head` (a critic's are under `backbone.`). The tiny configs' SFT uses {model.visual: 3}."""

    def __post_init__(self):
        check_lr_scale(self.lr_scale)   # at load time; whether a prefix matches needs the model


def check_lr_scale(lr_scale: Mapping[str, float]) -> None:
    """Raise ConfigError for a negative lr multiplier (0 freezes; there is no sign flip)."""
    from rl.config import ConfigError
    for prefix, scale in lr_scale.items():
        if scale < 0:
            raise ConfigError(f"lr_scale.{prefix}: must be >= 0, got {scale}")


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


def check_task_weights(weights: Mapping[str, int]) -> None:
    """Raise ConfigError unless every weight is an integer >= 1 (SFT records, RL prompts)."""
    from rl.config import ConfigError
    bad = {t: w for t, w in weights.items() if not isinstance(w, int) or w < 1}
    if bad:
        raise ConfigError(f"task_weights must be integers >= 1, got {bad}")


def weighted_records(records: list, weights: Mapping[str, int]) -> list:
    """`records` with each record of task t repeated weights.get(t, 1) times, in a fixed order (the
    data position stays a pure function of the step). Weights are integers >= 1."""
    check_task_weights(weights)
    return [r for r in records for _ in range(weights.get(r.task, 1))]


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine/linear decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def batch_indices(n: int, step: int, micro: int, *, batch_size: int, grad_accum: int, seed: int) -> list[int]:
    """Record indices of micro-batch `micro` of optimizer step `step`: epochs of seeded permutations,
    so the data position is a pure function of the step (exact resume)."""
    start = (step * grad_accum + micro) * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        perm = _permutation(n, seed, epoch)
        out.append(perm[i])
    return out


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(idx)
    return idx


def optimizer_step(model, opt, sched, max_grad_norm: float) -> float:
    """Clip gradients (0: no clipping), step optimizer and schedule, clear grads; returns the norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(grad_norm)


def lr_groups(names: list[str], lr_scale: Mapping[str, float]) -> dict[float, list[str]]:
    """Parameter names grouped by their lr multiplier: the value of the longest prefix of `lr_scale`
    that matches the name at a dot boundary, else 1. Raises ConfigError for a negative multiplier or
    a prefix that matches no parameter (a typo would otherwise silently train everything at 1x)."""
    from rl.config import ConfigError

    def matches(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    check_lr_scale(lr_scale)
    for prefix in lr_scale:
        if not any(matches(n, prefix) for n in names):
            parts = sorted({".".join(n.split(".")[:2]) for n in names})
            raise ConfigError(f"lr_scale.{prefix}: matches no parameter of the model (its parts: {', '.join(parts)})")
    groups: dict[float, list[str]] = {}
    for name in names:
        hits = [p for p in lr_scale if matches(name, p)]
        groups.setdefault(float(lr_scale[max(hits, key=len)]) if hits else 1.0, []).append(name)
    return groups


def make_optimizer(model, cfg: OptimConfig, total_steps: int):
    """AdamW over the model's parameters (grouped by `cfg.lr_scale`; a 0 multiplier freezes its group:
    no gradient, no optimizer state) with the warm-up/decay schedule of `cfg`."""
    params = dict(model.named_parameters())
    groups = lr_groups(list(params), cfg.lr_scale)
    for name in groups.pop(0.0, []):
        params[name].requires_grad_(False)
    if not groups:
        from rl.config import ConfigError
        raise ConfigError("lr_scale: every parameter is frozen (multiplier 0); nothing would train")
    opt = torch.optim.AdamW([{"params": [params[n] for n in names], "lr": cfg.lr * scale}
                             for scale, names in sorted(groups.items())],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, total=total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio))
    return opt, sched


def train_sft(cfg: SFTConfig, *, resume: bool = True, progress: bool = True) -> Path:
    """Run SFT; returns the folder of the final model (`out/final`)."""
    from tqdm import tqdm

    from model.inputs import encode_sft
    from model.load import load_vlm, save_vlm
    from rl.data import load_images, load_records
    from rl.evaluate import eval_subset, evaluate, format_table, write_eval
    from rl.runlog import (MetricsLog, latest_checkpoint, over_budget, periodic, save_checkpoint,
                           start_or_resume)

    out = Path(cfg.out)
    records = weighted_records(load_records(cfg.data, require="target"), cfg.task_weights)
    eval_records = load_records(cfg.eval_data, require="prompt") if cfg.eval_data else []
    ckpt = latest_checkpoint(out) if resume else None
    torch.manual_seed(cfg.seed)
    model, processor = load_vlm(ckpt or cfg.model, dtype=cfg.dtype, train=True)
    opt, sched = make_optimizer(model, cfg.optim, cfg.steps)
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
            micro_batches.append(encode_sft(processor, [r.messages for r in recs], [load_images(r) for r in recs]))
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
