"""The built-in synthetic multimodal task suite: shapes drawn with PIL on a small grid canvas.

Every task is answerable from the picture alone and small enough for the tiny VLM to learn on a CPU.
The canvas is a GRID x GRID board of CELL-pixel cells (84x84 by default): with Qwen2-VL's 14-pixel
patches merged 2x2, each cell is exactly one vision token, which keeps the tasks learnable.

Tasks (record field `task`):
  counting   "How many shapes are there?" / "How many red shapes are there?"    answer "3"
  grounding  "Where is the red shape? ..."                        answer "[32, 4, 51, 23]" (pixels)
             the target writes the box in the model family's coordinates (SceneSpec.coords)
  math       "Add 4 to the number of (red) shapes. ..."           answer "7" (any equivalent form scores)
  caption    "Describe the image."                                no answer: judged by the reward model

Records follow the layout in README.md ("Data format"); `meta.objects` holds the ground truth scene.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from training.atomic import write_lines
from verifiers.coords import Convention, encode_box

TASKS = ("counting", "grounding", "math", "caption")
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 30)}
SHAPES = ("square", "circle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class SceneSpec:
    """Geometry of the canvas: GRID x GRID cells of CELL pixels, shapes of SIZE pixels centred in a cell."""

    grid: int = 3
    cell: int = 28
    size: int = 20
    max_count: int = 6
    color_questions: float = 0.5
    """Share of counting and math questions about the shapes of one colour ("How many red shapes
    ..."): they need colour binding, as grounding does, and leave RL headroom after SFT."""
    coords: Convention = "pixel"
    """How a grounding target writes its box (verifiers.coords): the convention of the model family
    that trains on it (model.families.grounding_settings); the record's answer stays in pixels."""
    resize_factor: int = 28
    min_pixels: int = 56 * 56
    max_pixels: int = 12_845_056
    """The processor's resize, for coords 'resized' (as the grounding verifier's settings of that name)."""

    @property
    def side(self) -> int:
        return self.grid * self.cell


def object_box(cell_index: int, spec: SceneSpec) -> list[int]:
    """Pixel box [x1, y1, x2, y2] (inclusive corners) of the shape drawn in a cell."""
    row, col = divmod(cell_index, spec.grid)
    pad = (spec.cell - spec.size) // 2
    x1, y1 = col * spec.cell + pad, row * spec.cell + pad
    return [x1, y1, x1 + spec.size - 1, y1 + spec.size - 1]


def cell_background(row: int, col: int) -> tuple[int, int, int]:
    """A dark shade that tells the cell apart: row in the red channel, column in the green one.

    Qwen2-VL's vision tokens carry no absolute position in their content (its RoPE is relative),
    so without a cue a tiny model cannot say *where* a shape is; real images have such context.
    """
    return (20 + 60 * row, 20 + 60 * col, 20)


def draw_scene(objects: list[dict], spec: SceneSpec) -> Image.Image:
    img = Image.new("RGB", (spec.side, spec.side), (0, 0, 0))
    d = ImageDraw.Draw(img)
    for cell in range(spec.grid * spec.grid):
        row, col = divmod(cell, spec.grid)
        d.rectangle([col * spec.cell, row * spec.cell, (col + 1) * spec.cell - 1, (row + 1) * spec.cell - 1],
                    fill=cell_background(row, col))
    for o in objects:
        box = o["box"]
        fill = COLORS[o["color"]]
        if o["shape"] == "square":
            d.rectangle(box, fill=fill)
        else:
            d.ellipse(box, fill=fill)
    return img


def random_objects(rng: random.Random, n: int, spec: SceneSpec, *, distinct_colors: bool = False) -> list[dict]:
    cells = sorted(rng.sample(range(spec.grid * spec.grid), n))
    colors = rng.sample(list(COLORS), n) if distinct_colors else [rng.choice(list(COLORS)) for _ in cells]
    return [{"cell": c, "shape": rng.choice(SHAPES), "color": col, "box": object_box(c, spec)}
            for c, col in zip(cells, colors)]


def describe(objects: list[dict]) -> str:
    """Canonical caption, objects in reading order: 'A red square and a blue circle.'"""
    parts = [f"a {o['color']} {o['shape']}" for o in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def counted(rng: random.Random, objects: list[dict], spec: SceneSpec) -> tuple[str, int]:
    """What a counting or math question counts and how many there are: ("shapes", all of them) or,
    for a share `spec.color_questions` of questions, ("red shapes", those of one colour present)."""
    if rng.random() < spec.color_questions:
        color = rng.choice(sorted({o["color"] for o in objects}))
        return f"{color} shapes", sum(o["color"] == color for o in objects)
    return "shapes", len(objects)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def make_example(task: str, rng: random.Random, spec: SceneSpec) -> dict:
    """One record without id/images: task, messages (user + assistant target), answer, meta."""
    if task == "counting":
        objs = random_objects(rng, rng.randint(1, spec.max_count), spec)
        what, n = counted(rng, objs, spec)
        question = f"How many {what} are there?"
        thought, solution, answer = f"I count {n} {what}.", str(n), str(n)
    elif task == "grounding":
        objs = random_objects(rng, rng.randint(1, 2), spec, distinct_colors=True)
        target = rng.choice(objs)
        row, col = divmod(target["cell"], spec.grid)
        question = f"Where is the {target['color']} shape? Give its box."
        answer = "[{}, {}, {}, {}]".format(*target["box"])
        solution = "[{}, {}, {}, {}]".format(*encode_box(
            target["box"], spec.coords, (spec.side, spec.side), factor=spec.resize_factor,
            min_pixels=spec.min_pixels, max_pixels=spec.max_pixels))
        thought = f"The {target['color']} shape is in row {row + 1}, column {col + 1}."
    elif task == "math":
        objs = random_objects(rng, rng.randint(1, spec.max_count - 1), spec)
        (what, n), k = counted(rng, objs, spec), rng.randint(1, 4)
        question = f"Add {k} to the number of {what}. Put the result in \\boxed{{}}."
        answer = str(n + k)
        thought, solution = f"I count {n} {what}. {n} + {k} = {n + k}.", f"\\boxed{{{n + k}}}"
    elif task == "caption":
        objs = random_objects(rng, rng.randint(1, 3), spec)
        question = "Describe the image."
        n = len(objs)
        thought, solution, answer = f"I see {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}.", describe(objs), None
    else:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")
    messages = _user(question) + [
        {"role": "assistant", "content": [{"type": "text", "text": f"<think>{thought}</think>{solution}"}]}]
    rec = {"task": task, "messages": messages, "meta": {"difficulty": None, "objects": objs}}
    if answer is not None:
        rec["answer"] = answer
    return rec


def scene_key(rec: dict) -> str:
    """What makes two examples the same item: the task, the scene and the question."""
    objs = [(o["cell"], o["shape"], o["color"]) for o in rec["meta"]["objects"]]
    return json.dumps([rec["task"], objs, rec["messages"][0]["content"][1]["text"]])


SPLIT_SHARES = (("heldout", 0.2), ("sft", 0.6), ("rl", 0.2))
"""The share of all scenes each split owns. A small kind of scene (a one-shape grounding scene has
only 72 variants) is split in these shares too, so no split runs out of it."""


def split_owner(key: str, seed: int | str, shares: tuple[tuple[str, float], ...] = SPLIT_SHARES) -> str:
    """The split that owns a scene key: a keyed hash mapped onto `shares` ((name, share), ...).

    Ownership is independent of the kind of scene, so every split owns the same share of each kind and
    each split's records keep the generator's mix of kinds (object counts, questions)."""
    digest = hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2 ** 64
    bound = 0.0
    for name, share in shares:
        bound += share
        if u < bound:
            return name
    return shares[-1][0]


def synth_split(rng: random.Random, n_per_task: int, spec: SceneSpec, tasks, owns: Callable[[str], bool],
                max_tries: int = 100, distinct: bool = False, make: Callable | None = None,
                key: Callable | None = None) -> list[dict]:
    """n_per_task records per task drawn from the generator, keeping those whose scene_key `owns` accepts.

    distinct=False: a scene may repeat, so the kinds with few variants keep their share of the split,
    where drawing distinct scenes would exhaust them and skew the split towards the large kinds (what
    an evaluation split needs: the generator's mix). distinct=True: every scene once (what an RL prompt
    set needs: a repeated prompt spends rollouts on a scene already learnt, and the policy overfits the
    few variants of a small kind); a task whose owned variants run out keeps the ones found, with a
    note on stderr. make, key: the generator (default `make_example`) and its item key (`scene_key`)."""
    make, key_of = make or make_example, key or scene_key
    out = []
    for task in tasks:
        made = tries = 0
        seen: set[str] = set()
        while made < n_per_task:
            rec = make(task, rng, spec)
            key = key_of(rec)
            if not owns(key) or (distinct and key in seen):
                tries += 1
                if tries > max_tries * n_per_task:
                    if distinct and made:
                        print(f"synth: {made} distinct {task} scenes for this split, fewer than the "
                              f"{n_per_task} asked", file=sys.stderr)
                        break
                    raise RuntimeError(f"cannot draw {n_per_task} {task} examples for this split")
                continue
            if distinct:
                seen.add(key)
            out.append(rec)
            made += 1
    return out


def write_suite(out: str | os.PathLike, *, seed: int = 0, n: int = 2000, n_heldout: int = 100,
                n_rl: int | None = None, tasks=TASKS, spec: SceneSpec = SceneSpec()) -> dict[str, Path]:
    """Write sft.jsonl, rl.jsonl and heldout.jsonl (+ img/) under `out`; returns their paths.

    n: SFT records per task; n_rl: RL prompt records per task (default n // 2); n_heldout: per task.
    The three splits are disjoint by scene_key (split_owner). The held-out and SFT splits follow the
    generator's mix of scenes, repeats included, so held-out accuracy measures unseen scenes of the
    training distribution; the RL split lists each scene once (synth_split). Deterministic for a seed;
    a split's items do not depend on the other splits' sizes.
    """
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    n_rl = n // 2 if n_rl is None else n_rl
    sizes = {"heldout": n_heldout, "sft": n, "rl": n_rl}
    splits = {name: synth_split(random.Random(f"{seed}-{name}"), sizes[name], spec, tasks,
                                lambda key, name=name: split_owner(key, seed) == name, distinct=name == "rl")
              for name in ("heldout", "sft", "rl")}
    paths = {}
    for name, recs in splits.items():
        # prompt records (rl, heldout): the assistant target is not shown to RL or eval
        items = [(f"{name}-{rec['task']}-{i:05d}", rec if name == "sft" else {**rec, "messages": rec["messages"][:1]})
                 for i, rec in enumerate(recs)]
        paths[name] = write_scene_records(out / f"{name}.jsonl", items, spec)
    return paths


def write_scene_records(path: Path, items: list[tuple[str, dict]], spec: SceneSpec) -> Path:
    """Draw each (id, record)'s scene to img/<id>.png beside `path` and write the records, with their
    `id` and `images` fields, as JSONL (atomically). Returns `path`."""
    lines = []
    for rec_id, rec in items:
        rel = f"img/{rec_id}.png"
        draw_scene(rec["meta"]["objects"], spec).save(path.parent / rel)
        lines.append(json.dumps({"id": rec_id, "images": [rel], **rec}) + "\n")
    write_lines(path, lines)
    return path


def corpus_texts(seed: int = 0, n: int = 300) -> list[str]:
    """Texts of the suite (prompts, targets, chat roles) for training the tiny tokenizer."""
    rng = random.Random(f"{seed}-corpus")
    spec = SceneSpec()
    texts = ["system\n", "user\n", "assistant\n", "You are a helpful assistant."] * 50
    for _ in range(n):
        for task in TASKS:
            rec = make_example(task, rng, spec)
            texts += [m["content"][-1]["text"] for m in rec["messages"]]
    return texts
