"""The whole recipe as one resumable command: each stage writes its own folder and a `done.json`
marker; a finished stage is skipped on the next run.

Stages so far: model (tiny VLM or a given folder) -> data (synthetic suite or given files) ->
sft -> eval. RL and rejection-sampling rounds plug in after SFT.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rl.rl_config import RLConfig
from rl.sft import SFTConfig


@dataclass(frozen=True)
class DataConfig:
    synth: bool = True                    # draw the synthetic suite; else use the files below
    seed: int = 0
    n: int = 2000                         # synthetic SFT records per task
    n_heldout: int = 100                  # synthetic held-out records per task
    n_rl: int = 1000                      # synthetic RL prompt records per task
    sft: str = ""                         # SFT records (synth: false)
    rl: str = ""                          # RL prompt records (synth: false)
    heldout: str = ""                     # held-out prompt records (synth: false)


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str = "runs/tiny"            # every stage writes a sub-folder here
    model: str = "tiny"                   # "tiny" builds the embedded default; else an HF folder
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)   # its model/data/out are filled in by the pipeline
    rl: RLConfig = field(default_factory=RLConfig)      # likewise policy/data/eval_data/out/reward_model
    run_rl: bool = True


def _done(stage_dir: Path) -> dict | None:
    marker = stage_dir / "done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_done(stage_dir: Path, info: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / "done.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, stage_dir / "done.json")


def run_stage(name: str, stage_dir: Path, fn) -> dict:
    """Run `fn()` (returning a JSON-able dict) unless the stage already finished."""
    info = _done(stage_dir)
    if info is not None:
        print(f"[pipeline] {name}: done earlier, skipped ({stage_dir})")
        return info
    print(f"[pipeline] {name}: running -> {stage_dir}")
    t0 = time.time()
    info = {**fn(), "seconds": round(time.time() - t0, 1)}
    _mark_done(stage_dir, info)
    return info


def run_pipeline(cfg: PipelineConfig) -> dict:
    from rl.data import load_records
    from rl.evaluate import format_table

    run = Path(cfg.run_dir)

    def stage_model() -> dict:
        if cfg.model != "tiny":
            return {"model": str(Path(cfg.model).resolve())}
        from model.tiny import TinySpec, build_tiny_vlm
        from rl.synth import corpus_texts
        path = build_tiny_vlm(run / "model" / "hf", corpus_texts(seed=cfg.seed), TinySpec(seed=cfg.seed))
        return {"model": str(path.resolve())}

    def stage_data() -> dict:
        d = cfg.data
        if not d.synth:
            for p in (d.sft, d.heldout):
                load_records(p)  # validate now, not halfway through a stage
            return {"sft": d.sft, "rl": d.rl, "heldout": d.heldout}
        from rl.synth import write_suite
        paths = write_suite(run / "data", seed=d.seed, n=d.n, n_heldout=d.n_heldout, n_rl=d.n_rl)
        return {k: str(v.resolve()) for k, v in paths.items()}

    model = run_stage("model", run / "model", stage_model)["model"]
    data = run_stage("data", run / "data", stage_data)

    def stage_sft() -> dict:
        from rl.sft import train_sft
        scfg = dataclasses.replace(cfg.sft, model=model, data=data["sft"], eval_data=data["heldout"],
                                   out=str(run / "sft"))
        final = train_sft(scfg)
        table = json.loads((run / "sft" / "eval.json").read_text())
        return {"model": str(final.resolve()), "eval": table}

    sft = run_stage("sft", run / "sft", stage_sft)
    tables = {"sft": sft["eval"]}
    print(format_table(sft["eval"], "held-out accuracy after SFT"))
    final_model = sft["model"]

    def stage_rl(name: str, policy: str, reward_model: str | None) -> dict:
        from rl.ppo import fit
        rcfg = dataclasses.replace(cfg.rl, policy=policy, data=data["rl"], eval_data=data["heldout"],
                                   out=str(run / name), reward_model=reward_model or cfg.rl.reward_model)
        final = fit(rcfg)
        table = json.loads((run / name / "eval.json").read_text())
        return {"model": str(final.resolve()), "eval": table}

    if cfg.run_rl:
        rl = run_stage("rl", run / "rl", lambda: stage_rl("rl", final_model, None))
        tables["rl"] = rl["eval"]
        final_model = rl["model"]
    print(accuracy_table(tables))
    summary = {"stages": tables, "final_model": final_model}
    tmp = run / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, run / "summary.json")
    return summary


def accuracy_table(tables: dict[str, dict]) -> str:
    """Held-out accuracy per task (rows) after each stage (columns); format rate and RM score
    for tasks without a rule answer."""
    stages = list(tables)
    tasks = [t for t in next(iter(tables.values())) if t != "all"] + ["all"]
    head = f"{'task':<12}" + "".join(f"{s:>14}" for s in stages)
    lines = ["held-out accuracy by stage", head]
    for t in tasks:
        cells = []
        for s in stages:
            row = tables[s].get(t, {})
            if row.get("accuracy") is not None:
                cells.append(f"{100 * row['accuracy']:.1f}%")
            elif "rm_score" in row:
                cells.append(f"rm {row['rm_score']:.3f}")
            else:
                cells.append(f"fmt {100 * row.get('format', 0):.0f}%")
        lines.append(f"{t:<12}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)
