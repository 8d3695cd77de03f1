"""CLI commands of the scale-out: `vlrl plan` (GPU memory per worker group, from config.json alone)
and `vlrl export` (an HF folder from a run's sharded checkpoint)."""
from __future__ import annotations

import argparse
from pathlib import Path

from recipe.plan import format_plan, model_figures, plan
from rl.config import RLConfig
from rl.workers import CriticWorker, PolicyWorker
from training.config import ConfigError, load_config
from training.runlog import latest_checkpoint, load_trainer_state


def model_source(cfg: RLConfig, config_path: str | None, given: str | None) -> Path:
    """Where the policy's config.json is: --model, else the policy folder, else `plan.model_config`
    (relative to the working folder or to the RL config's folder)."""
    for candidate in (given, cfg.policy, cfg.plan.model_config):
        if not candidate:
            continue
        for base in (Path.cwd(), Path(config_path).parent if config_path else Path.cwd()):
            path = base / candidate
            if (path / "config.json").is_file() or (path.is_file() and path.suffix == ".json"):
                return path
    raise ConfigError(f"plan.model_config: no config.json at the policy ({cfg.policy}) nor at "
                      f"{cfg.plan.model_config!r}; give --model DIR or set plan.model_config")


def cmd_plan(args) -> int:
    cfg = load_config(RLConfig, args.config, args.overrides)
    m = model_figures(model_source(cfg, args.config, args.model))
    p = plan(cfg, m, gpus_per_node=args.gpus_per_node or cfg.plan.gpus_per_node, nodes=args.nodes or cfg.plan.nodes,
             gpu_memory_gib=args.gpu_memory_gib or cfg.plan.gpu_memory_gib)
    print(format_plan(p, m))
    return 0 if p.fits else 1


def cmd_export(args) -> int:
    run = Path(args.run_dir)
    cfg = load_config(RLConfig, run / "config.json")
    ckpt = run / "checkpoints" / f"step-{args.step:06d}" if args.step else latest_checkpoint(run)
    if ckpt is None or not (ckpt / "trainer_state.pt").is_file():
        raise ConfigError(f"{run}: no checkpoint {'step ' + str(args.step) if args.step else ''} to export")
    if args.critic:
        worker = CriticWorker(cfg.critic or cfg.policy, optim=None, lora=cfg.critic_lora)
    else:
        worker = PolicyWorker(cfg.policy, lora=cfg.actor_lora)   # a LoRA checkpoint holds the adapters
    out = worker.export_checkpoint(ckpt, "critic" if args.critic else "actor", args.out)
    print(f"step {load_trainer_state(ckpt)['step']} of {run} exported to {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="GPU memory per worker group of an RL config, and whether it fits",
                       description="Reads the policy's config.json only (meta device, no weights). Exits 1 when "
                                   "the plan does not fit, with what to change.")
    p.add_argument("--config", required=True, help="YAML config (rl.config.RLConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ray.actor_workers=8 fsdp.cpu_offload=true")
    p.add_argument("--gpus-per-node", type=int, help="default: the config's plan.gpus_per_node (8)")
    p.add_argument("--nodes", type=int, help="default: plan.nodes (1)")
    p.add_argument("--gpu-memory-gib", type=float, help="default: plan.gpu_memory_gib (80)")
    p.add_argument("--model", help="a model folder or config.json (default: the policy, then plan.model_config)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="an HF folder of the policy (or --critic) from an RL run's checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--step", type=int, default=0, help="checkpoint step (default: the newest)")
    p.add_argument("--critic", action="store_true", help="export the shared critic instead of the policy")
    p.set_defaults(func=cmd_export)
