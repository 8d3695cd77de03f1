"""The whole synthetic suite: the core image tasks of `synth.suite` (counting, grounding, math,
caption) and the video and multi-image tasks (`EXTRA_TASKS`: `synth.video`, `synth.boards`).

Each extra task is drawn from its own seeds (`{seed}-{split}-{task}`) and owns its scenes by the
same keyed hash as the core tasks (`synth.suite.split_owner`), so the core tasks' records and images
are byte-identical with the extra tasks or without them; the extra records follow them in each file.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from records.video import timestamp
from synth.boards import BOARD_TASKS, board_key, draw_boards, make_board_example
from synth.suite import TASKS, SceneSpec, corpus_texts, split_owner, synth_split, write_suite
from synth.video import FPS, VIDEO_TASKS, draw_frames, make_video_example, video_key, write_video
from training.atomic import write_lines

EXTRA_TASKS = VIDEO_TASKS + BOARD_TASKS
ALL_TASKS = TASKS + EXTRA_TASKS


def make_extra_example(task: str, rng: random.Random, spec: SceneSpec) -> dict:
    """One record of an extra task without id/images/videos."""
    if task in VIDEO_TASKS:
        return make_video_example(task, rng, spec)
    if task in BOARD_TASKS:
        return make_board_example(task, rng, spec)
    raise ValueError(f"unknown extra task {task!r}; choose from {EXTRA_TASKS}")


def extra_key(rec: dict) -> str:
    """What makes two extra examples the same item: the task, the scene(s) and the question."""
    scene = video_key(rec) if rec["task"] in VIDEO_TASKS else board_key(rec)
    return json.dumps([rec["task"], scene, rec["messages"][0]["content"][-1]["text"]])


def write_full_suite(out: str | os.PathLike, *, seed: int = 0, n: int = 2000, n_heldout: int = 100,
                     n_rl: int | None = None, tasks=ALL_TASKS, spec: SceneSpec = SceneSpec()) -> dict[str, Path]:
    """`synth.suite.write_suite` for the core tasks among `tasks`, then the extra ones appended to the
    same sft.jsonl, rl.jsonl and heldout.jsonl (images under img/, videos under vid/). Sizes are per
    task, as there. Returns the three paths."""
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; choose from {', '.join(ALL_TASKS)}")
    out = Path(out)
    paths = write_suite(out, seed=seed, n=n, n_heldout=n_heldout, n_rl=n_rl,
                        tasks=tuple(t for t in TASKS if t in tasks), spec=spec)
    extra = [t for t in EXTRA_TASKS if t in tasks]
    if not extra:
        return paths
    (out / "vid").mkdir(parents=True, exist_ok=True)
    n_rl = n // 2 if n_rl is None else n_rl
    sizes = {"heldout": n_heldout, "sft": n, "rl": n_rl}
    for name, path in paths.items():
        items = []
        for task in extra:
            recs = synth_split(random.Random(f"{seed}-{name}-{task}"), sizes[name], spec, (task,),
                               lambda key, name=name: split_owner(key, seed) == name, distinct=name == "rl",
                               make=make_extra_example, key=extra_key)
            for i, rec in enumerate(recs):
                # prompt records (rl, heldout): the assistant target is not shown to RL or eval
                items.append((f"{name}-{task}-{i:05d}", rec if name == "sft" else {**rec, "messages": rec["messages"][:1]}))
        lines = path.read_text().splitlines(keepends=True) + write_extra_media(path.parent, items, spec)
        write_lines(path, lines)
    return paths


def write_extra_media(folder: Path, items: list[tuple[str, dict]], spec: SceneSpec) -> list[str]:
    """Draw each (id, record)'s images (img/<id>.png, img/<id>-<k>.png for several) or video
    (vid/<id>.mov) under `folder`; returns the records as JSONL lines with `id`, `images`, `videos`."""
    lines = []
    for rec_id, rec in items:
        fields: dict = {"id": rec_id, "images": []}
        if rec["task"] in VIDEO_TASKS:
            rel = f"vid/{rec_id}.mov"
            write_video(folder / rel, draw_frames(rec, spec), FPS[rec["task"]])
            fields["videos"] = [rel]
        else:
            images = draw_boards(rec, spec)
            names = [f"img/{rec_id}.png"] if len(images) == 1 else [f"img/{rec_id}-{k}.png" for k in range(len(images))]
            for im, rel in zip(images, names):
                im.save(folder / rel)
            fields["images"] = names
        lines.append(json.dumps({**fields, **rec}) + "\n")
    return lines


def full_corpus_texts(seed: int = 0, n: int = 300) -> list[str]:
    """`synth.suite.corpus_texts` plus the extra tasks' texts and the clip timestamps, for training
    the tiny tokenizer."""
    texts = corpus_texts(seed=seed, n=n)
    rng = random.Random(f"{seed}-corpus-extra")
    spec = SceneSpec()
    for _ in range(n):
        for task in EXTRA_TASKS:
            rec = make_extra_example(task, rng, spec)
            texts += [m["content"][-1]["text"] for m in rec["messages"]]
    texts += [timestamp(k / 2) for k in range(64)] * 10
    return texts
