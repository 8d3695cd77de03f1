"""Agreement of our `math` verifier with the labels of Math-Verify's own test cases, next to
Math-Verify's own agreement on the same cases (its `parse` + `verify`, configured as its tests
configure them).

    python -m bench.math_verify_agreement [CASES.jsonl ...] [--math-verify-tests DIR] [--quiet]

Each line of a CASES file is {"gold", "pred", "expected", "precision"?, "match_types"?}; `precision`
becomes float_rounding. `--math-verify-tests DIR` also reads the (gold, pred, expected) tables of
a Math-Verify checkout's tests/test_numina_cases.py and tests/test_open_thoughts.py (answers with
several parts: sets, tuples, several boxes). Prints both agreements per file and every case where
we disagree with the label; exit status 0.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run as a script from anywhere: import this checkout's verifiers

import verifiers  # noqa: E402

DEFAULT_CASES = REPO.parent / "shared" / "benchmarks" / "math_verify_cases.jsonl"
MULTI_ANSWER_TESTS = ("test_numina_cases.py", "test_open_thoughts.py")


def read_cases(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def table_cases(path: str | Path) -> list[dict]:
    """The (gold, pred, expected) rows of the pytest.mark.parametrize tables of a Math-Verify test
    file, read as data (ast.literal_eval); these files compare with match types latex and expr."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    cases = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "parametrize":
            for row in node.args[1].elts:
                gold, pred, expected = (ast.literal_eval(x) for x in row.elts)
                cases.append({"gold": gold, "pred": pred, "expected": bool(expected), "match_types": "latex+expr",
                              "source": Path(path).name})
    return cases


def ours(case: dict) -> bool:
    settings = {"float_rounding": int(case["precision"])} if case.get("precision") else {}
    verifier = verifiers.load("math", **settings)
    return verifier(verifiers.Sample(task="math", response=case["pred"], answer=case["gold"])).value == 1.0


def math_verify_own(case: dict) -> bool:
    """Math-Verify's verdict as its tests compute it (compare_strings in its tests/test_all.py)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify  # heavy

    kinds = case.get("match_types", "latex+expr").split("+")
    targets = ([LatexExtractionConfig(boxed_match_priority=0)] if "latex" in kinds else []) + \
              ([ExprExtractionConfig()] if "expr" in kinds else [])
    return bool(verify(parse(case["gold"], targets), parse(case["pred"], targets),
                       float_rounding=int(case.get("precision") or 6)))


def agreement(cases: str | Path | list[dict], judge=ours) -> tuple[float, list[dict]]:
    """(fraction of cases where `judge`'s verdict equals `expected`, the disagreeing cases)."""
    cases = read_cases(cases) if isinstance(cases, (str, Path)) else cases
    wrong = [{**c, "got": got} for c in cases if (got := judge(c)) != bool(c["expected"])]
    return 1.0 - len(wrong) / max(1, len(cases)), wrong


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", help=f"JSONL case files (default {DEFAULT_CASES})")
    p.add_argument("--math-verify-tests", metavar="DIR", help="a Math-Verify checkout's tests/ folder")
    p.add_argument("--quiet", action="store_true", help="only the summary lines")
    args = p.parse_args(argv)
    paths = args.cases or ([DEFAULT_CASES] if Path(DEFAULT_CASES).is_file() else [])
    sets = {str(c): read_cases(c) for c in paths}
    if args.math_verify_tests:
        for name in MULTI_ANSWER_TESTS:
            sets[f"{args.math_verify_tests}/{name}"] = table_cases(Path(args.math_verify_tests) / name)
    for name, cases in sets.items():
        rate, wrong = agreement(cases)
        own, _ = agreement(cases, math_verify_own)
        if not args.quiet:
            for w in wrong:
                print(f"expected={w['expected']} got={w['got']}  gold={w['gold'][:80]!r}  pred={w['pred'][-120:]!r}")
        n = len(cases)
        print(f"{name}: vlrl {n - len(wrong)}/{n} ({rate:.1%}), math-verify's own {round(own * n)}/{n} ({own:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
