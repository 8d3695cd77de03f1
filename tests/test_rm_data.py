"""Synthetic preference pairs and preference-record validation for the reward model."""
import json
import random

import pytest

from records import DataError, load_records, message_text
from rewards.rm_train import load_pairs
from synth.prefs import CORRUPTIONS, corrupt, write_preference_pairs
from synth.suite import SceneSpec, describe, random_objects


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_preference_pairs(tmp_path_factory.mktemp("prefs"), seed=0, n=60, n_heldout=30)


def _solution(turns):
    return message_text(turns[-1]).split("</think>")[1]


def test_pairs_are_valid_deterministic_and_disjoint(pairs, tmp_path):
    again = write_preference_pairs(tmp_path, seed=0, n=60, n_heldout=30)
    assert again["train"].read_text() == pairs["train"].read_text()
    scenes = {}
    for split, path in pairs.items():
        recs = load_pairs(path)
        assert all(r.task == "caption" and r.target is None for r in recs)
        scenes[split] = {json.dumps([(o["cell"], o["shape"], o["color"]) for o in r.meta["objects"]]) for r in recs}
        for r in recs:
            assert _solution(r.chosen) == describe(r.meta["objects"])
            assert _solution(r.rejected) == describe(r.meta["rejected_objects"]) != _solution(r.chosen)
            assert message_text(r.chosen[-1]).startswith("<think>")
    assert not scenes["train"] & scenes["heldout"]
    kinds = [r.meta["corruption"] for r in load_records(pairs["train"])]
    assert set(kinds) == set(CORRUPTIONS)


def test_both_preference_splits_keep_the_share_of_one_shape_scenes(tmp_path):
    # 72 one-shape scenes exist; drawn distinct and held-out first, the training split had almost none
    paths = write_preference_pairs(tmp_path, seed=0, n=400, n_heldout=200)
    share = {split: sum(len(r.meta["objects"]) == 1 for r in load_pairs(p)) / len(load_pairs(p))
             for split, p in paths.items()}
    assert share["train"] > 0.2 and abs(share["train"] - share["heldout"]) < 0.1, share


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_changes_exactly_one_thing(kind):
    rng, spec = random.Random(1), SceneSpec()
    for _ in range(50):
        objs = random_objects(rng, 2, spec)
        wrong = corrupt(objs, kind, rng, spec)
        key = lambda o: (o["cell"], o["shape"], o["color"])  # noqa: E731
        if kind in ("color", "shape"):
            diff = [(a, b) for a, b in zip(objs, wrong) if key(a) != key(b)]
            assert len(wrong) == 2 and len(diff) == 1
            changed = {f for f in ("color", "shape") if diff[0][0][f] != diff[0][1][f]}
            assert changed == {kind}
        else:
            assert len(wrong) == (3 if kind == "add" else 1)
            small, big = (objs, wrong) if kind == "add" else (wrong, objs)
            assert {key(o) for o in small} < {key(o) for o in big}


def _write(tmp_path, rec):
    good = {"id": "a", "task": "caption", "images": [], "messages": [{"role": "user", "content": "Describe."}],
            "chosen": [{"role": "assistant", "content": "<think>x</think>A red square."}],
            "rejected": [{"role": "assistant", "content": "<think>x</think>A blue square."}]}
    bad = {**good, "id": "b", **rec}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in bad.items() if v is not None}) + "\n")
    return f


@pytest.mark.parametrize("change, field", [
    ({"rejected": None}, "rejected"),
    ({"chosen": None, "rejected": None}, "chosen"),
    ({"chosen": "A red square."}, "chosen"),
    ({"rejected": [{"role": "robot", "content": "x"}]}, "rejected[0].role"),
    ({"rejected": [{"role": "user", "content": "x"}]}, "rejected[0].role"),
    ({"chosen": [{"role": "assistant", "content": "<think>x</think>"}]}, "chosen"),
    ({"rejected": [{"role": "assistant", "content": "<think>y</think>A red square."}]}, "rejected"),
    ({"messages": [{"role": "user", "content": "D"}, {"role": "assistant", "content": "x"}]}, "messages"),
])
def test_bad_preference_records_name_file_line_field(tmp_path, change, field):
    f = _write(tmp_path, change)
    with pytest.raises(DataError) as e:
        load_pairs(f)
    assert (e.value.path, e.value.line, e.value.field) == (str(f), 2, field), str(e.value)
