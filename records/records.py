"""Reading and validating JSONL records (prompt, SFT and preference records), and loading a
record's images and videos as model input (`load_media`).

Every record is checked before training starts; the first bad one stops the run with
`FILE:LINE: FIELD: what is wrong`. Image and video paths are resolved relative to the JSONL file.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from records.video import (VideoError, VideoGeometry, VideoSampling, VideoSource, count_clips, expand_video_parts,
                           parse_video, probe, sample_video, verify)
from training.atomic import write_jsonl

ROLES = frozenset({"system", "user", "assistant"})
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 32 * 1024 * 1024


class DataError(ValueError):
    """A bad input record; str() is `file:line: field: message`."""

    def __init__(self, path: str | Path, line: int, field_: str, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field_, message
        super().__init__(f"{path}:{line}: {field_}: {message}")


@dataclass
class Record:
    """One validated record. `images` are absolute paths, `videos` their sources (absolute paths);
    `messages` keep the chat layout, one {"type": "image"} / {"type": "video"} part per entry."""

    id: str
    task: str
    images: list[Path]
    messages: list[dict]
    answer: str | None = None
    meta: dict = field(default_factory=dict)
    chosen: list[dict] | None = None      # preference records: assistant turns
    rejected: list[dict] | None = None
    source: str = ""                      # "file:line", for error messages downstream
    videos: list[VideoSource] = field(default_factory=list)
    video: VideoSampling | None = None    # the record's `video` block (None: the defaults)

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) a final assistant turn."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def target(self) -> str | None:
        """Text of the final assistant turn, if the record has one (SFT records)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return message_text(self.messages[-1])
        return None

    def to_json(self, base: Path) -> dict:
        """Back to the JSONL layout, image paths relative to `base` (the output file's folder)."""
        out: dict[str, Any] = {"id": self.id, "task": self.task,
                               "images": [os.path.relpath(p, base) for p in self.images],
                               "messages": self.messages}
        if self.videos:
            out["videos"] = [v.to_json(base) for v in self.videos]
        if self.video is not None:
            out["video"] = self.video.to_json()
        if self.answer is not None:
            out["answer"] = self.answer
        if self.chosen is not None:
            out["chosen"], out["rejected"] = self.chosen, self.rejected
        out["meta"] = self.meta
        return out


def message_text(message: dict) -> str:
    c = message["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text")


def count_parts(messages: list[dict], kind: str) -> int:
    """Parts of type `kind` ('image', 'video') in the messages."""
    return sum(1 for m in messages if not isinstance(m["content"], str)
               for p in m["content"] if p.get("type") == kind)


def count_image_parts(messages: list[dict]) -> int:
    return count_parts(messages, "image")


def _check_messages(msgs: Any, where: tuple, name: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(*where, name, "must be a non-empty list of messages")
    for i, m in enumerate(msgs):
        f = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(*where, f, "must be an object with role and content")
        if m.get("role") not in ROLES:
            raise DataError(*where, f"{f}.role", f"must be one of {sorted(ROLES)}, got {m.get('role')!r}")
        c = m.get("content")
        if isinstance(c, str):
            continue
        if not isinstance(c, list) or not c:
            raise DataError(*where, f"{f}.content", "must be a string or a non-empty list of parts")
        for j, p in enumerate(c):
            pf = f"{f}.content[{j}]"
            if not isinstance(p, dict) or p.get("type") not in ("text", "image", "video"):
                raise DataError(*where, f"{pf}.type", "must be 'text', 'image' or 'video'")
            if p["type"] == "text" and not isinstance(p.get("text"), str):
                raise DataError(*where, f"{pf}.text", "must be a string")


def _check_image(path: Path, where: tuple, f: str, max_pixels: int) -> None:
    if not path.is_file():
        raise DataError(*where, f, f"image file not found: {path}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise DataError(*where, f, f"image too large: {path.stat().st_size} bytes > {MAX_IMAGE_BYTES}")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise DataError(*where, f, f"image too large: {w}x{h} = {w * h} pixels > {max_pixels}")
            im.verify()
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(*where, f, f"cannot decode image {path.name}: {type(e).__name__}: {e}") from None


def _parse_videos(obj: dict, base: Path, where: tuple, *, check: bool, decode: bool) -> list[VideoSource]:
    videos = obj.get("videos", [])
    if not isinstance(videos, list):
        raise DataError(*where, "videos", "must be a list of videos (paths or objects)")
    n_parts = count_parts(obj["messages"], "video")
    if n_parts != len(videos):
        raise DataError(*where, "videos", f"{len(videos)} video(s) listed but the messages hold {n_parts} video part(s)")
    out = []
    for i, entry in enumerate(videos):
        try:
            src = parse_video(entry, base)
            if check and decode:
                verify(src)
            elif check:
                probe(src)
        except VideoError as e:
            raise DataError(*where, f"videos[{i}]" + (f".{e.field}" if e.field else ""), str(e)) from None
        out.append(src)
    return out


def parse_record(obj: Any, path: Path, line: int, *, tasks: Iterable[str] | None = None,
                 route_key: str = "reward.tasks", check_images: bool = True,
                 max_pixels: int = MAX_IMAGE_PIXELS, decode_videos: bool = False) -> Record:
    """One validated record; `tasks` (the routed task names, see load_records) bounds its task.
    check_images: open every image and read every video's index (frame counts, truncation);
    decode_videos: decode every frame as well (`vlrl data check`)."""
    where = (path, line)
    if not isinstance(obj, dict):
        raise DataError(*where, "record", f"must be a JSON object, got {type(obj).__name__}")
    for key in ("id", "task", "messages"):
        if key not in obj:
            raise DataError(*where, key, "missing required field")
    if not isinstance(obj["id"], str) or not obj["id"]:
        raise DataError(*where, "id", "must be a non-empty string")
    task = obj["task"]
    if not isinstance(task, str) or not task:
        raise DataError(*where, "task", "must be a non-empty string")
    if tasks is not None and task not in tasks:
        raise DataError(*where, "task", f"unknown task {task!r}: no reward route for it (routed: "
                                        f"{', '.join(sorted(tasks))}); route it under {route_key}.{task}")
    _check_messages(obj["messages"], where, "messages")
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(*where, "images", "must be a list of paths")
    n_parts = count_image_parts(obj["messages"])
    if n_parts != len(images):
        raise DataError(*where, "images", f"{len(images)} image(s) listed but the messages hold {n_parts} image part(s)")
    base = path if path.is_dir() else path.parent
    resolved = [(base / p).resolve() for p in images]
    if check_images:
        for i, p in enumerate(resolved):
            _check_image(p, where, f"images[{i}]", max_pixels)
    videos = _parse_videos(obj, base, where, check=check_images, decode=decode_videos)
    video = None
    if obj.get("video") is not None:
        try:
            video = VideoSampling.from_json(obj["video"])
        except VideoError as e:
            raise DataError(*where, "video" + (f".{e.field}" if e.field else ""), str(e)) from None
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(*where, "answer", "must be a string or a number")
        answer = str(answer)
    meta = obj.get("meta", {}) or {}
    if not isinstance(meta, dict):
        raise DataError(*where, "meta", "must be an object")
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if (chosen is None) != (rejected is None):
        raise DataError(*where, "chosen" if chosen is None else "rejected", "preference records need both chosen and rejected")
    if chosen is not None:
        _check_messages(chosen, where, "chosen")
        _check_messages(rejected, where, "rejected")
    return Record(id=obj["id"], task=obj["task"], images=resolved, messages=obj["messages"], answer=answer,
                  meta=meta, chosen=chosen, rejected=rejected, source=f"{path}:{line}", videos=videos, video=video)


def iter_jsonl(path: str | Path):
    """(line number, object) for each non-blank line; DataError for a missing file or bad JSON.

    A folder written by `datasets.Dataset.save_to_disk`, or a `.parquet` file, is read through HF
    `datasets` instead: row i counts as line i + 1, image paths are relative to the folder / file.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        yield from _iter_hf_dataset(path)
        return
    if not path.is_file():
        raise DataError(path, 0, "file", "not found")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, line_no, "json", f"not valid JSON: {e.msg} at column {e.colno}") from None


def _iter_hf_dataset(path: Path):
    import datasets  # heavy: only saved-dataset and parquet inputs need it

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(path, 0, "file", f"not a datasets folder or parquet file: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(path, 0, "file", f"holds several splits {list(ds)}; point at one split's folder")
    for i, row in enumerate(ds):
        yield i + 1, {k: v for k, v in row.items() if v is not None}


def load_records(path: str | Path, *, tasks: Iterable[str] | None = None, route_key: str = "reward.tasks",
                 check_images: bool = True, max_pixels: int = MAX_IMAGE_PIXELS,
                 require: str | None = None, decode_videos: bool = False) -> list[Record]:
    """Read and validate every line of a JSONL file.

    tasks: the task names a record may have: the routed tasks of the run's reward config
    (`rewards.config.RewardConfig.known_tasks`); None accepts any name. A record of another task
    stops with `file:line: task: ...`, naming the config key that would route it (`route_key`.TASK).

    require: "target" (SFT: last message is the assistant's), "prompt" (RL/eval: last message is
    not the assistant's) or "preference" (chosen and rejected present). decode_videos: decode every
    video frame (else a video's index is read: its frame counts, not its pixels).
    """
    path = Path(path)
    tasks = None if tasks is None else frozenset(tasks)
    records, ids = [], {}
    for line_no, obj in iter_jsonl(path):
        rec = parse_record(obj, path, line_no, tasks=tasks, route_key=route_key, check_images=check_images,
                           max_pixels=max_pixels, decode_videos=decode_videos)
        if rec.id in ids:
            raise DataError(path, line_no, "id", f"duplicate id {rec.id!r} (first on line {ids[rec.id]})")
        ids[rec.id] = line_no
        if require == "target" and rec.target is None:
            raise DataError(path, line_no, "messages", "an SFT record must end with an assistant message")
        if require == "preference" and rec.chosen is None:
            raise DataError(path, line_no, "chosen", "a preference record needs chosen and rejected")
        records.append(rec)
    if not records:
        raise DataError(path, 0, "file", "holds no records")
    return records


def load_images(rec: Record) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in rec.images]


@dataclass(frozen=True)
class Media:
    """A record's vision inputs as a processor takes them: the messages with each video part
    expanded into timestamped clips (`records.video.expand_video_parts`), the images, and the clips."""

    messages: list[dict]
    images: list                  # PIL RGB images, in the order of the image parts
    videos: list = field(default_factory=list)   # (temporal_patch, H, W, 3) uint8 clips, in the order of the video parts


def media_counts(rec: Record, geometry: VideoGeometry = VideoGeometry()) -> tuple[int, int]:
    """(images, video clips) of the record's model input (`load_media`), read from the video indexes."""
    cfg = rec.video or VideoSampling()
    return len(rec.images), sum(count_clips(src, cfg, geometry) for src in rec.videos)


def load_media(rec: Record, messages: list[dict] | None = None, *,
               geometry: VideoGeometry = VideoGeometry()) -> Media:
    """The images and sampled videos of `rec` with `messages` (default: the prompt turns) expanded:
    the one path from a record to model input, so every stage sees the same frames. `geometry`:
    the model's (`VideoGeometry.of(processor)`)."""
    messages = rec.prompt_messages if messages is None else messages
    if not rec.videos:
        return Media(messages, load_images(rec))
    cfg = rec.video or VideoSampling()
    clips, times = [], []
    for i, src in enumerate(rec.videos):
        try:
            sampled = sample_video(src, cfg, geometry)
        except VideoError as e:
            path, _, line = rec.source.rpartition(":")
            raise DataError(path or rec.source, int(line) if line.isdigit() else 0,
                            f"videos[{i}]" + (f".{e.field}" if e.field else ""), str(e)) from None
        clips += sampled.clips
        times.append(sampled.times)
    return Media(expand_video_parts(messages, times), load_images(rec), clips)


def write_records(path: str | Path, records: list[Record]) -> None:
    """Write records as JSONL atomically, image paths relative to the file's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    write_jsonl(path, (r.to_json(base) for r in records))


def prompt_key(rec) -> str:
    """What greedy decoding depends on: the prompt messages and the bytes of the images and videos
    (with the video sampling settings)."""
    h = hashlib.blake2b(json.dumps(rec.prompt_messages, sort_keys=True).encode(), digest_size=16)
    videos = getattr(rec, "videos", [])
    files = list(rec.images) + [f for v in videos for f in v.files()]
    for path in files:   # each file's own digest: the boundaries between files count
        st = os.stat(path)
        h.update(_file_digest(str(path), st.st_mtime_ns, st.st_size))
    if videos:
        sampling = rec.video or VideoSampling()
        h.update(json.dumps([sampling.to_json()] + [v.to_json(Path("/")) for v in videos]).encode())
    return h.hexdigest()


@lru_cache(maxsize=4096)
def _file_digest(path: str, mtime_ns: int, size: int) -> bytes:
    """Cached by path and stat (a rewritten file misses): avg@k judges each record k times."""
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).digest()


def unique_prompts(records) -> tuple[list[int], list[int]]:
    """(first, slot): indices of the first record of each distinct prompt (prompt_key), and for
    every record the position of its prompt in `first`. Held-out files may repeat a scene."""
    first, slot, seen = [], [], {}
    for i, rec in enumerate(records):
        key = prompt_key(rec)
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        slot.append(seen[key])
    return first, slot
