"""Loading a VLM + processor from an HF folder (the tiny built-in one or any Qwen2/2.5-VL), and saving.

One loader for every folder: `AutoModelForImageTextToText` + `AutoProcessor`. Saving is atomic: a
checkpoint folder is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from training.atomic import atomic_dir


def load_processor(path: str | os.PathLike, *, padding_side: str = "left"):
    proc = AutoProcessor.from_pretrained(str(path))
    proc.tokenizer.padding_side = padding_side
    return proc


def load_vlm(path: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu", train: bool = False):
    """(model, processor) from an HF folder. dtype: 'float32' | 'bfloat16' | 'float16'."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model folder (no config.json)")
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.to(device)
    model.train(train)
    return model, load_processor(path)


def save_vlm(model, processor, out: str | os.PathLike) -> Path:
    """Save model + processor in HF layout (safetensors), atomically."""
    def write(d: Path) -> None:
        model.save_pretrained(d)
        processor.save_pretrained(d)
        src = getattr(model, "name_or_path", None)
        if src and Path(src, "vlrl_tiny.json").is_file():
            shutil.copy(Path(src, "vlrl_tiny.json"), d / "vlrl_tiny.json")
    return atomic_dir(out, write)
