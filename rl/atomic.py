"""Atomic file writes: write a temporary sibling, fsync it, rename it over the target. A crash at
any moment leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_lines(path, [text])


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return write_lines(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
