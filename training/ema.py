"""An exponential moving average of a model's trainable parameters (Polyak averaging), kept beside
them on each rank: a sharded (FSDP2) parameter's average is the same shard of the average.

    avg <- decay * avg + (1 - decay) * param      after every optimizer step

The average starts at the parameters it is made from, so it needs no bias correction. RL on a
small model moves near-tied answers back and forth from step to step; the average over the last
~1 / (1 - decay) steps is the policy those steps agree on, and a stage that hands on the average
depends less on where its last few updates happened to leave the weights.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own tensor of a parameter: the local shard of a DTensor (its storage), else itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class ParamEMA:
    """The average of `model`'s parameters that require grad (LoRA: the adapters)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.avg = [_local(p).detach().clone() for p in self._params(model)]

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average towards the model's current parameters."""
        torch._foreach_lerp_(self.avg, [_local(p).detach() for p in self._params(model)], 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's parameters and the average, in place (twice restores both)."""
        for a, p in zip(self.avg, self._params(model)):
            p = _local(p)
            held = p.detach().clone()
            p.copy_(a)
            a.copy_(held)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """The model holds the average inside the block, its own parameters again after it."""
        self.swap(model)
        try:
            yield
        finally:
            self.swap(model)
