"""Held-out learning curves during GRPO: the policy evaluated on a prepared eval set as it trains.

`HeldoutEval` is a transformers TrainerCallback. Before the first update (step 0, in
`on_train_begin`; skipped when a run resumes past step 0), every `eval_steps` optimizer steps and at
the last step (`eval_due`), it samples `n_samples` completions per problem and one greedy completion
with the current policy, grades them with the trainer's own Grader (the reward's), and logs through
`Trainer.log`, at the global step:

    heldout/pass_at_1, heldout/pass_at_1_ci_low, heldout/pass_at_1_ci_high, heldout/greedy_accuracy,
    heldout/seconds

pass@1 is the unbiased estimator of rlvr.passk over the n samples, averaged over problems, with a
95% percentile-bootstrap CI over problems; problems whose gold answer the grader cannot parse are
left out, as in the evaluate stage. Trainer.log puts each point in `state.log_history`, which every
checkpoint saves (the point of a checkpoint's step is logged before the checkpoint is written), so a
resumed run keeps the earlier points; MlflowStepMetrics sends them to MLflow. `curve_rows` turns the
log history into the rows of metrics/heldout_curve.csv.

Training is not disturbed: the evaluation runs inside `torch.random.fork_rng` (CPU and every CUDA
device), with Python's and NumPy's global RNG states saved and restored around it, and samples with
a fixed seed, so a run with evaluations trains exactly like one without (tests/test_heldout.py
checks the final parameters bit for bit). The model goes to eval mode and back to the mode it was
in. The point is logged while the model is still in eval mode, which is what keeps TRL's training
metrics (and RLVRGRPOTrainer's curation metrics) for the next training log instead of this one, and
the trainer's `should_log` flag is put back, so the training log of an evaluation step still comes:
the training log is the same with evaluations as without (tested).
The same seed at every point means every point draws the same random numbers: differences between
points come from the policy, not from sampling noise of the evaluation.

With several processes, each evaluates a contiguous slice of the problems (accelerate's
`split_between_processes`) with its own Grader, and the grades are gathered (`gather_object`, which
also keeps the processes together), so every process logs the same values. The samples then depend on
the number of processes (batches are composed differently), the estimator does not.

Why not TRL's own evaluation loop (`eval_strategy`, `eval_dataset`): it samples with the trainer's
RNG (an evaluation would change the training that follows), reports the mean reward of
`num_generations` samples of `max_completion_length` tokens with no greedy decoding and no CI, and
would run through RLVRGRPOTrainer's generation override. What is not covered: vLLM sampling (the
evaluation generates with transformers on the training model in place).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

from rlvr import passk
from rlvr.generation import SamplingSettings, sample_transformers
from rlvr.grading import Grader, grade_matrix

log = logging.getLogger(__name__)

PREFIX = "heldout/"
# metrics/heldout_curve.csv, in this order; each but `step` is logged as PREFIX + name.
CURVE_COLUMNS = ("step", "pass_at_1", "pass_at_1_ci_low", "pass_at_1_ci_high", "greedy_accuracy", "seconds")
# Bootstrap resamples of the problems for the CI. Fixed rather than a param: the curve's CI is a guide
# between points, not a reported result (the evaluate stage's CIs are, with evaluate.n_bootstrap), and
# on ~200 problems 1,000 resamples take milliseconds.
N_BOOTSTRAP = 1000


def eval_due(step: int, eval_steps: int, max_steps: int) -> bool:
    """Whether the policy after `step` optimizer steps is evaluated: every eval_steps, and the last step."""
    return eval_steps > 0 and (step % eval_steps == 0 or step == max_steps)


def sample_and_grade(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     golds: list[str], grader: Grader, settings: SamplingSettings,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Grades of `settings.n` samples per prompt (problems x n) and of one greedy completion (problems,).

    1.0 / 0.0, NaN where the gold answer is unparseable. Sampling seeds torch's global RNG: callers
    that must not disturb it fork it (HeldoutEval does).
    """
    if not prompts:  # a process whose slice is empty (fewer problems than processes)
        return np.empty((0, settings.n)), np.empty(0)
    samples = sample_transformers(model, tokenizer, prompts, settings, batch_size, desc="held-out samples")
    greedy = sample_transformers(model, tokenizer, prompts, replace(settings, n=1, greedy=True), batch_size,
                                 desc="held-out greedy")
    return grade_matrix(grader, samples, golds), grade_matrix(grader, greedy, golds)[:, 0]


def summarize(scores: np.ndarray, greedy: np.ndarray, seed: int) -> dict[str, float]:
    """pass@1 (unbiased, over the n samples) with its bootstrap CI, and greedy accuracy.

    Rows with a NaN (unparseable gold) are left out of every number. Keys: CURVE_COLUMNS without
    step and seconds.
    """
    usable = ~np.isnan(scores).any(axis=1)
    if not usable.any():
        raise RuntimeError("held-out evaluation: no problem has a gold answer the grader can parse")
    per_problem = passk.pass_at_k_per_problem(scores[usable] >= 1.0, 1)
    low, high = passk.bootstrap_ci(per_problem, n_boot=N_BOOTSTRAP, seed=seed)
    return {"pass_at_1": float(per_problem.mean()), "pass_at_1_ci_low": low, "pass_at_1_ci_high": high,
            "greedy_accuracy": float(np.mean(greedy[usable] >= 1.0))}


class HeldoutEval(TrainerCallback):
    """Evaluates the trainer's policy on a held-out set at step 0, every `eval_steps` steps and at the end.

    `prompts` are rendered (chat template applied), `golds` their gold answers; `settings` are the
    sampling settings (n, temperature, top_p, max_new_tokens and the fixed seed); `batch_size`
    sequences are generated at a time. `seconds` is the time this process spent evaluating.
    """

    def __init__(self, trainer: Trainer, prompts: list[str], golds: list[str], grader: Grader,
                 eval_steps: int, settings: SamplingSettings, batch_size: int):
        if len(prompts) != len(golds) or not prompts:
            raise ValueError(f"HeldoutEval needs one gold per prompt and at least one prompt, got {len(prompts)} "
                             f"prompts and {len(golds)} golds")
        if eval_steps < 1:
            raise ValueError(f"HeldoutEval needs eval_steps >= 1, got {eval_steps} (0 means: add no callback)")
        if settings.greedy:
            raise ValueError("HeldoutEval samples with `settings` and adds greedy decoding itself: pass greedy=False")
        self.trainer, self.prompts, self.golds, self.grader = trainer, list(prompts), list(golds), grader
        self.eval_steps, self.settings, self.batch_size = eval_steps, settings, batch_size
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a resumed run has its earlier points in the log history
            self.evaluate()

    def on_step_end(self, args, state, control, **kwargs):
        if eval_due(state.global_step, self.eval_steps, state.max_steps):
            self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Evaluate the policy now and log the point at the trainer's global step; returns what was logged."""
        start = time.perf_counter()
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        training = model.training
        python_rng, numpy_rng = random.getstate(), np.random.get_state()
        try:
            # Nothing below draws from Python's or NumPy's global RNG today; restoring them keeps it that
            # way if a library starts to.
            with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
                model.eval()
                scores, greedy = self._sample_and_grade_my_slice(model)
            metrics = summarize(scores, greedy, seed=self.settings.seed)
            seconds = time.perf_counter() - start
            metrics["seconds"] = seconds
            # Logged in eval mode: TRL's GRPOTrainer.log then adds (and clears) its eval metrics, of
            # which there are none, and leaves the training metrics of the steps since the last log
            # for the training log of this step. Trainer.log also clears `should_log`, which the
            # training log of this step, due after on_step_end, needs: it is put back.
            should_log = self.trainer.control.should_log
            self.trainer.log({PREFIX + name: value for name, value in metrics.items()})
            self.trainer.control.should_log = should_log
        finally:
            random.setstate(python_rng)
            np.random.set_state(numpy_rng)
            model.train(training)
        self.seconds += seconds
        log.info("held-out at step %d: pass@1 %.3f [%.3f, %.3f], greedy %.3f (%.1f s)",
                 self.trainer.state.global_step, metrics["pass_at_1"], metrics["pass_at_1_ci_low"],
                 metrics["pass_at_1_ci_high"], metrics["greedy_accuracy"], seconds)
        return metrics

    def _sample_and_grade_my_slice(self, model: PreTrainedModel) -> tuple[np.ndarray, np.ndarray]:
        """This process's contiguous slice of the problems, sampled and graded, then gathered in order."""
        tokenizer = self.trainer.processing_class
        with PartialState().split_between_processes(list(range(len(self.prompts)))) as mine:
            # The seed of a slice continues the single-process numbering of sequences (seed + index x n).
            first = mine[0] if mine else 0
            settings = replace(self.settings, seed=self.settings.seed + first * self.settings.n)
            scores, greedy = sample_and_grade(model, tokenizer, [self.prompts[i] for i in mine],
                                              [self.golds[i] for i in mine], self.grader, settings, self.batch_size)
        rows = gather_object([(list(s), float(g)) for s, g in zip(scores, greedy)])
        return np.array([r[0] for r in rows], dtype=float), np.array([r[1] for r in rows], dtype=float)


def is_point(entry: dict) -> bool:
    """Whether a log history entry is a held-out point (the training curve leaves these out)."""
    return PREFIX + "pass_at_1" in entry


def curve_rows(log_history: list[dict]) -> list[dict]:
    """One row per held-out point of a trainer's log history (CURVE_COLUMNS), by step; the last wins."""
    points = {}
    for entry in log_history:
        if is_point(entry):
            points[int(entry["step"])] = {"step": int(entry["step"]),
                                          **{c: float(entry[PREFIX + c]) for c in CURVE_COLUMNS[1:]}}
    return [points[step] for step in sorted(points)]


def curve_csv(rows: list[dict]) -> str:
    """metrics/heldout_curve.csv: CURVE_COLUMNS, one row per point (a header only when there is none)."""
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS)).to_csv(index=False)
