"""The whole recipe as one resumable command: each stage writes its own folder and a `done.json`
marker; a finished stage is skipped on the next run.

    model -> data -> sft -> [prefs -> rm] -> rl -> ( filterN -> rftN -> rlN ) x rounds -> report

The run folder is the layout `vlrl report` reads (see docs/rft.md): `summary.json` holds every
stage's held-out table and the stage order. Every stage (SFT evals, RL, filter, RFT) scores with
the routes of `rl.reward`: the tasks routed there are the ones the data may hold.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from model.families import DEFAULT_FAMILY, FAMILIES, grounding_settings
from model.load import load_processor
from model.tiny import TinySpec, build_tiny_vlm
from recipe.filter import run_filter
from recipe.report import write_report
from recipe.rft import run_rft
from recipe.sft import SFTConfig, train_sft
from records import load_records, write_records
from records.mixture import mix_replay, seeded_sample
from rewards.evaluate import add_rm_scores, format_table, repeats_prompts
from rewards.rm import RewardModelScorer
from rewards.rm_train import RMConfig, train_rm
from rl.config import RLConfig
from rl.driver import fit, start_ray
from synth.prefs import write_preference_pairs
from synth.extra import ALL_TASKS, full_corpus_texts, write_full_suite
from synth.suite import SceneSpec
from training.atomic import write_json
from training.config import ConfigError, check_input
from training.distributed import FSDPConfig
from training.optim import OptimConfig
from training.placement import start_ray_once

ROUTE_KEY = "rl.reward.tasks"   # every stage scores with the RL stage's reward routes


@dataclass(frozen=True)
class DataConfig:
    synth: bool = True                    # draw the synthetic suite; else use the files below
    seed: int = 0
    n: int = 2000                         # synthetic SFT records per task
    n_heldout: int = 100                  # synthetic held-out records per task
    n_rl: int = 1000                      # synthetic RL prompt records per task
    color_questions: float = 0.5          # share of counting/math questions about one colour (SceneSpec)
    tasks: tuple[str, ...] = ALL_TASKS    # synthetic tasks drawn (the image, video and multi-image ones)
    sft: str = ""                         # SFT records (synth: false)
    rl: str = ""                          # RL prompt records (synth: false)
    heldout: str = ""                     # held-out prompt records (synth: false)

    def __post_init__(self):              # at load time, with the config file's name
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ConfigError(f"tasks: unknown synthetic task(s) {unknown} (known: {', '.join(ALL_TASKS)})")


@dataclass(frozen=True)
class RMStageConfig:
    enabled: bool = True                  # train a reward model for the RM-routed (RLHF) prompts
    path: str = ""                        # use this RM folder instead of training one
    n_pairs: int = 2000                   # synthetic preference pairs (synthetic data only)
    n_heldout_pairs: int = 200
    steps: int = 300
    batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20))
    # parameter prefixes start at `critic.backbone.` (e.g. lr_scale {critic.backbone.visual: 3})
    workers: int = 1                      # ranks of an FSDP2 group sharing each batch (as sft.workers)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass(frozen=True)
class RoundConfig:
    """One rejection-sampling round: re-estimate difficulty with the current model, keep the prompts
    in the band, fine-tune on the accepted samples, then RL again on the kept prompts."""

    k: int = 8                            # samples per prompt for the pass rate and for RFT
    band: tuple[float, ...] = (0.1, 0.9)  # keep prompts whose pass rate lies in [low, high]
    max_prompts: int = 400                # prompts re-estimated per round (from the RL prompt file)
    temperature: float = 1.0
    max_tokens: int = 48
    max_per_prompt: int = 2               # accepted samples kept per prompt
    min_overlap: float = 0.0              # RFT takes a correct box / interval answer only at this IoU / tIoU or above
    replay: float = 0.0                   # SFT records mixed into the RFT data per accepted sample
    rl_replay: float = 0.0                # prompts from outside the band mixed into the round's RL per kept prompt
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(
        steps=40, batch_size=16, save_every=0, optim=OptimConfig(lr=2e-5, warmup_steps=5, schedule="constant")))
    rl_steps: int = 60                    # RL steps after the RFT model

    def __post_init__(self):              # at load time, with the config file's name
        for key in ("replay", "rl_replay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0 (records mixed in per kept one), got {getattr(self, key)}")
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ConfigError(f"min_overlap: must lie in [0, 1] (an IoU), got {self.min_overlap}")


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str = "runs/tiny"            # every stage writes a sub-folder here
    model: str = "tiny"                   # "tiny" builds the embedded default; else an HF folder
    family: str = DEFAULT_FAMILY          # the tiny model's family: qwen2_vl, qwen2_5_vl, qwen3_vl (an HF folder
                                          # brings its own, from its config.json)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)   # its model/data/out/reward are filled in by the pipeline
    rm: RMStageConfig = field(default_factory=RMStageConfig)
    rl: RLConfig = field(default_factory=RLConfig)      # likewise policy/data/eval_data/out/reward_model
    run_rl: bool = True
    rounds: int = 1                       # filter -> RFT -> RL rounds after the first RL
    round: RoundConfig = field(default_factory=RoundConfig)

    def __post_init__(self):              # at load time, with the config file's name
        if self.family not in FAMILIES:
            raise ConfigError(f"family: {self.family!r} is not one of {', '.join(FAMILIES)}")


def _done(stage_dir: Path) -> dict | None:
    marker = stage_dir / "done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None



def run_stage(name: str, stage_dir: Path, fn) -> dict:
    """Run `fn()` (returning a JSON-able dict) unless the stage already finished."""
    info = _done(stage_dir)
    if info is not None:
        print(f"[pipeline] {name}: done earlier, skipped ({stage_dir})")
        return info
    print(f"[pipeline] {name}: running -> {stage_dir}", flush=True)
    t0 = time.time()
    info = {**fn(), "seconds": round(time.time() - t0, 1)}
    write_json(stage_dir / "done.json", info)
    return info


def run_pipeline(cfg: PipelineConfig) -> dict:
    run = Path(cfg.run_dir)
    t_start = time.time()
    tables: dict[str, dict] = {}

    def stage_model() -> dict:
        if cfg.model != "tiny":
            return {"model": str(Path(cfg.model).resolve())}
        path = build_tiny_vlm(run / "model" / "hf", full_corpus_texts(seed=cfg.seed), TinySpec(seed=cfg.seed),
                              family=cfg.family)
        return {"model": str(path.resolve())}

    def stage_data() -> dict:
        d = cfg.data
        if not d.synth:
            for key in ("sft", "rl", "heldout"):   # validate now, not halfway through a stage
                check_input(f"data.{key}", getattr(d, key), kind="data")
                load_records(getattr(d, key), tasks=cfg.rl.reward.known_tasks, route_key=ROUTE_KEY)
            return {"sft": d.sft, "rl": d.rl, "heldout": d.heldout}
        # grounding targets in the coordinates of the model's family
        spec = SceneSpec(color_questions=d.color_questions, **grounding_settings(load_processor(base)))
        paths = write_full_suite(run / "data", seed=d.seed, n=d.n, n_heldout=d.n_heldout, n_rl=d.n_rl,
                                 tasks=d.tasks, spec=spec)
        return {k: str(v.resolve()) for k, v in paths.items()}

    base = run_stage("model", run / "model", stage_model)["model"]
    data = run_stage("data", run / "data", stage_data)
    if cfg.run_rl and not (cfg.rm.path or cfg.rm.enabled):   # an RM-routed prompt needs rl.reward_model
        tasks = {r.task for key in ("rl", "heldout") for r in load_records(data[key], check_images=False)}
        try:
            cfg.rl.check_sources(tasks)
        except ConfigError as e:
            raise ConfigError(f"rl.{e} (or enable rm)") from None
    with _one_ray(cfg):
        return _train(cfg, run, base, data, tables, t_start)


def _train(cfg: PipelineConfig, run: Path, base: str, data: dict, tables: dict, t_start: float) -> dict:
    """The stages after the data: SFT, the reward model, RL and the rounds, then the report."""
    def stage_sft() -> dict:
        scfg = dataclasses.replace(cfg.sft, model=base, data=data["sft"], eval_data=data["heldout"],
                                   out=str(run / "sft"), reward=cfg.rl.reward)
        final = train_sft(scfg)
        return {"model": str(final.resolve()), "eval": _read_eval(run / "sft")}

    sft = run_stage("sft", run / "sft", stage_sft)
    print(format_table(sft["eval"], "held-out accuracy after SFT"))
    model = sft["model"]
    rm_path = _reward_model(cfg, run, model)
    rm_score = _rm_scorer(rm_path, load_records(data["heldout"]), cfg.rl.reward)
    tables["sft"] = rm_score(sft["eval"], run / "sft")

    def stage_rl(name: str, policy: str, prompts: str, steps: int) -> dict:
        rcfg = dataclasses.replace(cfg.rl, policy=policy, data=prompts, eval_data=data["heldout"],
                                   out=str(run / name), reward_model=rm_path, steps=steps)
        final = fit(rcfg)
        return {"model": str(final.resolve()), "eval": _read_eval(run / name)}

    if cfg.run_rl:
        rl = run_stage("rl", run / "rl", lambda: stage_rl("rl", model, data["rl"], cfg.rl.steps))
        tables["rl"], model = rl["eval"], rl["model"]
        for i in range(1, cfg.rounds + 1):
            model = _round(cfg, run, i, model, data, rm_path, tables, stage_rl, rm_score)

    summary = {"stages": tables, "order": list(tables), "final_model": model,
               "seconds": round(time.time() - t_start, 1)}
    write_json(run / "summary.json", summary)
    report = write_report(run)
    print(accuracy_table(tables))
    print(f"[pipeline] report: {report}")
    return summary


@contextmanager
def _one_ray(cfg: PipelineConfig):
    """One Ray instance for every stage that places its workers with Ray (SFT and RM ranks, the RL
    workers, the round's SFT) where the stages would each start and stop their own (seconds each):
    a stage ends its workers and leaves a Ray it did not start running."""
    rm_trains = cfg.rm.enabled and not cfg.rm.path
    needed = (cfg.sft.workers > 1 or (rm_trains and cfg.rm.workers > 1)
              or (cfg.run_rl and (cfg.rl.use_ray or (cfg.rounds > 0 and cfg.round.sft.workers > 1))))
    if not needed:
        yield
        return
    import ray  # optional: only Ray placement needs it
    if ray.is_initialized():
        yield
        return
    if cfg.run_rl and cfg.rl.use_ray:   # the RL workers' cluster settings
        start_ray(cfg.rl.ray)
    else:
        start_ray_once()
    try:
        yield
    finally:
        ray.shutdown()


def _reward_model(cfg: PipelineConfig, run: Path, policy: str) -> str | None:
    """The RM for RM-routed prompts: a given folder, or one trained on synthetic pairs."""
    if cfg.rm.path:
        return cfg.rm.path
    if not cfg.rm.enabled:
        return cfg.rl.reward_model

    def stage_prefs() -> dict:
        paths = write_preference_pairs(run / "prefs", seed=cfg.data.seed, n=cfg.rm.n_pairs,
                                       n_heldout=cfg.rm.n_heldout_pairs)
        return {k: str(Path(v).resolve()) for k, v in paths.items()}

    def stage_rm() -> dict:
        rcfg = RMConfig(model=policy, data=pairs["train"], eval_data=pairs["heldout"], out=str(run / "rm"),
                        steps=cfg.rm.steps, batch_size=cfg.rm.batch_size, seed=cfg.seed,
                        optim=cfg.rm.optim, workers=cfg.rm.workers, fsdp=cfg.rm.fsdp)
        final = train_rm(rcfg)
        return {"model": str(final.resolve()), "eval": json.loads((run / "rm" / "eval.json").read_text())}

    pairs = run_stage("prefs", run / "prefs", stage_prefs)
    return run_stage("rm", run / "rm", stage_rm)["model"]


def _rm_scorer(rm_path: str | None, heldout, reward_cfg):
    """table, stage folder -> table with the RM's score of the stage's saved greedy generations
    (`eval.generations.jsonl`) on RM-routed prompts, so SFT stages compare with RL stages."""
    cache = {}

    def add(table: dict, folder: Path) -> dict:
        gens = folder / "eval.generations.jsonl"
        if rm_path is None or not gens.is_file():
            return table
        if "rm" not in cache:
            cache["rm"] = RewardModelScorer(rm_path)
        by_id = {json.loads(line)["id"]: json.loads(line)["response"] for line in gens.read_text().splitlines()}
        recs = [r for r in heldout if r.id in by_id]
        return add_rm_scores(json.loads(json.dumps(table)), recs, [by_id[r.id] for r in recs], reward_cfg, cache["rm"])

    return add


def _round(cfg: PipelineConfig, run: Path, i: int, model: str, data: dict, rm_path: str | None,
           tables: dict, stage_rl, rm_score) -> str:
    """filter_i -> rft_i -> rl_i; returns the round's final model."""
    rc = cfg.round

    def stage_filter() -> dict:
        # a seeded sample across the whole file (prompt files are often grouped by task)
        prompts = seeded_sample(load_records(data["rl"]), rc.max_prompts, seed=cfg.seed + i)
        src = run / f"filter{i}" / "prompts.jsonl"
        write_records(src, prompts)
        summary = run_filter(model, str(src), str(run / f"filter{i}" / "rl.jsonl"), k=rc.k,
                             band=(rc.band[0], rc.band[1]), reward_cfg=cfg.rl.reward,
                             engine=cfg.rl.rollout, replicas=cfg.rl.rollout.replicas, rm_path=rm_path,
                             max_tokens=rc.max_tokens, temperature=rc.temperature, seed=cfg.seed + i,
                             route_key=ROUTE_KEY)
        rl_prompts = run / f"filter{i}" / "rl.jsonl"
        if rc.rl_replay > 0:  # the round's RL also sees the tasks the band dropped, against forgetting them
            mixed = mix_replay(load_records(rl_prompts), load_records(data["rl"]), rc.rl_replay, seed=cfg.seed + i)
            rl_prompts = run / f"filter{i}" / "rl_replay.jsonl"
            write_records(rl_prompts, mixed)
        return {"kept": str((run / f"filter{i}" / "rl.jsonl").resolve()), "rl_prompts": str(rl_prompts.resolve()),
                "counts": summary.get("counts", {})}

    filtered = run_stage(f"filter{i}", run / f"filter{i}", stage_filter)
    kept = filtered["kept"]

    def stage_rft() -> dict:
        summary = run_rft(model, kept, str(run / f"rft{i}"), k=rc.k, reward_cfg=cfg.rl.reward, sft_cfg=None,
                          engine=cfg.rl.rollout, replicas=cfg.rl.rollout.replicas, rm_path=rm_path,
                          max_per_prompt=rc.max_per_prompt, min_overlap=rc.min_overlap, max_tokens=rc.max_tokens, temperature=rc.temperature,
                          seed=cfg.seed + 100 + i, route_key=ROUTE_KEY)
        if not summary["counts"]["accepted"]:
            print(f"[pipeline] rft{i}: no sample was accepted; the round goes on with the current model")
            return {"model": model, "eval": tables[list(tables)[-1]], "accepted": 0}
        rft_data = summary["sft_data"]
        if rc.replay > 0:  # against forgetting the tasks the accepted samples barely cover
            rft_data = str(run / f"rft{i}" / "rft_replay.jsonl")
            accepted = load_records(summary["sft_data"], require="target")
            write_records(rft_data, accepted + seeded_sample(load_records(data["sft"], require="target"),
                                                             round(rc.replay * len(accepted)), seed=cfg.seed + i))
        scfg = dataclasses.replace(rc.sft, model=model, data=rft_data, eval_data=data["heldout"],
                                   out=str(run / f"rft{i}" / "sft"), reward=cfg.rl.reward)
        final = train_sft(scfg)
        return {"model": str(final.resolve()), "eval": _read_eval(run / f"rft{i}" / "sft"),
                "accepted": summary["counts"]["accepted"]}

    rft = run_stage(f"rft{i}", run / f"rft{i}", stage_rft)
    tables[f"rft{i}"] = rm_score(rft["eval"], run / f"rft{i}" / "sft")
    rl_prompts = filtered.get("rl_prompts", kept)   # a filter stage finished before rl_replay existed has none
    rl = run_stage(f"rl{i}", run / f"rl{i}", lambda: stage_rl(f"rl{i}", rft["model"], rl_prompts, rc.rl_steps))
    tables[f"rl{i}"] = rl["eval"]
    return rl["model"]


def _read_eval(folder: Path) -> dict:
    return json.loads((folder / "eval.json").read_text())


def accuracy_table(tables: dict[str, dict]) -> str:
    """Held-out accuracy per task (rows) after each stage (columns), followed by the accuracy over
    distinct prompts where the file repeats some ("62.7 / 49.0%"); the reward model's score (or the
    format rate) for tasks without a rule answer."""
    stages = list(tables)
    tasks = [t for t in next(iter(tables.values())) if t != "all"] + ["all"]
    w = max([12] + [len(t) for t in tasks])   # the task column fits the longest name ("spot_difference")
    head = f"{'task':<{w}}" + "".join(f"{s:>14}" for s in stages)
    lines = ["held-out accuracy by stage (all records / distinct prompts where they differ)", head]
    for t in tasks:
        cells = []
        for s in stages:
            row = tables[s].get(t, {})
            if row.get("accuracy") is not None and repeats_prompts(row):
                cells.append(f"{100 * row['accuracy']:.1f} / {100 * row['distinct_accuracy']:.1f}%")
            elif row.get("accuracy") is not None:
                cells.append(f"{100 * row['accuracy']:.1f}%")
            elif "rm_score" in row:
                cells.append(f"rm {row['rm_score']:.3f}")
            else:
                cells.append(f"fmt {100 * row.get('format', 0):.0f}%")
        lines.append(f"{t:<{w}}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)
