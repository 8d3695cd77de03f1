"""The `math` verifier: answer forms, hostile inputs, and agreement with Math-Verify's labels."""
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.math_verify_agreement import DEFAULT_CASES, agreement, math_verify_own, read_cases
from verifiers import Sample, load

MATH = load("math")


def score(response, answer, **settings):
    v = load("math", **settings) if settings else MATH
    return v(Sample(task="math", response=response, answer=answer)).value


@pytest.mark.parametrize("response, answer, expected", [
    ("\\boxed{7}", "7", 1.0),
    ("4 + 3 = 7, so \\boxed{7}.", "7", 1.0),
    ("\\boxed{8}", "7", 0.0),
    ("First \\boxed{3}, no wait: \\boxed{7}", "7", 0.0),          # two boxes answer together: {3, 7}
    ("\\boxed{\\frac{14}{2}}", "7", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("The answer is 7,425,000.", "7425000", 1.0),                # thousands separators
    ("1 000", "1000", 1.0),
    ("$1,000.99", "1000.99", 1.0),
    ("50%", "0.5", 1.0),
    ("\\boxed{28\\%}", "28%", 1.0),
    ("\\boxed{[0, 1)}", "[0,1)", 1.0),                            # intervals
    ("\\boxed{(0, 1)}", "[0,1)", 0.0),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0),                    # sets
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),                         # units
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("x = 2", "2", 1.0),
    ("10/9", "\\frac{10}{9}", 1.0),
    ("Final Answer: The largest $n$ is 34.", "34", 1.0),
    ("There is no answer here.", "7", 0.0),
    ("", "7", 0.0),
])
def test_math_table(response, answer, expected):
    assert score(response, answer) == expected


def test_math_abstains_without_reference():
    assert MATH(Sample(task="math", response="\\boxed{7}")).value is None


@pytest.mark.parametrize("response", [
    "\\boxed{9^{9^{9^{9}}}}", "$9^{9^{9^{9}}}$", "9^9^9^9", "9**9**9**9", "\\boxed{e^{e^{e^{e^{e}}}}}",
    "\\boxed{100000!}", "\\boxed{10^{100000}}", "{" * 10_000 + "7", "1" * 5000,
    "$" + "(" * 30 + "7" + ")" * 30 + "$",
])
def test_math_refuses_what_sympy_cannot_bound(response):
    start = time.monotonic()
    s = MATH(Sample(task="math", response=response, answer="7"))
    assert s.value == 0.0 and time.monotonic() - start < 2.0


@pytest.mark.parametrize("response, expected", [
    ("__import__('os').system('touch /tmp/vlrl_pwned')", 0.0),
    ("\\boxed{__import__('os').system('touch /tmp/vlrl_pwned')}", 0.0),
    ("x" * 1_000_000, 0.0),
    ("a" * 1_000_000 + "\\boxed{7}", 1.0),
    ("\\boxed{7}" + "a" * 1_000_000, 1.0),
    ("\x00\\boxed{7}\x00", 1.0),
    ("😀\u202e\ufeff 7", 1.0),
    ("\\frac{", 0.0),
    ("\\boxed{\\frac{1}{0}}", 0.0),
    ("$$$$$$$$" * 1000, 0.0),
    ("\\boxed{" * 10_000 + "7", 0.0),
])
def test_math_hostile_inputs_are_handled(response, expected, tmp_path):
    assert score(response, "7") == expected
    assert not os.path.exists("/tmp/vlrl_pwned")


def test_math_agreement_with_math_verify_labels_reaches_math_verify_own():
    if not Path(DEFAULT_CASES).is_file():
        pytest.skip(f"{DEFAULT_CASES} not present")
    cases = read_cases(DEFAULT_CASES)
    rate, wrong = agreement(cases)
    own, _ = agreement(cases, math_verify_own)
    assert rate >= own, wrong


@pytest.mark.parametrize("response, answer, expected", [
    # sets of solutions: one box holding them, or one box each, in any order
    ("\\boxed{x = \\frac{1}{2}, x = \\frac{-1 \\pm \\sqrt{13}}{4}}", "x = \\frac{1}{2}, x = \\frac{-1 \\pm \\sqrt{13}}{4}", 1.0),
    ("\\boxed{x = \\frac{1}{2}}", "x = \\frac{1}{2}, x = \\frac{-1 \\pm \\sqrt{13}}{4}", 0.0),
    ("\\boxed{2}, \\boxed{5}", "2, 5", 1.0),
    ("\\boxed{5, 2}", "2, 5", 1.0),
    ("$x=2$ and $x=5$", "\\{2, 5\\}", 1.0),
    ("\\boxed{5} \\text{ and } \\boxed{2}", "$2$ and $5$", 1.0),
    ("\\boxed{2}", "2, 5", 0.0),                                   # a part missing
    ("\\boxed{2, 5, 7}", "2, 5", 0.0),                             # a part too many
    # tuples, several of them, as one box or several
    ("\\boxed{(3, 3)} and \\boxed{(1, 1)}", "(3, 3), (1, 1)", 1.0),
    ("\\boxed{(1, 1)}, \\boxed{(3, 3)}", "(3, 3), (1, 1)", 1.0),
    ("\\boxed{(1, 1)}", "(3, 3), (1, 1)", 0.0),
    ("\\boxed{(2, 3)}", "(2, 3)", 1.0),
    ("\\boxed{(3, 2)}", "(2, 3)", 0.0),                            # order matters inside a tuple
    # several named parts
    ("\\boxed{x = 2}, \\boxed{y = 3}", "x = 2, y = 3", 1.0),
    ("x = 2, y = 3", "(2, 3)", 1.0),
])
def test_math_answers_with_several_parts(response, answer, expected):
    assert score(response, answer) == expected


def test_math_in_a_worker_thread_disables_the_signal_alarm():
    with ThreadPoolExecutor(1) as ex:   # math-verify's SIGALRM would raise ValueError here
        assert ex.submit(score, "\\boxed{\\frac{14}{2}}", "7").result() == 1.0
