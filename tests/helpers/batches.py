"""Rollout-shaped batches for tests of the trainer's passes: given prompts, random responses."""
from __future__ import annotations

import random

import torch

from rl.batch import RolloutBatch
from rollout.sequences import build_sequences
from rollout.types import Completion, Prompt


def random_response_batch(processor, prompts: list[Prompt], *, n: int = 2, seed: int = 0) -> RolloutBatch:
    """`n` responses of 3 to 30 random tokens per prompt, as one batch with random scores, a third
    of the rows correct and KL coefficient 0.05."""
    rng = random.Random(seed)
    completions = [[Completion([rng.randrange(100, 400) for _ in range(rng.randint(3, 30))], [0.0], "", "length")
                    for _ in range(n)] for _ in prompts]
    seq = build_sequences(processor, prompts, completions)
    rows = seq.rows
    g = torch.Generator().manual_seed(seed)
    return RolloutBatch(seq=seq, tasks=["counting"] * rows, task_id=torch.zeros(rows, dtype=torch.long),
                        scores=torch.rand(rows, generator=g), correct=torch.arange(rows) % 3 == 0,
                        kl_coef=torch.full((rows,), 0.05))
