"""Answer extraction and math-verify grading: the one grader for the GRPO reward and for evaluation.

A completion is graded by taking the content of its last `\\boxed{...}` (`extract_boxed`) and asking
math-verify whether it is equivalent to the gold answer, `verify(gold, pred)` with the gold first
(math-verify is asymmetric: gold `1 < x < 2` accepts the prediction `(1, 2)`, not the other way round).

Both strings go through `_parse_answer`: strip, wrap as `$...$` and parse; if that gives no SymPy
object, wrap as `\\boxed{...}` and parse again. Bare strings are not parsed as they are, because
math-verify then looks for a plain expression and reads `\\left( 3, \\frac{\\pi}{2} \\right)` as `3`
and `[-2, 7]` as `7`. `$...$` is tried first because `\\boxed{40\\%}` parses to no number at all;
`\\boxed{...}` is the second try because it rescues golds with a trailing full stop
(`-\\frac{5}{3}.`). Of the 10,600 gold answers in data/sources (MATH train, DeepScaleR, MATH500,
GSM8K, AIME, AMC) the chain leaves 10 unparseable (e.g. `\\sin^2 t`, `\\div`, empty strings);
`$...$` alone leaves 12, `\\boxed{...}` alone 58 and the bare string 887.

A gold answer is parseable when math-verify turns it into at least one SymPy object. A parse that
only yields math-verify's raw-string fallback does not count: for `\\sin^2 t` that fallback is the
truncated text `\\sin^2`, which string comparison would match against the wrong answer `\\sin^2 x`.
An unparseable gold grades as None (to be excluded and counted by the caller), never as 1.0.

Timeouts. math-verify bounds each parse and each comparison with `signal.alarm`, which only works in
the main thread and only takes effect when the interpreter next checks for signals, so C code that
does not check (an extension module, a stuck library call) runs past it, and nothing in-process
survives a crash. `Grader` therefore grades in worker processes (spawn context) that run
`grade_one` in their main thread, and the parent kills a worker whose item runs past `timeout_s`
plus a margin. Either way the item scores 0.0 (a prediction that cannot be verified in time is not
correct) and `Grader.timeouts` counts it. With CPython 3.11 the alarm itself stops
`\\boxed{10^{10^{10^{10}}}}` (CPython's big-int power and multiplication check for signals as they
go), so that input costs one math-verify timeout and no kill unless timeout_s is under a second.

What is covered: `\\boxed{...}` with nested and escaped braces, `\\boxed 5`, `\\fbox{...}`;
everything math-verify's LaTeX and expression parsers accept (fractions, decimals, thousands
separators, tuples, intervals, sets, matrices, `\\text{...}`, degrees, percentages, units).
What is not: answers outside a box (a completion without one scores 0.0), multiple-choice letters
matched against option text, source quirks such as GSM8K's `#### N` or AIME's zero padding (those
belong to the data loaders; math-verify happens to read `025` as 25), and memory limits: a
prediction that exhausts the worker's memory is caught only when the worker dies.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import multiprocessing.connection
import re
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

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
# Distinct (answer, gold) grades remembered per Grader: ~100 bytes each, so about 20 MB at most.
_KNOWN_LIMIT = 200_000
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


def _parse_answer(answer: str, timeout_s: float) -> tuple[list, bool]:
    """math-verify parse of a bare answer string -> (parsed, timed_out).

    Tries `$answer$`, then `\\boxed{answer}` (see the module docstring for why). If neither yields a
    SymPy object, returns the first non-empty raw-string fallback, so that a prediction can still
    match a gold string exactly; callers decide whether string-only results count.
    """
    answer = answer.strip()
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

    Workers start on the first call and are reused by later calls (GRPO grades every step). Items
    are handed to whichever worker is free, so `workers` items are graded at once; results come back
    in input order. An item that runs past timeout_s (+0.5 s) has its worker killed and replaced and
    scores 0.0 (grade) or False (parseable); so does an item whose worker dies. `timeouts` counts
    items that ran out of time, whether math-verify's alarm stopped them inside the worker or the
    worker had to be killed; `restarts` counts workers replaced after a kill or a crash.
    Not thread-safe: call it from one thread. Workers are spawned, so they re-import the calling
    script: scripts need the usual `if __name__ == "__main__":` guard.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Grader workers must be an int >= 1, got {workers!r}")
        if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            raise ValueError(f"Grader timeout_s must be a finite number > 0, got {timeout_s!r}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.timeouts = 0
        self.restarts = 0
        # spawn, not fork: the parent may hold torch/tokenizer threads and locks that fork would copy.
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._startup_failures = 0
        self._closed = False
        # Grades of (answer, gold) pairs already seen; items that ran out of time are not kept.
        self._known: dict[tuple[str | None, str], float | None] = {}

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
        # answer, and golds repeat across a group. Each distinct pair not already known goes to the
        # pool once, as the canonical completion "\\boxed{answer}" (or "" when there is no box).
        keys = [(extract_boxed(c), g) for c, g in zip(completions, golds)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._known))
        items = [("" if answer is None else f"\\boxed{{{answer}}}", gold) for answer, gold in todo]
        fresh = dict(zip(todo, self._run("grade", items)))
        for key, (value, killed) in fresh.items():
            if not killed and len(self._known) < _KNOWN_LIMIT:
                self._known[key] = value
        return [self._known[k] if k in self._known else 0.0 for k in keys]

    def parseable(self, golds: list[str]) -> list[bool]:
        """gold_is_parseable over golds; False for items that time out or crash their worker."""
        _check_strings("golds", golds)
        results = self._run("parseable", [(gold,) for gold in golds])
        return [False if timed_out_hard else value for value, timed_out_hard in results]

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
                        index = pending.popleft()
                        try:
                            worker.conn.send((task, items[index]))
                        except OSError:  # died while idle: the item never ran, so it goes back
                            pending.appendleft(index)
                            self._replace(slot)
                            continue
                        worker.item = index
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


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {value!r:.80}")


def _check_strings(name: str, values: list) -> None:
    for index, value in enumerate(values):
        _check_str(f"{name}[{index}]", value)
