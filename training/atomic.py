"""Atomic writes: write a temporary sibling, fsync it, rename it over the target. A crash at any
moment leaves either the old file (or folder) or the new one, never a torn one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


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


def atomic_dir(final: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Run `write(tmp_dir)` then rename tmp_dir to `final` (replacing it). A crash leaves `final` intact."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
