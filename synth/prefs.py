"""Synthetic preference pairs for reward-model training: a caption prompt over a drawn scene, `chosen`
the correct description and `rejected` the same description with exactly one thing wrong.

Corruptions (record `meta.corruption`), one per pair; the kind is drawn uniformly first, then a scene
it applies to, so that add and drop are equally frequent and caption length says nothing:
  color  one object's colour replaced by another colour          "A red square" -> "A blue square"
  shape  one object's shape swapped                              "A red square" -> "A red circle"
  add    one object that is not in the picture mentioned as well (scenes of 1-2 objects)
  drop   one object of the picture left out (scenes of 2-3 objects)
The rejected caption is a valid caption of some other scene, so text alone cannot tell the two
apart: the reward model has to look at the image. Both answers carry a think block consistent with
their own caption, as a policy that misread the picture would write.

Scenes, drawing and captions come from the task suite (`synth.suite`). The train and held-out files
are disjoint by scene (not only by pair), so held-out accuracy measures images never seen.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

from synth.suite import (COLORS, NUMBER_WORDS, SHAPES, SceneSpec, _user, describe, object_box, random_objects,
                         split_owner, write_scene_records)

CORRUPTIONS = ("color", "shape", "add", "drop")
QUESTION = "Describe the image."


def _answer(objects: list[dict]) -> list[dict]:
    """The assistant turn describing `objects`, think block first."""
    n = len(objects)
    thought = f"I see {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}."
    return [{"role": "assistant", "content": [{"type": "text", "text": f"<think>{thought}</think>{describe(objects)}"}]}]


def applicable(kind: str, n_objects: int, max_objects: int) -> bool:
    return (kind != "add" or n_objects < max_objects) and (kind != "drop" or n_objects > 1)


def corrupt(objects: list[dict], kind: str, rng: random.Random, spec: SceneSpec) -> list[dict]:
    """`objects` with exactly one attribute or one object changed, as `kind` says."""
    out = [dict(o) for o in objects]
    if kind == "color":
        i = rng.randrange(len(out))
        out[i]["color"] = rng.choice([c for c in COLORS if c != out[i]["color"]])
    elif kind == "shape":
        i = rng.randrange(len(out))
        out[i]["shape"] = next(s for s in SHAPES if s != out[i]["shape"])
    elif kind == "add":
        cell = rng.choice(sorted(set(range(spec.grid * spec.grid)) - {o["cell"] for o in out}))
        out.append({"cell": cell, "shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
                    "box": object_box(cell, spec)})
        out.sort(key=lambda o: o["cell"])   # captions list objects in reading order
    elif kind == "drop":
        if len(out) < 2:
            raise ValueError("cannot drop the only object")
        out.pop(rng.randrange(len(out)))
    else:
        raise ValueError(f"unknown corruption {kind!r}; choose from {CORRUPTIONS}")
    return out


def _scene(objects: list[dict]) -> str:
    return json.dumps([(o["cell"], o["shape"], o["color"]) for o in objects])


PREF_SHARES = (("heldout", 0.2), ("train", 0.8))
"""The share of all scenes each preference split owns (synth.suite.split_owner)."""


def _draw_pairs(rng: random.Random, n: int, spec: SceneSpec, owns: Callable[[str], bool], *, max_objects: int,
                kinds: tuple[str, ...]) -> list[dict]:
    """n pairs over the scenes `owns` accepts; a scene may repeat, so the one-shape scenes (72 of
    them) keep their share of the split instead of running out."""
    out, tries = [], 0
    while len(out) < n:
        # The kind is drawn first, uniformly, then a scene it applies to: add and drop are then equally
        # frequent, so "the longer (or shorter) caption wins" is worth nothing.
        kind = rng.choice(kinds)
        sizes = [k for k in range(1, max_objects + 1) if applicable(kind, k, max_objects)]
        objects = random_objects(rng, rng.choice(sizes), spec)
        if not owns(_scene(objects)):
            tries += 1
            if tries > 100 * n:
                raise RuntimeError(f"cannot draw {n} pairs for this split")
            continue
        wrong = corrupt(objects, kind, rng, spec)
        out.append({"task": "caption", "messages": _user(QUESTION), "chosen": _answer(objects),
                    "rejected": _answer(wrong),
                    "meta": {"difficulty": None, "objects": objects, "corruption": kind, "rejected_objects": wrong}})
    return out


def write_preference_pairs(out: str | os.PathLike, *, seed: int = 0, n: int = 2000, n_heldout: int = 200,
                           max_objects: int = 3, kinds: tuple[str, ...] = CORRUPTIONS,
                           spec: SceneSpec = SceneSpec()) -> dict[str, Path]:
    """Write prefs_train.jsonl and prefs_heldout.jsonl (+ img/) under the folder `out`; returns their paths.

    n / n_heldout: pairs per split. The splits share no scene (PREF_SHARES) and each keeps the
    generator's mix of scene sizes. Deterministic for a seed.
    """
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    sizes = {"heldout": n_heldout, "train": n}
    splits = {name: _draw_pairs(random.Random(f"{seed}-prefs-{name}"), sizes[name], spec,
                                lambda key, name=name: split_owner(key, f"{seed}-prefs", PREF_SHARES) == name,
                                max_objects=max_objects, kinds=kinds)
              for name in ("heldout", "train")}
    paths = {name: write_scene_records(out / f"prefs_{name}.jsonl",
                                       [(f"pref-{name}-{i:05d}", rec) for i, rec in enumerate(recs)], spec)
             for name, recs in splits.items()}
    return paths
