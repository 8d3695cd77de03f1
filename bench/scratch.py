"""Inputs the benchmarks build for themselves in a scratch folder, each built once and reused:
the tiny VLM (or a bigger random-init one of the same architecture), the synthetic suite, a
short SFT of the tiny VLM, and running one benchmark in a child process (clean memory figures)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from model.tiny import TinySpec, build_tiny_vlm
from recipe.sft import SFTConfig, SFTWorker, train_sft
from synth.extra import write_full_suite
from synth.suite import corpus_texts, write_suite
from synth.video import VIDEO_TASKS
from training.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_model(scratch: Path, *, spec=None, name: str = "tiny") -> Path:
    """A random-init Qwen2-VL folder under scratch/models/<name> (the tiny one by default)."""
    out = Path(scratch) / "models" / name
    if not (out / "config.json").is_file():
        build_tiny_vlm(out, corpus_texts(), spec or TinySpec())
    return out


def suite(scratch: Path, *, tasks=("counting",), n: int = 400, n_heldout: int = 400, n_rl: int = 256) -> dict[str, Path]:
    """The synthetic suite (seed 0) under scratch/data-<n>-<n_heldout>-<n_rl>: sft.jsonl, rl.jsonl,
    heldout.jsonl (the folder names the sizes, so a scratch folder of other sizes is not reused)."""
    out = Path(scratch) / f"data-{n}-{n_heldout}-{n_rl}"
    names = ("sft", "rl", "heldout")
    if all((out / f"{s}.jsonl").is_file() for s in names):
        return {s: out / f"{s}.jsonl" for s in names}
    return write_suite(out, seed=0, n=n, n_heldout=n_heldout, n_rl=n_rl, tasks=tasks)


def video_suite(scratch: Path, *, n_rl: int = 64) -> Path:
    """RL prompts of the suite's video tasks (seed 0) under scratch/data_video: its rl.jsonl."""
    out = Path(scratch) / "data_video"
    if not (out / "rl.jsonl").is_file():
        write_full_suite(out, seed=0, n=1, n_heldout=1, n_rl=n_rl, tasks=VIDEO_TASKS)
    return out / "rl.jsonl"


def sft_model(scratch: Path, model: Path, data: dict[str, Path], *, steps: int, take: int | None = None,
              batch_size: int = 16) -> Path:
    """The tiny VLM after SFT on the suite's SFT split: `steps` steps of the cosine schedule, and the
    checkpoint at step `take` (default: the end). Stopping before the end of the schedule leaves a
    policy that still explores when sampled, which RL needs (scratch/sft-<take>-of-<steps>)."""
    take = take or steps
    out = Path(scratch) / f"sft-{take}-of-{steps}"
    hf = out / f"step-{take}-hf" if take < steps else out / "final"
    if (hf / "config.json").is_file():
        return hf
    cfg = SFTConfig(model=str(model), data=str(data["sft"]), eval_data=None, out=str(out), steps=steps,
                    batch_size=batch_size, save_every=take, keep_checkpoints=steps // take + 1, log_every=10,
                    optim=OptimConfig(lr=3e-4, warmup_steps=20))
    train_sft(cfg, resume=False, progress=False)
    if take < steps:   # a checkpoint holds FSDP shards and the trainer state: write its weights as an HF folder
        SFTWorker(cfg).export_checkpoint(out / "checkpoints" / f"step-{take:06d}", "model", hf)
    return hf


def default_scratch() -> Path:
    """$VLRL_BENCH_SCRATCH, else a per-user folder under the system temp dir."""
    return Path(os.environ.get("VLRL_BENCH_SCRATCH") or Path(tempfile.gettempdir()) / f"vlrl-bench-{os.getuid()}")


def run_child(module: str, args: list[str], *, timeout: float, log: Path | None = None) -> dict:
    """Run `python -m module *args --json F` in a fresh process; return the JSON it wrote.

    A child per measurement keeps peak-memory figures and thread pools of one backend from leaking
    into the next. Its output goes to `log` (or is discarded); a failure raises with its tail."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        log = log or Path(tmp) / "child.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", module, *args, "--json", str(out)], cwd=REPO, env=env,
                                  stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{module} {' '.join(args)} exited {proc.returncode}:\n{tail}")
        return json.loads(out.read_text())
