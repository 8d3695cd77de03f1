"""Tables for the temporal grounding and grid-cell verifiers (hostile inputs included)."""
import pytest

from verifiers import Sample, load, registered
from verifiers.temporal_grounding import parse_interval, temporal_iou

HOSTILE = ["x" * 1_000_000, "\x00" * 100, "[" * 10_000 + "1, 2", "(" * 50_000, "\u202e\ufeff😀", "",
           "[1e999, 2e999]", "[nan, inf]", "[-999999999999, 99999999999999]", "[2.0,, 5.0]"]


def test_registered():
    assert {"temporal_grounding", "grid_cell"} <= set(registered())


@pytest.mark.parametrize("response, settings, expected", [
    ("[2.0, 5.0]", {}, 1.0),
    ("The square shows from [2, 5].", {}, 1.0),
    ("(2.0, 5.0)", {}, 1.0),
    ("[2 s, 5 seconds]", {}, 1.0),
    ("[5.0, 2.0]", {}, 1.0),                        # ends in either order
    ("[2.0, 3.5]", {}, 1.0),                        # tIoU 0.5: the threshold is inclusive
    ("[2.0, 3.4]", {}, 0.0),                        # tIoU 0.47
    ("[3.0, 6.0]", {}, 1.0),                        # tIoU 0.5
    ("[0.0, 1.0]", {}, 0.0),
    ("[0.0, 1.0] no, [2.0, 5.0]", {}, 0.0),         # two intervals: a hedge
    ("[0.0, 1.0] no, [2.0, 5.0]", {"pick": "last"}, 1.0),   # the last interval wins
    ("[2.0, 5.0], so [2 s, 5 s]", {}, 1.0),          # the same interval twice is one answer
    ("[2.0, 5.0] no, [0.0, 1.0]", {}, 0.0),
    ("[2.0, 4.0]", {"iou_threshold": 0.7}, 0.0),    # tIoU 0.67
    ("[2.0, 4.0]", {"mode": "soft"}, pytest.approx(2 / 3)),
    ("[2.0, 5.0]", {"mode": "soft"}, 1.0),
    ("[6.0, 9.0]", {"mode": "soft"}, 0.0),
    ("from 2 to 5", {}, 0.0),                       # not an interval form
    ("[2.0, 5.0, 7.0]", {}, 0.0),
] + [(h, {}, 0.0) for h in HOSTILE])
def test_temporal_grounding_table(response, settings, expected):
    s = load("temporal_grounding", **settings)(Sample("video_temporal", response, "[2.0, 5.0]"))
    assert s.value == expected and 0.0 <= s.value <= 1.0


@pytest.mark.parametrize("response, mode, correct", [
    ("[2.0, 4.0]", "soft", True),        # tIoU 0.67: rewarded 0.67, right at the 0.5 threshold
    ("[2.0, 3.0]", "soft", False),       # tIoU 0.33
    ("[2.0, 5.0]", "soft", True),
    ("nothing", "soft", None),           # not parsed: 0, no verdict beside it
    ("[2.0, 4.0]", "threshold", None),   # a binary value is its own verdict
])
def test_temporal_grounding_soft_mode_judges_by_the_threshold(response, mode, correct):
    assert load("temporal_grounding", mode=mode)(Sample("video_temporal", response, "[2.0, 5.0]")).correct is correct


def test_temporal_grounding_parts_abstain_and_bad_reference():
    v = load("temporal_grounding")
    s = v(Sample("video_temporal", "[3, 5]", "[2.0, 5.0]"))
    assert s.parts == {"parsed": 1.0, "tiou": pytest.approx(2 / 3)}
    assert v(Sample("video_temporal", "nothing", "[2.0, 5.0]")).parts == {"parsed": 0.0}
    assert v(Sample("video_temporal", "[1, 2]", None)).abstained
    with pytest.raises(ValueError, match="not an interval"):
        v(Sample("video_temporal", "[1, 2]", "two seconds"))


@pytest.mark.parametrize("a, b, expected", [
    ((0, 2), (1, 3), 1 / 3), ((0, 1), (1, 2), 0.0), ((0, 4), (1, 2), 0.25), ((2, 2), (2, 2), 1.0),
    ((2, 2), (3, 3), 0.0), ((2, 2), (0, 4), 0.0),
])
def test_temporal_iou(a, b, expected):
    assert temporal_iou(a, b) == pytest.approx(expected) and temporal_iou(b, a) == pytest.approx(expected)


def test_parse_interval_takes_the_tail_of_a_long_response():
    assert parse_interval("[1, 2]" + "x" * 30_000) is None
    assert parse_interval("x" * 30_000 + "[3, 4]") == (3.0, 4.0)


@pytest.mark.parametrize("response, settings, expected", [
    ("row 2, column 3", {}, 1.0),
    ("Row 2 Column 3", {}, 1.0),
    ("row 2 and column 3", {}, 1.0),
    ("row 2, col 3", {}, 1.0),
    ("r2c3", {}, 1.0),
    ("(2, 3)", {}, 1.0),
    ("row 3, column 2", {}, 0.0),
    ("row 1, column 1 or row 2, column 3", {}, 0.0),          # two cells: a hedge
    ("row 1, column 1 or row 2, column 3", {"pick": "last"}, 1.0),   # the last cell named wins
    ("row 1, column 1 or row 2, column 3", {"pick": "unique"}, 0.0),
    ("row 2, column 3; yes, row 2, column 3", {"pick": "unique"}, 1.0),
    ("row 2", {}, 0.0),
    ("rowboat 2, column 3", {}, 0.0),
] + [(h, {}, 0.0) for h in HOSTILE])
def test_grid_cell_table(response, settings, expected):
    s = load("grid_cell", **settings)(Sample("spot_difference", response, "row 2, column 3"))
    assert s.value == expected


def test_grid_cell_abstains_and_refuses_a_bad_reference():
    v = load("grid_cell")
    assert v(Sample("spot_difference", "row 1, column 1", None)).abstained
    with pytest.raises(ValueError, match="not one cell"):
        v(Sample("spot_difference", "row 1, column 1", "the middle"))
