"""CLI commands of the reward model: `vlrl rm pairs` (synthetic preference pairs), `vlrl rm train`
(Bradley-Terry training) and `vlrl rm eval` (held-out pairwise accuracy of an RM folder)."""
from __future__ import annotations

import argparse
import json

from model.load import load_processor
from model.reward import RewardModel
from rewards.rm_train import RMConfig, evaluate_pairs, format_eval, load_pairs, train_rm
from synth.prefs import write_preference_pairs
from training.config import load_config


def cmd_pairs(args) -> int:
    paths = write_preference_pairs(args.out, seed=args.seed, n=args.n, n_heldout=args.n_heldout,
                                   max_objects=args.max_objects)
    for name, p in paths.items():
        print(f"{name:8s} {p}")
    return 0


def cmd_train(args) -> int:
    cfg = load_config(RMConfig, args.config, args.overrides)
    final = train_rm(cfg, resume=not args.no_resume, progress=not args.no_progress)
    print(f"final reward model: {final}")
    return 0


def cmd_eval(args) -> int:
    records = load_pairs(args.data)
    rm = RewardModel.from_pretrained(args.model)
    result = evaluate_pairs(rm, load_processor(args.model), records, batch_size=args.batch_size)
    print(format_eval(result, f"{args.model} on {args.data}"))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"model": args.model, "data": args.data, **result}, f, indent=1)
        print(f"written {args.output}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rm", help="reward model: synthetic pairs, Bradley-Terry training, pairwise eval")
    rsub = p.add_subparsers(dest="rm_command", required=True)

    q = rsub.add_parser("pairs", help="write synthetic caption preference pairs (prefs_train/prefs_heldout.jsonl)")
    q.add_argument("out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n", type=int, default=2000, help="training pairs")
    q.add_argument("--n-heldout", type=int, default=200, help="held-out pairs (scenes disjoint from training)")
    q.add_argument("--max-objects", type=int, default=3)
    q.set_defaults(func=cmd_pairs)

    q = rsub.add_parser("train", help="train a scalar RM (Bradley-Terry) on preference records")
    q.add_argument("--config", help="YAML config (rewards.rm_train.RMConfig)")
    q.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=200 optim.lr=1e-4")
    q.add_argument("--no-resume", action="store_true", help="ignore checkpoints in the run folder")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_train)

    q = rsub.add_parser("eval", help="pairwise accuracy of an RM folder on preference records")
    q.add_argument("--model", required=True, help="RM folder")
    q.add_argument("--data", required=True, help="preference records (JSONL)")
    q.add_argument("--output", help="write the result as JSON here")
    q.add_argument("--batch-size", type=int, default=32)
    q.set_defaults(func=cmd_eval)
