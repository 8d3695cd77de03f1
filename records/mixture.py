"""Which records a step sees: task weights (a record of task t repeated w times per epoch), the data
order as a pure function of the step (exact resume), and seeded samples of a record list."""
from __future__ import annotations

import functools
import random
from typing import Mapping, Sequence

from training.config import ConfigError


def check_task_weights(weights: Mapping[str, int]) -> None:
    """Raise ConfigError unless every weight is an integer >= 1 (SFT records, RL prompts)."""
    bad = {t: w for t, w in weights.items() if not isinstance(w, int) or w < 1}
    if bad:
        raise ConfigError(f"task_weights must be integers >= 1, got {bad}")


def weighted_records(records: list, weights: Mapping[str, int]) -> list:
    """`records` with each record of task t repeated weights.get(t, 1) times, in a fixed order (the
    data position stays a pure function of the step). Weights are integers >= 1."""
    check_task_weights(weights)
    return [r for r in records for _ in range(weights.get(r.task, 1))]


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


def balanced_indices(tasks: Sequence[str], weights: Mapping[str, int], start: int, count: int, *,
                     seed: int) -> list[int]:
    """Positions start .. start+count-1 of a stream that deals slots to the tasks in turn, as indices
    into a pool whose record i is of task tasks[i]. A turn gives every task (sorted by name) one slot,
    and task t weights[t] slots in all, interleaved; each task draws its own records in seeded
    shuffled epochs. So any window of the stream holds each task's share to within one slot per
    weight, and the positions are pure functions of the stream index (exact resume)."""
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_task.setdefault(t, []).append(i)
    names = sorted(by_task)
    turn = [t for k in range(max((weights.get(t, 1) for t in names), default=1))
            for t in names if weights.get(t, 1) > k]
    out = []
    for pos in range(start, start + count):
        lap, slot = divmod(pos, len(turn))
        t = turn[slot]
        drawn = lap * turn.count(t) + turn[:slot].count(t)   # the task's own draws before this one
        epoch, i = divmod(drawn, len(by_task[t]))
        out.append(by_task[t][_permutation(len(by_task[t]), f"{seed}-{t}", epoch)[i]])
    return out


@functools.lru_cache(maxsize=64)   # the step and refill streams across an epoch edge, per task when balanced
def _permutation(n: int, seed: int | str, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(idx)
    return idx


def seeded_sample(records: list, n: int, *, seed: int) -> list:
    """n records drawn without replacement (all of them, shuffled, if n >= len), seeded."""
    return random.Random(seed).sample(records, min(n, len(records)))


def mix_replay(kept: list, pool: list, ratio: float, *, seed: int) -> list:
    """`kept` plus round(ratio * len(kept)) records of `pool` that are not in `kept` (by id), seeded."""
    ids = {r.id for r in kept}
    return kept + seeded_sample([r for r in pool if r.id not in ids], round(ratio * len(kept)), seed=seed)
