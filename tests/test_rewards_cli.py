"""`vlrl score` end to end in a subprocess: default routes, bad lines, and a third-party verifier
registered (a) by `file.py:Name` spec and (b) through the `vlrl.verifiers` entry-point group of an
installed distribution (a *.dist-info folder on PYTHONPATH), without touching vlrl's code."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "my_verifier.py"


def vlrl(*args, cwd, extra_path=()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, extra_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "recipe.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_with_default_routes(tmp_path):
    rows = [
        {"task": "math", "response": "<think>3+4</think>\\boxed{7}", "answer": "7", "prompt": "Add."},
        {"task": "math", "response": "\\boxed{7}", "answer": "7"},
        {"task": "counting", "response": "<think>x</think>There are three shapes.", "answer": 3},
        {"task": "grounding", "response": "<think>x</think>[32, 4, 51, 23]", "answer": "[32, 4, 51, 23]",
         "image_sizes": [[84, 84]]},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    r = vlrl("score", "in.jsonl", "--output", "out/scored.jsonl", "--set", "pool.workers=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = read_jsonl(tmp_path / "out" / "scored.jsonl")
    assert [o["reward"] for o in out] == [1.0, 0.0, 1.0, 1.0]
    assert out[0]["prompt"] == "Add." and out[1]["parts"]["format"] == 0.0
    assert not (tmp_path / "out" / "scored.jsonl.tmp").exists()


@pytest.mark.parametrize("line, where", [
    ("{not json", "in.jsonl:2: json"),
    ('{"task": "math"}', "in.jsonl:2: response"),
    ('{"task": "nope", "response": "x"}', "in.jsonl:2: task"),
    ('{"task": "caption", "response": "x"}', "in.jsonl:2: task"),
    ('{"task": "math", "response": "x", "answer": [1]}', "in.jsonl:2: answer"),
])
def test_bad_lines_exit_2_with_file_line_field(tmp_path, line, where):
    (tmp_path / "in.jsonl").write_text('{"task": "math", "response": "x", "answer": "1"}\n' + line + "\n")
    r = vlrl("score", "in.jsonl", "-o", "out.jsonl", "--set", "pool.workers=0", cwd=tmp_path)
    assert r.returncode == 2 and where in r.stderr, r.stderr
    assert not (tmp_path / "out.jsonl").exists()


ROWS = [{"task": "caption", "response": "<think>t</think>A Red Square.", "answer": "a red square"},
        {"task": "caption", "response": "<think>t</think>a blue circle", "answer": "a red square"}]


def test_custom_verifier_by_file_spec(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    r = vlrl("score", "in.jsonl", "-o", "out.jsonl", "--verifier", f"{EXAMPLE}:ExactMatch",
             "--set", "pool.workers=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [o["reward"] for o in read_jsonl(tmp_path / "out.jsonl")] == [1.0, 0.0]


def test_custom_verifier_by_entry_point(tmp_path):
    site = tmp_path / "site"
    dist = site / "my_verifier-0.1.dist-info"
    dist.mkdir(parents=True)
    shutil.copy(EXAMPLE, site / "my_verifier.py")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-verifier\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vlrl.verifiers]\nexact_match = my_verifier:ExactMatch\n")
    config = tmp_path / "reward.yaml"
    config.write_text("tasks:\n  caption: {verifiers: [{verifier: exact_match, settings: {case_sensitive: true}}]}\n"
                      "pool: {workers: 1}\n")
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    r = vlrl("score", "in.jsonl", "-o", "out.jsonl", "--config", config, cwd=tmp_path, extra_path=[site])
    assert r.returncode == 0, r.stderr
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [o["reward"] for o in out] == [0.0, 0.0]            # case_sensitive reached the verifier
    r = vlrl("score", "in.jsonl", "-o", "out.jsonl", "--verifier", "exact_match", "--set", "pool.workers=0",
             cwd=tmp_path, extra_path=[site])
    assert r.returncode == 0, r.stderr
    assert [o["reward"] for o in read_jsonl(tmp_path / "out.jsonl")] == [1.0, 0.0]
    assert read_jsonl(tmp_path / "out.jsonl")[0]["parts"]["exact_match/exact"] == 1.0
