"""Answer extraction and math-verify grading: the one grader for the GRPO reward and for evaluation.

A completion is graded by taking the content of its last `\\boxed{...}` (`extract_boxed`) and asking
math-verify whether it is equivalent to the gold answer, `verify(gold, pred)` with the gold first
(math-verify is asymmetric: gold `1 < x < 2` accepts the prediction `(1, 2)`, not the other way round).
A prediction written the same way as the gold (`same_written_form`: `\\dfrac` is `\\frac`, `\\left(` is
`(`, spaces TeX ignores do not count) is correct without asking.

Both strings go through `_parse_answer`: `normalize_numbers` (below), strip, wrap as `$...$` and
parse; if that gives no SymPy object, wrap as `\\boxed{...}` and parse again. Bare strings are not
parsed as they are, because math-verify then looks for a plain expression and reads
`\\left( 3, \\frac{\\pi}{2} \\right)` as `3` and `[-2, 7]` as `7`. `$...$` is tried first because
`\\boxed{40\\%}` parses to no number at all; `\\boxed{...}` is the second try because it rescues golds
with a trailing full stop (`-\\frac{5}{3}.`). Of the 10,602 gold answers in data/sources (MATH train,
DeepScaleR, MATH500, GSM8K test, AIME, AMC) the chain leaves 12 unparseable (6 empty strings,
`\\sin^2 t`, `\\div`, `\\dfrac{1}{29,\\!322,\\!216}`, ...); `$...$` alone leaves 14, `\\boxed{...}` alone
16 and the bare string 889 (all after normalize_numbers).

A gold answer is parseable when math-verify turns it into at least one SymPy object. A parse that
only yields math-verify's raw-string fallback does not count: for `\\sin^2 t` that fallback is the
truncated text `\\sin^2`, which string comparison would match against the wrong answer `\\sin^2 x`.
An unparseable gold grades as None (to be excluded and counted by the caller), never as 1.0.

Numbers (`normalize_numbers`, on the gold and on the prediction alike). math-verify reads `4.5e33`
as 4.5 x e x 33 (Euler's number), and compares decimals after rounding them to 6 places, so
`1.6 \\times 10^{-19}` equals `1.6 \\times 10^{-18}` and `0.0000001` equals `0.00000001`. Before
parsing, e-notation and powers of ten (`4.5e33`, `6.0E-3`, `-2e5`, `3 \\times 10^{8}`,
`3\\cdot10^8`) and decimals below 10^-6 are rewritten as exact integers or fractions, so every
spelling of a number grades 1.0 against the others and a value 10x off grades 0.0 at any magnitude;
e-notation compares exactly at the digits written (`6.63e-34` = `6.630e-34` != `6.626e-34`). Only a
number that stands alone is rewritten: `e^{x}`, `2e`, `2e^{3}`, `3e - 5` keep Euler's number (but
`3e-5` is 0.00003), and identifiers (`x2e3`), text (`\\text{0x1e5}`) and factors of another power or
quotient (`2^3 \\times 10^2`, `1/3 \\times 10^2`) are left alone. A percent sign after a number is
dropped: `50\\%`, `50%` and `50 percent` all grade as 50, never as 0.5. That is math-verify's own
reading of `50\\%` (the way the MATH golds write percentages), it keeps "equal" transitive (if
`50\\%` matched both 50 and 0.5, then 50 and 0.5 would both be right for one gold), and a model that
answers 0.5 to "what percent" has given the fraction, not the percentage.

Fast paths. `Grader` decides a pair in the calling process, without math-verify, only where the
decision provably equals grade_one's: both sides plain numbers (integers with optional leading
zeros and strict thousands commas, decimals with at most 6 places, `\\frac{a}{b}`, `a/b`, after
normalize_numbers) compared exactly with `fractions.Fraction` (unequal decimals only when they are
too far apart for the 6-place rounding to join them); no box at all, or a copy of the gold, once the
gold is known to parse (a plain number always does). tests/test_grading.py checks each decision
against grade_one on a table of tricky cases and on random numbers; benchmarks/grader.py on every
item of its mix.

Timeouts. math-verify bounds each parse and each comparison with `signal.alarm`, which only works in
the main thread and only takes effect when the interpreter next checks for signals, so C code that
does not check (an extension module, a stuck library call) runs past it, and nothing in-process
survives a crash. `Grader` therefore grades in worker processes (spawn context) that run
`grade_one` in their main thread, and the parent kills a worker whose item runs past `timeout_s`
plus a margin. Either way the item scores 0.0 (a prediction that cannot be verified in time is not
correct) and `Grader.timeouts` counts it. With CPython 3.11 the alarm itself stops
`\\boxed{10^{10^{10^{10}}}}` (CPython's big-int power and multiplication check for signals as they
go), so that input costs one math-verify timeout and no kill unless timeout_s is under a second.

Memory. A Grader remembers the grades the pool gave for up to `memo_size` distinct (answer, gold)
pairs, and which golds parse, least recently used forgotten first; a forgotten pair is graded
again, so the limit bounds memory and never changes a grade. Each process that grades also keeps
its last 4,096 parses (a parse is deterministic; one that ran out of time is not kept), and the pool
sends a gold's completions to the worker that parsed it when it can.

What is covered: `\\boxed{...}` with nested and escaped braces, `\\boxed 5`, `\\fbox{...}`;
everything math-verify's LaTeX and expression parsers accept (fractions, decimals, thousands
separators, tuples, intervals, sets, matrices, `\\text{...}`, degrees, percentages, units); numbers
in e-notation and powers of ten. What is not: answers outside a box (a completion without one scores
0.0), multiple-choice letters matched against option text, source quirks such as GSM8K's `#### N` or
AIME's zero padding (those belong to the data loaders; math-verify happens to read `025` as 25),
`10^-3` without braces (LaTeX reads it as 10^- then 3), relative tolerance for decimals (math-verify's
6-place rounding stays, e.g. `0.333333` = `\\frac{1}{3}`), and memory limits: a prediction that
exhausts the worker's memory is caught only when the worker dies.
"""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import multiprocessing.connection
import re
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from math_verify import parse, verify
from math_verify.errors import TimeoutException

_BOX_COMMAND = re.compile(r"\\(boxed|fbox)(?![A-Za-z])")

# Seconds added to timeout_s before the parent kills a worker: covers pipe latency and scheduling
# jitter, and is below one second so that with a sub-second timeout_s the kill comes before
# math-verify's alarm (which has whole-second resolution).
_KILL_MARGIN_S = 0.5
# A worker imports SymPy and math-verify and grades one warm-up item before it reports ready;
# that takes a second or two, so a worker that is not ready after this long is broken, not slow.
_STARTUP_TIMEOUT_S = 120.0
# Start-up failures in a row (no worker got ready in between) before the pool gives up: one can be
# bad luck (the OOM killer), several mean the environment is broken and retrying would loop forever.
_MAX_STARTUP_FAILURES = 3
# Distinct (answer, gold) grades a Grader remembers by default (least recently used go first):
# ~100 bytes each, so about 20 MB at most.
MEMO_SIZE = 200_000
# Pending items a free worker looks through for one with a gold it has parsed (see Grader._take);
# a bound keeps a call with thousands of items (prepare's parseable) linear.
_LOOK_AHEAD = 32
# How long terminate() gets before kill(), and close() gets before terminate().
_EXIT_GRACE_S = 1.0


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, `\\boxed TOKEN` or `\\fbox{...}` in text.

    Braces are matched with a depth counter that skips escaped characters, so `\\boxed{\\frac{1}{2}}`
    gives `\\frac{1}{2}` and `\\boxed{\\{1, 2\\}}` gives `\\{1, 2\\}`. Returns None when there is no
    box, or when the last box is unbalanced or has no argument (`\\boxed` at the end of the text):
    a truncated final answer is not replaced by an earlier, abandoned one.
    """
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    pos = last.end()
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos == len(text):
        return None
    if text[pos] == "{":
        return _braced_content(text, pos)
    if last.group(1) == "fbox":
        return None
    # `\boxed 5` / `\boxed5`: the argument runs to the next space or closing `$`.
    end = pos
    while end < len(text) and not text[end].isspace() and text[end] != "$":
        end += 1
    return text[pos:end] or None


def _braced_content(text: str, open_pos: int) -> str | None:
    """Text between the `{` at open_pos and its matching `}`, or None if it is never closed."""
    depth = 0
    pos = open_pos
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2  # `\{`, `\}` and `\\` are escapes, not braces
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : pos]
        pos += 1
    return None


# --------------------------------------------------------------------------------------------
# Numbers: how a number is spelled must not change its grade

# Commands whose argument is text, not math: numbers inside are left alone (`\text{0x1e5}` is a
# label, not 100,000).
_TEXT_COMMAND = re.compile(
    r"\\(?:text|textrm|textbf|textit|textnormal|textsf|texttt|mathrm|mathit|mathbf|mathsf|mathtt|mbox"
    r"|operatorname)\s*(?=\{)"
)
# ASCII digits only (Python's \d also matches other scripts' digits, which math-verify does not read),
# and at most 100 of them: int() refuses numbers over 4,300 digits, and no real answer comes close.
_MANTISSA = r"(?:[0-9]{1,100}(?:\.[0-9]{0,100})?|\.[0-9]{1,100})"
# A number starts a token: not inside a word or identifier (`x2e3`), not after a decimal point, a
# command, a sub- or superscript (`2^3 \times 10^2` is not 2^300) or a thousands comma (`1,500e3`).
_NUMBER_START = r"(?<![\w.\\^_])(?<!\d,)"
# ... and nothing binds tighter to its end: no superscript, subscript or factorial follows.
_NUMBER_END = r"(?!\s*[\^_!])"
_TIMES_TEN = re.compile(
    _NUMBER_START + rf"(?P<mantissa>{_MANTISSA})\s*\\(?:times|cdot)\s*10\s*\^\s*"
    r"(?:\{\s*(?P<braced>[-+]?\s*[0-9]{1,6})\s*\}|(?P<digit>[0-9])(?!\d))" + _NUMBER_END
)
# `4.5e33`, `6.0E-3`: the exponent follows the e at once; `3e - 5` and `2e^{x}` stay Euler's number.
_E_NOTATION = re.compile(
    _NUMBER_START + rf"(?P<mantissa>{_MANTISSA})[eE](?P<exponent>[-+]?[0-9]{{1,6}})(?!\w|\.\d)" + _NUMBER_END
)
# A decimal below 10^-6: math-verify rounds decimals to 6 places, which would make every such
# number equal to every other (0.00000016 = 0.0000016 = 0).
_TINY_DECIMAL = re.compile(
    _NUMBER_START + r"0{0,100}\.(?P<zeros>0{6,100})(?P<digits>[1-9][0-9]{0,100})(?![\w.])" + _NUMBER_END
)
# A percent sign after a number is a unit and is dropped: `50\%`, `50%`, `50 percent`,
# `50\text{ pct}` all read 50 (see the module docstring for why not 0.5).
_PERCENT = re.compile(
    r"(?<=[0-9}.])\s*(?:\\?%|(?:percentage|percent|pct)\b"
    r"|\\(?:text|textrm|mathrm|mbox)\s*\{\s*(?:\\?%|percentage|percent|pct)\s*\})"
)
# Powers of ten written out in full up to this size (a 301-digit integer is cheap for SymPy);
# beyond it the exact value stays a product `m \times 10^{k}`.
_MAX_WRITTEN_POWER = 300


def _exact_number(mantissa: str, exponent: int) -> str:
    """mantissa x 10^exponent as exact LaTeX: an integer, or `\\frac{m}{10...0}` (a SymPy Rational)."""
    whole, _, fraction = mantissa.partition(".")
    digits = int(whole + fraction or "0")
    power = exponent - len(fraction)
    if digits == 0:
        return "0"
    if abs(power) > _MAX_WRITTEN_POWER:
        return f"{digits} \\times 10^{{{power}}}"
    if power >= 0:
        return str(digits * 10**power)
    return f"\\frac{{{digits}}}{{1{'0' * -power}}}"


def _rewrite_math(text: str) -> str:
    """Scientific notation and tiny decimals in a stretch of math (no text commands) -> exact values."""

    def times_ten(match: re.Match) -> str:
        before = text[: match.start()].rstrip()
        # `6 \div 3 \times 10^2` and `1/3 \times 10^2` divide by the mantissa only: not a number.
        if before.endswith(("/", "\\div")):
            return match.group(0)
        exponent = match["braced"] if match["braced"] is not None else match["digit"]
        return _exact_number(match["mantissa"], int(exponent.replace(" ", "")))

    text = _TIMES_TEN.sub(times_ten, text)
    text = _E_NOTATION.sub(lambda m: _exact_number(m["mantissa"], int(m["exponent"])), text)
    return _TINY_DECIMAL.sub(
        lambda m: f"\\frac{{{int(m['digits'])}}}{{1{'0' * (len(m['zeros']) + len(m['digits']))}}}", text
    )


def normalize_numbers(answer: str) -> str:
    """The answer with every number spelled so that math-verify reads its value exactly.

    - e-notation and powers of ten (`4.5e33`, `6.0E-3`, `-2e5`, `3 \\times 10^{8}`, `3\\cdot10^8`)
      become the exact integer or `\\frac{m}{10^k}` written out, so every spelling of a number has the
      same value and a value 10x off differs at any magnitude;
    - decimals below 10^-6 (`0.00000016`) become exact fractions, for the same reason;
    - a percent sign after a number is dropped (`50\\%` reads 50, never 0.5).
    Text arguments (`\\text{...}`, `\\mathrm{...}`) are copied unchanged; nothing else is touched.
    """
    return _map_math(_PERCENT.sub("", answer), _rewrite_math)


def _map_math(text: str, rewrite: Callable[[str], str]) -> str:
    """text with `rewrite` applied to each stretch of math; text arguments (`\\text{...}`) copied as
    they are, and everything after an unbalanced one too."""
    pieces = []
    pos = 0
    for match in _TEXT_COMMAND.finditer(text):
        if match.start() < pos:  # a command inside text already copied
            continue
        content = _braced_content(text, match.end())
        if content is None:
            return "".join(pieces) + text[pos:]
        end = match.end() + len(content) + 2
        pieces += [rewrite(text[pos : match.start()]), text[match.start() : end]]
        pos = end
    return "".join(pieces) + rewrite(text[pos:])


# --------------------------------------------------------------------------------------------
# Answers that are written the same way

_FRAC_STYLE = re.compile(r"\\[dtc]frac(?![A-Za-z])")
# `\left(` is `(` drawn to fit; `\left.` (an invisible delimiter) and `\leftarrow` are not touched.
_SIZED_DELIMITER = re.compile(r"\\(?:left|right)(?=[()\[\]|]|\\[{}|])")
_WHITESPACE = re.compile(r"\s+")


def _squeeze_spaces(math: str) -> str:
    """Drop the spaces TeX ignores in math: all but one between two letters (`\\sin x` is not `\\sinx`)
    and one after a backslash (a control space)."""

    def squeeze(match: re.Match) -> str:
        before = math[match.start() - 1] if match.start() else ""
        after = math[match.end()] if match.end() < len(math) else ""
        return " " if before == "\\" or (before.isalpha() and after.isalpha()) else ""

    return _WHITESPACE.sub(squeeze, math)


@functools.lru_cache(maxsize=1 << 14)
def _written_form(answer: str) -> str:
    """The answer as TeX draws it: `\\dfrac`/`\\tfrac` as `\\frac`, `\\left(` as `(`, spaces TeX ignores
    dropped; text arguments unchanged. Two answers with the same written form are the same answer."""
    return _map_math(answer, _math_written_form)


def _math_written_form(math: str) -> str:
    return _squeeze_spaces(_SIZED_DELIMITER.sub("", _FRAC_STYLE.sub(r"\\frac", math)))


def same_written_form(answer: str, gold: str) -> bool:
    """Whether answer and gold are written the same way (see _written_form): then they are equal."""
    return answer == gold or _written_form(answer) == _written_form(gold)


# Plain numbers as the fast paths read them (after normalize_numbers): an optional sign, then an
# integer (leading zeros and strict thousands commas allowed), a decimal (`2.5`, `.5`, `5.`), or a
# fraction of two integers (`\frac{1}{2}`, `\dfrac12`, `1/2`, `\frac{-1}{2}`).
_PLAIN_NUMBER = re.compile(
    r"(?P<sign>-?)(?:"
    r"(?P<int>[1-9][0-9]{0,2}(?:,[0-9]{3})+|[0-9]+)(?P<point>\.(?P<decimals>[0-9]*))?"
    r"|\.(?P<lone_decimals>[0-9]+)"
    r"|\\[dt]?frac\{(?P<num>-?[0-9]+)\}\{(?P<den>[0-9]+)\}"
    r"|\\[dt]?frac(?P<num_digit>[0-9])(?P<den_digit>[0-9])"
    r"|(?P<slash_num>[0-9]+)/(?P<slash_den>[0-9]+)"
    r")"
)
# Longest answer the fast paths read; longer ones go to math-verify (bounds the work in the parent).
_MAX_PLAIN_LENGTH = 400
# Decimals the fast paths compare: at most 6 places and 8 integer digits, so that SymPy's 15-digit
# Float holds every place that math-verify's 6-place rounding looks at.
_MAX_DECIMAL_PLACES = 6
_MAX_DECIMAL_INTEGER_DIGITS = 8
# math-verify calls decimals equal when they agree rounded to 6 places; two values further apart
# than this can never round together (each moves by at most 5e-7, plus float error far below 1e-9).
_DECIMAL_SEPARATION = Fraction(2, 10**6)


# A gold is looked up once per completion graded against it; a bounded cache keeps that cheap.
@functools.lru_cache(maxsize=1 << 14)
def _plain_number(answer: str) -> tuple[Fraction, bool] | None:
    """(exact value, written as a decimal) for a plain number (see _PLAIN_NUMBER), else None."""
    text = normalize_numbers(answer).strip()
    if len(text) > _MAX_PLAIN_LENGTH:
        return None
    match = _PLAIN_NUMBER.fullmatch(text)
    if match is None:
        return None
    sign = -1 if match["sign"] == "-" else 1
    if match["int"] is not None or match["lone_decimals"] is not None:
        whole = (match["int"] or "0").replace(",", "")
        places = match["decimals"] if match["int"] is not None else match["lone_decimals"]
        decimal = match["point"] is not None or match["lone_decimals"] is not None
        if decimal and (len(places) > _MAX_DECIMAL_PLACES or len(whole.lstrip("0")) > _MAX_DECIMAL_INTEGER_DIGITS):
            return None
        value = Fraction(int(whole + (places or "")), 10 ** len(places or ""))
        return sign * value, decimal
    if match["num"] is not None:
        num, den = match["num"], match["den"]
    elif match["num_digit"] is not None:
        num, den = match["num_digit"], match["den_digit"]
    else:
        num, den = match["slash_num"], match["slash_den"]
    # Leading zeros, a zero denominator and two minus signs are left to math-verify.
    if num.startswith("-") and sign < 0:
        return None
    if any(len(part.lstrip("-")) > 1 and part.lstrip("-")[0] == "0" for part in (num, den)) or den == "0":
        return None
    return sign * Fraction(int(num), int(den)), False


def _number_grade(answer: str, gold: str) -> float | None:
    """The grade of two plain numbers without math-verify, or None where it would have to decide.

    Exact values equal -> 1.0. Both exact (integers, fractions, anything normalize_numbers wrote
    out) and unequal -> 0.0, as SymPy compares Integers and Rationals exactly. A decimal on either
    side and unequal -> 0.0 only when the values are too far apart for math-verify's 6-place
    rounding to join them (`0.333333` against `\\frac{1}{3}` is math-verify's call).
    """
    gold_number = _plain_number(gold)
    answer_number = _plain_number(answer)
    if gold_number is None or answer_number is None:
        return None
    (gold_value, gold_decimal), (answer_value, answer_decimal) = gold_number, answer_number
    if gold_value == answer_value:
        return 1.0
    if not (gold_decimal or answer_decimal) or abs(gold_value - answer_value) > _DECIMAL_SEPARATION:
        return 0.0
    return None


def _alarm_seconds(timeout_s: float) -> int:
    """math-verify's alarms take whole seconds; round down but never to 0 (0 disables them)."""
    return max(1, int(timeout_s))


def _require_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "grade_one/gold_is_parseable use math-verify's signal.alarm timeouts, which only work in "
            "the main thread; from other threads use Grader, which grades in worker processes"
        )


def _has_math(parsed: list) -> bool:
    return any(not isinstance(item, str) for item in parsed)


# Parses of answer strings in this process (a grading worker, or the caller of grade_one), least
# recently used dropped first: GRPO grades one gold against a whole group of completions, and
# math-verify's LaTeX parser takes 10-50 ms on a string it has not seen (it keeps only the last 20).
_PARSED_SIZE = 4096
_parsed: OrderedDict[str, list] = OrderedDict()


def _parse_answer(answer: str, timeout_s: float) -> tuple[list, bool]:
    """math-verify parse of a bare answer string -> (parsed, timed_out).

    Tries `$answer$`, then `\\boxed{answer}` (see the module docstring for why). If neither yields a
    SymPy object, returns the first non-empty raw-string fallback, so that a prediction can still
    match a gold string exactly; callers decide whether string-only results count.
    """
    answer = normalize_numbers(answer).strip()
    if answer in _parsed:
        _parsed.move_to_end(answer)
        return _parsed[answer], False
    parsed, timed_out = _parse_normalized(answer, timeout_s)
    if not timed_out:  # a parse is deterministic unless it ran out of time
        _parsed[answer] = parsed
        if len(_parsed) > _PARSED_SIZE:
            _parsed.popitem(last=False)
    return parsed, timed_out


def _parse_normalized(answer: str, timeout_s: float) -> tuple[list, bool]:
    if not answer:
        return [], False
    timed_out = False
    fallback: list = []
    for wrapped in (f"${answer}$", f"\\boxed{{{answer}}}"):
        try:
            parsed = parse(wrapped, parsing_timeout=_alarm_seconds(timeout_s), raise_on_error=True)
        except TimeoutException:
            timed_out = True
            continue
        except Exception:  # noqa: BLE001 - the parser raises many types on malformed LaTeX;
            # math-verify's own non-raising mode maps every one of them to "nothing parsed".
            continue
        if _has_math(parsed):
            return parsed, timed_out
        fallback = fallback or parsed
    return fallback, timed_out


def _verify(gold_parsed: list, pred_parsed: list, timeout_s: float) -> tuple[bool, bool]:
    """`verify(gold, pred)`, one pair of candidates at a time -> (equivalent, timed_out).

    `verify(gold_list, pred_list)` is `any` over the same pairs in the same order, but with
    raise_on_error=False it reports a timeout as a plain False; calling it per pair with
    raise_on_error=True lets the pool count timeouts.
    """
    timed_out = False
    for gold, pred in itertools.product(gold_parsed, pred_parsed):
        try:
            if verify(gold, pred, timeout_seconds=_alarm_seconds(timeout_s), raise_on_error=True):
                return True, timed_out
        except TimeoutException:
            timed_out = True
        except Exception:  # noqa: BLE001 - SymPy raises many types on odd expressions; math-verify's
            # own non-raising mode treats every one of them as "not equal", and so do we.
            continue
    return False, timed_out


def _grade(completion: str, gold: str, timeout_s: float) -> tuple[float | None, bool]:
    """grade_one plus whether a math-verify timeout fired (what the workers report)."""
    _check_str("completion", completion)
    _check_str("gold", gold)
    _require_main_thread()
    gold_parsed, gold_timed_out = _parse_answer(gold, timeout_s)
    if not _has_math(gold_parsed):
        return None, gold_timed_out
    pred = extract_boxed(completion)
    if pred is None:
        return 0.0, gold_timed_out
    if same_written_form(pred, gold):  # a parseable gold equals itself, whatever SymPy makes of it
        return 1.0, gold_timed_out
    pred_parsed, pred_timed_out = _parse_answer(pred, timeout_s)
    if not pred_parsed:
        return 0.0, gold_timed_out or pred_timed_out
    equivalent, verify_timed_out = _verify(gold_parsed, pred_parsed, timeout_s)
    return (1.0 if equivalent else 0.0), gold_timed_out or pred_timed_out or verify_timed_out


def _gold_is_parseable(gold: str, timeout_s: float) -> tuple[bool, bool]:
    _check_str("gold", gold)
    _require_main_thread()
    parsed, timed_out = _parse_answer(gold, timeout_s)
    return _has_math(parsed), timed_out


def grade_one(completion: str, gold: str, timeout_s: float = 5.0) -> float | None:
    """1.0 if the completion's last boxed answer is equivalent to gold, else 0.0; None if gold is unparseable.

    Runs in the calling process, which must be the main thread (math-verify's timeouts use
    signal.alarm). A timeout inside math-verify counts as not equivalent. No hard limit: use
    `Grader` for untrusted completions.
    """
    return _grade(completion, gold, timeout_s)[0]


def gold_is_parseable(gold: str, timeout_s: float = 5.0) -> bool:
    """Whether math-verify turns gold into at least one SymPy object (main thread only)."""
    return _gold_is_parseable(gold, timeout_s)[0]


_TASKS = {"grade": _grade, "parseable": _gold_is_parseable}


def _worker_main(conn: multiprocessing.connection.Connection, timeout_s: float) -> None:
    """Worker process loop: receive (task, args), send back (value, timed_out); None means exit."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The first parse builds math-verify's LaTeX parser; do it before the parent starts the clock.
    _grade("\\boxed{1}", "1", timeout_s)
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            return
        if message is None:
            return
        task, args = message
        conn.send(_TASKS[task](*args, timeout_s))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False
    item: int | None = None
    deadline: float = math.inf
    gold: str | None = None  # of the last item sent (see _take)


def _stop(worker: _Worker, grace_s: float) -> None:
    """terminate, then kill: SIGTERM ends a worker even while it holds the GIL in C code."""
    if worker.process.is_alive():
        worker.process.terminate()
        worker.process.join(grace_s)
    if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
    worker.conn.close()


def _deadline(worker: _Worker) -> float:
    return worker.deadline if worker.ready else worker.started_at + _STARTUP_TIMEOUT_S


def _receive(worker: _Worker) -> object | None:
    """The worker's next message, or None if its process is gone (a dead pipe reads as EOF)."""
    try:
        return worker.conn.recv() if worker.conn.poll() else None
    except (EOFError, OSError):
        return None


class Grader:
    """grade_one / gold_is_parseable in a pool of worker processes with a hard per-item timeout.

    Each distinct (answer, gold) pair of a call is graded once: from the memo (`memo_size` pairs,
    least recently used forgotten first), by a fast path in this process (plain numbers, no box, a
    copy of the gold; see the module docstring), or on the pool. Workers start on the first pool
    call (or `start()`) and are reused by later calls (GRPO grades every step). Items are handed to
    whichever worker is free, preferring one that has parsed the item's gold, so `workers` items are
    graded at once; results come back in input order. `fast` counts pairs decided in this process
    (once per call). An item that runs past timeout_s (+0.5 s) has its worker killed and replaced and
    scores 0.0 (grade) or False (parseable); so does an item whose worker dies. `timeouts` counts
    items that ran out of time, whether math-verify's alarm stopped them inside the worker or the
    worker had to be killed; `restarts` counts workers replaced after a kill or a crash.
    Not thread-safe: call it from one thread. Workers are spawned, so they re-import the calling
    script: scripts need the usual `if __name__ == "__main__":` guard.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memo_size: int = MEMO_SIZE):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Grader workers must be an int >= 1, got {workers!r}")
        if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise ValueError(f"Grader timeout_s must be a finite number > 0, got {timeout_s!r}")
        if isinstance(memo_size, bool) or not isinstance(memo_size, int) or memo_size < 0:
            raise ValueError(f"Grader memo_size must be an int >= 0, got {memo_size!r}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.memo_size = memo_size
        self.timeouts = 0
        self.restarts = 0
        # Pairs graded in the calling process, without the pool (each distinct pair once per call).
        self.fast = 0
        # spawn, not fork: the parent may hold torch/tokenizer threads and locks that fork would copy.
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._startup_failures = 0
        self._closed = False
        # Grades the pool gave for (answer, gold) pairs, least recently used first; items that ran out
        # of time are not kept. Golds the pool found parseable, in the same order. Both hold at most
        # memo_size entries: a forgotten pair is graded again, so the limit never changes a grade.
        self._known: OrderedDict[tuple[str | None, str], float | None] = OrderedDict()
        self._parseable_golds: OrderedDict[str, None] = OrderedDict()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Ask workers to exit, then terminate/kill stragglers. Idempotent."""
        self._closed = True
        workers, self._workers = self._workers, []
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:  # already dead: the pipe is broken
                pass
        for worker in workers:
            worker.process.join(_EXIT_GRACE_S)
            _stop(worker, _EXIT_GRACE_S)

    def start(self) -> None:
        """Start the workers now and wait until every one is ready (else the first pool call does)."""
        if self._closed:
            raise RuntimeError("Grader is closed")
        self._start_missing_workers()
        while not all(worker.ready for worker in self._workers):
            self._collect([])

    def grade(self, completions: list[str], golds: list[str]) -> list[float | None]:
        """grade_one over pairs; 0.0 for items that time out or crash their worker."""
        if len(completions) != len(golds):
            raise ValueError(
                f"grade needs one gold per completion: got {len(completions)} completions "
                f"and {len(golds)} golds"
            )
        _check_strings("completions", completions)
        _check_strings("golds", golds)
        # A grade depends only on (last boxed answer, gold): a GRPO group of 8 often repeats an
        # answer, and golds repeat across a group. Each distinct pair is graded once: from the memo,
        # by a fast path in this process, or on the pool.
        keys = [(extract_boxed(c), g) for c, g in zip(completions, golds)]
        grades: dict[tuple[str | None, str], float | None] = {}
        todo = []
        for key in dict.fromkeys(keys):
            if key in self._known:
                self._known.move_to_end(key)
                grades[key] = self._known[key]
            elif (fast := self._fast_grade(*key)) is not None:
                grades[key] = fast
            else:
                todo.append(key)
        # A missing box or a copy of the gold only needs to know whether the gold parses; when another
        # pair with the same gold goes to the pool, its result says so, and these wait for it.
        pooled_golds = {gold for answer, gold in todo if not _needs_only_gold(answer, gold)}
        waiting = {key: None for key in todo if _needs_only_gold(*key) and key[1] in pooled_golds}
        pooled, parsed = self._grade_on_pool([key for key in todo if key not in waiting])
        grades.update(pooled)
        still = []
        for key in waiting:
            if (fast := self._fast_grade(*key, parsed=parsed)) is not None:
                grades[key] = fast
            else:  # the gold did not parse, or its pair ran out of time: the pool decides
                still.append(key)
        grades.update(self._grade_on_pool(still)[0])
        return [grades[key] for key in keys]

    def parseable(self, golds: list[str]) -> list[bool]:
        """gold_is_parseable over golds; False for items that time out or crash their worker."""
        _check_strings("golds", golds)
        # A plain number always parses; only the others go to the pool.
        todo = [gold for gold in dict.fromkeys(golds) if _plain_number(gold) is None]
        found = {gold: True for gold in golds}
        for gold, (value, killed) in zip(todo, self._run("parseable", [(gold,) for gold in todo])):
            found[gold] = bool(value) and not killed
            if found[gold]:
                self._remember_gold(gold)
        return [found[gold] for gold in golds]

    def _fast_grade(self, answer: str | None, gold: str, parsed: set[str] | frozenset = frozenset()) -> float | None:
        """A pair's grade without the pool where it provably equals grade_one's, else None.

        `parsed`: golds that the pool has just found parseable (in this call).
        """
        parseable = gold in parsed or gold in self._parseable_golds or _plain_number(gold) is not None
        if answer is None:
            grade = 0.0 if parseable else None
        elif same_written_form(answer, gold):
            grade = 1.0 if parseable else None
        else:
            grade = _number_grade(answer, gold)
        self.fast += grade is not None
        return grade

    def _grade_on_pool(
        self, keys: list[tuple[str | None, str]]
    ) -> tuple[dict[tuple[str | None, str], float | None], set[str]]:
        """Grade pairs on the pool -> (grades, golds found parseable).

        Each pair goes as the canonical completion "\\boxed{answer}" ("" when there is no box).
        """
        items = [("" if answer is None else f"\\boxed{{{answer}}}", gold) for answer, gold in keys]
        grades = {}
        parsed = set()
        for key, (value, killed) in zip(keys, self._run("grade", items)):
            grades[key] = 0.0 if killed else value
            if not killed:
                self._remember(key, value)
                if value is not None:
                    parsed.add(key[1])
        return grades, parsed

    def _remember(self, key: tuple[str | None, str], value: float | None) -> None:
        if value is not None:
            self._remember_gold(key[1])
        if self.memo_size:
            self._known[key] = value
            self._known.move_to_end(key)
            while len(self._known) > self.memo_size:
                self._known.popitem(last=False)

    def _remember_gold(self, gold: str) -> None:
        if self.memo_size:
            self._parseable_golds[gold] = None
            self._parseable_golds.move_to_end(gold)
            while len(self._parseable_golds) > self.memo_size:
                self._parseable_golds.popitem(last=False)

    def _run(self, task: str, items: list[tuple]) -> list[tuple[object, bool]]:
        """Run task over items on the pool -> [(value, killed)] in input order."""
        if self._closed:
            raise RuntimeError("Grader is closed")
        if not items:
            return []
        self._start_missing_workers()
        results: list[tuple[object, bool] | None] = [None] * len(items)
        pending = deque(range(len(items)))
        remaining = len(items)
        try:
            while remaining:
                for slot, worker in enumerate(self._workers):
                    if worker.ready and worker.item is None and pending:
                        index = self._take(pending, items, worker)
                        try:
                            worker.conn.send((task, items[index]))
                        except OSError:  # died while idle: the item never ran, so it goes back
                            pending.appendleft(index)
                            self._replace(slot)
                            continue
                        worker.item = index
                        worker.gold = items[index][-1]
                        worker.deadline = time.monotonic() + self.timeout_s + _KILL_MARGIN_S
                remaining -= self._collect(results)
        finally:
            # Interrupted (Ctrl-C, a start-up failure): a busy worker would later deliver a stale
            # answer into the next call, so stop it; _start_missing_workers brings the pool back.
            busy = [worker for worker in self._workers if worker.item is not None]
            for worker in busy:
                _stop(worker, _EXIT_GRACE_S)
            self._workers = [worker for worker in self._workers if worker.item is None]
        return results  # type: ignore[return-value]

    def _take(self, pending: deque, items: list[tuple], worker: _Worker) -> int:
        """The next item for a free worker (items end with their gold): the first pending one with the
        gold this worker graded last, else the first whose gold no busy worker has, else the oldest.
        A gold's completions then mostly go to one worker, which parses the gold once (_parse_answer
        remembers it) instead of every worker parsing it. Looks a bounded way ahead."""
        window = list(itertools.islice(pending, _LOOK_AHEAD))
        busy = {other.gold for other in self._workers if other.item is not None}
        choice = next((i for i in window if items[i][-1] == worker.gold), None)
        if choice is None:
            choice = next((i for i in window if items[i][-1] not in busy), window[0])
        pending.remove(choice)
        return choice

    def _collect(self, results: list) -> int:
        """Wait for the next event (result, ready, death or deadline) and handle it; return items finished."""
        waiting = [(slot, w) for slot, w in enumerate(self._workers) if not w.ready or w.item is not None]
        handles = [w.conn for _, w in waiting] + [w.process.sentinel for _, w in waiting]
        next_deadline = min(_deadline(w) for _, w in waiting)
        ready = multiprocessing.connection.wait(handles, timeout=max(0.0, next_deadline - time.monotonic()))
        finished = 0
        for slot, worker in waiting:
            if worker.conn in ready or worker.process.sentinel in ready:
                message = _receive(worker)
                if message is None:
                    finished += self._lose(slot, results, died=True)
                elif message == "ready":
                    worker.ready = True
                    self._startup_failures = 0
                else:
                    value, timed_out = message
                    self.timeouts += int(timed_out)
                    results[worker.item] = (value, False)
                    worker.item = None
                    worker.deadline = math.inf
                    finished += 1
            elif time.monotonic() >= _deadline(worker):
                finished += self._lose(slot, results, died=False)
        return finished

    def _lose(self, slot: int, results: list, died: bool) -> int:
        """Replace a worker that died or overran and score its item as killed; return items finished."""
        worker = self._workers[slot]
        _stop(worker, _EXIT_GRACE_S)
        if not worker.ready:
            why = f"exited with code {worker.process.exitcode}" if died else "did not get ready in time"
            self._startup_failures += 1
            if self._startup_failures >= _MAX_STARTUP_FAILURES:
                self.close()
                raise RuntimeError(
                    f"grader worker {why} during start-up, {self._startup_failures} times in a row "
                    f"(start-up limit {_STARTUP_TIMEOUT_S:.0f} s); check that "
                    "`python -c 'import rlvr.grading'` works and that the calling script has an "
                    "`if __name__ == \"__main__\":` guard (spawned workers re-import it)"
                )
            self._replace(slot)
            return 0
        self._replace(slot)
        self.timeouts += 1
        results[worker.item] = (None, True)
        return 1

    def _replace(self, slot: int) -> None:
        _stop(self._workers[slot], _EXIT_GRACE_S)
        self._workers[slot] = self._spawn()
        self.restarts += 1

    def _start_missing_workers(self) -> None:
        for slot, worker in enumerate(self._workers):
            if not worker.process.is_alive():  # died between calls: nothing was lost
                self._replace(slot)
        while len(self._workers) < self.workers:
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self.timeout_s), name="rlvr-grader", daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn, started_at=time.monotonic())


def grade_matrix(grader: Grader, samples: list[list[str]], golds: list[str]) -> np.ndarray:
    """(problems x n) float matrix of 1.0 / 0.0, NaN where the gold answer is unparseable.

    What pass@k consumes, for the evaluate stage and the held-out curve during training alike.
    """
    flat = [(s, g) for row, g in zip(samples, golds) for s in row]
    scores = grader.grade([s for s, _ in flat], [g for _, g in flat])
    values = np.array([np.nan if x is None else x for x in scores], dtype=float)
    return values.reshape(len(samples), -1)


def _needs_only_gold(answer: str | None, gold: str) -> bool:
    """No box, or the gold as written: grade_one's result follows from whether the gold parses."""
    return answer is None or same_written_form(answer, gold)


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r:.80}")


def _check_strings(name: str, values: list) -> None:
    for index, value in enumerate(values):
        _check_str(f"{name}[{index}]", value)
