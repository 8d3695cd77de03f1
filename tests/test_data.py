"""Bad input stops with FILE:LINE: FIELD: message (library error and CLI exit code 2)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from records import DataError, load_records, write_records
from rewards.config import RewardConfig

ROUTED = RewardConfig().known_tasks   # the built-in routes

GOOD = {"id": "a", "task": "counting", "images": ["img.png"],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}],
        "answer": "3"}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (84, 84)).save(tmp_path / "img.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


def write(folder: Path, *records) -> Path:
    f = folder / "data.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f


def other(**changes):
    rec = {**GOOD, "id": "b", **changes}
    return {k: v for k, v in rec.items() if v is not None}


CASES = [
    ("bad json", '{"id": "b", "task": ', "json", "not valid JSON"),
    ("missing field", other(task=None), "task", "missing required field"),
    ("unknown task", other(task="juggling"), "task", "unknown task 'juggling': no reward route for it"),
    ("missing image", other(images=["nope.png"]), "images[0]", "image file not found"),
    ("corrupt image", other(images=["corrupt.png"]), "images[0]", "cannot decode image"),
    ("image count", other(images=[]), "images", "0 image(s) listed but the messages hold 1"),
    ("bad role", other(messages=[{"role": "robot", "content": "hi"}], images=[]), "messages[0].role", "must be one of"),
    ("bad part", other(messages=[{"role": "user", "content": [{"type": "audio"}]}], images=[]),
     "messages[0].content[0].type", "must be 'text', 'image' or 'video'"),
    ("duplicate id", other(id="a"), "id", "duplicate id 'a' (first on line 1)"),
    ("bad answer", other(answer={"x": 1}), "answer", "must be a string or a number"),
    ("half preference", other(chosen=[{"role": "assistant", "content": "x"}]), "rejected", "need both"),
]


@pytest.mark.parametrize("name,bad,field,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_record_names_file_line_field(folder, name, bad, field, needle):
    f = write(folder, GOOD, bad)
    with pytest.raises(DataError) as e:
        load_records(f, tasks=ROUTED)
    assert (e.value.path, e.value.line, e.value.field) == (str(f), 2, field)
    assert str(e.value).startswith(f"{f}:2: {field}: ") and needle in str(e.value)


def test_image_too_large(folder):
    Image.new("RGB", (300, 300)).save(folder / "big.png")
    f = write(folder, other(images=["big.png"]))
    with pytest.raises(DataError, match=r"data.jsonl:1: images\[0\]: image too large: 300x300"):
        load_records(f, max_pixels=200 * 200)


def test_sft_records_need_a_target(folder):
    f = write(folder, GOOD)
    with pytest.raises(DataError, match=r"data.jsonl:1: messages: an SFT record must end with an assistant"):
        load_records(f, require="target")


def test_images_resolve_relative_to_file_and_round_trip(folder, tmp_path):
    recs = load_records(write(folder, GOOD))
    assert recs[0].images == [(folder / "img.png").resolve()]
    out = folder / "sub" / "copy.jsonl"
    write_records(out, recs)
    again = load_records(out)
    assert again[0].images == recs[0].images and again[0].answer == "3"


def test_cli_check_exits_2_with_location(folder):
    f = write(folder, GOOD, other(task="juggling"))
    r = subprocess.run([sys.executable, "-m", "recipe.cli", "data", "check", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{f}:2: task: unknown task 'juggling'" in r.stderr and "reward.tasks.juggling" in r.stderr
    ok = write(folder, GOOD)
    r = subprocess.run([sys.executable, "-m", "recipe.cli", "data", "check", str(ok)], capture_output=True, text=True)
    assert r.returncode == 0 and "1 records ok" in r.stdout


def test_hf_datasets_folder_and_parquet(folder):
    import datasets

    ds = datasets.Dataset.from_list([dict(GOOD, id=f"r{i}") for i in range(3)])
    ds.save_to_disk(str(folder / "ds"))
    (folder / "ds" / "img.png").write_bytes((folder / "img.png").read_bytes())
    recs = load_records(folder / "ds")
    assert [r.id for r in recs] == ["r0", "r1", "r2"] and recs[0].images == [(folder / "ds" / "img.png").resolve()]
    ds.to_parquet(str(folder / "data.parquet"))
    assert [r.answer for r in load_records(folder / "data.parquet")] == ["3", "3", "3"]
    bad = datasets.Dataset.from_list([{**GOOD, "id": "x", "task": "juggling"}])
    bad.to_parquet(str(folder / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet:1: task: unknown task 'juggling'"):
        load_records(folder / "bad.parquet", tasks=ROUTED)
