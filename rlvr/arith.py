"""The built-in verifiable task: multi-step integer arithmetic with worked solutions.

A problem is a left-to-right chain of additions and subtractions, e.g. ``Compute 37+12-8.``; its
worked solution has one step per operation, steps separated by blank lines, and the final answer
boxed as its own last step::

    37+12=49

    49-8=41

    \\boxed{41}

Difficulty is set by the number of operations and the number of digits per operand. Everything is
deterministic given the seed. Prompts and solutions are deliberately terse: the built-in model is a
character-level transformer, so CPU time grows with every character.

`check_step_list` is an exact process reward model for this task: it says which steps of a completion
are right (arithmetically true *and* the next step of this problem's chain), which PROF uses.

Not covered: multiplication/division and operator precedence (left-to-right +/- needs none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PROMPT_PREFIX = "Compute "
_PROBLEM_RE = re.compile(r"^Compute (\d+(?:[+-]\d+)+)\.$")
_TERM_RE = re.compile(r"([+-]?)(\d+)")
_STEP_RE = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")
_BOXED_STEP_RE = re.compile(r"^\\boxed\{(-?\d+)\}$")


@dataclass(frozen=True)
class Chain:
    """Operands a0..an and operators op1..opn, evaluated left to right."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.operands) != len(self.ops) + 1 or not self.ops:
            raise ValueError(f"a chain needs n >= 1 operators and n + 1 operands, got {self}")
        if any(op not in "+-" for op in self.ops):
            raise ValueError(f"operators must be '+' or '-', got {self.ops}")

    def partial_results(self) -> list[int]:
        """Running value after each operation."""
        value, out = self.operands[0], []
        for op, b in zip(self.ops, self.operands[1:]):
            value = value + b if op == "+" else value - b
            out.append(value)
        return out

    @property
    def answer(self) -> int:
        return self.partial_results()[-1]

    def problem(self) -> str:
        expr = str(self.operands[0]) + "".join(f"{op}{b}" for op, b in zip(self.ops, self.operands[1:]))
        return f"{PROMPT_PREFIX}{expr}."

    def solution(self) -> str:
        steps, left = [], self.operands[0]
        for op, b, result in zip(self.ops, self.operands[1:], self.partial_results()):
            steps.append(f"{left}{op}{b}={result}")
            left = result
        steps.append(f"\\boxed{{{self.answer}}}")
        return "\n\n".join(steps)


def parse_problem(problem: str) -> Chain:
    """Inverse of `Chain.problem`; raises ValueError for text that is not a built-in problem."""
    match = _PROBLEM_RE.match(problem.strip())
    if not match:
        raise ValueError(f"not a built-in arithmetic problem: {problem!r}")
    terms = _TERM_RE.findall(match.group(1))
    operands = tuple(int(digits) for _, digits in terms)
    ops = tuple(sign for sign, _ in terms[1:])
    return Chain(operands=operands, ops=ops)


def sample_chain(rng: np.random.Generator, n_ops: int, digits: int) -> Chain:
    """One chain with `n_ops` operations and operands of up to `digits` digits (at least 1)."""
    high = 10**digits
    operands = tuple(int(x) for x in rng.integers(0, high, size=n_ops + 1))
    ops = tuple("+" if flip else "-" for flip in rng.integers(0, 2, size=n_ops))
    return Chain(operands=operands, ops=ops)


def generate(
    n: int,
    seed: int,
    split: str,
    min_ops: int,
    max_ops: int,
    min_digits: int,
    max_digits: int,
) -> list[dict]:
    """`n` problems as records in the pipeline's schema (id, problem, answer, solution, meta).

    The stream depends on (seed, split) only, so the held-out split is independent of the train
    split; exact repeats across splits are possible for easy settings and are removed by the
    prepare stage's decontamination, which counts them.
    """
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    split_key = int.from_bytes(split.encode(), "little") % (2**32)
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_key]))
    width = len(str(max(n - 1, 0)))
    records = []
    for i in range(n):
        n_ops = int(rng.integers(min_ops, max_ops + 1))
        digits = int(rng.integers(min_digits, max_digits + 1))
        chain = sample_chain(rng, n_ops, digits)
        records.append(
            {
                "id": f"arith-{split}-{i:0{width}d}",
                "problem": chain.problem(),
                "answer": str(chain.answer),
                "solution": chain.solution(),
                "meta": {"n_ops": n_ops, "digits": digits},
            }
        )
    return records


def split_steps(text: str) -> list[str]:
    """Steps of a completion: blocks separated by blank lines, stripped, empty ones dropped.

    A completion with no non-empty block is one (empty) step, so every response has >= 1 step.
    """
    steps = [block.strip() for block in re.split(r"\n\s*\n", text)]
    steps = [s for s in steps if s]
    return steps or [text.strip()]



def check_step_list(problem: str, steps: list[str]) -> list[bool]:
    """Which of `steps` (a completion split by `split_steps`) are right for `problem`.

    Step i < n_ops is right iff it reads ``left op b=result`` with `left` the correct running
    value, `op`/`b` the problem's i-th operation and `result` correct. The step after the last
    operation is right iff it is ``\\boxed{answer}``. Any further step is wrong (the chain is over).
    Raises ValueError for a problem of another kind.
    """
    chain = parse_problem(problem)
    expected = []
    left = chain.operands[0]
    for op, b, result in zip(chain.ops, chain.operands[1:], chain.partial_results()):
        expected.append((left, op, b, result))
        left = result
    verdicts = []
    for i, step in enumerate(steps):
        if i < len(expected):
            match = _STEP_RE.match(step)
            verdicts.append(
                bool(match)
                and (int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4)))
                == expected[i]
            )
        elif i == len(expected):
            match = _BOXED_STEP_RE.match(step)
            verdicts.append(bool(match) and int(match.group(1)) == chain.answer)
        else:
            verdicts.append(False)
    return verdicts
