"""Image coordinate conventions of VLM answers, and the processor resize one of them refers to (pure math).

  pixel     pixels of the image as given, inclusive corners: a box [x1, y1, x2, y2] covers x1..x2
  norm1000  0-1000 of the image's width and height (Qwen2-VL, Qwen3-VL, Seed1.5-VL)
  resized   pixels of the image as the processor resized it, inclusive corners (Qwen2.5-VL)

Qwen-style processors resize an image so that both sides are multiples of `factor` (patch size x
merge size) and its area lies within [min_pixels, max_pixels], keeping the aspect ratio as far as
the rounding allows (`resized_size`). A model that answers in resized pixels never sees the image's
original size, so a reference in original pixels has to go through the same resize.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

Convention = Literal["pixel", "norm1000", "resized"]
CONVENTIONS: tuple[str, ...] = ("pixel", "norm1000", "resized")


def resized_size(width: int, height: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) of the image after the processor's resize: each side rounded to the nearest
    multiple of `factor`; if the area then exceeds max_pixels (falls below min_pixels), both sides
    are scaled down (up) by the same ratio and rounded down (up) to multiples of `factor`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    w, h = round(width / factor) * factor, round(height / factor) * factor   # 0 for a side under factor / 2
    if w * h > max_pixels:
        beta = math.sqrt(width * height / max_pixels)
        w = max(factor, math.floor(width / beta / factor) * factor)
        h = max(factor, math.floor(height / beta / factor) * factor)
    elif w * h < min_pixels:
        beta = math.sqrt(min_pixels / (width * height))
        w = math.ceil(width * beta / factor) * factor
        h = math.ceil(height * beta / factor) * factor
    return w, h


def encode_box(box: Sequence[int], convention: Convention, size: tuple[int, int], *, factor: int = 28,
               min_pixels: int = 56 * 56, max_pixels: int = 12_845_056) -> list[int]:
    """A box given in inclusive pixel corners of an image of `size` (width, height), written in
    `convention` (integers, as a model would write it). The resize settings apply to 'resized'.

    The box covers the continuous span [x1, x2 + 1) x [y1, y2 + 1); norm1000 writes that span's ends,
    resized writes the inclusive corners of the span scaled onto the resized image."""
    x1, y1, x2, y2 = box
    if convention == "pixel":
        return [int(x1), int(y1), int(x2), int(y2)]
    w, h = size
    if convention == "norm1000":
        return [round(x1 * 1000 / w), round(y1 * 1000 / h), round((x2 + 1) * 1000 / w), round((y2 + 1) * 1000 / h)]
    if convention == "resized":
        rw, rh = resized_size(w, h, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        sx, sy = rw / w, rh / h
        return [round(x1 * sx), round(y1 * sy), round((x2 + 1) * sx) - 1, round((y2 + 1) * sy) - 1]
    raise ValueError(f"unknown coordinate convention {convention!r}; choose from {CONVENTIONS}")
