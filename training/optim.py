"""The optimizer every trainer uses: AdamW over parameter groups with per-part learning-rate
multipliers, a warm-up/decay schedule, and one clipped optimizer step."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch

from training.config import ConfigError


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
    for prefix, scale in lr_scale.items():
        if scale < 0:
            raise ConfigError(f"lr_scale.{prefix}: must be >= 0, got {scale}")


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then cosine/linear decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


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
    """AdamW over the model's trainable parameters (grouped by `cfg.lr_scale`; a 0 multiplier
    freezes its group: no gradient, no optimizer state) with the warm-up/decay schedule of `cfg`.
    Parameters frozen already (a LoRA model's base) take no part; `lr_scale` prefixes may name them."""
    params = dict(model.named_parameters())
    groups = lr_groups(list(params), cfg.lr_scale)
    for name in groups.pop(0.0, []):
        params[name].requires_grad_(False)
    groups = {s: kept for s, names in groups.items() if (kept := [n for n in names if params[n].requires_grad])}
    if not groups:
        raise ConfigError("lr_scale: every parameter is frozen (multiplier 0); nothing would train")
    opt = torch.optim.AdamW([{"params": [params[n] for n in names], "lr": cfg.lr * scale}
                             for scale, names in sorted(groups.items())],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                            foreach=True)   # one kernel per op over all tensors: torch's default only on GPUs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, total=total_steps, warmup=cfg.warmup_steps, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio))
    return opt, sched
