"""The run report (`vlrl report RUN_DIR`): one HTML page with PNG charts of a whole recipe run,
from the files the stages leave behind. Any subset of stages works (an SFT-only run too).

Run-folder layout read (every file optional):
    RUN_DIR/summary.json             {"stages": {stage: eval table}, "order": [stage, ...]?}  (recipe.pipeline)
    RUN_DIR/<stage>/done.json        stage marker; its time orders stages when summary.json has no "order"
    RUN_DIR/<stage>/metrics.jsonl    rows {"step", metric: value}: train/loss (SFT), reward/<task>/<part>
                                     and kl/<task> (RL)
    RUN_DIR/<stage>/eval.json        held-out table {task: {n, format, accuracy, reward?, rm_score?}} after the stage
    RUN_DIR/<stage>/*.filter.json    `vlrl filter --output RUN_DIR/<stage>/NAME.jsonl` summaries
    RUN_DIR/<stage>/rft.json         `vlrl rft --output-dir RUN_DIR/<stage>` summary
    RUN_DIR/<stage>/sft/{metrics.jsonl,eval.json}   the RFT stage's SFT run (used when the stage has none)
A bare run folder (RUN_DIR/metrics.jsonl, e.g. from `vlrl sft`) is read as one stage.

Writes RUN_DIR/report.html and RUN_DIR/report/*.png (the folder's old PNGs are removed first, so the
page never shows a chart from an earlier report).
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from recipe.filter import plot_histogram, save_figure
from records import DataError
from rewards.evaluate import repeats_prompts
from training.atomic import write_text

PNG_DIR = "report"
SKIP_PARTS = ("timeout", "error", "abstained")   # counts, not reward components


@dataclass
class Stage:
    """What one stage folder holds."""

    name: str
    path: Path
    metrics: list[dict] = field(default_factory=list)
    eval: dict | None = None
    filters: dict[str, dict] = field(default_factory=dict)   # filter summary name -> summary
    rft: dict | None = None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a run still writing) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _is_eval_table(obj) -> bool:
    """A held-out table {task: {n, format, accuracy, ...}} as rewards.evaluate writes it."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, dict) and "format" in v for v in obj.values())


def read_stage(path: Path, name: str | None = None) -> Stage:
    st = Stage(name or path.name, path)
    for folder in (path, path / "sft"):
        if not st.metrics:
            st.metrics = read_metrics(folder / "metrics.jsonl")
        if st.eval is None and (folder / "eval.json").is_file():
            table = _read_json(folder / "eval.json")
            st.eval = table if _is_eval_table(table) else None   # e.g. the RM's pairwise eval is not one
    for f in sorted(path.glob("*.filter.json")):
        s = _read_json(f)
        if isinstance(s, dict) and "histogram" in s:
            st.filters[f.name[:-len(".filter.json")]] = s
    if (path / "rft.json").is_file():
        st.rft = _read_json(path / "rft.json")
    return st


def read_run(run_dir: str | os.PathLike) -> tuple[list[Stage], dict]:
    """The stages of a run folder in run order, and its summary.json (or {})."""
    run = Path(run_dir)
    summary = _read_json(run / "summary.json") if (run / "summary.json").is_file() else None
    summary = summary if isinstance(summary, dict) else {}
    folders = [p for p in run.iterdir() if p.is_dir() and p.name != PNG_DIR]
    order = list(summary.get("order") or [])

    def key(p: Path):
        if p.name in order:
            return (0, order.index(p.name), "")
        done = p / "done.json"
        return (1, done.stat().st_mtime if done.is_file() else math.inf, p.name)

    stages = [read_stage(p) for p in sorted(folders, key=key)]
    if (run / "metrics.jsonl").is_file() or (run / "eval.json").is_file():
        stages.insert(0, read_stage(run, name=run.name))
    for st in stages:   # summary.json's tables win: they are what the pipeline reported
        table = (summary.get("stages") or {}).get(st.name)
        if isinstance(table, dict):
            st.eval = table
    return [s for s in stages if s.metrics or s.eval or s.filters or s.rft], summary


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric; the last row wins where a step repeats."""
    by_step = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            by_step[r["step"]] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def reward_keys(rows: list[dict]) -> dict[str, list[str]]:
    """task -> its reward components (top-level parts only, 'total' first), from reward/<task>/<part>."""
    out: dict[str, set] = {}
    for r in rows:
        for k in r:
            parts = k.split("/")
            if parts[0] == "reward" and len(parts) == 3 and parts[1] != "all" and parts[2] not in SKIP_PARTS:
                out.setdefault(parts[1], set()).add(parts[2])
    return {t: sorted(ps, key=lambda p: (p != "total", p != "format", p)) for t, ps in sorted(out.items())}


# ----------------------------------------------------------------------------- charts

def _plt():
    import matplotlib  # optional at import time: only plots need it (slow to import)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path)
    _plt().close(fig)


def plot_rewards(rows: list[dict], path: Path, *, title: str) -> bool:
    keys = reward_keys(rows)
    if not keys:
        return False
    plt = _plt()
    n = len(keys)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.2), squeeze=False)
    # one colour per component across the subplots (total and format first, then the verifiers and rm)
    names = sorted({p for ps in keys.values() for p in ps}, key=lambda p: (p != "total", p != "format", p))
    colour = {p: f"C{i % 10}" for i, p in enumerate(names)}
    for ax, (task, parts) in zip(axes[0], keys.items()):
        for part in parts:
            ax.plot(*series(rows, f"reward/{task}/{part}"), label=part, color=colour[part],
                    lw=2.0 if part == "total" else 1.2)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("mean reward")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return True


def plot_metric_family(rows: list[dict], prefix: str, path: Path, *, title: str, ylabel: str) -> bool:
    """One line per `prefix/<name>` key (e.g. kl/<task>)."""
    names = sorted({k[len(prefix) + 1:] for r in rows for k in r if k.startswith(prefix + "/") and k.count("/") == 1})
    if not names:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for nm in names:
        ax.plot(*series(rows, f"{prefix}/{nm}"), label=nm)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _save(fig, path)
    return True


def plot_loss(rows: list[dict], path: Path, *, title: str) -> bool:
    steps, values = series(rows, "train/loss")
    if not steps:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(title, fontsize=10)
    _save(fig, path)
    return True


def plot_accuracy(stages: list[Stage], path: Path) -> bool:
    evals = [(s.name, s.eval) for s in stages if s.eval]
    tasks = sorted({t for _, e in evals for t, row in e.items() if isinstance(row, dict)
                    and isinstance(row.get("accuracy"), (int, float))})
    if not tasks:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(evals) + 2), 3.4))
    x = list(range(len(evals)))
    for t in tasks:
        ys = [e.get(t, {}).get("accuracy") if isinstance(e.get(t), dict) else None for _, e in evals]
        ax.plot(x, [math.nan if y is None else y for y in ys], marker="o", label=t, ls="--" if t == "all" else "-")
    ax.set_xticks(x, [n for n, _ in evals])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("held-out accuracy after each stage", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _save(fig, path)
    return True


def plot_data(stages: list[Stage], path: Path) -> bool:
    """Kept and dropped prompts per filter, accepted samples per RFT."""
    bars = []   # (label, kept/accepted, dropped)
    for s in stages:
        for name, f in s.filters.items():
            c = f.get("counts", {})
            bars.append((f"{s.name}/{name}\nfilter", c.get("kept", 0), c.get("dropped", 0)))
        if s.rft:
            c = s.rft.get("counts", {})
            bars.append((f"{s.name}\nrft", c.get("accepted", 0), 0))
    if not bars:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(bars) + 2), 3.4))
    x = list(range(len(bars)))
    ax.bar(x, [b[1] for b in bars], color="#2f6fb0", label="kept prompts / accepted samples")
    ax.bar(x, [b[2] for b in bars], bottom=[b[1] for b in bars], color="#c8ccd2", label="dropped prompts")
    ax.set_xticks(x, [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("count")
    ax.set_title("data kept and dropped", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------- page

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "stage"


def _img(rel: str, alt: str) -> str:
    return f'<img src="{html.escape(rel)}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape("-" if v is None else str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(run_dir: str | os.PathLike) -> Path:
    """Render RUN_DIR/report.html and its PNGs; returns the HTML path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(run, 0, "run_dir", "not a folder")
    stages, summary = read_run(run)
    png_dir = run / PNG_DIR
    png_dir.mkdir(exist_ok=True)
    for old in png_dir.glob("*.png"):
        old.unlink()

    def chart(fn, name: str, *args, **kw) -> str:
        """Draw into report/<name>.png; the <img> tag if something was drawn, else ''."""
        ok = fn(*args, png_dir / name, **kw)
        return _img(f"{PNG_DIR}/{name}", name) if ok else ""

    sec = [f"<h1>Run report: {html.escape(run.name)}</h1>",
           "<p>Stages found, in run order: " + (", ".join(html.escape(s.name) for s in stages) or "none") + "</p>"]
    if summary.get("final_model"):
        sec.append(f"<p>Final model: <code>{html.escape(str(summary['final_model']))}</code></p>")

    evals = [s for s in stages if s.eval]
    if evals:
        sec.append("<h2>Held-out accuracy</h2>")
        sec.append(chart(plot_accuracy, "accuracy.png", stages))
        tasks = sorted({t for s in evals for t in s.eval}, key=lambda t: (t == "all", t))
        rows = [[s.name] + [(s.eval.get(t) or {}).get("accuracy") for t in tasks] for s in evals]
        sec.append(_table(["stage"] + [f"{t} accuracy" for t in tasks], rows))
        distinct = [t for t in tasks if any("distinct_accuracy" in (s.eval.get(t) or {})
                                            and repeats_prompts(s.eval[t]) for s in evals)]
        if distinct:   # the held-out file repeats prompts: each distinct prompt weighed once
            rows = [[s.name] + [(s.eval.get(t) or {}).get("distinct_accuracy") for t in distinct] for s in evals]
            sec.append(_table(["stage"] + [f"{t} accuracy, distinct prompts" for t in distinct], rows))
        rows = [[s.name] + [(s.eval.get(t) or {}).get("format") for t in tasks] for s in evals]
        sec.append(_table(["stage"] + [f"{t} format" for t in tasks], rows))

    for s in stages:
        slug = _slug(s.name)
        parts = [chart(plot_rewards, f"reward_{slug}.png", s.metrics, title=f"{s.name}: reward per task and component"),
                 chart(plot_metric_family, f"kl_{slug}.png", s.metrics, "kl", title=f"{s.name}: KL to the reference per task",
                       ylabel="KL (k1, per token)"),
                 chart(plot_loss, f"loss_{slug}.png", s.metrics, title=f"{s.name}: training loss")]
        if any(parts):
            sec.append(f"<h2>Stage {html.escape(s.name)}: training curves</h2>" + "".join(parts))

    for s in stages:
        for name, f in s.filters.items():
            png = f"filter_{_slug(s.name)}_{_slug(name)}.png"
            low, high = f.get("band", [None, None])
            plot_histogram(f["histogram"], png_dir / png, title=f"{s.name}/{name}: pass rate, k={f.get('k')}, "
                                                                f"band [{low}, {high}]")
            sec.append(f"<h2>Difficulty filter {html.escape(s.name)}/{html.escape(name)}</h2>"
                       f"<p>k={f.get('k')}, band [{low}, {high}], model <code>{html.escape(str(f.get('model')))}</code>; "
                       f"kept {f['counts']['kept']} of {f['counts']['total']}.</p>" + _img(f"{PNG_DIR}/{png}", png))
            rows = [[t, r.get("total"), r.get("kept"), r.get("dropped"), r.get("mean_pass_rate")]
                    for t, r in f.get("tasks", {}).items()]
            sec.append(_table(["task", "total", "kept", "dropped", "mean pass rate"], rows))
            reasons = f["counts"].get("by_reason", {})
            sec.append(_table(["reason", "prompts"], [[r, n] for r, n in reasons.items()]))
        if s.rft:
            c = s.rft.get("counts", {})
            sec.append(f"<h2>Rejection sampling {html.escape(s.name)}</h2>"
                       f"<p>k={s.rft.get('k')}: {c.get('accepted')} accepted samples from "
                       f"{c.get('prompts_with_accepted')} of {c.get('prompts')} prompts.</p>")
            rows = [[t, r.get("prompts"), r.get("samples"), r.get("formatted"), r.get("accepted"),
                     r.get("prompts_with_accepted")] for t, r in s.rft.get("tasks", {}).items()]
            sec.append(_table(["task", "prompts", "samples", "formatted", "accepted", "prompts with one"], rows))

    data_img = chart(plot_data, "data.png", stages)
    if data_img:
        sec.insert(2, "<h2>Data kept and dropped</h2>" + data_img)

    page = ("<!doctype html><html><head><meta charset='utf-8'><title>vlrl report: "
            f"{html.escape(run.name)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}"
            "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;"
            "text-align:right}img{max-width:100%;display:block;margin:.5em 0}</style></head><body>"
            + "\n".join(p for p in sec if p) + "</body></html>\n")
    return write_text(run / "report.html", page)
