"""Tables for the grounding, counting, multiple-choice and instruction verifiers (hostile inputs included)."""
import subprocess
import sys

import pytest

from verifiers import Sample, load, registered
from verifiers.coords import CONVENTIONS, encode_box, resized_size

BOX = "[32, 4, 51, 23]"          # rl.synth: pixel box, inclusive corners, 84x84 image
SIZE = ((84, 84),)
HOSTILE = ["x" * 1_000_000, "\x00" * 100, "{" * 10_000, "[" * 10_000 + "1,2,3,4", "\u202e\ufeff😀", ""]


def test_shipped_verifiers_are_registered():
    assert {"math", "grounding", "counting", "multiple_choice", "instruction", "think_format"} <= set(registered())


@pytest.mark.parametrize("response, settings, expected", [
    (BOX, {}, 1.0),
    ("The red shape is at [32,4,51,23].", {}, 1.0),
    ("(30,5),(50,22)", {}, 1.0),                                         # IoU 0.78
    ("<box>[[381, 48, 619, 285]]</box>", {}, 1.0),                       # 0-1000 normalised (auto)
    ("<|box_start|>(380,47),(619,285)<|box_end|>", {"coords": "norm1000"}, 1.0),
    ("<|box_start|>(380,47),(619,285)<|box_end|>", {"coords": "pixel"}, 0.0),
    ("[51, 23, 32, 4]", {}, 1.0),                                         # corners in either order
    ("[0, 0, 10, 10]", {}, 0.0),
    ("[32, 4, 51, 23]", {"iou_threshold": 1.0}, 1.0),
    ("[32, 4, 45, 23]", {"iou_threshold": 0.9}, 0.0),
    ("(40, 10)", {}, 0.0),                                                # a point for a box question
    ("(40, 10)", {"mode": "hit"}, 1.0),                                   # a point question: hit test
    ("(70, 70)", {"mode": "hit"}, 0.0),
    ("[33, 5, 50, 22]", {"mode": "hit"}, 1.0),                            # a box inside the target
    ("[30, 2, 60, 30]", {"mode": "hit"}, 0.0),                            # a box larger than the target
    ("(40, 10)", {"mode": "hit", "accept": ["box"]}, 0.0),                # the route takes boxes only
    ("[60, 60, 80, 80]", {"mode": "hit"}, 0.0),
    ("no box here", {}, 0.0),
] + [(h, {}, 0.0) for h in HOSTILE])
def test_grounding_table(response, settings, expected):
    s = load("grounding", **settings)(Sample("grounding", response, BOX, SIZE))
    assert s.value == expected


def test_grounding_soft_iou_and_abstain():
    s = load("grounding", soft=True)(Sample("grounding", "(30,5),(50,22)", BOX, SIZE))
    assert 0.7 < s.value < 0.8 and s.parts["iou"] == s.value
    assert s.correct is True   # IoU >= 0.5: graded reward, the threshold's verdict
    assert load("grounding", soft=True, iou_threshold=0.8)(Sample("grounding", "(30,5),(50,22)", BOX, SIZE)).correct is False
    assert load("grounding")(Sample("grounding", "(30,5),(50,22)", BOX, SIZE)).correct is None
    assert load("grounding")(Sample("grounding", BOX)).value is None


def test_grounding_norm1000_needs_image_size():
    with pytest.raises(ValueError):
        load("grounding", coords="norm1000")(Sample("grounding", BOX, BOX))


@pytest.mark.parametrize("response, expected", [
    ("3", 1.0), ("There are 3 shapes.", 1.0), ("three", 1.0), ("There are Three shapes.", 1.0),
    ("\\boxed{3}", 1.0), ("3.0", 1.0), ("4", 0.0), ("33", 0.0), ("3.5", 0.0), ("twenty-three", 0.0),
    ("I count 4, no: 3.", 0.0), ("none", 0.0),
] + [(h, 0.0) for h in HOSTILE])
def test_counting_table(response, expected):
    assert load("counting")(Sample("counting", response, "3")).value == expected


def test_counting_refuses_hedging_unless_told_to_pick():
    v = load("counting")
    assert v(Sample("counting", "2 or 3", "3")).value == 0.0
    assert v(Sample("counting", "3, yes 3", "3")).value == 1.0
    assert v(Sample("counting", "twenty-one", "21")).value == 1.0
    assert load("counting", pick="last")(Sample("counting", "2 or 3", "3")).value == 1.0   # opt-in: pays hedges


def test_grounding_settings_are_checked():
    with pytest.raises(ValueError, match="no IoU"):
        load("grounding", accept=["box", "point"])
    with pytest.raises(ValueError, match="accept"):
        load("grounding", mode="hit", accept=["polygon"])


OPTIONS = {"options": ["London", "Paris", "Rome"]}


@pytest.mark.parametrize("response, expected", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("B) Paris", 1.0), ("\\boxed{B}", 1.0), ("**B**", 1.0),
    ("The answer is B", 1.0), ("Answer: (B)", 1.0), ("Paris", 1.0), ("It is Paris.", 1.0),
    ("A", 0.0), ("(C) Rome", 0.0), ("I think A or B... the answer is B", 0.0), ("London or Paris", 0.0),
] + [(h, 0.0) for h in HOSTILE])
def test_multiple_choice_table(response, expected):
    assert load("multiple_choice")(Sample("multiple_choice", response, "B", meta=OPTIONS)).value == expected


def test_multiple_choice_reference_by_text_and_without_options():
    assert load("multiple_choice")(Sample("multiple_choice", "B", "Paris", meta=OPTIONS)).value == 1.0
    assert load("multiple_choice")(Sample("multiple_choice", "(D)", "D")).value == 1.0


@pytest.mark.parametrize("response, settings, meta, expected", [
    ("a small cat", {"max_words": 5}, {}, 1.0),
    ("a b c d e f", {"max_words": 5}, {}, 0.0),
    ("abc", {"min_chars": 4}, {}, 0.0),
    ("A Cat sat", {"required": ["cat"]}, {}, 1.0),
    ("A Cat sat", {"required": ["cat"], "case_sensitive": True}, {}, 0.0),
    ("a dog", {"forbidden": ["dog"]}, {}, 0.0),
    ('{"a": [1, 2]}', {"json": True}, {}, 1.0),
    ('```json\n{"a": 1}\n```', {}, {"rules": {"json": True}}, 1.0),
    ("{'a': 1}", {}, {"rules": {"json": True}}, 0.0),
    ("[" * 100_000, {"json": True}, {}, 0.0),                             # deep nesting: not JSON, no crash
    ("one two three", {"max_words": 2, "aggregate": "mean"}, {"rules": {"required": "two"}}, 0.5),
    ("x" * 1_000_000, {"max_chars": 10}, {}, 0.0),
])
def test_instruction_table(response, settings, meta, expected):
    assert load("instruction", **settings)(Sample("instruction", response, meta=meta)).value == expected


def test_instruction_abstains_without_rules_and_rejects_unknown_rules():
    assert load("instruction")(Sample("instruction", "x")).value is None
    with pytest.raises(ValueError):
        load("instruction")(Sample("instruction", "x", meta={"rules": {"max_lines": 3}}))


def test_load_rejects_bad_settings():
    with pytest.raises(ValueError):
        load("grounding", radius=3)


def test_verifiers_import_no_heavy_runtime():
    code = ("import sys, verifiers; verifiers.load('math'); "
            "bad = [m for m in ('torch', 'ray', 'vllm') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# One box of a 300x300 image, [90, 60, 179, 149] in inclusive pixel corners, as each convention
# writes it. 'resized' with the tiny models' processor (factor 28, 3,136-12,544 pixels): 300x300 -> 84x84.
RESIZE = {"resize_factor": 28, "min_pixels": 56 * 56, "max_pixels": 112 * 112}
WRITTEN = {"pixel": [90, 60, 179, 149], "norm1000": [300, 200, 600, 500], "resized": [25, 17, 49, 41]}


def test_one_box_written_in_each_convention():
    box, size = WRITTEN["pixel"], (300, 300)
    kw = dict(factor=28, min_pixels=56 * 56, max_pixels=112 * 112)
    assert resized_size(*size, **kw) == (84, 84)   # 112x112 exactly at the cap; the rounding floors to 3 tokens
    assert {c: encode_box(box, c, size, **kw) for c in CONVENTIONS} == WRITTEN
    # the resize rounds each side to the factor, caps the area and lifts a small image to min_pixels
    assert resized_size(100, 60, **kw) == (112, 56) and resized_size(20, 20, **kw) == (56, 56)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_the_same_box_scores_in_its_own_convention_only(convention):
    """The box as `convention` writes it scores 1 (IoU > 0.9) read in that convention and 0 read in
    either other one; its centre as a point hits in that convention only."""
    ref, size = "[90, 60, 179, 149]", ((300, 300),)
    x1, y1, x2, y2 = WRITTEN[convention]
    for reader in CONVENTIONS:
        settings = {"coords": reader, **RESIZE}
        box = load("grounding", soft=True, **settings)(Sample("grounding", str(WRITTEN[convention]), ref, size))
        point = load("grounding", mode="hit", **settings)(   # a point answers a point question (hit mode)
            Sample("grounding", f"({(x1 + x2) // 2}, {(y1 + y2) // 2})", ref, size))
        if reader == convention:
            assert box.value > 0.9 and point.value == 1.0, reader
        else:
            assert box.value == 0.0 and point.value == 0.0, reader
