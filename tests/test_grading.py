"""Answer extraction, math-verify grading and the process pool with hard timeouts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from rlvr.grading import (
    Grader,
    _number_grade,
    extract_boxed,
    gold_is_parseable,
    grade_one,
    normalize_numbers,
    same_written_form,
)

# SymPy would need about 10^10 digits to evaluate this; it must cost one timeout, not a hang.
PATHOLOGICAL = r"Let me compute. \boxed{10^{10^{10^{10}}}}"
# Plain numbers are graded in the calling process (fast paths); these pairs need math-verify, so
# they reach the worker pool.
POOL_ITEM = (r"\boxed{\sqrt{49}}", "7")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The answer is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"so $\boxed{\sqrt{\frac{a}{b^{2}}}}$ done", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),
        (r"\fbox{1} and finally \boxed{3}", "3"),
        (r"\boxed{1} and finally \fbox{7}", "7"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"\boxed {3}", "3"),
        (r"\boxed 5", "5"),
        (r"the answer is $\boxed 5$.", "5"),
        (r"\boxed 12 apples", "12"),
        (r"\boxed{}", ""),
        ("no box here, the answer is 5", None),
        (r"\boxed{\frac{1}{2}", None),  # unbalanced
        (r"\boxed{1} then a truncated \boxed{2", None),  # the last box is unbalanced
        (r"ends with \boxed", None),
        (r"\boxedx{3}", None),  # another command, not \boxed
        (r"\fbox 3", None),  # \fbox needs braces
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\dfrac{3}{7}}", r"\frac{3}{7}", 1.0),
        (r"\boxed{27}", "27.0", 1.0),  # AMC gold stored as a float
        (r"\boxed{27.0}", "27", 1.0),
        (r"\boxed{25}", "025", 1.0),  # AIME zero padding
        (r"\boxed{1450000}", "1,450,000", 1.0),  # GSM8K thousands separators
        (r"\boxed{1,450,000}", "1450000", 1.0),
        (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
        (r"\boxed{\left( \frac{\pi}{2}, 3 \right)}", r"\left( 3, \frac{\pi}{2} \right)", 0.0),
        (r"\boxed{\text{ellipse}}", r"\text{ellipse}", 1.0),
        (r"\boxed{\text{circle}}", r"\text{ellipse}", 0.0),
        (r"\boxed{336}", r"336^\circ", 1.0),
        (r"\boxed{336^\circ}", "336", 1.0),
        (r"\boxed{40\%}", "40", 1.0),
        (r"\boxed{[-2, 7]}", "[-2, 7]", 1.0),
        (r"\boxed{(-2, 7)}", "[-2, 7]", 0.0),
        (r"\boxed{28}", "27", 0.0),
        (r"\boxed 27", "27", 1.0),
        ("the answer is 27", "27", 0.0),  # no box, no credit
        (r"\boxed{27} or maybe \boxed{26}", "27", 0.0),  # the last box is the answer
        (r"\boxed{}", "27", 0.0),
        (r"\boxed{\frac{", "27", 0.0),
    ],
)
def test_grade_one(completion, gold, expected):
    assert grade_one(completion, gold) == expected


def test_grade_one_puts_gold_first():
    # math-verify is asymmetric: a gold inequality accepts an interval, a gold interval does not
    # accept an inequality. Swapping the arguments inside grade_one would flip both.
    assert grade_one(r"\boxed{(1, 2)}", "1 < x < 2") == 1.0
    assert grade_one(r"\boxed{1 < x < 2}", "(1, 2)") == 0.0


@pytest.mark.parametrize(
    "gold",
    [
        "",
        "   ",
        "\\",
        # A real gold answer from MATH train: math-verify only returns the raw-string fallback
        # "\sin^2" for it, which would match the wrong answer "\sin^2 x" by string equality.
        r"\sin^2 t",
        r"\div",
    ],
)
def test_unparseable_gold_gives_none_never_credit(gold):
    assert not gold_is_parseable(gold)
    assert grade_one(rf"\boxed{{{gold}}}", gold) is None
    assert grade_one(r"\boxed{\sin^2 x}", gold) is None
    assert grade_one("no box", gold) is None


@pytest.mark.parametrize(
    "gold",
    [
        r"\left( 3, \frac{\pi}{2} \right)",
        r"\text{ellipse}",
        r"336^\circ",
        r"\frac{3}{7}",
        "27",
        "27.0",
        "1450000",
        "1,450,000",
        "025",
        r"\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}",
        r"40\%",
        r"-\frac{5}{3}.",  # trailing full stop: only the \boxed{} wrapping parses it
    ],
)
def test_bare_gold_strings_parse_and_grade_against_themselves(gold):
    assert gold_is_parseable(gold)
    assert grade_one(rf"\boxed{{{gold}}}", gold) == 1.0


def test_grade_one_rejects_non_strings():
    with pytest.raises(TypeError, match="completion must be a str"):
        grade_one(None, "1")
    with pytest.raises(TypeError, match="gold must be a str"):
        grade_one(r"\boxed{27}", 27.0)


def test_grade_one_refuses_to_run_outside_the_main_thread():
    errors = []

    def grade_in_thread():
        try:
            grade_one(r"\boxed{1}", "1")
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=grade_in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


MIXED_COMPLETIONS = [
    r"\boxed{\frac{1}{2}}",
    r"\boxed{3}",
    "no box",
    r"\boxed{(3, \frac{\pi}{2})}",
    r"\boxed{1}",
    r"\boxed{\text{ellipse}}",
    r"\boxed{336}",
    r"\boxed{26}",
    r"\boxed{27}",
]
MIXED_GOLDS = [
    "0.5",
    "4",
    "5",
    r"\left( 3, \frac{\pi}{2} \right)",
    "",  # unparseable gold: None, not 0.0
    r"\text{ellipse}",
    r"336^\circ",
    "27.0",
    "27.0",
]


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=2, timeout_s=2.0) as pool:
        yield pool


def test_grader_matches_grade_one_in_input_order(grader):
    expected = [grade_one(c, g) for c, g in zip(MIXED_COMPLETIONS, MIXED_GOLDS)]
    assert expected == [1.0, 0.0, 0.0, 1.0, None, 1.0, 1.0, 0.0, 1.0]
    assert grader.grade(MIXED_COMPLETIONS, MIXED_GOLDS) == expected
    # Reversed input, reversed output: results follow the input, not the order workers finish in.
    assert grader.grade(MIXED_COMPLETIONS[::-1], MIXED_GOLDS[::-1]) == expected[::-1]
    assert grader.timeouts == 0 and grader.restarts == 0


def test_grader_parseable_matches_gold_is_parseable(grader):
    golds = MIXED_GOLDS + ["\\", r"\sin^2 t", "1,450,000"]
    assert grader.parseable(golds) == [gold_is_parseable(gold) for gold in golds]
    assert grader.parseable([]) == []
    assert grader.grade([], []) == []


def test_grader_grades_two_slow_items_at_once(grader):
    before = grader.timeouts
    start = time.monotonic()
    results = grader.grade([PATHOLOGICAL, PATHOLOGICAL, r"\boxed{5}"], ["5", "6", "5"])
    elapsed = time.monotonic() - start
    assert results == [0.0, 0.0, 1.0]
    assert grader.timeouts - before == 2
    # Each pathological item costs one 2 s timeout; one after the other would take 4 s or more.
    assert elapsed < 3.5


def test_pathological_prediction_costs_one_timeout_and_pool_keeps_working():
    with Grader(workers=2, timeout_s=1.0) as pool:
        start = time.monotonic()
        assert pool.grade([PATHOLOGICAL], ["5"]) == [0.0]
        assert time.monotonic() - start < 10.0  # start-up plus one timeout, not a hang
        assert pool.timeouts == 1
        assert pool.grade([r"\boxed{5}", r"\boxed{4}"], ["5", "5"]) == [1.0, 0.0]
        assert pool.timeouts == 1


def test_hard_timeout_kills_and_replaces_the_worker():
    # math-verify's alarm has whole-second resolution (at least 1 s), so with timeout_s = 0.3 the
    # parent's kill at 0.3 + 0.5 s comes first: this exercises terminate/kill and the replacement.
    with Grader(workers=1, timeout_s=0.3) as pool:
        assert pool.grade([PATHOLOGICAL, r"\boxed{5}"], ["5", "5"]) == [0.0, 1.0]
        assert pool.timeouts == 1
        assert pool.restarts == 1
        # Parsing the huge power is cheap (SymPy keeps it unevaluated); only comparing it is not.
        assert pool.parseable([r"10^{10^{10^{10}}}", "5"]) == [True, True]
        assert pool.restarts == 1


def test_worker_that_dies_is_replaced_and_its_item_scores_zero():
    with Grader(workers=1, timeout_s=5.0) as pool:
        assert pool.grade([POOL_ITEM[0]], [POOL_ITEM[1]]) == [1.0]  # start the worker
        pid = pool._workers[0].process.pid
        killer = threading.Timer(0.5, os.kill, args=(pid, signal.SIGKILL))
        killer.start()
        start = time.monotonic()
        assert pool.grade([PATHOLOGICAL, r"\boxed{2}"], ["5", "2"]) == [0.0, 1.0]
        killer.join()
        assert time.monotonic() - start < 4.0  # noticed at once, not at the 5 s deadline
        assert pool.timeouts == 1 and pool.restarts == 1

        # A worker that dies between calls is replaced before the next call; no item is lost.
        process = pool._workers[0].process
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        assert pool.grade([r"\boxed{\sqrt{9}}"], ["3"]) == [1.0]
        assert pool.timeouts == 1 and pool.restarts == 2


def test_grader_starts_lazily_and_close_stops_workers():
    children_before = set(multiprocessing.active_children())
    pool = Grader(workers=2, timeout_s=1.0)
    assert set(multiprocessing.active_children()) == children_before
    with pool:
        assert pool.grade([POOL_ITEM[0]], [POOL_ITEM[1]]) == [1.0]
        processes = [worker.process for worker in pool._workers]
        assert len(processes) == 2 and all(process.is_alive() for process in processes)
    assert not any(process.is_alive() for process in processes)
    with pytest.raises(RuntimeError, match="closed"):
        pool.grade([r"\boxed{7}"], ["7"])
    pool.close()  # idempotent


def test_grader_validates_inputs_before_starting():
    pool = Grader(workers=1)
    with pytest.raises(ValueError, match=r"3 completions and 2 golds"):
        pool.grade(["a", "b", "c"], ["1", "2"])
    with pytest.raises(TypeError, match=r"completions\[1\] must be a str"):
        pool.grade(["a", 3], ["1", "2"])
    with pytest.raises(TypeError, match=r"golds\[0\] must be a str"):
        pool.grade(["a"], [27.0])
    with pytest.raises(TypeError, match=r"golds\[2\] must be a str"):
        pool.parseable(["1", "2", None])
    assert pool._workers == []
    with pytest.raises(ValueError, match="workers"):
        Grader(workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0)


def test_grade_reuses_known_pairs_and_grades_plain_numbers_in_process():
    # a GRPO group repeats answers; each distinct (boxed answer, gold) pair is graded once
    completions = [r"so \boxed{\sqrt{2}}", r"\boxed{\sqrt{2}}", r"x=\boxed{\sqrt{2}}.", r"\boxed{2^{1/2}}",
                   r"\boxed{3}", "no box", r"\boxed{3}"]
    golds = [r"\sqrt{2}", r"\sqrt{2}", r"\sqrt{2}", r"\sqrt{2}", "3", "3", r"\div"]
    with Grader(workers=1, timeout_s=5.0) as grader:
        first = grader.grade(completions, golds)
        assert first == [grade_one(c, g) for c, g in zip(completions, golds)] == [1.0] * 5 + [0.0, None]
        # In process: (3, "3") and (no box, "3") as plain numbers, and (\sqrt{2}, \sqrt{2}) once the
        # pool's grade of (2^{1/2}, \sqrt{2}) showed that the gold parses. The pool graded the rest.
        assert grader.fast == 3
        assert set(grader._known) == {(r"2^{1/2}", r"\sqrt{2}"), ("3", r"\div")}
        assert grader.grade(completions[::-1], golds[::-1]) == first[::-1]
        assert len(grader._known) == 2


# Golds that need math-verify (two do not parse), and answers: each gold itself, other spellings,
# wrong answers and no box at all.
# (Cheap ones: SymPy's simplify on unequal expressions would make the test slow.)
MEMO_GOLDS = [r"\text{ellipse}", r"\text{circle}", "(1, 2)", "[0, 1)", r"\div", r"\sin^2 t"]
MEMO_COMPLETIONS = [rf"\boxed{{{g}}}" for g in MEMO_GOLDS] + [
    r"\boxed{\text{parabola}}", r"\boxed{(2, 1)}", r"\boxed{[0, 1]}", r"\boxed{(1,2)}", "no box",
]


def test_memo_limit_never_changes_a_grade():
    # Before: once the memo was full every new pair graded 0.0 (and an unparseable gold 0.0, not None).
    pairs = [(c, g) for g in MEMO_GOLDS for c in MEMO_COMPLETIONS]
    expected = [grade_one(c, g) for c, g in pairs]
    assert expected.count(None) == 2 * len(MEMO_COMPLETIONS) and expected.count(1.0) == 5
    # grade_one is what a grader with an unlimited memo returns (test_grader_matches_grade_one...).
    order = list(range(len(pairs)))
    with Grader(workers=2, timeout_s=5.0, memo_size=2) as grader:
        for round_ in range(2):  # two passes, each in several calls, in a different order
            order = order[7:] + order[:7] if round_ else order
            got = {}
            for start in range(0, len(order), 16):
                chunk = order[start:start + 16]
                got.update(zip(chunk, grader.grade([pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk])))
            assert [got[i] for i in range(len(pairs))] == expected, round_
        assert len(grader._known) == 2 and len(grader._parseable_golds) == 2
        assert grader.timeouts == 0


def test_memo_size_is_checked_and_zero_turns_the_memo_off():
    with Grader(workers=1, memo_size=0) as grader:
        completions = [r"\boxed{2^{1/2}}", r"\boxed{\sqrt{2}}", "no box", r"\boxed{\div}"]
        golds = [r"\sqrt{2}", r"\sqrt{2}", r"\sqrt{2}", r"\div"]
        assert grader.grade(completions, golds) == [1.0, 1.0, 0.0, None]
        assert grader._known == {} and grader._parseable_golds == {}
    with pytest.raises(ValueError, match="memo_size"):
        Grader(memo_size=-1)
    with pytest.raises(ValueError, match="memo_size"):
        Grader(memo_size=2.5)


# --------------------------------------------------------------------------------------------
# Numbers: e-notation, powers of ten, tiny decimals, percent

# Spellings of one number, and spellings of the number 10x off (larger or smaller).
SAME_NUMBER = [
    (["4.5e33", "4.5E33", "4.5E+33", "45e32", r"4.5 \times 10^{33}", r"4.5\cdot10^{33}",
      "4500000000000000000000000000000000"],
     ["4.5e34", r"4.5 \times 10^{34}", "45000000000000000000000000000000000"]),
    (["6.0E-3", "6e-3", "0.6e-2", r"6 \times 10^{-3}", r"6.0\cdot 10^{-3}", "0.006", r"\frac{3}{500}"],
     ["6.0E-4", r"6 \times 10^{-4}", "0.0006"]),
    (["-2e5", r"-2 \times 10^{5}", r"-2\cdot10^5", "-200000", "-200,000"],
     ["-2e6", "-2000000", "-2e4"]),
    ([r"3 \times 10^{8}", r"3\cdot10^{8}", r"3\cdot10^8", "3e8", "3.0E+8", "300000000", "300,000,000"],
     ["3e9", r"3 \times 10^{7}", "30000000"]),
    # Below 10^-6 math-verify's 6-place rounding alone would call all of these equal (and equal to 0).
    (["1.6e-19", r"1.6 \times 10^{-19}", "0.00000000000000000016", r"16 \times 10^{-20}"],
     ["1.6e-18", r"1.6 \times 10^{-20}", "0.0000000000000000016", "0"]),
    (["6.63e-34", r"6.630 \times 10^{-34}"], ["6.63e-33", "6.63e-35"]),
]


@pytest.mark.parametrize(("same", "off"), SAME_NUMBER, ids=[row[0][0] for row in SAME_NUMBER])
def test_every_spelling_of_a_number_grades_alike_on_both_sides(same, off):
    for answer in same:
        for gold in same:
            assert grade_one(rf"\boxed{{{answer}}}", gold) == 1.0, (answer, gold)
        for wrong in off:
            assert grade_one(rf"\boxed{{{answer}}}", wrong) == 0.0, (answer, wrong)
            assert grade_one(rf"\boxed{{{wrong}}}", answer) == 0.0, (wrong, answer)


@pytest.mark.parametrize(
    "text",
    [
        "e^{x}", "2e", "2e^{3}", "3e - 5", "x2e3", "2e3x", "e5",
        r"\text{0x1e5}", r"\text{1e5}", r"\mathrm{deadbeef1e5}", r"\operatorname{f1e2}(x)",
        "1,500e3",  # a thousands comma: not a mantissa
        r"2^3 \times 10^{2}", r"6 \div 3 \times 10^{2}", r"1/3 \times 10^{2}",  # 3 is not the factor
        r"3\cdot10^83", r"3 \times 10^{8}!", r"x^{3 \times 10}",
        r"x\%", "0.0000000", "0.000001", "0.5",
    ],
)
def test_normalize_numbers_leaves_what_is_not_a_number(text):
    assert normalize_numbers(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4.5e33", "4500000000000000000000000000000000"),
        ("6.0E-3", r"\frac{60}{10000}"),
        ("-2e5", "-200000"),
        (r"3\cdot10^8 \text{ m/s}", r"300000000 \text{ m/s}"),
        (r"(1, 2e3)", "(1, 2000)"),
        (r"\text{1e5} + 1e5", r"\text{1e5} + 100000"),
        ("0.00000016", r"\frac{16}{100000000}"),
        ("1e400", r"1 \times 10^{400}"),  # beyond 10^300 the exact value stays a product
        (r"50\%", "50"), ("50 %", "50"), ("50 percent", "50"), (r"50\text{ pct}", "50"),
    ],
)
def test_normalize_numbers_writes_exact_values(text, expected):
    assert normalize_numbers(text) == expected


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        # e stays Euler's number unless an exponent follows it at once; `3e-5` is e-notation.
        (r"3e - 5", r"-5 + 3e", 1.0),
        (r"3e-5", r"-5 + 3e", 0.0),
        (r"3e-5", "0.00003", 1.0),
        (r"2e", r"2 \cdot e", 1.0),
        (r"2e", "2", 0.0),
        (r"2e^{3}", r"2 e^{3}", 1.0),
        (r"2e^{3}", "2000", 0.0),
        (r"\text{1e5}", "100000", 0.0),
        (r"(1, 2e3)", "(1, 2000)", 1.0),  # math-verify alone: 0.0
        (r"1e400", r"10^{400}", 1.0),
        (r"1e400", r"10^{401}", 0.0),
    ],
)
def test_e_notation_and_eulers_number(answer, gold, expected):
    assert grade_one(rf"\boxed{{{answer}}}", gold) == expected


# Percent: the sign is a unit and is dropped on both sides, so 50% grades like 50 and never like 0.5
# (math-verify alone reads `50%` as both 50 and 0.5, and `50\%` as 50 only).
PERCENT_CASES = [
    (r"50\%", "50", 1.0), ("50", r"50\%", 1.0), ("50%", "50", 1.0), ("50", "50%", 1.0),
    ("50 percent", "50", 1.0), (r"50\text{ percent}", "50", 1.0), (r"12.5\%", "12.5", 1.0),
    (r"\frac{1}{2}\%", "0.5", 1.0),
    (r"50\%", "0.5", 0.0), ("0.5", r"50\%", 0.0), ("50%", "0.5", 0.0), ("0.5", "50%", 0.0),
    ("50 percent", "0.5", 0.0), (r"0.5\%", "0.005", 0.0),
]


@pytest.mark.parametrize(("answer", "gold", "expected"), PERCENT_CASES)
def test_percent_sign_is_a_unit(answer, gold, expected):
    assert grade_one(rf"\boxed{{{answer}}}", gold) == expected


# --------------------------------------------------------------------------------------------
# Fast paths: each decision must equal grade_one's (the reference: math-verify on the pool)

# (answer, gold, what _number_grade decides: a grade, or None where math-verify must decide)
FAST_CASES = [
    ("1,000", "1000", 1.0), ("1000", "1,000", 1.0), ("1,000,000", "1000000", 1.0), ("1,000.5", "1000.5", 1.0),
    ("1,00", "100", None),  # math-verify reads the set {1, 0}: not a plain number
    ("1,0000", "10000", None), ("0,5", "0.5", None), (r"1{,}000", "1000", None),
    ("025", "25", 1.0), ("007.50", "7.5", 1.0),  # leading zeros (AIME pads to 3 digits)
    ("-0", "0", 1.0), ("-0.0", "0", 1.0), ("00", "0", 1.0),
    (".5", "0.5", 1.0), ("-.5", r"-\frac{1}{2}", 1.0), ("5.", "5", 1.0), ("27.0", "27", 1.0), ("2.50", "2.5", 1.0),
    ("1/2", r"\frac12", 1.0), (r"\dfrac{1}{2}", "0.5", 1.0), (r"\tfrac{3}{4}", "0.75", 1.0),
    (r"\frac{-1}{2}", "-0.5", 1.0), (r"-\frac{1}{2}", "-1/2", 1.0), (r"\frac{4}{2}", "2", 1.0),
    (r"\frac{1}{3}", r"\frac{2}{6}", 1.0),
    ("2", "3", 0.0), ("10", "1", 0.0), ("-5", "5", 0.0), (r"\frac{1}{3}", "0.33", 0.0), ("0.1", "0.01", 0.0),
    (r"\frac{1}{3}", "0.333333", None),  # equal after math-verify's 6-place rounding: its call
    ("0.500001", r"\frac12", None), ("0.500003", r"\frac12", 0.0),
    ("1.0000001", "1", None),  # more than 6 places
    ("123456789.5", "123456789.5", None),  # more than 8 integer digits in a decimal
    ("123456789012345678901234567890", "123456789012345678901234567891", 0.0),  # integers: exact
    (r"50\%", "50", 1.0), ("50%", "0.5", 0.0), (r"12.5\%", "12.5", 1.0),
    ("4.5e33", r"4.5 \times 10^{33}", 1.0), ("4.5e33", "4500000000000000000000000000000000", 1.0),
    ("4.5e34", "4.5e33", 0.0), ("6.0E-3", "0.006", 1.0), ("6.0E-3", "0.0006", 0.0),
    ("1.6e-19", "0.00000000000000000016", 1.0), ("1.6e-18", "0.00000000000000000016", 0.0),
    (r"\frac{1}{0}", r"\frac{1}{0}", None), (r"\frac{08}{15}", r"\frac{8}{15}", None),
    ("+5", "5", None), (r"-\frac{-1}{2}", "0.5", None), ("- 5", "-5", None),
    ("x", "5", None), (r"\sqrt{4}", "2", None), ("1e400", "1e400", None), ("", "5", None),
]


@pytest.mark.parametrize(("answer", "gold", "expected"), FAST_CASES)
def test_number_fast_path_agrees_with_grade_one(answer, gold, expected):
    assert _number_grade(answer, gold) == expected
    if expected is not None:
        assert grade_one(rf"\boxed{{{answer}}}", gold) == expected
        assert _number_grade(gold, answer) == expected == grade_one(rf"\boxed{{{gold}}}", answer)
        # a plain number always parses as a gold, so "no box" is 0.0 and never None
        assert gold_is_parseable(gold) and gold_is_parseable(answer)


def _random_spellings(value, rng):
    """Plain spellings of an exact value (integers, thousands, leading zeros, decimals, fractions)."""
    from fractions import Fraction

    value = Fraction(value)
    sign = "-" if value < 0 else ""
    size = abs(value)
    spellings = [rf"{sign}\frac{{{size.numerator}}}{{{size.denominator}}}", f"{sign}{size.numerator}/{size.denominator}"]
    if size.denominator == 1:
        spellings += [f"{sign}{size.numerator}", f"{sign}0{size.numerator}", f"{sign}{size.numerator:,}",
                      f"{sign}{size.numerator}.0", f"{sign}{size.numerator}."]
    for places in range(1, 7):
        if (size * 10**places).denominator == 1:
            scaled = int(size * 10**places)
            decimal = f"{scaled // 10**places}.{scaled % 10**places:0{places}d}"
            spellings += [sign + decimal, sign + decimal + "0", sign + decimal.removeprefix("0")]
            break
    spellings.append(f"{sign}{scaled // 10**6}.{scaled % 10**6:06d}" if (scaled := round(size * 10**6)) else "0.000000")
    return [s for s in spellings if rng.random() < 0.7] or spellings[:1]


@pytest.mark.slow
def test_number_fast_path_agrees_with_grade_one_on_random_numbers():
    import random
    from fractions import Fraction

    rng = random.Random(1)
    decided = checked = 0
    for _ in range(400):
        value = Fraction(rng.randrange(-10 ** rng.randrange(1, 9), 10 ** rng.randrange(1, 9)),
                         rng.choice([1, 1, 2, 3, 4, 7, 8, 10, 25, 1000, 10**6]))
        # equal, within math-verify's rounding, just outside it, off by one, 10x
        other = value + rng.choice([0, 0, Fraction(1, 10**6), Fraction(3, 10**6), 1, 9 * value])
        answer, gold = rng.choice(_random_spellings(value, rng)), rng.choice(_random_spellings(other, rng))
        fast = _number_grade(answer, gold)
        checked += 1
        if fast is not None:
            decided += 1
            assert fast == grade_one(rf"\boxed{{{answer}}}", gold), (answer, gold)
    assert decided > checked * 0.7


def test_plain_numbers_never_reach_the_pool():
    decided = [(a, g) for a, g, expected in FAST_CASES if expected is not None]
    completions = [rf"The answer is \boxed{{{a}}}." for a, _ in decided] + ["no box", r"\boxed{5}"]
    golds = [g for _, g in decided] + ["1,000", "5"]
    pool = Grader(workers=1)
    assert pool.grade(completions, golds) == [grade_one(c, g) for c, g in zip(completions, golds)]
    assert pool.parseable(["5", "1,000", r"\frac12", "-0", "4.5e33", r"50\%"]) == [True] * 6
    assert pool._workers == [] and pool.fast == len(set(zip(completions, golds)))
    pool.close()


@pytest.mark.parametrize("gold", [r"\frac{1}{0}", r"\left( 3, \frac{\pi}{2} \right)", r"\text{Evelyn}", "x=5"])
def test_a_copy_of_a_parseable_gold_is_correct(gold):
    assert grade_one(rf"\boxed{{{gold}}}", gold) == 1.0
    assert grade_one(rf"\boxed{{ {gold} }}", gold) == 1.0


# Pairs that TeX draws alike: the same answer, whatever SymPy makes of them.
SAME_WRITTEN = [
    (r"\dfrac{\pi}{2}", r"\frac{\pi}{2}"), (r"\tfrac12", r"\frac12"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), (r"\left\{1, 2\right\}", r"\{1,2\}"),
    ("p - q", "p-q"), ("x ^ {2} + 1", "x^{2}+1"), (r"\sqrt{x} \cdot 2", r"\sqrt{x}\cdot2"),
    (r"\text{ellipse} ", r"\text{ellipse}"),
]
# Pairs that differ: a space between letters ends a command or separates symbols, a control space
# is a space, and text keeps its spaces.
NOT_SAME_WRITTEN = [
    (r"\sin x", r"\sinx"), (r"\pi x", r"\pix"), ("a b", "ab"), (r"a\ b", "ab"),
    (r"\text{a b}", r"\text{ab}"), (r"\left. x \right|", "x|"), (r"\dfracx", r"\fracx"),
]


@pytest.mark.parametrize(("answer", "gold"), SAME_WRITTEN)
def test_answers_written_the_same_way_are_equal(answer, gold):
    assert same_written_form(answer, gold) and same_written_form(gold, answer)
    assert grade_one(rf"\boxed{{{answer}}}", gold) == 1.0 == grade_one(rf"\boxed{{{gold}}}", answer)


@pytest.mark.parametrize(("answer", "gold"), NOT_SAME_WRITTEN)
def test_what_tex_draws_differently_is_not_the_same_written_form(answer, gold):
    assert not same_written_form(answer, gold)


def test_the_written_form_of_an_unparseable_gold_grades_none():
    assert grade_one(r"\boxed{\sin^2  t}", r"\sin^2 t") is None


def test_huge_or_foreign_numbers_are_left_to_math_verify_without_errors():
    # int() refuses more than 4,300 digits, and \d also matches other scripts' digits ("٣" is 3 to
    # Python, not to math-verify): neither may reach the fast paths or crash normalize_numbers.
    huge = "9" * 5000
    for text in (f"1e{huge}", f"{huge}e5", f"0.{'0' * 5000}1", huge):
        assert normalize_numbers(text) == text
        assert _number_grade(text, "5") is None
    assert _number_grade("٣", "3") is None
    assert grade_one(rf"\boxed{{{huge}}}", "5") == 0.0
    assert normalize_numbers("1e999999") == r"1 \times 10^{999999}"  # exact, not written out


def test_start_readies_every_worker_before_the_first_call():
    with Grader(workers=2, timeout_s=5.0) as pool:
        pool.start()
        assert len(pool._workers) == 2 and all(worker.ready for worker in pool._workers)
        assert pool.grade([POOL_ITEM[0]], [POOL_ITEM[1]]) == [1.0] and pool.restarts == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.start()
