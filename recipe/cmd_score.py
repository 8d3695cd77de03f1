"""CLI commands of the reward side: `vlrl score` scores a JSONL file of responses offline."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from PIL import Image

from recipe.reward_config import load_reward_config
from records import DataError, iter_jsonl
from rewards.config import RewardConfig, TaskRoute, VerifierRoute
from rewards.hybrid import RewardInput, score_batch
from rewards.judge import TimedJudge, load_judge
from rewards.pool import VerifierPool
from rewards.rm import RewardModelScorer
from training.atomic import write_jsonl
from training.config import ConfigError

CHUNK = 256   # lines scored per score_batch call


def add_commands(sub) -> None:
    p = sub.add_parser("score", help="score responses offline with the hybrid reward's verifiers",
                       description="Each input line: {task, response, answer?, images?, prompt?, meta?, image_sizes?, "
                                   "group?}. Each output line: the input plus reward, parts and correct.")
    p.add_argument("input", help="JSONL file of responses")
    p.add_argument("--output", "-o", required=True, help="JSONL file to write (atomically)")
    p.add_argument("--config", help="YAML reward config (rewards.config.RewardConfig), or an RL / SFT config "
                                    "(its reward section) or a pipeline config (rl.reward)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. pool.workers=0 (repeatable)")
    p.add_argument("--verifier", action="append", default=[], metavar="NAME_OR_SPEC",
                   help="score every line with this verifier (registered name, entry-point name or "
                        "path/file.py:Name) instead of the task routes; repeat for several (equal weights)")
    p.add_argument("--no-format-gate", action="store_true",
                   help="do not require the <think>..</think> form (with --verifier)")
    p.add_argument("--rm", metavar="DIR",
                   help="reward model folder (vlrl rm train) scoring the tasks routed to it, e.g. caption; "
                        "its score is sigmoid(raw BT score), see rewards.rm")
    p.add_argument("--rm-batch-size", type=int, default=16)
    p.set_defaults(func=run_score)


def _read(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for line_no, obj in iter_jsonl(path):
        _check_row(obj, path, line_no)
        rows.append((line_no, obj))
    if not rows:
        raise DataError(path, 0, "file", "holds no lines")
    return rows


def _check_row(obj: Any, path: Path, line: int) -> None:
    if not isinstance(obj, dict):
        raise DataError(path, line, "record", f"must be a JSON object, got {type(obj).__name__}")
    for key in ("task", "response"):
        if not isinstance(obj.get(key), str):
            raise DataError(path, line, key, "missing" if key not in obj else "must be a string")
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise DataError(path, line, "answer", "must be a string or a number")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise DataError(path, line, "prompt", "must be a string")
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(path, line, "images", "must be a list of paths")
    sizes = obj.get("image_sizes", [])
    if not isinstance(sizes, list) or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in sizes):
        raise DataError(path, line, "image_sizes", "must be a list of [width, height] pairs of positive integers")
    if not isinstance(obj.get("meta", {}), dict):
        raise DataError(path, line, "meta", "must be an object")
    group = obj.get("group")
    if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
        raise DataError(path, line, "group", "must be an integer (lines of one prompt share it)")


def _image_sizes(obj: dict, base: Path, path: Path, line: int) -> tuple[tuple[int, int], ...]:
    if obj.get("image_sizes"):
        return tuple((int(w), int(h)) for w, h in obj["image_sizes"])
    sizes = []
    for i, rel in enumerate(obj.get("images", [])):
        p = (base / rel).resolve()
        try:
            with Image.open(p) as im:   # reads the header only
                sizes.append(im.size)
        except (OSError, ValueError) as e:
            raise DataError(path, line, f"images[{i}]", f"cannot read image size of {p}: {e}") from None
    return tuple(sizes)


def run_score(args: argparse.Namespace) -> int:
    cfg, route_key = load_reward_config(args.config, args.overrides)
    path, out = Path(args.input), Path(args.output)
    rows = _read(path)
    if args.verifier:
        routes = []
        for spec in args.verifier:
            try:
                routes.append(VerifierRoute(spec))
            except ConfigError as e:
                raise DataError("--verifier", 0, spec, str(e).removeprefix("verifier: ")) from None
        only = TaskRoute(verifiers=tuple(routes), format_gate=not args.no_format_gate)
        cfg = RewardConfig(tasks={obj["task"]: only for _, obj in rows}, builtin_routes=False, pool=cfg.pool)

    inputs = []
    for line, obj in rows:
        try:
            route = cfg.route(obj["task"])
        except KeyError as e:
            raise DataError(path, line, "task", f"{e.args[0]}; route it under {route_key}.{obj['task']}") from None
        if route.use_rm and not args.rm:
            raise DataError(path, line, "task", f"task {obj['task']!r} is routed to the reward model: pass "
                                                "--rm DIR, or route it to verifiers (--verifier or --config)")
        answer = obj.get("answer")
        inputs.append(RewardInput(task=obj["task"], response=obj["response"],
                                  answer=None if answer is None else str(answer), prompt=obj.get("prompt", ""),
                                  images=tuple(str((path.parent / p).resolve()) for p in obj.get("images", [])),
                                  image_sizes=_image_sizes(obj, path.parent, path, line), meta=obj.get("meta", {}),
                                  group=obj.get("group")))

    rm = None
    if args.rm:

        if not Path(args.rm, "config.json").is_file():
            raise DataError(args.rm, 0, "--rm", "not a reward model folder (no config.json)")
        rm = RewardModelScorer(args.rm, batch_size=args.rm_batch_size)
    judge = TimedJudge(load_judge(cfg.judge)) if cfg.uses_judge else None
    results = []
    with VerifierPool.from_config(cfg.pool) as pool:
        for start in range(0, len(inputs), CHUNK):
            results += score_batch(inputs[start:start + CHUNK], cfg, pool=pool, rm=rm, judge=judge)
        stats = dict(pool.stats)

    write_jsonl(out, ({**obj, "reward": r.reward, "parts": r.parts, "correct": r.correct}
                      for (_, obj), r in zip(rows, results)))
    mean = sum(r.reward for r in results) / len(results)
    cost = "" if judge is None else f", judge {judge.seconds:.1f} s for {judge.calls} calls"
    print(f"scored {len(results)} lines -> {out}: mean reward {mean:.4f}, "
          f"{stats.get('timeouts', 0)} timeouts, {stats.get('errors', 0)} errors{cost}")
    return 0
