"""What every training worker shares (the RL actor and critic, SFT, the reward model): its place on
the device, sharding over the ranks of its group, mixed precision with float32 master weights, the
optimizer step, and sharded checkpoints.

A trainer keeps float32 weights and optimizer state whatever the compute dtype: a bfloat16 weight
updated at lr 1e-6 mostly rounds back to itself. With `dtype: bfloat16`, a sharded model computes
in bfloat16 through FSDP2's mixed-precision policy (gradients reduced in float32), an unsharded one
under autocast.

A model with adapters on a frozen base (LoRA, `model.lora`) checkpoints only what trains (the
adapters, a critic's value head) and their optimizer state: the base is the folder it started from.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from training.distributed import (FSDPConfig, full_state_dict, is_sharded, load_sharded, rank, save_sharded,
                                  scalar, shard_model, world_size)
from training.atomic import atomic_dir
from training.optim import OptimConfig, make_optimizer
from training.runlog import load_trainer_state


def set_threads() -> None:
    """One OpenMP thread per worker process unless the environment says otherwise."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def device() -> torch.device:
    """The GPU Ray (or CUDA_VISIBLE_DEVICES) gave this process, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Mixin of a worker that owns `self.model` (float32) and optionally its optimizer. Call
    `_setup` once the model is on `self.device`."""

    model: nn.Module
    device: torch.device

    def _setup(self, *, optim: OptimConfig | None, total_steps: int, dtype: str, fsdp: FSDPConfig,
               checkpointed: nn.Module | None = None, adapters: bool = False) -> None:
        """Shard over the group's ranks (when there are several), switch on activation
        checkpointing (on `checkpointed`, an HF model, default `self.model`) and build the optimizer;
        without `optim` the model is frozen. `adapters`: the model carries adapters on a frozen base,
        and checkpoints hold only the parameters trainable now (before any freezing here)."""
        self.rank, self.world = rank(), world_size()
        self.checkpoint_only = (frozenset(n for n, p in self.model.named_parameters() if p.requires_grad)
                                if adapters else None)
        self.compute_dtype = None if dtype == "float32" else getattr(torch, dtype)
        self.opt = self.sched = None
        if optim is not None and fsdp.grad_checkpointing:
            (checkpointed or self.model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.world > 1:
            shard_model(self.model, fsdp, compute_dtype=self.compute_dtype if optim is not None else None)
        if optim is not None:
            self.opt, self.sched = make_optimizer(self.model, optim, total_steps)
            self.max_grad_norm = optim.max_grad_norm
        else:
            self.model.requires_grad_(False)

    def _autocast(self):
        """Compute in the run's dtype: FSDP casts a sharded model's parameters itself; an unsharded
        trainer keeps float32 parameters and autocasts."""
        if self.compute_dtype is None or is_sharded(self.model) or self.opt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _step(self) -> float:
        """Clip the gradients (0: no clipping), step the optimizer and the schedule; the global norm."""
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or float("inf"))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return scalar(gn)

    def save_state(self, path: str) -> dict:
        """Every rank writes its shards of the weights and the optimizer state under `path`, and its
        RNG state (LoRA dropout draws from it); returns the scheduler state (for the trainer state file)."""
        save_sharded(path, self.model, self.opt, only=self.checkpoint_only)
        torch.save(_rng_state(), os.path.join(path, f"rng-{self.rank}.pt"))
        return {"scheduler": self.sched.state_dict() if self.sched is not None else None}

    def load_state(self, path: str, state: dict) -> None:
        """Restore what `save_state` wrote (with any number of ranks), the rank's RNG state (where
        a rank of that number wrote one) and the scheduler state."""
        load_sharded(path, self.model, self.opt, only=self.checkpoint_only)
        rng = os.path.join(path, f"rng-{self.rank}.pt")
        if os.path.isfile(rng):
            _set_rng_state(torch.load(rng, weights_only=False))
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])

    def export_checkpoint(self, ckpt: str | os.PathLike, key: str, out: str | os.PathLike) -> Path:
        """Load this trainer's part (`key`: "model", "actor", "critic") of the checkpoint folder
        `ckpt` and write it as an HF folder at `out`, atomically (`export` of the subclass)."""
        ckpt = Path(ckpt)
        self.load_state(str(ckpt / key), load_trainer_state(ckpt)[key])
        return atomic_dir(out, lambda d: self.export(str(d)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (other ranks: {}); every rank must call it."""
        return full_state_dict(self.model)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
