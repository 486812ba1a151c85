"""DUMP (Wang et al. 2025, "DUMP: Automated Distribution-Level Curriculum Learning for RL-based LLM
Post-training", arXiv:2504.09710): a UCB bandit over data distributions.

The training prompts are split into distributions d_1..d_J (by `source`, or by a difficulty
bucket of the `rollout` stage's pass rate). The paper's learnability of a distribution is its
expected absolute advantage,

    L(d_j) = E_{x ~ d_j} E_{o ~ pi(.|x)} |A(o)|                              (paper, Sec. 3, Thm 3.1)

estimated from a sliding window of the absolute advantages of the most recent rollouts of d_j.
With n_j the number of rollouts drawn from d_j so far (all of them, not only the window's), each
distribution scores

    UCB(d_j) = L_hat(d_j) + sqrt(2 ln(sum_i n_i) / n_j)                      (paper, Algorithm 1)

and the sampling probabilities are a softmax of the scores with temperature tau,

    P(d_j) = exp(UCB(d_j) / tau) / sum_i exp(UCB(d_i) / tau).

A step's K prompts: K distributions drawn i.i.d. from P, then, within each distribution, prompts
uniformly (without replacement inside the step while the distribution has enough prompts, with
replacement beyond; the reference draws every prompt with replacement). `update` adds every
rollout of the step to its distribution's window (|advantage|, the trainer's GRPO advantages) and
count, then recomputes P.

Choices where the paper and its reference code leave room (our reading; uncertain points):
- Window and temperature: the reference code uses a window of 300 advantages per distribution and
  tau = 0.1; they are params here (`window`, `temperature`) with those values proposed.
- A distribution not drawn yet (n_j = 0) has an infinite bonus: the probability is split evenly
  over the undrawn distributions (the limit of the softmax), so every distribution is tried
  before any is exploited, as in UCB1. The reference code instead smooths the bonus to
  sqrt(2 ln(sum n + 1) / (n_j + 1)), finite at n_j = 0; we follow the paper's formula.
- What n_j counts: rollouts. The reference code updates after every step with one value per
  response (its advantage averaged over the response's tokens, which for GRPO's outcome advantage
  is the response's advantage), adds each to the window and counts each in n_j; we do the same.
  The paper's text speaks of samples of d_j without saying whether a prompt or a response is one.
- Rollouts with a NaN advantage are left out of both window and count.

What is not covered: the reference's Beta-distribution bookkeeping of rewards and weight-trend
logging (not part of the scheduling rule the paper states).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlvr import config
from rlvr.curation.base import Context, StepStats, check_state, new_rng, settings_from

NAME = "dump"
BY = ("source", "difficulty")


# The settings live in rlvr/config.py with the other params (validated when params.yaml loads).
DumpSettings = config.Dump


def difficulty_buckets(pass_rate: Sequence[float], edges: Sequence[float]) -> list[str]:
    """A label per row from its rollout pass rate: `pass_rate_lt_<e1>`, ..., `pass_rate_ge_<eN>`
    (bucket b holds edges[b-1] <= rate < edges[b]); rows without a pass rate get `pass_rate_unknown`."""
    labels = []
    for rate in pass_rate:
        if rate is None or math.isnan(rate):
            labels.append("pass_rate_unknown")
            continue
        below = [e for e in edges if rate < e]
        labels.append(f"pass_rate_lt_{below[0]:g}" if below else f"pass_rate_ge_{edges[-1]:g}")
    return labels


def ucb_scores(mean_abs_advantage: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """L_hat(d_j) + sqrt(2 ln(sum n) / n_j); +inf where n_j = 0 (never drawn)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        bonus = np.where(counts > 0, np.sqrt(2.0 * math.log(max(total, 1.0)) / np.where(counts > 0, counts, 1.0)),
                         np.inf)
    return np.where(counts > 0, np.nan_to_num(mean_abs_advantage), 0.0) + bonus


def probabilities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(scores / temperature); with infinite scores, uniform over those (the softmax's limit)."""
    scores = np.asarray(scores, dtype=np.float64)
    infinite = np.isinf(scores)
    if infinite.any():
        return infinite / infinite.sum()
    z = (scores - scores.max()) / temperature
    weights = np.exp(z)
    return weights / weights.sum()


def _metric_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


class DumpSampler:
    """The DUMP distribution-level UCB sampler (module docstring)."""

    offline = False

    def __init__(self, settings: DumpSettings, labels: Sequence[str], seed: int):
        if not labels:
            raise ValueError(f"{NAME} needs a distribution label for every training row")
        self.settings = settings
        self.labels = [str(x) for x in labels]
        self.names = sorted(set(self.labels))
        index = {name: j for j, name in enumerate(self.names)}
        self.row_distribution = np.array([index[x] for x in self.labels], dtype=np.int64)
        self.rows = [np.flatnonzero(self.row_distribution == j) for j in range(len(self.names))]
        self.windows: list[list[float]] = [[] for _ in self.names]
        self.counts = np.zeros(len(self.names), dtype=np.int64)
        self.updates = 0
        self._rng = new_rng(seed)

    @classmethod
    def from_settings(cls, values: Mapping[str, Any] | None, context: Context,
                      resources: Mapping[str, Any] | None = None) -> DumpSampler:
        settings = settings_from(DumpSettings, f"curation.{NAME}", values)
        if len(context.labels) != context.n_rows:
            raise ValueError(f"{NAME} (by: {settings.by}) needs a distribution label for each of the "
                             f"{context.n_rows} training rows, the context has {len(context.labels)}")
        return cls(settings, context.labels, context.seed)

    def mean_abs_advantage(self) -> np.ndarray:
        return np.array([np.mean(w) if w else np.nan for w in self.windows])

    def scores(self) -> np.ndarray:
        return ucb_scores(self.mean_abs_advantage(), self.counts)

    def probabilities(self) -> np.ndarray:
        return probabilities(self.scores(), self.settings.temperature)

    def plan(self, steps: int) -> list[int]:
        raise TypeError(f"{NAME} is an online sampler: it draws at generation time (no plan)")

    def draw(self, k: int) -> list[int]:
        """k rows: k distributions i.i.d. from P, then rows uniformly within each (ascending)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        picks = self._rng.choice(len(self.names), size=k, p=self.probabilities())
        chosen: list[int] = []
        for j in range(len(self.names)):
            need = int((picks == j).sum())
            if need:
                rows = self.rows[j]
                chosen += self._rng.choice(rows, size=need, replace=need > len(rows)).tolist()
        return sorted(int(i) for i in chosen)

    def update(self, stats: StepStats) -> dict[str, float]:
        """Each rollout's |advantage| into its distribution's window (last `window` kept), counts up."""
        groups = stats.groups
        if groups.advantages is None:
            raise ValueError(f"{NAME} updates from the step's advantages; the groups carry none")
        for row, advantages in zip(groups.prompts, groups.advantages, strict=True):
            if not 0 <= row < len(self.row_distribution):
                raise ValueError(f"group prompt row {row} is outside the training set")
            j = self.row_distribution[row]
            finite = np.abs(advantages[np.isfinite(advantages)])
            self.windows[j] = (self.windows[j] + finite.tolist())[-self.settings.window:]
            self.counts[j] += finite.size
        self.updates += 1
        p, mean = self.probabilities(), self.mean_abs_advantage()
        metrics: dict[str, float] = {}
        for j, name in enumerate(self.names):
            metrics[f"{NAME}/p/{_metric_name(name)}"] = float(p[j])
            if not math.isnan(mean[j]):
                metrics[f"{NAME}/abs_adv/{_metric_name(name)}"] = float(mean[j])
        return metrics

    def _fixed(self) -> dict:
        s = self.settings
        return {"method": NAME, "names": self.names, "n_rows": len(self.labels), "window": s.window,
                "temperature": s.temperature}

    def state_dict(self) -> dict:
        return {**self._fixed(), "windows": [list(w) for w in self.windows], "counts": self.counts.tolist(),
                "updates": self.updates, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self._fixed(), NAME)
        windows = [[float(v) for v in w] for w in state["windows"]]
        if len(windows) != len(self.names) or any(len(w) > self.settings.window for w in windows):
            raise ValueError(f"checkpointed {NAME} state has windows that do not fit this run's settings")
        self.windows = windows
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        self.updates = int(state["updates"])
        self._rng.bit_generator.state = state["rng"]
