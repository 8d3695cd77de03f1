"""Visual grounding (registered as `grounding`): box IoU against the reference box, or a hit test
(the predicted point, or the predicted box's centre, inside the reference box).

Box forms read from the response (the last one wins): `[x1, y1, x2, y2]`, `(x1,y1),(x2,y2)`,
`<box>...</box>`, `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`; points: `(x, y)`, `[x, y]`,
`<point>x y</point>`. Coordinates are pixels (inclusive corners, as synth.suite's answers are),
0-1000 normalised (Seed1.5-VL / Qwen2-VL / Qwen3-VL / InternVL style), converted with
`Sample.image_sizes[0]`, or pixels of the image as the processor resized it (Qwen2.5-VL; see
verifiers.coords): the reference is then taken through that resize and compared there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from verifiers.base import Sample, Score, register
from verifiers.coords import resized_size

MAX_CHARS = 20_000   # only the tail of a longer response is searched
_N = r"\s*(-?\d{1,6}(?:\.\d{1,6})?)\s*"
_TAGGED = re.compile(r"<\|?(box|point)(?:_start\|)?>(.{0,200}?)<\|?/?(?:box|point)(?:_end\|)?>", re.S)
_BOX_PATTERNS = (
    re.compile(rf"\[{_N},{_N},{_N},{_N}\]"),
    re.compile(rf"\({_N},{_N},{_N},{_N}\)"),
    re.compile(rf"[\[(]{_N},{_N}[\])]\s*,?\s*(?:to|-)?\s*[\[(]{_N},{_N}[\])]"),
)
_POINT_PATTERNS = (re.compile(rf"[\[(]{_N},{_N}[\])]"),)
_NUMBER = re.compile(r"-?\d{1,6}(?:\.\d{1,6})?")

Box = tuple[float, float, float, float]


def parse_region(text: str) -> tuple[str, tuple[float, ...]] | None:
    """("box", (x1, y1, x2, y2)) or ("point", (x, y)) from the last region in `text`; None if none."""
    text = text[-MAX_CHARS:]
    tagged = None
    for tagged in _TAGGED.finditer(text):
        pass
    if tagged is not None:
        nums = tuple(float(n) for n in _NUMBER.findall(tagged.group(2)))
        if len(nums) == 4:
            return "box", nums
        if len(nums) == 2:
            return "point", nums
    best = None
    for kind, patterns in (("box", _BOX_PATTERNS), ("point", _POINT_PATTERNS)):
        for pattern in patterns:
            for m in pattern.finditer(text):
                # the rightmost region wins; at the same end a box beats the point inside it
                if best is None or m.end() > best[0]:
                    best = (m.end(), kind, tuple(float(g) for g in m.groups()))
    return (best[1], best[2]) if best else None


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two continuous boxes (x1, y1, x2, y2) with x1 <= x2, y1 <= y2."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _to_pixels(values: tuple[float, ...], coords: str, size: tuple[int, int] | None) -> tuple[float, ...]:
    if coords == "pixel":
        return values
    if size is None:
        raise ValueError("grounding: 0-1000 coordinates need Sample.image_sizes")
    w, h = size
    return tuple(v / 1000.0 * (w if i % 2 == 0 else h) for i, v in enumerate(values))


def _continuous(box: tuple[float, ...], coords: str) -> Box:
    """Sorted corners; inclusive pixel corners cover [x1, x2 + 1) x [y1, y2 + 1)."""
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    pad = 1.0 if coords == "pixel" else 0.0
    return x1, y1, x2 + pad, y2 + pad


@register("grounding")
@dataclass(frozen=True)
class Grounding:
    """mode "iou": 1 when IoU >= iou_threshold (or the IoU itself when soft); a predicted point
    scores by the hit test. mode "hit": 1 when the point / the box centre lies in the reference box.
    coords: the response's coordinates; "auto" reads 0-1000 when a value lies outside the image
    but within 1000, else pixels; "resized" reads pixels of the image resized by the processor
    whose settings are resize_factor (patch x merge), min_pixels and max_pixels.
    answer_coords: the reference's coordinates."""

    mode: Literal["iou", "hit"] = "iou"
    iou_threshold: float = 0.5
    soft: bool = False
    coords: Literal["pixel", "norm1000", "auto", "resized"] = "auto"
    answer_coords: Literal["pixel", "norm1000"] = "pixel"
    resize_factor: int = 28
    min_pixels: int = 56 * 56
    max_pixels: int = 12_845_056

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        size = tuple(sample.image_sizes[0]) if sample.image_sizes else None
        ref = parse_region(str(sample.answer))
        if ref is None or ref[0] != "box":
            raise ValueError(f"grounding: reference {str(sample.answer)[:80]!r} is not a box")
        ref_box = _continuous(_to_pixels(ref[1], self.answer_coords, size), self.answer_coords)
        pred = parse_region(sample.response)
        if pred is None:
            return Score(0.0, {"parsed": 0.0})
        kind, values = pred
        coords = self._coords(values, size)
        if coords == "resized":
            # IoU and the hit test are invariant under scaling each axis: compare in the resized frame
            ref_box, coords = self._resized_frame(ref_box, size), "pixel"
        pixels = _to_pixels(values, coords, size)
        if kind == "point" or self.mode == "hit":
            if kind == "box":
                box = _continuous(pixels, coords)
                pixels = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            x, y = pixels[0] + (0.5 if coords == "pixel" else 0.0), pixels[1] + (0.5 if coords == "pixel" else 0.0)
            hit = float(ref_box[0] <= x <= ref_box[2] and ref_box[1] <= y <= ref_box[3])
            return Score(hit, {"parsed": 1.0, "hit": hit})
        overlap = iou(_continuous(pixels, coords), ref_box)
        value = overlap if self.soft else float(overlap >= self.iou_threshold)
        return Score(value, {"parsed": 1.0, "iou": overlap})

    def _resized_frame(self, box: Box, size: tuple[int, int] | None) -> Box:
        """A continuous box of the original image mapped onto the image the processor resized."""
        if size is None:
            raise ValueError("grounding: resized coordinates need Sample.image_sizes")
        w, h = size
        rw, rh = resized_size(w, h, factor=self.resize_factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        sx, sy = rw / w, rh / h
        return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy

    def _coords(self, values: tuple[float, ...], size: tuple[int, int] | None) -> str:
        if self.coords != "auto":
            return self.coords
        if size is None or any(v < 0 or v > 1000 for v in values):
            return "pixel"
        w, h = size
        outside = any(v > (w if i % 2 == 0 else h) for i, v in enumerate(values))
        return "norm1000" if outside else "pixel"
