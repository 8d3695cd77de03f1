"""CLI commands of the training side: model init-tiny/info, data synth/check, sft, eval."""
from __future__ import annotations

import argparse
import sys

from model.families import DEFAULT_FAMILY, FAMILIES, get_family, grounding_settings
from model.info import describe, format_info
from model.load import load_processor, load_vlm
from model.tiny import SIZES, build_tiny_vlm, size_spec
from recipe.pipeline import PipelineConfig, run_pipeline
from recipe.reward_config import load_reward_config
from recipe.sft import SFTConfig, train_sft
from records import load_records
from rewards.evaluate import evaluate, format_table, local_scorer, write_eval
from rewards.inputs import for_model
from rewards.judge import load_judge
from rewards.pool import VerifierPool
from rewards.rm import RewardModelScorer
from rl.config import RLConfig
from rl.driver import fit
from synth.extra import ALL_TASKS, full_corpus_texts, write_full_suite
from synth.suite import TASKS, SceneSpec
from training.config import load_config


def cmd_init_tiny(args) -> int:
    spec = size_spec(args.size, seed=args.seed)
    out = build_tiny_vlm(args.out, full_corpus_texts(seed=args.seed), spec, family=args.family)
    print(f"{args.size} {get_family(args.family).title} written to {out}")
    return 0


def cmd_info(args) -> int:
    try:
        print(format_info(describe(args.dir)))
    except FileNotFoundError as e:   # the first thing users run on a folder: one line, no traceback
        print(f"vlrl model info: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_synth(args) -> int:
    # grounding targets in the coordinates of the model that will train on them
    coords = grounding_settings(load_processor(args.model)) if args.model else {
        "coords": get_family(DEFAULT_FAMILY).coords}
    paths = write_full_suite(args.out, seed=args.seed, n=args.n, n_heldout=args.n_heldout, n_rl=args.n_rl,
                             tasks=TASKS if args.core_only else ALL_TASKS, spec=SceneSpec(**coords))
    for name, p in paths.items():
        print(f"{name:8s} {p}")
    return 0


def cmd_check(args) -> int:
    reward_cfg, route_key = load_reward_config(args.config, args.overrides)
    for f in args.files:
        recs = load_records(f, tasks=reward_cfg.known_tasks | set(args.task or ()), route_key=route_key,
                            decode_videos=True)
        by_task: dict[str, int] = {}
        for r in recs:
            by_task[r.task] = by_task.get(r.task, 0) + 1
        print(f"{f}: {len(recs)} records ok ({', '.join(f'{k} {v}' for k, v in sorted(by_task.items()))})")
    return 0


def cmd_sft(args) -> int:
    cfg = load_config(SFTConfig, args.config, args.overrides)
    final = train_sft(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(f"final model: {final}")
    return 0


def cmd_eval(args) -> int:
    reward_cfg, route_key = load_reward_config(args.config, args.overrides)
    records = load_records(args.data, tasks=reward_cfg.known_tasks, route_key=route_key, require="prompt")
    if args.limit:
        records = records[: args.limit]
    model, processor = load_vlm(args.model)
    reward_cfg = for_model(reward_cfg, processor)   # the model family's conventions (grounding coordinates)
    rm = RewardModelScorer(args.rm) if args.rm else None
    judge = load_judge(reward_cfg.judge) if reward_cfg.uses_judge else None
    with VerifierPool.from_config(reward_cfg.pool) as pool:
        scorer = local_scorer(reward_cfg, rm=rm, judge=judge, pool=pool)
        table, gens = evaluate(model, processor, records, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, reward_cfg=reward_cfg, scorer=scorer)
    print(format_table(table, f"{args.model} on {args.data}"))
    if args.output:
        write_eval(args.output, table, gens)
        print(f"written {args.output}")
    return 0


def cmd_pipeline(args) -> int:
    cfg = load_config(PipelineConfig, args.config, args.overrides)
    run_pipeline(cfg)
    return 0


def cmd_rl(args) -> int:
    cfg = load_config(RLConfig, args.config, args.overrides)
    final = fit(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(f"final policy: {final}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_command", required=True)
    q = msub.add_parser("init-tiny", help="build a tiny VLM of a family (local tokenizer, random init)")
    q.add_argument("out")
    q.add_argument("--family", choices=list(FAMILIES), default=DEFAULT_FAMILY)
    q.add_argument("--size", choices=list(SIZES), default="tiny",
                   help="tiny: the embedded default (~1.3M params); small: ~35M params, images up to 224 px (benchmarks)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_init_tiny)
    q = msub.add_parser("info", help="family, parameter counts, image token budget and chat template of a folder")
    q.add_argument("dir")
    q.set_defaults(func=cmd_info)

    p = sub.add_parser("data", help="synthetic data and validation")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("synth", help="write the synthetic multimodal task suite")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n", type=int, default=2000, help="SFT records per task")
    q.add_argument("--n-heldout", type=int, default=100, help="held-out records per task")
    q.add_argument("--n-rl", type=int, default=None, help="RL prompt records per task (default n/2)")
    q.add_argument("--model", help="write grounding targets in this model folder's coordinates "
                                   f"(default: {DEFAULT_FAMILY}'s, 0-1000)")
    q.add_argument("--core-only", action="store_true",
                   help="only the image tasks counting, grounding, math, caption (no video or multi-image tasks)")
    q.set_defaults(func=cmd_synth)
    q = dsub.add_parser("check", help="validate JSONL files, decoding every image and video "
                                      "(exit 2 with file:line: field: message)")
    q.add_argument("files", nargs="+")
    q.add_argument("--config", help="a config whose reward routes name the accepted tasks: a reward config, "
                                    "or an RL / SFT (reward) or pipeline (rl.reward) config")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the reward routes, e.g. 'tasks.my_task={use_rm: true}' (repeatable)")
    q.add_argument("--task", action="append", help="accept an extra task type (no route needed)")
    q.set_defaults(func=cmd_check)

    p = sub.add_parser("sft", help="supervised fine-tuning (loss on assistant tokens)")
    p.add_argument("--config", help="YAML config (recipe.sft.SFTConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 steps=500")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="greedy held-out evaluation: the training reward and accuracy per task")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--config", help="the reward routes to score with (and the tasks accepted): a reward config, "
                                    "or an RL / SFT (reward) or pipeline (rl.reward) config; default: built-in")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the reward routes, e.g. pool.workers=0 (repeatable)")
    p.add_argument("--rm", metavar="DIR", help="reward model folder: RM-routed tasks then report reward and rm_score")
    p.add_argument("--output", help="write the table as JSON here (+ .generations.jsonl)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("pipeline", help="the whole recipe, resumable stage by stage")
    p.add_argument("--config", help="YAML config (recipe.pipeline.PipelineConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=200 run_dir=runs/x")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("rl", help="hybrid-reward RL: PPO with a shared critic, or GRPO")
    p.add_argument("--config", help="YAML config (rl.config.RLConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo=grpo rollout.backend=hf")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_rl)
