"""Answer extraction, math-verify grading and the process pool with hard timeouts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from rlvr.grading import Grader, extract_boxed, gold_is_parseable, grade_one

# SymPy would need about 10^10 digits to evaluate this; it must cost one timeout, not a hang.
PATHOLOGICAL = r"Let me compute. \boxed{10^{10^{10^{10}}}}"


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
        assert pool.grade([r"\boxed{1}"], ["1"]) == [1.0]  # start the worker
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
        assert pool.grade([r"\boxed{3}"], ["3"]) == [1.0]
        assert pool.timeouts == 1 and pool.restarts == 2


def test_grader_starts_lazily_and_close_stops_workers():
    children_before = set(multiprocessing.active_children())
    pool = Grader(workers=2, timeout_s=1.0)
    assert set(multiprocessing.active_children()) == children_before
    with pool:
        assert pool.grade([r"\boxed{7}"], ["7"]) == [1.0]
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


def test_grade_reuses_known_answer_gold_pairs():
    # a GRPO group repeats answers; each distinct (boxed answer, gold) pair is graded once
    completions = ["so \\boxed{3}", "\\boxed{3}", "x=\\boxed{3}.", "\\boxed{4}", "no box", "\\boxed{3}"]
    golds = ["3", "3", "3", "3", "3", "\\div"]
    with Grader(workers=1, timeout_s=5.0) as grader:
        first = grader.grade(completions, golds)
        assert first == [grade_one(c, g) for c, g in zip(completions, golds)] == [1.0, 1.0, 1.0, 0.0, 0.0, None]
        assert len(grader._known) == 4  # (3, "3"), (4, "3"), (None, "3"), (3, "\\div")
        assert grader.grade(completions[::-1], golds[::-1]) == first[::-1]
        assert len(grader._known) == 4
