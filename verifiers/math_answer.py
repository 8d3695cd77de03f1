"""Math answer equivalence (registered as `math`): extract the final answer of a solution and of
the reference, then compare them with math-verify (sympy + latex2sympy2).

Departures from calling math-verify's `parse`/`verify` directly:
- No `ExprExtractionConfig`: its plain-text path runs sympy's `parse_expr`, which is built on
  `eval`. Plain numbers ("7,425,000", "1 000", "2,74 $", "28 percent") are read here by a regex
  into exact sympy numbers, and plain-text arithmetic ("10/9") goes to the LaTeX grammar inside
  `$...$` (a parser, no eval).
- Inputs are bounded before sympy sees them: a window of `max_chars` around the last `\\boxed{}`
  (or the tail of the text), a brace-depth cap, and a refusal of power towers, huge exponents,
  huge factorials and huge literals (`9^{9^{9^{9}}}` would otherwise hang the comparison).
- math-verify's own SIGALRM timeout is used only in a main thread (signals work nowhere else);
  the hard limit is always the caller's pool timeout (rewards.pool).
"""
from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass

from verifiers.base import Sample, Score, register
from verifiers.hedging import distinct, qualified

# math-verify logs a warning with the whole input on a timeout; a verifier does not print.
logging.getLogger("math_verify").addHandler(logging.NullHandler())
logging.getLogger("latex2sympy2_extended").addHandler(logging.NullHandler())

MAX_DEPTH = 12          # nesting of { ( [ in the window (the LaTeX grammar slows down steeply with depth)
MAX_EXPONENT = 10_000   # a literal exponent above this is refused (its power has too many digits)
MAX_FACTORIAL = 1_000
MAX_DIGITS = 1_000      # a literal with more digits is refused

_SEP = r"(?:,\\!\s?|\\,|\s?\{\s?,\s?\}|\\\s|[,\u00a0\u202f\u2009 ])"   # thousands separators
_NUM = (r"(?P<sign>[-\u2212])?\s?[$€£¥₹]?\s?"
        rf"(?:(?P<int>[1-9][0-9]{{0,2}}(?:{_SEP}[0-9]{{3}})+(?![0-9])|[0-9]+)(?P<frac>[.,][0-9]+)?"
        r"|(?P<bare>\.[0-9]+))"
        r"(?P<pct>\s*(?:\\?%|[Pp]ercent(?:age)?\b|[Pp]ct\b))?")
_NUMBER = re.compile(rf"(?<![\w.,\\{{^_]){_NUM}(?![0-9]*\s*[}}^_])")  # not inside {..} nor an exponent
_BARE_NUMBER = re.compile(rf"\$?\s*{_NUM}\s*[$€£¥₹]?\s*\.?")
# "Final answer: the volume is 120." (math-verify ranks this above any LaTeX but \boxed)
_FINAL_NUMBER = re.compile(rf"(?i:final answer)[^\n]{{0,100}}?(?:\sis|:)\s*\**\s*{_NUM}(?![0-9/^*])")
# "Answer: Jane started 3 hours ago" (no LaTeX between the keyword and the number)
_ANSWER_NUMBER = re.compile(rf"(?i:answer)\s*(?:is)?\s*:[^\n$\\]{{0,50}}?(?<![\w.,\\]){_NUM}(?![0-9/^*])")
# plain-text arithmetic: numbers joined by operators, optionally parenthesised ("(9+1)", "10/9")
_ARITH = re.compile(r"(?<![\w.\\^])[-(]*[0-9]+(?:\.[0-9]+)?\)*(?:\s*[-+*/^×÷]\s*\(*[0-9]+(?:\.[0-9]+)?\)*)+")
_POWER = re.compile(r"\^|\*\*")
_FACTORIAL = re.compile(r"([0-9]+)\s*!")
_CHAIN = re.compile(r"[0-9]+(?:\s*(?:\^|\*\*)\s*[0-9]+){2,}")   # unbraced 9^9^9 / 9**9**9
_DIGIT_RUN = re.compile(r"[0-9]{%d,}" % (MAX_DIGITS + 1))
_FINAL_PHRASE = re.compile(r"(?i:final answer)")
_DELIMITER = re.compile(r"\$|\\\[|\\\(")
_MATH_ENV = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.S)
_LATEX_ANCHOR = re.compile(r"\$|\\\[|\\\(|\\boxed|\\fbox|\\frac")


class _Refused(Exception):
    """The text holds something sympy must not evaluate (a power tower, a huge factorial...)."""


class _Hedged(Exception):
    """The solution gives several different final answers, or qualifies its answer."""


def last_boxed(text: str) -> tuple[int, int, str] | None:
    """(start, end, content) of the last `\\boxed{...}` / `\\fbox{...}`, braces matched; None if absent or unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return start, j + 1, text[i + 1:j]
    return None


_BOX_JOINER = re.compile(r"(?:\s|[,;.$]|\\[\[\]()]|\\q?quad|\\text\{\s*(?:and|or)?\s*\}|\band\b|\bor\b)*")


def all_boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every closed `\\boxed{...}` / `\\fbox{...}`, in order."""
    out = []
    end = len(text)
    while True:
        box = last_boxed(text[:end])
        if box is None:
            # an unclosed box hides the ones before it from last_boxed: look left of it
            start = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
            if start < 0:
                return out[::-1]
            end = start
            continue
        out.append(box)
        end = box[0]


def final_boxes(text: str) -> tuple[int, int] | None:
    """(start, end) of the final run of boxes: the last box and the boxes before it that only
    separators join ("\\boxed{-2} \\quad \\text{and} \\quad \\boxed{1}"); None without a box."""
    last = last_boxed(text)
    if last is None:
        return None
    start, end = last[0], last[1]
    for _ in range(10):
        prev = last_boxed(text[:start])
        if prev is None or prev[1] > start or not _BOX_JOINER.fullmatch(text[prev[1]:start]):
            break
        start = prev[0]
    return start, end


def _clean(text: str) -> str:
    # NUL and other C0 controls (but newline/tab) carry no math and upset C-level parsers.
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "", text).strip()


def _window(text: str, max_chars: int) -> str:
    """The part of `text` that holds the answer: from just before the last boxed, else the tail."""
    if len(text) <= max_chars:
        return text
    pos = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if pos >= 0:
        start = max(0, pos - 200)
        return text[start:start + max_chars]
    return text[-max_chars:]


def _group(text: str, i: int) -> str:
    """The exponent token starting at text[i]: a balanced {..}/(..) group, a digit run, or one char."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return ""
    if text[i] in "{(":
        close = "}" if text[i] == "{" else ")"
        depth = 0
        for j in range(i, len(text)):
            if text[j] == text[i]:
                depth += 1
            elif text[j] == close:
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        return text[i + 1:]
    m = re.match(r"[0-9]+", text[i:])
    return m.group(0) if m else text[i]


def _log10_int(digits: str) -> float:
    digits = digits.lstrip("0")
    if len(digits) <= 1 and digits in ("", "1"):
        return 0.0
    head = digits[:15]
    return len(digits) - len(head) + math.log10(int(head))


_ATOM_LOG10 = {"e": math.log10(math.e), "\\e": math.log10(math.e), "\\pi": math.log10(math.pi), "\\mathrm{e}": math.log10(math.e)}


def _log10_tower(expr: str) -> float | None:
    """log10 of a purely numeric power tower like `9^{9^{9}}` or `e^{e^{e}}` (right-associative);
    None when the expression holds anything else (symbols, sums...), which sympy keeps symbolic."""
    s = expr.replace(" ", "").replace("**", "^")
    while len(s) >= 2 and s[0] + s[-1] in ("{}", "()"):
        s = s[1:-1]
    m = re.match(r"([0-9]+|\\mathrm\{e\}|\\pi|\\e|e)(?:\^(.+))?$", s)
    if not m:
        return None
    atom = m.group(1)
    log_base = _ATOM_LOG10[atom] if atom in _ATOM_LOG10 else _log10_int(atom)
    if m.group(2) is None:
        return log_base
    log_exp = _log10_tower(m.group(2))
    if log_exp is None:
        return None
    if log_exp > 15:
        return math.inf if log_base > 0 else 0.0
    return 10 ** log_exp * log_base


def check_size(text: str) -> None:
    """Raise _Refused when sympy could spend unbounded time or memory on `text`."""
    depth = top = 0
    for c in text:
        if c in "{([":
            depth += 1
            top = max(top, depth)
        elif c in "})]":
            depth = max(0, depth - 1)
    if top > MAX_DEPTH:
        raise _Refused(f"nesting depth {top} > {MAX_DEPTH}")
    if _DIGIT_RUN.search(text):
        raise _Refused(f"a literal with more than {MAX_DIGITS} digits")
    for m in _FACTORIAL.finditer(text):
        if len(m.group(1)) > 6 or int(m.group(1)) > MAX_FACTORIAL:
            raise _Refused(f"factorial of {m.group(1)[:20]}")
    for m in _CHAIN.finditer(text):
        chain = re.split(r"\^|\*\*", m.group(0).replace(" ", ""))
        if _log10_tower("^{".join(chain) + "}" * (len(chain) - 1)) > math.log10(10 ** MAX_DIGITS):
            raise _Refused(f"power tower {m.group(0)[:30]!r}")
    for m in _POWER.finditer(text):
        exponent = _group(text, m.end())
        log_exp = _log10_tower(exponent)
        if log_exp is not None and log_exp > math.log10(MAX_EXPONENT):
            raise _Refused(f"exponent {exponent[:30]!r} too large")


def _number(m: re.Match):
    """An exact sympy number from a _NUM match (integer, decimal Float as math-verify makes, percent)."""
    import sympy  # heavy: loaded on first use (the verifier pool warms it)
    from latex2sympy2_extended.latex2sympy2 import convert_to_pct  # heavy, as sympy

    if m.group("bare"):
        integer, frac = "0", m.group("bare")
    else:
        integer, frac = re.sub(r"[^0-9]", "", m.group("int")), m.group("frac") or ""
    if len(integer) > MAX_DIGITS or len(frac) > MAX_DIGITS:
        raise _Refused("literal too long")
    sign = "-" if m.group("sign") else ""
    if frac:
        value = sympy.Float(f"{sign}{integer}.{frac[1:]}")
    else:
        value = sympy.Integer(int(f"{sign}{integer}"))
    return convert_to_pct(value) if m.group("pct") else value


@register("math")
@dataclass(frozen=True)
class MathAnswer:
    """1 when the solution's final answer equals the reference answer, else 0; abstains without a reference.

    float_rounding / strict / allow_set_relation_comp: passed to math_verify.verify.
    timeout_s: math-verify's own per-step alarm (main thread only; 0 disables it).
    max_chars: size of the text window examined around the final answer.
    """

    float_rounding: int = 6
    strict: bool = True
    allow_set_relation_comp: bool = False
    timeout_s: int = 5
    max_chars: int = 4000

    def __call__(self, sample: Sample) -> Score:
        if sample.answer is None:
            return Score(None)
        try:
            gold = self.extract(str(sample.answer), reference=True)
            pred = self.extract(sample.response, reference=False)
        except _Refused:
            return Score(0.0, {"math": 0.0, "refused": 1.0})
        except _Hedged:
            return Score(0.0, {"math": 0.0, "hedged": 1.0})
        if not gold or not pred:
            return Score(0.0, {"math": 0.0, "extracted": float(bool(pred))})
        from math_verify import verify  # heavy, as sympy
        ok = verify(gold, pred, float_rounding=self.float_rounding, strict=self.strict,
                    allow_set_relation_comp=self.allow_set_relation_comp,
                    timeout_seconds=self._alarm(), raise_on_error=False)
        return Score(float(ok), {"math": float(ok), "extracted": 1.0})

    def _alarm(self) -> int | None:
        # SIGALRM can only be set from the main thread of the main interpreter.
        if self.timeout_s > 0 and threading.current_thread() is threading.main_thread():
            return int(self.timeout_s)
        return None

    def _latex(self, text: str, *, boxed_first: bool = True) -> list:
        from math_verify import LatexExtractionConfig, parse  # heavy, as sympy
        config = LatexExtractionConfig(boxed_match_priority=0 if boxed_first else 50)
        return parse(text, [config], fallback_mode="first_match", extraction_mode="any_match",
                     parsing_timeout=self._alarm())

    def extract(self, text: str, *, reference: bool) -> list:
        """Candidate answers (sympy objects, then a string fallback) for math_verify.verify."""
        text = _clean(text)
        if not text:
            return []
        m = _BARE_NUMBER.fullmatch(text)
        if m and not (text.startswith("$") and text.endswith("$")):  # "$-2,1$" is LaTeX (a list)
            return [_number(m)]
        text = _window(text, self.max_chars)
        check_size(text)
        anchored = bool(_LATEX_ANCHOR.search(text))
        delimited = bool(_DELIMITER.search(text))
        boxed = final_boxes(text)
        final_at = max((m.start() for m in _FINAL_PHRASE.finditer(text)), default=-1)
        if boxed is not None and boxed[1] > final_at:
            if reference:   # a reference keeps math-verify's reading of all its boxes ("\\boxed{1}\\boxed{2}")
                found = self._latex(text)
            else:
                contents = distinct(" ".join(c.split()) for _, _, c in all_boxes(text))
                if len(contents) > 1:
                    # Several different boxes answer together, as math-verify reads them: one set
                    # ("\\boxed{(3, 3)} and \\boxed{(1, 1)}"), so a hedge between values is not the value.
                    found = self._latex("$" + ", ".join(contents) + "$") or [", ".join(contents)]
                    _check_beside_boxes(text[:all_boxes(text)[0][0]], text[boxed[1]:], found)
                    return found
                # one box (maybe repeated), plus a short tail for "\\boxed{28} pct"
                found = self._latex(text[boxed[0]:boxed[1] + 20])
                if _parsed(found):
                    _check_beside_boxes(text[:all_boxes(text)[0][0]], text[boxed[1]:], found)
            if _parsed(found):
                return found
        finals = list(_FINAL_NUMBER.finditer(text)) or list(_ANSWER_NUMBER.finditer(text))
        if finals:
            return [self._plain(finals, text, reference=reference)]
        if boxed is not None:   # "final answer" stated after the last box, in LaTeX
            found = self._latex(text, boxed_first=False)
            if _parsed(found):
                return found
        if (reference or len(text) <= 200) and not delimited:
            # a bare expression ("10/9", "x = 2", "\\{1, 2\\}" without $): read it as LaTeX
            wrapped = self._latex(f"${text}$")
            if _parsed(wrapped) or (reference and wrapped and _well_formed_latex(text)):
                return wrapped   # a LaTeX reference math-verify reads as a string compares as one
        # Otherwise the rightmost of: the last math environment, a plain arithmetic expression,
        # a plain number ("... there are 12 sequences.", "... increases by 100%.").
        math_end = max(text.rfind("$"), text.rfind("\\)"), text.rfind("\\]"))
        plain = _MATH_ENV.sub(lambda m: " " * len(m.group(0)), text)   # what LaTeX did not read is not math
        arith, number = _last(_ARITH, plain), _last(_NUMBER, plain)
        found = self._latex(text) if anchored else []
        plain_last = max(arith.end() if arith else -1, number.end() if number else -1) > math_end
        if _parsed(found) and not plain_last:
            return found
        if reference and found and not plain_last:   # math-verify reads this reference as a string: keep it
            return found
        if arith is not None and (number is None or arith.end() >= number.end()):
            expr = arith.group(0).replace("×", "\\times ").replace("÷", "\\div ")
            wrapped = self._latex(f"${expr}$")
            if _parsed(wrapped):
                return wrapped
        if number is not None:
            return [self._plain([number], text, reference=reference)]
        return found

    def _plain(self, matches: list[re.Match], text: str, *, reference: bool):
        """The number stated by the last of `matches` (plain-text final answers); in a solution, two
        different stated numbers or a qualified one ("at least 7") are a hedge."""
        values = [_number(m) for m in matches]
        if not reference:
            if any(v != values[-1] for v in values):
                raise _Hedged("different final answers")
            m = matches[-1]
            start = min(m.start(g) for g in ("sign", "int", "bare") if m.group(g) is not None)
            if qualified(text, start, m.end()):
                raise _Hedged("a qualified final answer")
        return values[-1]


# What may stand between a box and a second value offered beside it: punctuation, LaTeX spacing and
# the words of a disjunction ("\\boxed{7}, 8", "\\boxed{7} (or 8)", "8 or \\boxed{7}"); after the box
# also the words that offer another answer ("\\boxed{7}; it could also be 8"). Before a box, "is"
# and the like introduce it ("the sum of 3 and 4 is \\boxed{7}"), so they do not connect there.
_PUNCT = r"[\s$.,;:!?()\[\]/|&~-]|\\[,;:! ]|\\q?quad"
_OR = r"or|either|nor|maybe|perhaps|possibly|probably|alternatively|otherwise|else"
_BEFORE_BOX = re.compile(rf"(?:{_PUNCT}|\b(?:{_OR})\b)*", re.I)
_AFTER_BOX = re.compile(rf"(?:{_PUNCT}|\b(?:{_OR}|also|could|might|would|be|it|is|was|the|answer|and)\b)*", re.I)
_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def _check_beside_boxes(before: str, after: str, found: list) -> None:
    """Raise _Hedged when a plain number offered beside the boxes, with nothing but punctuation and
    words of a disjunction between, is none of the boxed values. Other numbers around the boxes are
    work or context ("4 + 3 = 7, so", "after 5 years"); numbers inside a command's braces or an
    exponent ("\\pmod{11}", "cm^2") are not plain."""
    import sympy  # heavy, as in _number

    values = [v for v in found if not isinstance(v, str)]
    before, after = _TEXT.sub(r" \1 ", before), _TEXT.sub(r" \1 ", after)
    # only the number closest to the boxes on each side can have nothing but connectors in between
    last, first = _last(_NUMBER, before), _NUMBER.search(after)
    beside = ([last] if last and _BEFORE_BOX.fullmatch(before[last.end():]) else []) + \
             ([first] if first and _AFTER_BOX.fullmatch(after[:first.start()]) else [])
    for m in beside:
        if not any(_same_number(_number(m), v, sympy) for v in values):
            raise _Hedged("a second value beside the boxes")


def _same_number(n, v, sympy) -> bool:
    try:
        if isinstance(v, sympy.Set):
            return bool(v.contains(n) == sympy.true)
        return abs(float(n) - float(v)) <= 1e-9 * max(1.0, abs(float(v)))
    except (TypeError, ValueError, AttributeError):
        return False


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    m = None
    for m in pattern.finditer(text):
        pass
    return m


def _well_formed_latex(text: str) -> bool:
    """LaTeX with balanced braces (a reference, not a fragment of one)."""
    return bool(_LATEX_ANCHOR.search(text)) and text.count("{") == text.count("}")


def _parsed(found: list) -> bool:
    return any(not isinstance(x, str) for x in found)
