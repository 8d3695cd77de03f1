"""The RL step's batch: the sampled rows as model inputs (`SequenceBatch`) and, per row and per
response token, what the driver computes about them. The batch owns row selection and micro-batch
splitting: each field says which axis it has, nothing is inferred from shapes.

Token-level tensors are on *label positions*: T = L - 1, position t scores input_ids[:, t + 1]
(causal-LM alignment), so `mask = seq.response_mask[:, 1:]`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from rollout.sequences import SequenceBatch

ROW = {"axis": "row"}      # (B,) or a list of B items
LABEL = {"axis": "label"}  # (B, T)


@dataclass
class RolloutBatch:
    """B = prompts x samples rows, prompt-major."""

    seq: SequenceBatch                                             # model inputs, (B, L)
    tasks: list[str] = field(metadata=ROW)                         # (B) task of each row
    task_id: Tensor = field(metadata=ROW)                          # (B,) index of the row's task in sorted(set(tasks))
    scores: Tensor = field(metadata=ROW)                           # (B,) hybrid reward of each sample
    correct: Tensor = field(metadata=ROW)                          # (B,) bool: a verifier judged it fully right
    kl_coef: Tensor = field(metadata=ROW)                          # (B,) KL coefficient of the row's task
    old_logp: Tensor | None = field(default=None, metadata=LABEL)  # (B, T) log pi_old(a|s), the behaviour policy
    ref_logp: Tensor | None = field(default=None, metadata=LABEL)  # (B, T) log pi_ref(a|s); None: no reference policy
    values: Tensor | None = field(default=None, metadata=LABEL)    # (B, T) V_old(s) of the critic before its update
    entropy: Tensor | None = field(default=None, metadata=LABEL)   # (B, T) policy entropy (a diagnostic)
    adv: Tensor | None = field(default=None, metadata=LABEL)       # (B, T) advantages
    returns: Tensor | None = field(default=None, metadata=LABEL)   # (B, T) critic targets (PPO)
    keep: Tensor | None = field(default=None, metadata=ROW)        # (B,) bool: rows the updates train on
    is_weight: Tensor | None = field(default=None, metadata=LABEL)  # (B, T) truncated IS weight of each token (TIS)

    @property
    def rows(self) -> int:
        return self.seq.rows

    @property
    def mask(self) -> Tensor:
        """(B, T) float, 1 on response tokens."""
        return self.seq.label_mask

    def select(self, rows: Sequence[int]) -> RolloutBatch:
        """The sub-batch of `rows` in that order, trimmed to its longest row (images included)."""
        rows = list(rows)
        idx = torch.as_tensor(rows, dtype=torch.long)
        seq = self.seq.select(rows)
        width = seq.input_ids.shape[1] - 1
        changes = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            axis = f.metadata.get("axis")
            if v is None or axis is None:
                continue
            if axis == "label":
                changes[f.name] = v[idx, :width]
            elif isinstance(v, Tensor):
                changes[f.name] = v[idx]
            else:
                changes[f.name] = [v[i] for i in rows]
        return dataclasses.replace(self, seq=seq, **changes)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch with its tensors on `device` (a no-op on the CPU)."""
        changes = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, seq=self.seq.to(device), **changes)

    def micro_batches(self, size: int, *, order: Sequence[int] | None = None) -> Iterator[RolloutBatch]:
        """Sub-batches of at most `size` rows, in `order` (default: row order)."""
        order = list(range(self.rows)) if order is None else list(order)
        for i in range(0, len(order), size):
            yield self.select(order[i:i + size])


def micro_batches(seq: SequenceBatch, size: int) -> Iterator[SequenceBatch]:
    """Row-order sub-batches of at most `size` rows of a `SequenceBatch` (forward passes only)."""
    for i in range(0, seq.rows, size):
        yield seq.select(range(i, min(i + size, seq.rows)))
