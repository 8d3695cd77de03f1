"""A new task, as a user adds one: records of task `shape_parity` and a verifier in a file of their own
(`parity.py:Parity`), routed in a config's `reward.tasks`, with nothing in vlrl edited. Every command
accepts it: data check, rl, eval and score (the acceptance run, through the CLI), and sft, filter, rft."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from recipe.filter import run_filter
from recipe.reward_config import load_reward_config
from recipe.rft import run_rft
from recipe.sft import SFTConfig, train_sft
from records import DataError, load_records
from rollout.types import EngineConfig

REPO = Path(__file__).resolve().parents[1]

PARITY = '''
from dataclasses import dataclass

from verifiers.base import Sample, Score


@dataclass(frozen=True)
class Parity:
    """1 when the solution says the reference parity ("even" / "odd") and nothing else."""

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        said = {w.strip(".,!") for w in sample.response.lower().split()} & {"even", "odd"}
        if len(said) != 1:
            return Score(0.0, {"parsed": 0.0})
        return Score(float(said.pop() == sample.answer), {"parsed": 1.0})
'''

ROUTES = "  tasks:\n    shape_parity: {verifiers: [{verifier: parity.py:Parity}]}\n  pool: {workers: 1, timeout_s: 30}\n"


def write_parity_data(folder: Path, n: int = 4, *, sft: bool = False) -> Path:
    """n records of task shape_parity: k squares on an 84x84 image, "Is the number of squares even or odd?"."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        k = 1 + i % 4
        im = Image.new("RGB", (84, 84), "white")
        for j in range(k):
            ImageDraw.Draw(im).rectangle([4 + 20 * j, 30, 18 + 20 * j, 44], fill="red")
        im.save(folder / "img" / f"p{i}.png")
        answer = "even" if k % 2 == 0 else "odd"
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": "Is the number of squares even or odd?"}]}]
        if sft:
            messages.append({"role": "assistant", "content": [{"type": "text",
                                                               "text": f"<think>I count {k}.</think>{answer}"}]})
        lines.append({"id": f"parity-{i}", "task": "shape_parity", "images": [f"img/p{i}.png"], "messages": messages,
                      "answer": answer})
    path = folder / ("parity_sft.jsonl" if sft else "parity.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture
def user_dir(tmp_path):
    (tmp_path / "parity.py").write_text(PARITY)
    write_parity_data(tmp_path / "data")
    return tmp_path


def vlrl(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "recipe.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_new_task_passes_data_check_rl_and_score_as_a_user_runs_them(user_dir, sft_run):
    config = user_dir / "rl.yaml"
    config.write_text(f"algo: grpo\npolicy: {sft_run['final']}\ndata: data/parity.jsonl\neval_data: data/parity.jsonl\n"
                      "out: run\nsteps: 2\nprompts_per_step: 2\nsave_every: 0\n"
                      "rollout: {backend: hf, n: 2, max_tokens: 16}\nreward:\n" + ROUTES)
    r = vlrl("data", "check", "data/parity.jsonl", cwd=user_dir)
    assert r.returncode == 2 and "parity.jsonl:1: task: unknown task 'shape_parity'" in r.stderr
    assert "reward.tasks.shape_parity" in r.stderr and "Traceback" not in r.stderr
    r = vlrl("data", "check", "data/parity.jsonl", "--config", config, cwd=user_dir)
    assert r.returncode == 0 and "4 records ok (shape_parity 4)" in r.stdout, r.stderr

    r = vlrl("rl", "--config", config, "--no-progress", cwd=user_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (user_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "reward/shape_parity/total" in row] == [1, 2]
    assert rows[0]["reward/shape_parity/parity.py:Parity"] == rows[0]["reward/shape_parity/total"]
    table = json.loads((user_dir / "run" / "eval.json").read_text())
    assert table["shape_parity"]["n"] == 4 and table["shape_parity"]["accuracy"] is not None
    assert "reward" in table["shape_parity"]
    r = vlrl("eval", "--model", "run/final", "--data", "data/parity.jsonl", "--config", config, "--output", "ev.json",
             cwd=user_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((user_dir / "ev.json").read_text())["shape_parity"]["accuracy"] is not None

    (user_dir / "responses.jsonl").write_text(
        json.dumps({"task": "shape_parity", "response": "<think>1, 2</think>even", "answer": "even"}) + "\n"
        + json.dumps({"task": "shape_parity", "response": "<think>3</think>even or odd", "answer": "odd"}) + "\n")
    r = vlrl("score", "responses.jsonl", "-o", "scored.jsonl", "--config", config, cwd=user_dir)
    assert r.returncode == 0, r.stderr
    scored = [json.loads(line) for line in (user_dir / "scored.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in scored] == [1.0, 0.0] and [s["correct"] for s in scored] == [True, False]


@pytest.mark.slow
def test_sft_eval_filter_and_rft_accept_the_routed_task(user_dir, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(user_dir)   # the verifier spec is relative to where the user runs
    config = user_dir / "sft.yaml"
    config.write_text("reward:\n" + ROUTES.replace("workers: 1", "workers: 0"))
    routes, key = load_reward_config(str(config))
    assert key == "reward.tasks" and "shape_parity" in routes.known_tasks
    sft_data = write_parity_data(user_dir / "data", sft=True)
    with pytest.raises(DataError, match="route it under reward.tasks.shape_parity"):
        train_sft(SFTConfig(model=str(tiny_model_dir), data=str(sft_data), out=str(user_dir / "nope"), steps=1))
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(sft_data), eval_data="data/parity.jsonl",
                    out=str(user_dir / "sft"), steps=2, batch_size=2, save_every=0, reward=routes)
    final = train_sft(cfg, progress=False)
    row = json.loads((user_dir / "sft" / "eval.json").read_text())["shape_parity"]
    assert row["n"] == 4 and row["accuracy"] is not None and "reward" in row   # eval scored by the new route

    summary = run_filter(str(final), "data/parity.jsonl", str(user_dir / "f" / "kept.jsonl"), k=2, band=(0.0, 1.0),
                         reward_cfg=routes, engine=EngineConfig(backend="hf"), max_tokens=8, progress=False,
                         route_key=key)
    assert summary["tasks"]["shape_parity"]["total"] == 4
    kept = load_records(user_dir / "f" / "kept.jsonl", tasks=routes.known_tasks)
    assert all(r.meta["pass_rate"] is not None for r in kept)
    rft = run_rft(str(final), "data/parity.jsonl", str(user_dir / "rft"), k=2, reward_cfg=routes,
                  engine=EngineConfig(backend="hf"), max_tokens=8, progress=False, route_key=key)
    assert rft["tasks"]["shape_parity"]["samples"] == 8
