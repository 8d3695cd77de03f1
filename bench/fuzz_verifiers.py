"""Property-based fuzz of every shipped verifier (Hypothesis): hostile responses, built from random
text and from the pieces answers are made of (numbers, boxes, LaTeX, regions, option letters, think
tags, long repeats), each run through the verifier pool with its per-call timeout.

    python -m bench.fuzz_verifiers [--cases 12000] [--timeout 10] [--seed 0]

Properties, per case: no exception (pool status "error"), a value in [0, 1] or an abstention, and
no call past the timeout (status "timeout"). Prints a row per verifier: cases, errors, timeouts,
abstentions, and the slowest call as a share of the timeout. tests/test_verifiers_fuzz.py runs the
same strategies on fewer cases in CI.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run as a script from anywhere: import this checkout's verifiers

from rewards.pool import Call, VerifierPool  # noqa: E402
from verifiers import Sample, registered  # noqa: E402

OPTIONS = {"options": ["London", "Paris", "Rome"]}
# verifier -> (its settings to try, (reference answer, meta) pairs, image sizes); references are valid data
CASES: dict[str, tuple[list[dict], list[tuple[str | None, dict]], tuple]] = {
    "counting": ([{}, {"pick": "last"}], [("3", {}), ("0", {}), ("21", {}), (None, {})], ()),
    "grounding": ([{}, {"mode": "hit"}, {"coords": "norm1000"}, {"soft": True}, {"mode": "hit", "accept": ["box"]}],
                  [("[32, 4, 51, 23]", {}), ("<box>(100,200),(300,400)</box>", {}), (None, {})], ((84, 84),)),
    "math": ([{}, {"float_rounding": 2}],
             [(a, {}) for a in ("7", "\\frac{1}{2}", "(3, 3), (1, 1)", "x \\in [0, 1)", "\\{1, 2\\}", None)], ()),
    "multiple_choice": ([{}, {"letters": "ABCD"}], [("B", OPTIONS), ("Paris", OPTIONS), ("B", {}), (None, {})], ()),
    "instruction": ([{"max_words": 5}, {"json": True}, {"required": ["cat"], "forbidden": ["dog"]}, {}],
                    [(None, {}), (None, {"rules": {"min_chars": 3, "max_chars": 100}})], ()),
    "think_format": ([{}], [(None, {}), ("x", {})], ()),
    "temporal_grounding": ([{}, {"mode": "soft"}, {"pick": "last"}, {"iou_threshold": 0.9}],
                           [("[2.0, 5.0]", {}), ("[0.0, 0.0]", {}), (None, {})], ()),
    "grid_cell": ([{}, {"pick": "last"}], [("row 2, column 3", {}), ("(1, 1)", {}), (None, {})], ()),
}

PIECES = [
    "3", "-7", "0", "1,000", "2.5", "1e9", "9" * 50, "three", "twenty-one", "none", "a dozen", "or", "and", "no,",
    "at least", "~", "+", "about", "A", "B", "(C)", "D.", "Answer:", "The answer is", "final answer is", "Paris",
    "\\boxed{", "\\fbox{", "}", "{", "\\frac{", "}{", "^", "^{", "\\sqrt{", "\\pm", "\\{", "\\}", "\\in", "\\cup",
    "\\infty", "\\text{", "\\le", "=", "x", "$", "$$", "\\(", "\\)", "\\[", "\\]", "[", "]", "(", ")", ",", ";",
    "%", "!", "**", "9^9^9^9", "10^{100000}", "100000!", "<box>", "</box>", "<point>", "</point>", "<|box_start|>",
    "<|box_end|>", "row", "column", "col", "r2c3", "s", "seconds", "<think>", "</think>", "```json", "```", "\"", "'", "\n", " ", "\x00", "\u202e", "\ufeff", "😀",
]
_INT = st.integers(-50, 1200)
FRAGMENTS = st.one_of(
    st.sampled_from(PIECES),
    st.text(max_size=12),
    st.integers(-10**15, 10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.tuples(_INT, _INT, _INT, _INT).map(lambda b: "[%d, %d, %d, %d]" % b),
    st.tuples(_INT, _INT).map(lambda p: "(%d, %d)" % p),
    st.tuples(_INT, _INT, _INT, _INT).map(lambda b: "(%d,%d),(%d,%d)" % b),
)
BOXED = st.recursive(FRAGMENTS, lambda inner: st.one_of(
    st.lists(inner, max_size=4).map("".join),
    inner.map(lambda x: "\\boxed{" + x + "}"),
    st.tuples(inner, inner).map(lambda t: "\\frac{" + t[0] + "}{" + t[1] + "}"),
    inner.map(lambda x: "<think>" + x + "</think>"),
), max_leaves=12)
RESPONSES = st.one_of(
    st.lists(BOXED, max_size=24).map("".join),
    st.tuples(BOXED, st.integers(1, 4000)).map(lambda t: t[0] * t[1]),          # long repeats
    st.text(max_size=300),
)


def shipped() -> list[str]:
    """The verifiers vlrl ships (registered by its own modules, not by installed plug-ins)."""
    from verifiers.base import resolve
    return [n for n in registered() if resolve(n).__module__.startswith("verifiers.")]


def calls(name: str) -> st.SearchStrategy[Call]:
    """One fuzz case of verifier `name`: its settings, a reference, a meta and a hostile response."""
    settings_list, references, sizes = CASES[name]
    return st.builds(lambda s, ref, r: Call(name, s, Sample(task=name, response=r, answer=ref[0], image_sizes=sizes,
                                                            meta=ref[1])),
                     st.sampled_from(settings_list), st.sampled_from(references), RESPONSES)


def check(outcome) -> str | None:
    """What is wrong with a pool outcome, or None: no error, no timeout, a value in [0, 1] or None."""
    if outcome.status != "ok":
        return f"{outcome.status}: {outcome.error}"
    if outcome.value is not None and not 0.0 <= outcome.value <= 1.0:
        return f"value {outcome.value!r} outside [0, 1]"
    return None


def generate(name: str, n: int, seed_value: int) -> list[Call]:
    """n cases of verifier `name`, drawn by Hypothesis (generation only: nothing to shrink)."""
    out: list[Call] = []

    @seed(seed_value)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(calls(name))
    def draw(call):
        out.append(call)

    draw()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=12_000, help="cases in all, spread over the verifiers")
    p.add_argument("--timeout", type=float, default=10.0, help="the pool's per-call timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = shipped()
    per = -(-args.cases // len(names))
    rows, failures = {}, defaultdict(list)
    with VerifierPool(workers=1, timeout_s=args.timeout) as pool:
        pool.wait_ready()
        for name in names:
            counts, slowest = Counter(), 0.0
            for call in generate(name, per, args.seed):
                t0 = time.perf_counter()
                (outcome,) = pool.run([call])
                slowest = max(slowest, time.perf_counter() - t0)
                counts["cases"] += 1
                counts[outcome.status] += 1
                counts["abstained"] += outcome.status == "ok" and outcome.value is None
                problem = check(outcome)
                if problem:
                    failures[name].append((problem, call.settings, call.sample.response[:120]))
            rows[name] = (counts, slowest)
    print(f"{'verifier':<16} {'cases':>6} {'errors':>7} {'timeouts':>9} {'abstained':>10} {'slowest / timeout':>18}")
    for name, (c, slowest) in rows.items():
        print(f"{name:<16} {c['cases']:>6} {c['error']:>7} {c['timeout']:>9} {c['abstained']:>10} "
              f"{slowest / args.timeout:>18.3f}")
    total = sum(c["cases"] for c, _ in rows.values())
    bad = sum(len(v) for v in failures.values())
    print(f"{total} cases, {bad} failing the properties (timeout {args.timeout:g} s, seed {args.seed})")
    for name, items in failures.items():
        for problem, s, response in items[:5]:
            print(f"  {name} {s}: {problem}  response={response!r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
