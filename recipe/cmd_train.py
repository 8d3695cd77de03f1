"""CLI commands of the training side: model init-tiny, data synth/check, sft, eval."""
from __future__ import annotations

import argparse

from model.load import load_vlm
from model.tiny import TinySpec, build_tiny_vlm
from recipe.pipeline import PipelineConfig, run_pipeline
from recipe.sft import SFTConfig, train_sft
from records import KNOWN_TASKS, load_records
from rewards.evaluate import evaluate, format_table, write_eval
from rl.config import RLConfig
from rl.driver import fit
from synth.extra import ALL_TASKS, full_corpus_texts, write_full_suite
from synth.suite import TASKS
from training.config import load_config


def cmd_init_tiny(args) -> int:
    spec = TinySpec(seed=args.seed)
    out = build_tiny_vlm(args.out, full_corpus_texts(seed=args.seed), spec)
    print(f"tiny VLM written to {out}")
    return 0


def cmd_synth(args) -> int:
    paths = write_full_suite(args.out, seed=args.seed, n=args.n, n_heldout=args.n_heldout, n_rl=args.n_rl,
                             tasks=TASKS if args.core_only else ALL_TASKS)
    for name, p in paths.items():
        print(f"{name:8s} {p}")
    return 0


def cmd_check(args) -> int:
    for f in args.files:
        recs = load_records(f, tasks=_tasks(args), decode_videos=True)
        by_task: dict[str, int] = {}
        for r in recs:
            by_task[r.task] = by_task.get(r.task, 0) + 1
        print(f"{f}: {len(recs)} records ok ({', '.join(f'{k} {v}' for k, v in sorted(by_task.items()))})")
    return 0


def _tasks(args):
    return KNOWN_TASKS | set(args.task or ())


def cmd_sft(args) -> int:
    cfg = load_config(SFTConfig, args.config, args.overrides)
    final = train_sft(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(f"final model: {final}")
    return 0


def cmd_eval(args) -> int:
    records = load_records(args.data, require="prompt")
    if args.limit:
        records = records[: args.limit]
    model, processor = load_vlm(args.model)
    table, gens = evaluate(model, processor, records, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
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
    q = msub.add_parser("init-tiny", help="build the embedded tiny Qwen2-VL (local tokenizer, random init)")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_init_tiny)

    p = sub.add_parser("data", help="synthetic data and validation")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("synth", help="write the synthetic multimodal task suite")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n", type=int, default=2000, help="SFT records per task")
    q.add_argument("--n-heldout", type=int, default=100, help="held-out records per task")
    q.add_argument("--n-rl", type=int, default=None, help="RL prompt records per task (default n/2)")
    q.add_argument("--core-only", action="store_true",
                   help="only the image tasks counting, grounding, math, caption (no video or multi-image tasks)")
    q.set_defaults(func=cmd_synth)
    q = dsub.add_parser("check", help="validate JSONL files, decoding every image and video "
                                      "(exit 2 with file:line: field: message)")
    q.add_argument("files", nargs="+")
    q.add_argument("--task", action="append", help="accept an extra task type")
    q.set_defaults(func=cmd_check)

    p = sub.add_parser("sft", help="supervised fine-tuning (loss on assistant tokens)")
    p.add_argument("--config", help="YAML config (recipe.sft.SFTConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 steps=500")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="greedy held-out evaluation, accuracy per task")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
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
