"""PROF: process-consistency filtering of rollouts (Ye et al. 2025, "Beyond Correctness").

Per prompt group of n graded rollouts, PROF removes k of them so that what is kept agrees between
outcome and process: among correct responses it drops those with the lowest process value (right
answer, poor steps), among incorrect ones those with the highest (wrong answer, steps that look
fine), and it splits the k removals between the two sides so that the kept group is as balanced
as it can be. GRPO then computes advantages over the kept rollouts only.

The rule (DESIGN.md, "PROF"), with P correct and N incorrect responses and k to remove:

    k_pos = min(k, round((P - N + k) / 2))          round half to even, like Python's round()
    k_pos > 0:  remove min(k_pos, P) correct (lowest value first), the rest of k from incorrect
    else:       remove k incorrect (highest value first)

Within a side, responses whose step count is outside [min_steps, max_steps] go first, then NaN
process values, then by value; ties go in order of position (earlier first). For n = 8, k = 4 this
keeps 8/0->4/0, 7/1->3/1, 6/2->2/2, 5/3->2/2, 4/4->2/2, 3/5->2/2, 2/6->2/2, 1/7->1/3, 0/8->0/4.

Process reward models (PRMs) score each step in [0, 1]; the process value of a response is the
mean over its first `max_steps` steps. Two PRMs share one interface (`ProcessRewardModel`):
`ArithStepChecker`, exact for the built-in task, and `TransformersPRM`, a model in the
Qwen2.5-Math-PRM format (steps joined by a separator token, a 2-class softmax at each separator,
class 1 = good step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from rlvr import arith, models
from rlvr.config import ARITH_PRM, PRM

split_steps = arith.split_steps  # one definition of a step: blocks between blank lines

# Why a response was removed (the `reason` column of the filter stage's output).
KEPT = ""
STEP_COUNT = "step_count"            # fewer than min_steps or more than max_steps steps
NAN_VALUE = "nan_process_value"      # the PRM gave no usable score
LOW_VALUE = "correct_low_process"    # right answer, the weakest steps in its group
HIGH_VALUE = "incorrect_high_process"  # wrong answer, the most plausible-looking steps in its group

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class GroupDecision:
    """The outcome of PROF on one group: which responses are kept and why each other one was not."""

    kept: list[bool]
    reasons: list[str]


def removal_split(n_correct: int, n_incorrect: int, k: int) -> tuple[int, int]:
    """How many correct and incorrect responses to remove from a group (the PROF rule above)."""
    if min(n_correct, n_incorrect, k) < 0:
        raise ValueError(f"counts must be >= 0, got P={n_correct}, N={n_incorrect}, k={k}")
    k = min(k, n_correct + n_incorrect)
    k_pos = min(k, round((n_correct - n_incorrect + k) / 2))
    if k_pos > 0:
        from_correct = min(k_pos, n_correct)
        return from_correct, min(k - from_correct, n_incorrect)
    from_incorrect = min(k, n_incorrect)
    return min(k - from_incorrect, n_correct), from_incorrect


def filter_group(correct: Sequence[bool], values: Sequence[float], n_steps: Sequence[int], k: int | None = None,
                 min_steps: int = 2, max_steps: int = 30) -> GroupDecision:
    """PROF on one group of rollouts: `correct` from the grader, `values` the process values.

    `k` defaults to n // 2. Returns the keep mask and, for each removed response, the reason.
    """
    n = len(correct)
    if not len(values) == len(n_steps) == n:
        raise ValueError(f"correct, values and n_steps differ in length: {n}, {len(values)}, {len(n_steps)}")
    k = n // 2 if k is None else k
    if not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and the group size {n}, got {k}")
    pos = [i for i in range(n) if correct[i]]
    neg = [i for i in range(n) if not correct[i]]
    remove_pos, remove_neg = removal_split(len(pos), len(neg), k)

    def badness(i: int, sign: float) -> tuple:
        # Sorted ascending = removed first: bad step counts, then NaN values, then by value, then position.
        value = values[i]
        outside = not (min_steps <= n_steps[i] <= max_steps)
        nan = value is None or math.isnan(value)
        return (not outside, not nan, 0.0 if nan else sign * value, i)

    reasons = [KEPT] * n
    for side, count, sign, reason in ((pos, remove_pos, 1.0, LOW_VALUE), (neg, remove_neg, -1.0, HIGH_VALUE)):
        for key in sorted(badness(i, sign) for i in side)[:count]:
            in_bounds, finite, _, i = key
            reasons[i] = STEP_COUNT if not in_bounds else NAN_VALUE if not finite else reason
    return GroupDecision(kept=[r == KEPT for r in reasons], reasons=reasons)


def process_value(step_scores: Sequence[float], max_steps: int) -> float:
    """Mean PRM score over the first `max_steps` steps; NaN if there is none or any is NaN."""
    scores = [float(s) for s in step_scores[:max_steps]]
    if not scores or any(math.isnan(s) for s in scores):
        return float("nan")
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------
# Process reward models


class ProcessRewardModel(Protocol):
    """Scores in [0, 1] for every step of every response (NaN where it cannot score a step)."""

    def step_scores(self, problems: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]: ...


class ArithStepChecker:
    """The exact PRM of the built-in task: 1.0 for a right step, 0.0 for a wrong one.

    A problem that is not a built-in arithmetic problem gets NaN for every step (this PRM cannot
    judge it); callers count those.
    """

    def step_scores(self, problems: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for problem, response_steps in zip(problems, steps, strict=True):
            try:
                verdicts = arith.check_step_list(problem, response_steps)
            except ValueError:
                verdicts = [float("nan")] * len(response_steps)
            out.append([float(v) for v in verdicts])
        return out


class TransformersPRM:
    """A PRM in the Qwen2.5-Math-PRM format, loaded with transformers.

    Each response is rendered with the chat template as system / user (problem) / assistant (steps,
    each followed by `separator`); the model's per-token 2-class logits at the separator positions,
    softmaxed, give P(good step) = class 1. Batches are right-padded with an attention mask, so a
    response scores the same alone and in a batch. A sequence longer than `max_length` is cut, and
    the steps whose separator falls beyond the cut get NaN.

    With `trust_remote_code` off (the default) the model loads as `AutoModelForTokenClassification`
    (e.g. `Qwen2ForTokenClassification` with 2 labels); the released Qwen2.5-Math-PRM checkpoints
    ship their own modelling code and need `trust_remote_code: true` (then `AutoModel`).
    """

    def __init__(self, name_or_path: str, trust_remote_code: bool = False, separator: str = "<extra_0>",
                 system: str | None = QWEN_PRM_SYSTEM, batch_size: int = 8, max_length: int = 4096,
                 device: str | None = None, dtype: torch.dtype = torch.float32, progress: bool = False):
        from transformers import AutoModel, AutoModelForTokenClassification

        source = models.local_or_hub(name_or_path)
        self.tokenizer = models.load_tokenizer(source, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "right"
        ids = self.tokenizer.convert_tokens_to_ids(separator)
        if ids is None or ids == self.tokenizer.unk_token_id:
            raise models.ModelLoadError(f"{source}: the tokenizer has no separator token {separator!r}")
        self.separator, self.separator_id = separator, ids
        loader = AutoModel if trust_remote_code else AutoModelForTokenClassification
        try:
            self.model = loader.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise models.ModelLoadError(f"{source}: cannot load a process reward model ({error})") from error
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.system, self.batch_size, self.max_length, self.progress = system, batch_size, max_length, progress

    def render(self, problem: str, steps: Sequence[str]) -> str:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        turns += [{"role": "user", "content": problem},
                  {"role": "assistant", "content": "".join(step + self.separator for step in steps)}]
        return self.tokenizer.apply_chat_template(turns, tokenize=False)

    @torch.no_grad()
    def step_scores(self, problems: Sequence[str], steps: Sequence[Sequence[str]]) -> list[list[float]]:
        texts = [self.render(p, s) for p, s in zip(problems, steps, strict=True)]
        out: list[list[float]] = []
        for start in tqdm(range(0, len(texts), self.batch_size), desc="prm", disable=not self.progress):
            batch = texts[start : start + self.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False).to(self.device)
            result = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            logits = result.logits if hasattr(result, "logits") else result[0]
            if logits.shape[-1] != 2:
                raise ValueError(f"a PRM must give 2 classes per token, this one gives {logits.shape[-1]}")
            good = torch.softmax(logits.float(), dim=-1)[..., 1]
            at_separator = (enc["input_ids"] == self.separator_id) & enc["attention_mask"].bool()
            for row, response_steps in enumerate(steps[start : start + self.batch_size]):
                found = good[row][at_separator[row]].tolist()[: len(response_steps)]
                out.append(found + [float("nan")] * (len(response_steps) - len(found)))
        return out


def load_prm(settings: PRM, progress: bool = False) -> ProcessRewardModel:
    """The PRM that params name: `arith` is the built-in exact checker; anything else is a
    transformers PRM (local folder or hub name)."""
    if settings.name == ARITH_PRM:
        return ArithStepChecker()
    return TransformersPRM(settings.name, trust_remote_code=settings.trust_remote_code, separator=settings.separator,
                           system=settings.system, batch_size=settings.batch_size, max_length=settings.max_length,
                           progress=progress)


def score_responses(prm: ProcessRewardModel, problems: Sequence[str], completions: Sequence[str],
                    max_steps: int) -> tuple[list[int], list[list[float]], list[float]]:
    """Step counts, step scores (first `max_steps` steps) and process values of completions."""
    steps = [split_steps(c) for c in completions]
    scores = prm.step_scores(problems, [s[:max_steps] for s in steps])
    return [len(s) for s in steps], scores, [process_value(s, max_steps) for s in scores]
