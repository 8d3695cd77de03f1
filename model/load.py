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


def write_vlm(model, processor, folder: str | os.PathLike, *, state_dict: dict | None = None) -> Path:
    """Write model + processor in HF layout (safetensors) into `folder`; the weights from
    `state_dict` where given (e.g. gathered from shards)."""
    folder = Path(folder)
    model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
    processor.save_pretrained(folder)
    src = getattr(model, "name_or_path", None)
    if src and Path(src, "vlrl_tiny.json").is_file():
        shutil.copy(Path(src, "vlrl_tiny.json"), folder / "vlrl_tiny.json")
    return folder


def save_vlm(model, processor, out: str | os.PathLike) -> Path:
    """Save model + processor in HF layout (safetensors), atomically."""
    return atomic_dir(out, lambda d: write_vlm(model, processor, d))
