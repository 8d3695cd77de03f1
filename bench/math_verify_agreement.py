"""Agreement of our `math` verifier with the labels of Math-Verify's own regression cases.

    python bench/math_verify_agreement.py [CASES.jsonl] [--quiet]

Each line of CASES is {"gold", "pred", "expected", "precision"?}; `precision` becomes the
verifier's float_rounding. Prints agreement and every disagreement; exit status 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import verifiers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = REPO.parent / "shared" / "benchmarks" / "math_verify_cases.jsonl"


def agreement(path: str | Path) -> tuple[float, list[dict]]:
    """(fraction of cases where our verdict equals `expected`, the disagreeing cases)."""
    sys.path.insert(0, str(REPO))

    cases = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    wrong = []
    for case in cases:
        settings = {"float_rounding": int(case["precision"])} if case.get("precision") else {}
        verifier = verifiers.load("math", **settings)
        got = verifier(verifiers.Sample(task="math", response=case["pred"], answer=case["gold"])).value == 1.0
        if got != bool(case["expected"]):
            wrong.append({**case, "got": got})
    return 1.0 - len(wrong) / max(1, len(cases)), wrong


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="?", default=str(DEFAULT_CASES))
    p.add_argument("--quiet", action="store_true", help="only the summary line")
    args = p.parse_args(argv)
    score, wrong = agreement(args.cases)
    if not args.quiet:
        for w in wrong:
            print(f"expected={w['expected']} got={w['got']}  gold={w['gold'][:80]!r}  pred={w['pred'][-120:]!r}")
    n = sum(1 for line in Path(args.cases).read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"agreement: {score:.1%} ({n - len(wrong)}/{n}) on {args.cases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
