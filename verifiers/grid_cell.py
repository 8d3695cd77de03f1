"""A cell of a grid (registered as `grid_cell`): the solution names the reference cell, e.g. for
"Which cell differs between the two boards?".

Cell forms read (case-insensitive): `row 2, column 3` (also `row 2 col 3`, `r2c3`) and `(2, 3)` as
(row, column). pick "unique" (default): every cell named must be the same one, so listing several
cells is a hedge and scores 0 (see verifiers.hedging); "last": the last cell named is the answer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from verifiers.base import Sample, Score, register
from verifiers.hedging import distinct

MAX_CHARS = 20_000
_CELL = re.compile(r"\brow\s*(\d{1,4})\s*(?:,|and)?\s*(?:column|col)\.?\s*(\d{1,4})\b"
                   r"|\br(\d{1,4})\s*c(\d{1,4})\b"
                   r"|\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)", re.I)


def read_cells(text: str) -> list[tuple[int, int]]:
    """Every (row, column) named in `text`, in order."""
    out = []
    for m in _CELL.finditer(text[-MAX_CHARS:]):
        g = [x for x in m.groups() if x is not None]
        out.append((int(g[0]), int(g[1])))
    return out


@register("grid_cell")
@dataclass(frozen=True)
class GridCell:
    """1 when the solution's cell (see `pick`) is the reference cell."""

    pick: Literal["unique", "last"] = "unique"

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        ref = read_cells(str(sample.answer))
        if len(ref) != 1:
            raise ValueError(f"grid_cell: reference {str(sample.answer)[:80]!r} is not one cell")
        cells = read_cells(sample.response)
        if not cells:
            return Score(0.0, {"parsed": 0.0})
        if self.pick == "unique" and len(distinct(cells)) > 1:
            return Score(0.0, {"parsed": 1.0, "hedged": 1.0})
        ok = float(cells[-1] == ref[0])
        return Score(ok, {"parsed": 1.0, "cell": ok})
