"""CLI commands of the RFT round: `vlrl filter` (difficulty filter), `vlrl rft` (rejection-sampling
fine-tuning) and `vlrl report` (the run report)."""
from __future__ import annotations

import argparse

from recipe.filter import run_filter
from recipe.report import write_report
from recipe.reward_config import load_reward_config
from recipe.rft import run_rft
from recipe.sft import SFTConfig
from rl.algos.difficulty import parse_band
from rollout.types import EngineConfig
from training.config import load_config


def _band(text: str) -> tuple[float, float]:
    try:
        return parse_band(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _fraction(text: str) -> float:
    v = _non_negative_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return v


def _engine_config(args) -> EngineConfig:
    """--backend plus the --engine KEY=VALUE settings (any EngineConfig field)."""
    return load_config(EngineConfig, None, [f"backend={args.backend}", *args.engine])


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder to sample from")
    p.add_argument("--data", required=True, help="prompt records (JSONL)")
    p.add_argument("--k", type=_positive_int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="generation engine (default vllm; hf: transformers generate)")
    p.add_argument("--replicas", type=_positive_int, default=1,
                   help="engines sampling side by side (Ray actors when more than 1; default 1)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="engine setting, as the RL config's rollout section, e.g. max_model_len=4096, "
                        "tensor_parallel_size=2, gpu_memory_utilization=0.8 (repeatable)")
    p.add_argument("--rm", metavar="DIR", help="reward model folder, for tasks routed to it (caption, general)")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="response length limit (default 64)")
    p.add_argument("--temperature", type=_non_negative_float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward-config", help="YAML reward config (rewards.config.RewardConfig: routes, verifier pool, "
                                           "judge), or an RL / SFT config (its reward section) or a pipeline "
                                           "config (rl.reward)")
    p.add_argument("--reward-set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted reward-config override, e.g. pool.workers=0 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def cmd_filter(args) -> int:
    reward_cfg, route_key = load_reward_config(args.reward_config, args.reward_set)
    run_filter(args.model, args.data, args.output, k=args.k, band=args.band, reward_cfg=reward_cfg,
               engine=_engine_config(args), replicas=args.replicas, rm_path=args.rm, min_std=args.min_std,
               max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, progress=not args.quiet,
               route_key=route_key)
    return 0


def cmd_rft(args) -> int:
    sft_cfg = None if args.no_train else load_config(SFTConfig, args.sft_config, args.overrides)
    reward_cfg, route_key = load_reward_config(args.reward_config, args.reward_set)
    run_rft(args.model, args.data, args.output_dir, k=args.k, reward_cfg=reward_cfg, sft_cfg=sft_cfg,
            engine=_engine_config(args), replicas=args.replicas, rm_path=args.rm, max_per_prompt=args.max_per_prompt,
            min_overlap=args.min_overlap,
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, progress=not args.quiet,
            route_key=route_key)
    return 0


def cmd_report(args) -> int:
    out = write_report(args.run_dir)
    print(f"report written to {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filter", help="difficulty filter: keep prompts whose pass rate over k samples lies in a band",
                       description="Samples k responses per prompt, writes meta.pass_rate and meta.difficulty, keeps "
                                   "the prompts with LOW <= pass_rate <= HIGH (reward-model prompts: reward std >= "
                                   "--min-std). Writes OUT, OUT-stem.dropped.jsonl, OUT-stem.filter.json and "
                                   "OUT-stem.filter.png.")
    _sampling_args(p)
    p.add_argument("--band", type=_band, default=(0.1, 0.9), metavar="LOW,HIGH",
                   help="pass-rate band kept, both ends inclusive (default 0.1,0.9)")
    p.add_argument("--min-std", type=_non_negative_float, default=0.05,
                   help="reward-model prompts: keep when the k rewards' std is at least this (default 0.05)")
    p.add_argument("--output", "-o", required=True, help="kept records (JSONL)")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("rft", help="rejection sampling: keep correct, well-formatted samples and SFT on them",
                       description="Samples k responses per prompt, keeps the correct, well-formatted ones "
                                   "(best-of-k for reward-model prompts with --rm), writes D/rft_sft.jsonl, then SFTs "
                                   "--model on it into D/sft (SFT settings: --sft-config and KEY=VALUE overrides).")
    _sampling_args(p)
    p.add_argument("--output-dir", required=True, metavar="D", help="folder for rft_sft.jsonl, rft.json and sft/")
    p.add_argument("--max-per-prompt", type=_positive_int, default=4,
                   help="accepted samples kept per prompt, after de-duplication (default 4)")
    p.add_argument("--min-overlap", type=_fraction, default=0.0,
                   help="accept a correct box or interval answer only at this IoU / tIoU or above, the closest "
                        "first (default 0: any the verifier scores 1)")
    p.add_argument("--sft-config", help="YAML SFT config (recipe.sft.SFTConfig); model, data and out are set by rft")
    p.add_argument("--no-train", action="store_true", help="write the SFT records only")
    p.add_argument("overrides", nargs="*", help="dotted SFT overrides, e.g. steps=200 optim.lr=1e-4")
    p.set_defaults(func=cmd_rft)

    p = sub.add_parser("report", help="HTML report of a run folder: rewards, KL, accuracy, filters, data kept")
    p.add_argument("run_dir", help="run folder (see docs/rft.md for the layout read)")
    p.set_defaults(func=cmd_report)
