import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from model.tiny import TinySpec, train_tokenizer
from records import load_media, load_records
from synth.boards import make_board_example
from synth.extra import ALL_TASKS, EXTRA_TASKS, extra_key, full_corpus_texts, write_full_suite
from synth.suite import COLORS, TASKS, SceneSpec, make_example, scene_key, split_owner, synth_split, write_suite
from verifiers import Sample, load


def test_suite_is_deterministic_and_valid(tmp_path):
    a = write_suite(tmp_path / "a", seed=3, n=12, n_heldout=5, n_rl=6)
    b = write_suite(tmp_path / "b", seed=3, n=12, n_heldout=5, n_rl=6)
    for split in ("sft", "rl", "heldout"):
        assert a[split].read_text() == b[split].read_text()
        recs = load_records(a[split], require="target" if split == "sft" else "prompt")
        assert {r.task for r in recs} == set(TASKS)
    img_a = Image.open(tmp_path / "a" / "img" / "sft-counting-00000.png")
    img_b = Image.open(tmp_path / "b" / "img" / "sft-counting-00000.png")
    assert img_a.size == (84, 84) and img_a.tobytes() == img_b.tobytes()


def test_splits_are_disjoint(tmp_path):
    paths = write_suite(tmp_path, seed=0, n=60, n_heldout=30, n_rl=30)
    keys = {}
    for split, p in paths.items():
        keys[split] = {scene_key(json.loads(line)) for line in p.read_text().splitlines()}
    assert not keys["sft"] & keys["heldout"] and not keys["rl"] & keys["heldout"] and not keys["sft"] & keys["rl"]


def test_eval_and_sft_splits_keep_the_generators_mix_and_the_rl_split_lists_each_scene_once(tmp_path):
    # Half of the grounding scenes have one shape, and there are only 72 of those. Drawing distinct
    # scenes, the held-out split (drawn first) took all of them and the SFT split none. The RL split
    # does list each scene once: repeated, its few one-shape scenes were half its grounding prompts.
    paths = write_suite(tmp_path, seed=0, n=400, n_heldout=200, n_rl=100, tasks=("grounding",))
    recs = {split: [json.loads(line) for line in p.read_text().splitlines()] for split, p in paths.items()}
    for split in ("heldout", "sft"):
        one = sum(len(r["meta"]["objects"]) == 1 for r in recs[split]) / len(recs[split])
        assert 0.4 < one < 0.6, (split, one)
        assert len({scene_key(r) for r in recs[split]}) < len(recs[split])   # repeats kept
    keys = [scene_key(r) for r in recs["rl"]]
    assert len(keys) == 100 and len(set(keys)) == 100


def test_a_distinct_split_keeps_what_it_finds_when_a_task_runs_out_of_scenes(capsys):
    spec = SceneSpec()
    # 72 one-shape and 3,456 two-shape grounding scenes exist; a split owning a tenth holds ~350
    owns = lambda key: split_owner(key, 0, (("a", 0.1), ("b", 0.9))) == "a"
    recs = synth_split(random.Random(0), 1000, spec, ("grounding", "counting"), owns, distinct=True)
    grounding = [scene_key(r) for r in recs if r["task"] == "grounding"]
    assert 250 < len(grounding) < 450 and len(set(grounding)) == len(grounding)
    assert sum(r["task"] == "counting" for r in recs) == 1000
    assert "distinct grounding scenes for this split, fewer than the 1000 asked" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="cannot draw 1000 grounding"):
        synth_split(random.Random(0), 1000, spec, ("grounding",), lambda key: False)


def test_answers_match_the_drawn_scene():
    rng = random.Random(0)
    spec = SceneSpec()
    seen_color_questions = set()
    for _ in range(50):
        for task in TASKS:
            rec = make_example(task, rng, spec)
            objs = rec["meta"]["objects"]
            target = rec["messages"][-1]["content"][0]["text"]
            assert target.startswith("<think>") and "</think>" in target
            for o in objs:
                x1, y1, x2, y2 = o["box"]
                assert 0 <= x1 < x2 < spec.side and 0 <= y1 < y2 < spec.side
            question = rec["messages"][0]["content"][1]["text"]
            if task in ("counting", "math"):
                # "How many [red ]shapes ..." / "Add k to the number of [red ]shapes. ..."
                color = re.search(r"(\w+) shapes\b", question).group(1)
                n = sum(o["color"] == color for o in objs) if color in COLORS else len(objs)
                assert n >= 1
                seen_color_questions.add(color in COLORS)
            if task == "counting":
                assert rec["answer"] == str(n) and target.endswith(f"</think>{n}")
            if task == "grounding":
                color = rec["messages"][0]["content"][1]["text"].split()[3]
                (box,) = [o["box"] for o in objs if o["color"] == color]
                assert json.loads(rec["answer"]) == box
            if task == "math":
                k = int(question.split()[1])
                assert int(rec["answer"]) == n + k
            if task == "caption":
                assert "answer" not in rec
    assert seen_color_questions == {True, False}   # both question forms are drawn


# ----------------------------------------------------------------------------- the video and multi-image tasks

def test_full_suite_keeps_the_core_records_byte_identical_and_adds_every_task(tmp_path):
    core = write_suite(tmp_path / "core", seed=3, n=12, n_heldout=5, n_rl=6)
    full = write_full_suite(tmp_path / "full", seed=3, n=12, n_heldout=5, n_rl=6)
    again = write_full_suite(tmp_path / "again", seed=3, n=12, n_heldout=5, n_rl=6)
    for split in ("sft", "rl", "heldout"):
        core_lines = core[split].read_text().splitlines()
        full_lines = full[split].read_text().splitlines()
        assert full_lines[:len(core_lines)] == core_lines                      # the core records come first, unchanged
        assert full[split].read_text() == again[split].read_text()
        recs = load_records(full[split], require="target" if split == "sft" else "prompt", decode_videos=True)
        assert {r.task for r in recs} == set(ALL_TASKS)
    for name in ("sft-counting-00000.png", "heldout-grounding-00005.png"):
        assert (tmp_path / "core" / "img" / name).read_bytes() == (tmp_path / "full" / "img" / name).read_bytes()
    assert (tmp_path / "full" / "vid" / "rl-video_count-00000.mov").read_bytes() == \
        (tmp_path / "again" / "vid" / "rl-video_count-00000.mov").read_bytes()
    only = write_full_suite(tmp_path / "only", seed=3, n=12, n_heldout=5, n_rl=6, tasks=("puzzle",))
    assert {json.loads(line)["task"] for line in only["sft"].read_text().splitlines()} == {"puzzle"}
    with pytest.raises(ValueError, match="unknown synthetic task"):
        write_full_suite(tmp_path / "bad", tasks=("juggling",))


def test_extra_splits_are_disjoint(tmp_path):
    paths = write_full_suite(tmp_path, seed=0, n=60, n_heldout=30, n_rl=30, tasks=EXTRA_TASKS)
    keys = {split: {extra_key(json.loads(line)) for line in p.read_text().splitlines()} for split, p in paths.items()}
    assert not keys["sft"] & keys["heldout"] and not keys["rl"] & keys["heldout"] and not keys["sft"] & keys["rl"]


def _on_screen(frame, box, side: int = 84) -> tuple | None:
    """The colour at a box's centre (drawn at side x side pixels), None for a cell's dark background."""
    scale = frame.shape[0] / side
    x, y = round((box[0] + box[2]) / 2 * scale), round((box[1] + box[3]) / 2 * scale)
    px = tuple(int(v) for v in frame[y, x])
    return px if max(px) > 180 else None


def _is(px, rgb) -> bool:
    """A resized frame's pixel is the colour (bicubic resizing moves a value by a few levels)."""
    return px is not None and max(abs(a - b) for a, b in zip(px, rgb)) < 24


def _cell_colour(px) -> str:
    """The colour name of a pixel at a cell's centre, "-" for the dark background."""
    return next((name for name, rgb in COLORS.items() if _is(tuple(int(v) for v in px), rgb)), "-")


def test_extra_answers_match_the_drawn_media(tmp_path):
    paths = write_full_suite(tmp_path, seed=1, n=30, n_heldout=0, n_rl=0, tasks=EXTRA_TASKS)
    recs = load_records(paths["sft"], require="target")
    instruction, choice = load("instruction"), load("multiple_choice")
    seen = set()
    for r in recs:
        target = r.target
        thought, solution = target[len("<think>"):].split("</think>")
        question = r.messages[0]["content"][-1]["text"]
        if r.task in ("video_temporal", "video_count"):
            media = load_media(r)
            frames = np.concatenate(media.videos)[::2]           # one frame a clip: each clip is one picture
            step = 1.0 if r.task == "video_temporal" else 2.0
            assert [p["text"] for p in media.messages[0]["content"][:-1:2]] == [
                f"[{k * step:.1f} second]" for k in range(len(frames))]
            color, shape = question.split(" the ")[1].split()[:2]
            target_events = [e for e in r.meta["events"] if (e["color"], e["shape"]) == (color, shape.rstrip("?"))]
            assert frames.shape[1:3] == (84, 84)                  # within budget at the top of the ladder
            on = [any(_is(_on_screen(f, e["box"]), COLORS[color]) for e in target_events) for f in frames]
            onsets = [k * step for k in range(len(on)) if on[k] and (k == 0 or not on[k - 1])]
            if r.task == "video_temporal":
                (start,) = onsets
                end = next(k * step for k in range(len(on)) if k * step > start and not on[k])
                assert json.loads(r.answer) == [start, end] and solution == r.answer
            else:
                assert r.answer == solution == str(len(onsets))
                assert thought.startswith(f"I count {len(onsets)} {color} {shape}")
        elif r.task == "spot_difference":
            a, b = (np.asarray(im) for im in load_media(r).images)
            rows, cols = np.nonzero((a != b).any(-1))
            cells = {(y // 28 + 1, x // 28 + 1) for y, x in zip(rows, cols)}
            assert [f"row {y}, column {x}" for y, x in cells] == [r.answer] == [solution]
            assert load("grid_cell")(Sample("spot_difference", solution, r.answer)).value == 1.0
            # the thought reads each drawn cell: the first board's colours, then "=" or the second's
            before, after = ([_cell_colour(im[14 + 28 * (c // 3), 14 + 28 * (c % 3)]) for c in range(9)] for im in (a, b))
            marks = ["=" if x == y else y for x, y in zip(before, after)]
            assert thought == f"First: {' '.join(before)}. Second: {' '.join(marks)}."
            (odd,) = [c for c, m in enumerate(marks) if m != "="]
            assert r.answer == f"row {odd // 3 + 1}, column {odd % 3 + 1}"
        elif r.task == "puzzle":
            options, chosen = r.meta["options"], r.answer
            (board,) = r.meta["boards"]
            assert len(board) == 8 and all(o["cell"] != 8 for o in board)
            assert chosen == f"a {board[2]['color']} {board[2]['shape']}" == f"a {board[5]['color']} {board[5]['shape']}"
            assert solution == chosen and thought == f"The last row lacks {chosen}."
            letter = "ABCD"[options.index(chosen)]
            for response, score in ((solution, 1.0), (letter, 1.0), (next(o for o in options if o != chosen), 0.0)):
                assert choice(Sample("puzzle", response, r.answer, meta=r.meta)).value == score
        elif r.task == "instruction":
            assert instruction(Sample("instruction", solution, r.answer, meta=r.meta)).value == 1.0
            limit = int(question.split("at most ")[1].split()[0])
            assert len(solution.split()) <= limit and set(r.meta["rules"]["required"]) <= {
                o["color"] for o in r.meta["boards"][0]}
        seen.add(r.task)
    assert seen == set(EXTRA_TASKS)


def test_spot_difference_targets_fit_the_demo_rollout_budget():
    """The longest spot_difference target (thought + answer + end of turn), in the tiny tokenizer
    trained on the suite, fits the demo's rl.rollout.max_tokens."""
    tok = train_tokenizer(full_corpus_texts(seed=0, n=100), TinySpec().vocab_size)
    rng, spec = random.Random(0), SceneSpec()
    targets = [make_board_example("spot_difference", rng, spec)["messages"][1]["content"][0]["text"] for _ in range(500)]
    longest = max(len(tok(t)["input_ids"]) + 1 for t in targets)
    demo = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "pipeline.yaml"
    budget = yaml.safe_load(demo.read_text())["rl"]["rollout"]["max_tokens"]
    assert longest == 35 <= budget
