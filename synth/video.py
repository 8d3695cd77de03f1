"""The suite's video tasks: shapes that appear and disappear on the suite's board over a few seconds,
drawn frame by frame with PIL and written as small lossless video files (PNG frames in a QuickTime
container, through PyAV).

  video_temporal  "When is the red square on screen?"            answer "[2.0, 4.0]" (seconds)
                  2 frames a second, sampled at 2 fps: each clip the model sees is one second; the
                  shape stays 1-2 seconds of a 6-7 second video
  video_count     "How many times does the red square appear?"   answer "2"
                  1 frame a second, sampled at the default 1 fps: each clip is two seconds; the
                  shape flashes on for one clip at a time, 1-3 times

Every change happens on a clip boundary (whole seconds at 2 fps, even seconds at 1 fps), so the two
frames of a clip are the same picture and a clip's timestamp ("[2.0 second]") is when it starts. A
shape is `meta.events[i]` = {cell, shape, color, box, start, end}: on screen for start <= t < end.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from synth.suite import COLORS, SHAPES, SceneSpec, draw_scene, object_box

VIDEO_TASKS = ("video_temporal", "video_count")
FPS = {"video_temporal": 2, "video_count": 1}
"""Frames per second of each task's videos, and the rate it samples them at."""
CLIP_SECONDS = {"video_temporal": 1, "video_count": 2}
"""Seconds one clip (a temporal patch of 2 frames) covers at that rate."""
TINY_LADDER = [84, 56]
"""The resolution ladder scaled to the tiny model's 84x84 boards (Seed1.5-VL's is 640 ... 128)."""
TOKEN_BUDGET = 64
"""Vision tokens a video may take: the suite's videos (at most 7 clips, 9 tokens a clip at 84x84) fit at
the top of the ladder, so a clip of two equal frames is the very input of the same picture as an image
and what the image tasks teach carries over; a longer video would step down to 56x56 (4 a clip)."""


def sampling(task: str) -> dict:
    """The record's `video` block: the task's fps, the tiny ladder and budget."""
    block = {"max_frames": 16, "token_budget": TOKEN_BUDGET, "resolutions": TINY_LADDER}
    if FPS[task] != 1:   # 1 fps is the default: video_count leaves it out
        block = {"fps": float(FPS[task]), **block}
    return block


def _pick_targets(rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    """The asked-about (colour, shape) and a distractor of another colour."""
    color, other = rng.sample(list(COLORS), 2)
    return (color, rng.choice(SHAPES)), (other, rng.choice(SHAPES))


def _event(cell: int, color: str, shape: str, start: float, end: float, spec: SceneSpec) -> dict:
    return {"cell": cell, "shape": shape, "color": color, "box": object_box(cell, spec), "start": start, "end": end}


def _flashes(rng: random.Random, n: int, k: int) -> list[int]:
    """k of n slots, no two adjacent (each flash is followed by a slot without it)."""
    while True:
        picked = sorted(rng.sample(range(n), k))
        if all(b - a > 1 for a, b in zip(picked, picked[1:])):
            return picked


def _runs(rng: random.Random, n: int, k: int) -> list[tuple[int, int]]:
    """k runs [a, b) of consecutive slots among n, at least one empty slot between two runs."""
    while True:
        on = [rng.random() < 0.5 for _ in range(n)]
        runs, i = [], 0
        while i < n:
            if on[i]:
                j = i
                while j < n and on[j]:
                    j += 1
                runs.append((i, j))
                i = j
            else:
                i += 1
        if len(runs) == k:
            return runs


def make_video_example(task: str, rng: random.Random, spec: SceneSpec) -> dict:
    """One record of a video task without id/videos: task, messages, answer, meta (events, duration, fps)."""
    cells = list(range(spec.grid * spec.grid))
    if task == "video_temporal":
        clips = rng.randint(6, 7)                      # seconds
        (color, shape), (c, s) = _pick_targets(rng)
        length = rng.randint(1, 2)
        start = rng.randint(0, clips - 1 - length)     # gone before the video ends: its end is a shown timestamp
        end = start + length
        cell, other_cell = rng.sample(cells, 2)
        a = rng.randint(0, clips - 1)
        events = [_event(cell, color, shape, float(start), float(end), spec),
                  _event(other_cell, c, s, float(a), float(rng.randint(a + 1, clips)), spec)]
        question = f"When is the {color} {shape} on screen?"
        answer = f"[{start:.1f}, {end:.1f}]"
        thought = f"The {color} {shape} is on screen from {start:.1f} to {end:.1f} seconds."
        solution = answer
    elif task == "video_count":
        clips, step = rng.randint(5, 6), CLIP_SECONDS[task]
        (color, shape), (c, s) = _pick_targets(rng)
        n = rng.randint(1, 3)
        events = [_event(rng.choice(cells), color, shape, float(a * step), float((a + 1) * step), spec)
                  for a in _flashes(rng, clips, n)]
        cell = rng.choice([x for x in cells if x not in {e["cell"] for e in events}])
        a, b = rng.choice(_runs(rng, clips, 1) if rng.random() < 0.5 else [(0, clips)])
        events.append(_event(cell, c, s, float(a * step), float(b * step), spec))
        question = f"How many times does the {color} {shape} appear?"
        thought = f"I count {n} {color} {shape}{'s' if n > 1 else ''}."
        answer = solution = str(n)
    else:
        raise ValueError(f"unknown video task {task!r}; choose from {VIDEO_TASKS}")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"<think>{thought}</think>{solution}"}]}]
    duration = clips * CLIP_SECONDS[task]
    return {"task": task, "messages": messages, "answer": answer, "video": sampling(task),
            "meta": {"difficulty": None, "events": events, "duration": duration, "fps": FPS[task]}}


def video_key(rec: dict) -> list:
    """What makes two video examples the same item (with the task and the question)."""
    events = [(e["cell"], e["shape"], e["color"], e["start"], e["end"]) for e in rec["meta"]["events"]]
    return [events, rec["meta"]["duration"]]


def draw_frames(rec: dict, spec: SceneSpec) -> np.ndarray:
    """(duration * fps, side, side, 3) uint8: frame k shows the events on screen at k / fps seconds."""
    meta = rec["meta"]
    frames = []
    for k in range(int(meta["duration"] * meta["fps"])):
        t = k / meta["fps"]
        on = sorted((e for e in meta["events"] if e["start"] <= t < e["end"]), key=lambda e: e["cell"])
        frames.append(np.asarray(draw_scene(on, spec), dtype=np.uint8))
    return np.stack(frames)


def write_video(path: Path, frames: np.ndarray, fps: int) -> Path:
    """Lossless, byte-for-byte reproducible video: PNG frames in a QuickTime container, its index first."""
    import av  # PyAV: heavy, only videos need it

    with av.open(str(path), "w", format="mov", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path
