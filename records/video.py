"""Videos in records: where a video's frames come from, checking that it decodes and that its frame
counts agree, Seed1.5-VL's dynamic frame-resolution sampling (`plan_frames`, pure), and how a
sampled video becomes model input (`expand_video_parts`, `split_clips`).

A record's `videos` entries, paths relative to the JSONL file:
  "clip.mp4"                                            a video file, decoded with PyAV
  {"path": "clip.mp4", "num_frames": 48}                the same; `num_frames` (optional) must match
  {"path": "frames/", "fps": 2}                         a folder of frame images (name order) at `fps`
  {"path": "frames/", "times": [0, 0.5, ...]}           ... or with each frame's time in seconds
  {"frames": ["a.png", "b.png"], "times": [0, 0.5]}     a list of frames with their times (or `fps`)
A file's times are its frames' presentation times from its first frame; given times are used as given.

Model input (Qwen2-VL and its successors encode a video in temporal patches of 2 frames): the
sampled frames are cut into clips of one temporal patch each (the last one padded with its last
frame), and each clip goes in as its own video part preceded by the time of its first frame as
text, "[1.5 second]". Every stage (SFT, both rollout engines, the trainer, critic, reward model,
evaluation) goes through `records.load_media`, so they all see the same frames and text.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_RESOLUTIONS = (640, 512, 384, 256, 160, 128)
MAX_VIDEO_BYTES = 2 * 1024 ** 3
_EPS = 1e-6


class VideoError(ValueError):
    """A bad video entry or file; `field` is the sub-field at fault ('' for the entry itself)."""

    def __init__(self, message: str, field_: str = ""):
        self.field = field_
        super().__init__(message)


@dataclass(frozen=True)
class VideoSampling:
    """How a record's videos are sampled (a record's `video` block; the synthetic suite writes the
    same block on every record of a task, so it is set per task)."""

    fps: float = 1.0
    """Frames per second taken (Seed1.5-VL: 1 by default, 2 for tasks about timing, 5 for motion)."""
    max_frames: int = 64
    """Most frames taken from one video; more are dropped uniformly."""
    token_budget: int = 4096
    """Most vision tokens one video may take, all its frames together."""
    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    """The ladder: longer side of a frame in pixels, tried from the largest down (never above the video's own)."""

    @classmethod
    def from_json(cls, obj: Any) -> VideoSampling:
        """From a record's `video` block; VideoError naming the key when it does not fit."""
        if not isinstance(obj, dict):
            raise VideoError("must be an object with fps, max_frames, token_budget, resolutions")
        known = {f.name for f in fields(cls)}
        for key in obj:
            if key not in known:
                raise VideoError(f"unknown key (known: {', '.join(sorted(known))})", key)
        out = {}
        if "fps" in obj:
            out["fps"] = _positive(obj["fps"], "fps", float)
        for key in ("max_frames", "token_budget"):
            if key in obj:
                out[key] = _positive(obj[key], key, int)
        if "resolutions" in obj:
            res = obj["resolutions"]
            if not isinstance(res, list) or not res:
                raise VideoError("must be a non-empty list of sizes in pixels", "resolutions")
            out["resolutions"] = tuple(sorted({_positive(r, "resolutions", int) for r in res}, reverse=True))
        return cls(**out)

    def to_json(self) -> dict:
        return {"fps": self.fps, "max_frames": self.max_frames, "token_budget": self.token_budget,
                "resolutions": list(self.resolutions)}


def _positive(value: Any, key: str, kind: type) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok or (kind is int and float(value) != int(value)):
        raise VideoError(f"must be a positive {'integer' if kind is int else 'number'}, got {value!r}", key)
    return kind(value)


@dataclass(frozen=True)
class VideoGeometry:
    """What one vision token and one temporal patch cover in the model (Qwen2/2.5-VL: 28 pixels,
    2 frames; Qwen3-VL: 32 pixels). `of(processor)` reads them from a processor."""

    unit: int = 28
    temporal_patch: int = 2

    @classmethod
    def of(cls, processor) -> VideoGeometry:
        vp = getattr(processor, "video_processor", None)
        if vp is None:
            return cls()
        return cls(unit=int(getattr(vp, "patch_size", 14)) * int(getattr(vp, "merge_size", 2)),
                   temporal_patch=int(getattr(vp, "temporal_patch_size", 2)))


@dataclass(frozen=True)
class FramePlan:
    """The frames sampling picked: their indices into the video's frames, their times, the size
    each is resized to, and the vision tokens they take."""

    indices: tuple[int, ...]
    times: tuple[float, ...]
    width: int
    height: int
    tokens: int


# ----------------------------------------------------------------------------- sampling (pure)


def _uniform(items: Sequence[int], k: int) -> list[int]:
    """k of `items`, evenly spread, the first and the last kept (all when k >= len)."""
    n = len(items)
    if n <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(i * (n - 1) / (k - 1))] for i in range(k)]


def fit_size(width: int, height: int, level: int, unit: int) -> tuple[int, int]:
    """(w, h) with the longer side scaled to `level` pixels, each rounded to a multiple of `unit`."""
    scale = level / max(width, height)
    return (max(unit, round(width * scale / unit) * unit), max(unit, round(height * scale / unit) * unit))


def plan_frames(times: Sequence[float], width: int, height: int, cfg: VideoSampling, *,
                unit: int = 28, temporal_patch: int = 2) -> FramePlan:
    """Seed1.5-VL's dynamic frame-resolution sampling of a video whose frames show at `times`
    (seconds, ascending) and measure width x height pixels.

    1. Frames at `cfg.fps`: at each tick t0 + k / fps up to the last frame's time, the frame on
       screen (the last one shown at or before the tick); a video slower than fps keeps every frame.
    2. At most `cfg.max_frames`, dropped uniformly.
    3. The largest level of `cfg.resolutions` (the longer side, capped at the video's own) whose
       tokens fit `cfg.token_budget`: ceil(frames / temporal_patch) * (w / unit) * (h / unit).
    4. If even the lowest level does not fit, frames are dropped uniformly until the budget holds.
    """
    if not times:
        raise VideoError("the video has no frames")
    step, t0, last = 1.0 / cfg.fps, times[0], times[-1]
    picks: list[int] = []
    j, k = 0, 0
    while t0 + k * step <= last + _EPS:
        tick = t0 + k * step
        while j + 1 < len(times) and times[j + 1] <= tick + _EPS:
            j += 1
        if not picks or picks[-1] != j:
            picks.append(j)
        k += 1
    picks = _uniform(picks, cfg.max_frames)
    long_side = max(width, height)
    levels = sorted({min(level, long_side) for level in cfg.resolutions}, reverse=True)
    for level in levels:
        w, h = fit_size(width, height, level, unit)
        per_patch = (w // unit) * (h // unit)
        tokens = math.ceil(len(picks) / temporal_patch) * per_patch
        if tokens <= cfg.token_budget:
            break
    else:
        patches = cfg.token_budget // per_patch
        if patches < 1:
            raise VideoError(f"token_budget {cfg.token_budget} cannot hold one temporal patch "
                             f"({per_patch} tokens at {w}x{h}, the lowest resolution)")
        picks = _uniform(picks, patches * temporal_patch)
        tokens = math.ceil(len(picks) / temporal_patch) * per_patch
    return FramePlan(indices=tuple(picks), times=tuple(float(times[i]) for i in picks), width=w, height=h,
                     tokens=tokens)


def timestamp(seconds: float) -> str:
    """The text that precedes a clip: '[1.5 second]'."""
    return f"[{seconds:.1f} second]"


def clip_times(times: Sequence[float], temporal_patch: int) -> list[float]:
    """The time of each clip (its first frame) when `times` are cut into clips of temporal_patch."""
    return [float(times[i]) for i in range(0, len(times), temporal_patch)]


def split_clips(frames: np.ndarray, temporal_patch: int) -> list[np.ndarray]:
    """(F, H, W, 3) frames -> clips of `temporal_patch` frames, the last one padded with its last
    frame (so both engines and the trainer see exactly the same frames)."""
    clips = []
    for i in range(0, len(frames), temporal_patch):
        clip = frames[i:i + temporal_patch]
        if len(clip) < temporal_patch:
            clip = np.concatenate([clip, np.repeat(clip[-1:], temporal_patch - len(clip), axis=0)])
        clips.append(np.ascontiguousarray(clip))
    return clips


def expand_video_parts(messages: Sequence[dict], video_clip_times: Sequence[Sequence[float]]) -> list[dict]:
    """The messages with the k-th {"type": "video"} part replaced by, for each of its clips, the
    clip's timestamp text and a video part (one clip each). `video_clip_times[k]`: the clip times of
    the k-th video part. Other parts and messages are kept as they are."""
    out, k = [], 0
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = []
        for p in m["content"]:
            if p.get("type") != "video":
                parts.append(p)
                continue
            if k >= len(video_clip_times):
                raise ValueError(f"the messages hold more video parts than the {len(video_clip_times)} videos given")
            for t in video_clip_times[k]:
                parts += [{"type": "text", "text": timestamp(t)}, {"type": "video"}]
            k += 1
        out.append({**m, "content": parts})
    if k != len(video_clip_times):
        raise ValueError(f"{len(video_clip_times)} videos given but the messages hold {k} video parts")
    return out


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class VideoSource:
    """Where one video's frames come from: a file (`path`), a folder of frames (`path` with `fps` or
    `times`), or listed frames (`frames` with `fps` or `times`). Paths are absolute."""

    path: Path | None = None
    frames: tuple[Path, ...] = ()
    times: tuple[float, ...] | None = None
    fps: float | None = None
    num_frames: int | None = None

    @property
    def kind(self) -> str:
        if self.frames:
            return "frames"
        return "folder" if self.fps is not None or self.times is not None else "file"

    def files(self) -> list[Path]:
        """The files whose bytes make up the video (the frame images, or the video file)."""
        if self.frames:
            return list(self.frames)
        if self.kind == "folder":
            return folder_frames(self.path)
        return [self.path]

    def to_json(self, base: Path) -> str | dict:
        """Back to the record layout, paths relative to `base`."""
        if self.kind == "file" and self.num_frames is None:
            return os.path.relpath(self.path, base)
        out: dict[str, Any] = {}
        if self.frames:
            out["frames"] = [os.path.relpath(p, base) for p in self.frames]
        else:
            out["path"] = os.path.relpath(self.path, base)
        if self.fps is not None:
            out["fps"] = self.fps
        if self.times is not None:
            out["times"] = list(self.times)
        if self.num_frames is not None:
            out["num_frames"] = self.num_frames
        return out


def parse_video(entry: Any, base: Path) -> VideoSource:
    """A `videos` entry of a record (see the module docstring) with its paths resolved against `base`."""
    if isinstance(entry, str):
        if not entry:
            raise VideoError("must be a non-empty path")
        return VideoSource(path=(base / entry).resolve())
    if not isinstance(entry, dict):
        raise VideoError("must be a path or an object with path or frames")
    known = {"path", "frames", "times", "fps", "num_frames"}
    for key in entry:
        if key not in known:
            raise VideoError(f"unknown key (known: {', '.join(sorted(known))})", key)
    if ("path" in entry) == ("frames" in entry):
        raise VideoError("needs exactly one of path (a video file or a folder of frames) and frames")
    fps = _positive(entry["fps"], "fps", float) if "fps" in entry else None
    num_frames = _positive(entry["num_frames"], "num_frames", int) if "num_frames" in entry else None
    times = None
    if "times" in entry:
        raw = entry["times"]
        if not isinstance(raw, list) or not raw or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in raw):
            raise VideoError("must be a non-empty list of seconds", "times")
        if any(b <= a for a, b in zip(raw, raw[1:])):
            raise VideoError("must increase from frame to frame", "times")
        times = tuple(float(t) for t in raw)
    if fps is not None and times is not None:
        raise VideoError("give fps or times, not both", "times")
    if "frames" in entry:
        frames = entry["frames"]
        if not isinstance(frames, list) or not frames or not all(isinstance(p, str) and p for p in frames):
            raise VideoError("must be a non-empty list of image paths", "frames")
        if fps is None and times is None:
            raise VideoError("listed frames need fps or times", "frames")
        return VideoSource(frames=tuple((base / p).resolve() for p in frames), times=times, fps=fps,
                           num_frames=num_frames)
    if not isinstance(entry["path"], str) or not entry["path"]:
        raise VideoError("must be a non-empty path", "path")
    return VideoSource(path=(base / entry["path"]).resolve(), times=times, fps=fps, num_frames=num_frames)


def folder_frames(folder: Path) -> list[Path]:
    """The frame images of a folder, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


@dataclass(frozen=True)
class VideoInfo:
    """What sampling needs to know of a video."""

    times: tuple[float, ...]   # each frame's time, seconds, ascending
    width: int
    height: int


def probe(src: VideoSource) -> VideoInfo:
    """Frame times and size, without decoding frames (a file's packets are read, not decoded).
    VideoError when the video is missing or unreadable, or when its frame counts disagree: a
    file's header against the frames its index holds (a truncated file), `num_frames` against the
    frames, `times` against the frames."""
    if src.kind == "file":
        info = _probe_file(src.path)
    else:
        files = list(src.frames) if src.frames else _folder(src.path)
        for f in files:
            if not f.is_file():
                raise VideoError(f"frame file not found: {f}", "frames")
        n = len(files)
        if src.times is not None and len(src.times) != n:
            raise VideoError(f"{len(src.times)} times for {n} frames", "times")
        times = src.times if src.times is not None else tuple(i / src.fps for i in range(n))
        w, h = _image_size(files[0])
        info = VideoInfo(times=tuple(times), width=w, height=h)
    if src.num_frames is not None and src.num_frames != len(info.times):
        raise VideoError(f"the record says {src.num_frames} frames, the video has {len(info.times)}", "num_frames")
    return info


def _folder(path: Path) -> list[Path]:
    if not path.is_dir():
        raise VideoError(f"frame folder not found: {path}", "path")
    files = folder_frames(path)
    if not files:
        raise VideoError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in {path}", "path")
    return files


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # PIL raises many types for corrupt files
        raise VideoError(f"cannot decode frame {path.name}: {type(e).__name__}: {e}") from None


def _open(path: Path):
    import av  # PyAV: heavy, only videos need it

    if path.is_dir():
        raise VideoError(f"{path} is a folder: a folder of frames needs fps or times")
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    if path.stat().st_size > MAX_VIDEO_BYTES:
        raise VideoError(f"video too large: {path.stat().st_size} bytes > {MAX_VIDEO_BYTES}")
    try:
        container = av.open(str(path))
    except Exception as e:  # FFmpeg errors come as many types
        raise VideoError(f"cannot decode video {path.name}: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"cannot decode video {path.name}: no video stream")
    return container


def _probe_file(path: Path) -> VideoInfo:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        pts = []
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    pts.append(packet.pts)
        except Exception as e:  # noqa: BLE001  (a damaged index or stream)
            raise VideoError(f"cannot decode video {path.name}: {type(e).__name__}: {e}") from None
        if not pts:
            raise VideoError(f"cannot decode video {path.name}: no frames")
        if stream.frames and stream.frames != len(pts):
            raise VideoError(f"{path.name}: its header lists {stream.frames} frames but {len(pts)} are present "
                             "(a truncated or damaged file)")
        pts.sort()
        base = float(pts[0] * stream.time_base)
        times = tuple(float(p * stream.time_base) - base for p in pts)
        return VideoInfo(times=times, width=stream.codec_context.width, height=stream.codec_context.height)
    finally:
        container.close()


def verify(src: VideoSource) -> VideoInfo:
    """`probe`, then decode every frame (a file) or open every frame image: VideoError if any fails
    or a file decodes to another number of frames than its index lists. What `vlrl data check` runs."""
    info = probe(src)
    if src.kind != "file":
        for f in src.files():
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as e:  # PIL raises many types for corrupt files
                raise VideoError(f"cannot decode frame {f.name}: {type(e).__name__}: {e}") from None
        return info
    container = _open(src.path)
    try:
        n = sum(1 for _ in container.decode(container.streams.video[0]))
    except VideoError:
        raise
    except Exception as e:  # FFmpeg errors come as many types
        raise VideoError(f"cannot decode video {src.path.name}: {type(e).__name__}: {e}") from None
    finally:
        container.close()
    if n != len(info.times):
        raise VideoError(f"{src.path.name}: {n} frames decoded but its index lists {len(info.times)} "
                         "(a truncated or damaged file)")
    return info


def read_frames(src: VideoSource, plan: FramePlan) -> np.ndarray:
    """The planned frames, RGB uint8 (F, H, W, 3), each resized to the plan's size."""
    size = (plan.width, plan.height)
    wanted = set(plan.indices)
    if src.kind != "file":
        files = src.files()
        return np.stack([_resized(Image.open(files[i]).convert("RGB"), size) for i in plan.indices])
    container = _open(src.path)
    got: dict[int, np.ndarray] = {}
    try:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                got[i] = _resized(frame.to_image(), size)
                if len(got) == len(wanted):
                    break
    except Exception as e:  # FFmpeg errors come as many types
        raise VideoError(f"cannot decode video {src.path.name}: {type(e).__name__}: {e}") from None
    finally:
        container.close()
    if len(got) != len(wanted):
        raise VideoError(f"{src.path.name}: decoded {len(got)} of the {len(wanted)} frames sampled")
    return np.stack([got[i] for i in plan.indices])


def _resized(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    im = im.convert("RGB")
    if im.size != size:
        im = im.resize(size, Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


@dataclass(frozen=True)
class SampledVideo:
    """A video as the model takes it: clips of one temporal patch and the time of each."""

    clips: list[np.ndarray] = field(default_factory=list)   # each (temporal_patch, H, W, 3) uint8
    times: list[float] = field(default_factory=list)


def count_clips(src: VideoSource, cfg: VideoSampling, geometry: VideoGeometry = VideoGeometry()) -> int:
    """The clips `sample_video` cuts the video into, from its index alone (nothing decoded)."""
    info = probe(src)
    plan = plan_frames(info.times, info.width, info.height, cfg, unit=geometry.unit,
                       temporal_patch=geometry.temporal_patch)
    return math.ceil(len(plan.indices) / geometry.temporal_patch)


def sample_video(src: VideoSource, cfg: VideoSampling, geometry: VideoGeometry = VideoGeometry()) -> SampledVideo:
    """Probe, plan (`plan_frames`), read and cut one video into timestamped clips."""
    info = probe(src)
    plan = plan_frames(info.times, info.width, info.height, cfg, unit=geometry.unit,
                       temporal_patch=geometry.temporal_patch)
    frames = read_frames(src, plan)
    return SampledVideo(clips=split_clips(frames, geometry.temporal_patch),
                        times=clip_times(plan.times, geometry.temporal_patch))
