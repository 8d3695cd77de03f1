"""Visual grounding (registered as `grounding`): box IoU against the reference box, or a hit test
(the predicted point, or the whole predicted box, inside the reference box).

Box forms read from the response: `[x1, y1, x2, y2]`, `(x1,y1),(x2,y2)`, `<box>...</box>`,
`<|box_start|>(x1,y1),(x2,y2)<|box_end|>`; points: `(x, y)`, `[x, y]`, `<point>x y</point>`.
The answer is the one region written. Two different regions (two boxes, a box and a point, the
whole image and then a point) are a hedge and score 0; a region of a type the route does not
accept (`accept`: a point for a box question) scores 0 as well. Coordinates are pixels (inclusive
corners, as synth.suite's answers are), 0-1000 normalised (Seed1.5-VL / Qwen2-VL / Qwen3-VL /
InternVL style), converted with `Sample.image_sizes[0]`, or pixels of the image as the processor
resized it (Qwen2.5-VL; see verifiers.coords): the reference is then taken through that resize and
compared there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from verifiers.base import Sample, Score, register
from verifiers.hedging import distinct
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


Region = tuple[str, tuple[float, ...]]   # ("box", (x1, y1, x2, y2)) or ("point", (x, y))


def find_regions(text: str) -> list[tuple[Region, int, int]]:
    """Every region written in `text` with its span, in order: tagged regions, then untagged boxes,
    then untagged points, each outside the spans already taken (the corners of "(x1,y1),(x2,y2)"
    are one box, not two points)."""
    text = text[-MAX_CHARS:]
    found: list[tuple[Region, int, int]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for _, s, e in found)

    for m in _TAGGED.finditer(text):
        nums = tuple(float(n) for n in _NUMBER.findall(m.group(2)))
        if len(nums) in (2, 4):
            found.append((("box" if len(nums) == 4 else "point", nums), m.start(), m.end()))
    for kind, patterns in (("box", _BOX_PATTERNS), ("point", _POINT_PATTERNS)):
        for pattern in patterns:
            for m in pattern.finditer(text):
                if free(m.start(), m.end()):
                    found.append(((kind, tuple(float(g) for g in m.groups())), m.start(), m.end()))
    return sorted(found, key=lambda r: r[1])


def parse_region(text: str) -> Region | None:
    """The last region written in `text`; None if none."""
    regions = find_regions(text)
    return regions[-1][0] if regions else None


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
    """mode "iou": 1 when the box's IoU >= iou_threshold (or the IoU itself when soft, the box still
    judged correct at IoU >= iou_threshold). mode "hit":
    1 when the point, or the whole box, lies in the reference box. accept: the answer types the
    question asks for; another type scores 0 (part `wrong_type`); iou mode accepts boxes only.
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
    accept: tuple[Literal["box", "point"], ...] | None = None   # answer types; None: (box,) for iou, (point, box) for hit

    def __post_init__(self):
        kinds = self.accepted
        if not kinds or set(kinds) - {"box", "point"}:
            raise ValueError(f"grounding: accept must list 'box' and/or 'point', got {self.accept!r}")
        if self.mode == "iou" and "point" in kinds:
            raise ValueError("grounding: a point has no IoU: mode 'iou' accepts only boxes (use mode 'hit' for points)")

    @property
    def accepted(self) -> tuple[str, ...]:
        if self.accept is None:
            return ("box",) if self.mode == "iou" else ("point", "box")
        return tuple(self.accept)

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        size = tuple(sample.image_sizes[0]) if sample.image_sizes else None
        ref = parse_region(str(sample.answer))
        if ref is None or ref[0] != "box":
            raise ValueError(f"grounding: reference {str(sample.answer)[:80]!r} is not a box")
        ref_box = _continuous(_to_pixels(ref[1], self.answer_coords, size), self.answer_coords)
        regions = distinct(region for region, _, _ in find_regions(sample.response))
        if not regions:
            return Score(0.0, {"parsed": 0.0})
        if len(regions) > 1:
            return Score(0.0, {"parsed": 1.0, "hedged": 1.0})
        kind, values = regions[0]
        if kind not in self.accepted:
            return Score(0.0, {"parsed": 1.0, "wrong_type": 1.0})
        coords = self._coords(values, size)
        if coords == "resized":
            # IoU and the hit test are invariant under scaling each axis: compare in the resized frame
            ref_box, coords = self._resized_frame(ref_box, size), "pixel"
        pixels = _to_pixels(values, coords, size)
        if kind == "point":
            x, y = pixels[0] + (0.5 if coords == "pixel" else 0.0), pixels[1] + (0.5 if coords == "pixel" else 0.0)
            hit = float(ref_box[0] <= x <= ref_box[2] and ref_box[1] <= y <= ref_box[3])
            return Score(hit, {"parsed": 1.0, "hit": hit})
        box = _continuous(pixels, coords)
        if self.mode == "hit":   # a box answers a point question when all of it lies in the reference box
            hit = float(ref_box[0] <= box[0] and ref_box[1] <= box[1] and box[2] <= ref_box[2] and box[3] <= ref_box[3])
            return Score(hit, {"parsed": 1.0, "hit": hit})
        overlap = iou(box, ref_box)
        right = overlap >= self.iou_threshold
        if self.soft:   # the reward is graded, the verdict still the threshold's
            return Score(overlap, {"parsed": 1.0, "iou": overlap}, correct=right)
        return Score(float(right), {"parsed": 1.0, "iou": overlap})

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
