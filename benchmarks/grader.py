"""The Grader against plain math-verify, item by item: throughput, and grades identical to grade_one.

Items. Every gold answer of the benchmark copies in data/sources (MATH500, GSM8K, AIME 2024 and
2025, AMC 2023), loaded with the pipeline's presets so that golds look as `prepare` leaves them
(GSM8K without `#### ` and thousands commas, AIME without zero padding, AMC's `27.0` as `27`). Each
gold is graded against six completions, all "Working through it step by step, the final answer
is ...":
  - the gold itself, boxed;
  - two re-spellings, boxed. Numbers: thousands commas or `.0`, e-notation or `\\times 10^{k}` for
    round numbers, a decimal for a fraction and a fraction for a decimal, `\\dfrac`, `a/b`.
    Other answers: `\\dfrac` for `\\frac`, spaces removed, the two terms of `a + b` swapped;
  - two wrong values, boxed: off by one and 10x for numbers, a changed digit (or `+ 1`) otherwise;
  - the gold in plain text, without a box (grade_one gives 0.0: no box, no credit).

Methods, all on the same items and on this machine:
  - plain:     math-verify one item at a time in one process (a second one, so that the reference
               pass below warms nothing for it), `verify(parse("$gold$"), parse(completion))`;
  - grader:    `rlvr.grading.Grader` with --workers processes, in calls of --batch items in input
               order (a gold's items together, as in a GRPO group), memo off so that every run
               grades every item;
  - reference: `grade_one` per item in this process (the Grader's slow path: math-verify after
               number normalisation, no fast paths), once.
Each run starts a new plain process and a new Grader, and both first grade a warm-up set untimed
(--warmup MATH train golds, items built the same way: the same kinds of answers, none of the same
items): a new process pays for SymPy's lazy imports and first use of each kind of expression, which
a long GRPO run pays once, and the Grader pays it in every worker. Then both make one pass over the
items, --chunk items at a time, taking turns at going first, so that a change in the load of this
shared machine falls on both alike; the ratio is plain seconds / grader seconds within a run, and
the summary gives medians over --repeats runs with the load average before and after.
Every Grader grade must equal the reference (the script exits 1 otherwise); items where plain
math-verify differs from the reference are counted by reason.

Run: python benchmarks/grader.py [--repeats 5] [--batch 64] [--chunk 1024] [--workers 2] [--limit N]
                                 [--warmup 400] [--timeout 5] [--out benchmarks/results/grader.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from fractions import Fraction
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from math_verify import parse, verify  # noqa: E402

from rlvr import data  # noqa: E402
from rlvr.grading import Grader, _plain_number, extract_boxed, grade_one, normalize_numbers  # noqa: E402
from rlvr.io import write_json  # noqa: E402

SOURCES = {
    "math500": ("data/sources/benchmarks/math500/test.jsonl", "math500"),
    "gsm8k": ("data/sources/benchmarks/gsm8k/test.jsonl", "gsm8k"),
    "aime24": ("data/sources/benchmarks/aime24/test.jsonl", "aime"),
    "aime25": ("data/sources/benchmarks/aime25/test.jsonl", "aime"),
    "amc23": ("data/sources/benchmarks/amc23/test.jsonl", "amc"),
}
PREFIX = "Working through it step by step, the final answer is "
# Warm-up items (see the module docstring): MATH train golds, the same kinds of answers as the
# benchmarks and none of the same items.
WARM_UP_SOURCE = ("data/sources/train/math/math.json", "math")


# --------------------------------------------------------------------------------------------
# Items


def latex_number(value: Fraction) -> str:
    sign = "-" if value < 0 else ""
    size = abs(value)
    return f"{sign}{size.numerator}" if size.denominator == 1 else rf"{sign}\frac{{{size.numerator}}}{{{size.denominator}}}"


def decimal_number(value: Fraction) -> str | None:
    """value as a decimal with at most 6 places, or None if it has no such expansion."""
    for places in range(1, 7):
        scaled = abs(value) * 10**places
        if scaled.denominator == 1:
            whole, part = divmod(int(scaled), 10**places)
            return f"{'-' if value < 0 else ''}{whole}.{part:0{places}d}".rstrip("0")
    return None


def scientific(value: int) -> tuple[str, str] | None:
    """A round integer (>= 1000, two or more trailing zeros) in e-notation and as `m \\times 10^{k}`."""
    digits = str(abs(value))
    if abs(value) < 1000 or not digits.endswith("00"):
        return None
    significant = digits.rstrip("0")
    mantissa = significant[0] + ("." + significant[1:] if len(significant) > 1 else "")
    exponent = len(digits) - 1
    sign = "-" if value < 0 else ""
    return f"{sign}{mantissa}e{exponent}", rf"{sign}{mantissa} \times 10^{{{exponent}}}"


def number_variants(gold: str, value: Fraction) -> tuple[list[str], list[str]]:
    """(two equivalent spellings, two wrong values) of a gold that is a plain number."""
    if value.denominator == 1:
        n = int(value)
        same = [f"{n:,}" if abs(n) >= 1000 else f"{n}.0"]
        forms = scientific(n)
        same.append(forms[n % 2] if forms else (f"{n}.00" if abs(n) >= 1000 else rf"\frac{{{2 * n}}}{{2}}"))
    else:
        as_decimal = decimal_number(value)
        fraction = latex_number(value)
        slash = f"{value.numerator}/{value.denominator}"
        dfrac = fraction.replace(r"\frac", r"\dfrac")
        same = [choice for choice in (as_decimal, fraction, dfrac, slash) if choice and choice != gold][:2]
    wrong = [latex_number(value + 1), latex_number(value * 10) if value else "10"]
    return same, wrong




def swap_sum(gold: str) -> str | None:
    """`a + b` -> `b + a` when the gold is exactly two terms joined by a top-level `+` (else None)."""
    depth = 0
    splits = []
    for index, char in enumerate(gold):
        depth += char in "{([" and not gold[index - 1 : index] == "\\"
        depth -= char in "})]" and not gold[index - 1 : index] == "\\"
        if char == "+" and depth == 0:
            splits.append(index)
    if len(splits) != 1:
        return None
    left, right = gold[: splits[0]].strip(), gold[splits[0] + 1 :].strip()
    unsafe = ("-", "=", ",", "<", ">", "\\pm", "\\cup", "\\cap", "\\le", "\\ge", "\\ne", "\\in")
    if not left or not right or any(token in left or token in right for token in unsafe):
        return None
    return f"{right} + {left}"


def latex_variants(gold: str) -> tuple[list[str], list[str]]:
    """(up to two equivalent spellings, two wrong answers) of a gold that is not a plain number."""
    candidates = [
        gold.replace(r"\frac", r"\dfrac") if r"\frac" in gold else None,
        swap_sum(gold),
        gold.replace(" ", "") if " " in gold and r"\text" not in gold else None,
        gold.replace(r"\left", "").replace(r"\right", "") if r"\left" in gold else None,
    ]
    same = list(dict.fromkeys(c for c in candidates if c and c != gold))[:2]
    digits = [m for m in re.finditer(r"\d", gold)]
    if digits:
        last = digits[-1]
        changed = gold[: last.start()] + str((int(last.group()) + 1) % 10) + gold[last.end() :]
    else:
        changed = f"{gold} + 1"
    return same, [changed, f"2 \\cdot ({gold})"]


def items_for(gold: str) -> list[str]:
    """The six completions graded against one gold."""
    number = _plain_number(gold)
    same, wrong = number_variants(gold, number[0]) if number is not None else latex_variants(gold)
    boxed = [gold] + same + wrong
    return [f"{PREFIX}\\boxed{{{answer}}}." for answer in boxed] + [f"{PREFIX}{gold}."]


def build_items(sources: dict[str, tuple[str, str]], limit: int | None) -> tuple[list[str], list[str], dict[str, int]]:
    completions, golds, counts = [], [], {}
    for name, (path, preset) in sources.items():
        frame = data.load_file(ROOT / path, name, preset, limit=limit)
        counts[name] = len(frame)
        for gold in frame["answer"].tolist():
            for completion in items_for(gold):
                completions.append(completion)
                golds.append(gold)
    return completions, golds, counts


# --------------------------------------------------------------------------------------------
# Methods


def plain_math_verify(completions: list[str], golds: list[str]) -> tuple[list[float], float]:
    """Plain math-verify over items, one at a time (run in the plain process): grades and seconds."""
    start = time.perf_counter()
    grades = [float(verify(parse(f"${gold}$"), parse(completion))) for completion, gold in zip(completions, golds)]
    return grades, time.perf_counter() - start


def with_grader(grader: Grader, completions: list[str], golds: list[str], batch: int) -> tuple[list, float]:
    """The Grader over items in calls of `batch`: grades and seconds."""
    start = time.perf_counter()
    grades = []
    for first in range(0, len(completions), batch):
        grades += grader.grade(completions[first : first + batch], golds[first : first + batch])
    return grades, time.perf_counter() - start


def spin(iterations: int) -> float:
    """Seconds of a pure-Python loop: the unit of the parallelism probe."""
    start = time.perf_counter()
    total = 0
    for value in range(iterations):
        total += value
    return time.perf_counter() - start


def parallel_speedup(pool: concurrent.futures.ProcessPoolExecutor, iterations: int = 10_000_000) -> float:
    """How many cores two processes really get on this shared machine: 2.0 when both run at full
    speed side by side, about 1.0 when other work leaves room for one (the Grader's workers then
    cannot grade in parallel, and plain math-verify, one process, loses nothing)."""
    list(pool.map(time.sleep, [0.5, 0.5]))  # start both processes before the clock
    alone = spin(iterations)
    start = time.perf_counter()
    list(pool.map(spin, [iterations, iterations]))
    return round(2 * alone / (time.perf_counter() - start), 2)


def timed_run(plain_process, grader: Grader, completions: list[str], golds: list[str], args) -> dict:
    """One pass of both methods over the items, chunk by chunk, taking turns at going first so that
    a change in the machine's load falls on both alike."""
    plain, grades = [], []
    plain_s = grader_s = 0.0
    fast, timeouts = grader.fast, grader.timeouts
    load = os.getloadavg()[0]
    for index, first in enumerate(range(0, len(completions), args.chunk)):
        chunk = (completions[first : first + args.chunk], golds[first : first + args.chunk])
        for method in ("plain", "grader") if index % 2 == 0 else ("grader", "plain"):
            if method == "plain":
                chunk_grades, seconds = plain_process.submit(plain_math_verify, *chunk).result()
                plain += chunk_grades
                plain_s += seconds
            else:
                chunk_grades, seconds = with_grader(grader, *chunk, args.batch)
                grades += chunk_grades
                grader_s += seconds
    return {
        "plain": plain,
        "grader": grades,
        "stats": {
            "plain_items_per_s": round(len(completions) / plain_s, 1),
            "grader_items_per_s": round(len(completions) / grader_s, 1),
            "ratio": round(plain_s / grader_s, 2),
            "grader_timeouts": grader.timeouts - timeouts,
            "pairs_in_process": grader.fast - fast,
            "load_average_before": round(load, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        },
    }


def difference_reason(completion: str, gold: str, reference: float | None) -> str:
    """Why plain math-verify's grade differs from the reference on one item."""
    answer = extract_boxed(completion)
    if reference is None:
        return "gold does not parse: reference None, plain 0.0"
    if answer is None:
        return "no box: plain math-verify reads the answer from the text"
    if "%" in answer + gold or "percent" in answer + gold:
        return "percent sign"
    if normalize_numbers(answer) != answer or normalize_numbers(gold) != gold:
        return "e-notation, a power of ten or a decimal below 1e-6"
    if answer.strip() == gold.strip():
        return "the gold itself: plain math-verify does not match it with itself"
    return "other"


def summarize_differences(completions, golds, reference, plain) -> dict:
    reasons: Counter = Counter()
    examples: dict[str, list] = {}
    for completion, gold, want, got in zip(completions, golds, reference, plain):
        if (0.0 if want is None else want) == got and want is not None:
            continue
        reason = difference_reason(completion, gold, want)
        reasons[reason] += 1
        if len(examples.setdefault(reason, [])) < 3:
            examples[reason].append({"answer": extract_boxed(completion) or completion, "gold": gold,
                                     "reference": want, "plain": got})
    return {"count": sum(reasons.values()), "by_reason": dict(reasons.most_common()), "examples": examples}


def versions() -> dict:
    return {name: metadata.version(name) for name in ("math-verify", "latex2sympy2_extended", "sympy")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="items per Grader.grade call")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=int, help="golds per source (default: all)")
    parser.add_argument("--chunk", type=int, default=1024, help="items per turn of each method")
    parser.add_argument("--warmup", type=int, default=400, help="MATH train golds in the warm-up set")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="per-item limit of the Grader and of the reference (grade_one's default); an item "
                             "that runs out of time on one side only differs, so a loaded machine needs more")
    parser.add_argument("--out", default="benchmarks/results/grader.json")
    args = parser.parse_args(argv)

    completions, golds, counts = build_items(SOURCES, args.limit)
    warm_up = build_items({"math_train": WARM_UP_SOURCE}, args.warmup)[:2]
    print(f"{len(completions)} items from {sum(counts.values())} golds {counts}; "
          f"{len(warm_up[0])} warm-up items", flush=True)
    started = time.perf_counter()
    reference = [grade_one(c, g, args.timeout) for c, g in zip(completions, golds)]
    reference_s = time.perf_counter() - started

    runs = []
    plain = None
    grader_differs = 0
    examples: list[dict] = []
    spawn = multiprocessing.get_context("spawn")
    probe = concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn)
    for run in range(args.repeats):
        speedup = parallel_speedup(probe)
        # New processes each run: SymPy caches what it computed, and a second pass over the same
        # items would partly measure that cache.
        with (concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as plain_process,
              Grader(workers=args.workers, timeout_s=args.timeout, memo_size=0) as grader):
            grader.start()
            plain_process.submit(plain_math_verify, *warm_up).result()
            with_grader(grader, *warm_up, args.batch)
            timed = timed_run(plain_process, grader, completions, golds, args)
        plain = timed["plain"]
        differing = [{"completion": c, "gold": g, "grader": got, "reference": want}
                     for c, g, got, want in zip(completions, golds, timed["grader"], reference) if got != want]
        grader_differs = max(grader_differs, len(differing))
        examples += differing[:5]
        runs.append({**timed["stats"], "grader_differs_from_reference": len(differing),
                     "two_process_speedup": speedup})
        print(f"run {run + 1}: " + ", ".join(f"{k} {v}" for k, v in runs[-1].items()), flush=True)

    probe.shutdown()
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), **versions()},
        "args": vars(args),
        "items": len(completions),
        "golds": counts,
        "distinct_pairs": len(set(zip((extract_boxed(c) for c in completions), golds))),
        "reference_items_per_s": round(len(completions) / reference_s, 1),
        "runs": runs,
        "median": {key: round(statistics.median(run[key] for run in runs), 2)
                   for key in ("plain_items_per_s", "grader_items_per_s", "ratio", "two_process_speedup")},
        "grader_differs_from_reference": grader_differs,
        "grader_differences": examples[:10],
        "reference_none": reference.count(None),
        "plain_differs_from_reference": summarize_differences(completions, golds, reference, plain),
    }
    write_json(Path(args.out), result)
    median = result["median"]
    print(f"median of {len(runs)} runs: plain {median['plain_items_per_s']} items/s, grader "
          f"{median['grader_items_per_s']} items/s, ratio {median['ratio']}x (two processes ran "
          f"{median['two_process_speedup']}x as fast as one); grader differs from "
          f"grade_one on {grader_differs} items; plain math-verify differs on "
          f"{result['plain_differs_from_reference']['count']} "
          f"{result['plain_differs_from_reference']['by_reason']}")
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["grader_differs_from_reference"] else 0)
