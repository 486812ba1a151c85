"""Online difficulty filtering: train on the prompts whose running pass rate lies inside a band.

The `filter` stage's band (`train.prompts: band`) is fixed before training, from the warm-up
policy's rollouts. Online, the policy moves: prompts it has learned drift above the band and stop
teaching (all-correct groups, zero advantage), hard ones may come into reach. This sampler keeps,
for every training prompt i, pseudo-counts of correct and graded rollouts,

    c_i = prior_samples * r_i  +  correct rollouts of i in this run
    n_i = prior_samples        +  graded rollouts of i in this run      (NaN grades are not counted)
    p_i = c_i / n_i                                          (undefined while n_i = 0)

with r_i the `rollout` stage's pass rate when there is one (a Beta-style prior worth
`prior_samples` rollouts; 0 turns it off). The pool is {i : low <= p_i <= high}, plus every prompt
whose p_i is still undefined (it has to be tried to be measured). After each step's groups are
graded the counts move, and prompts leave the pool (p_i crossed out of the band) or return to it.

A prompt outside the pool is never drawn by a pure band filter, so its p_i could never change and
it could never return. `explore` reserves round(explore * K) of every step's K slots for prompts
outside the pool (uniformly), which is what lets a prompt come back; 0 gives the pure filter.
When the pool has fewer prompts than its share of K, the step is filled from outside the pool
(`filled`). Draws within each part are uniform without replacement from the sampler's seeded RNG.

Logged per update: `online_difficulty/pool_size`, `left` (in the pool before this update, out
after), `returned` (out before, in after) and, per draw, `explored` and `filled`.

This is the project's setting (a running pass rate with a prior, not a per-step filter of
each group's own pass rate as in Bae et al. 2025, "Online Difficulty Filtering for Reasoning
Oriented Reinforcement Learning"; DAPO's dynamic sampling is that per-step filter at band (0, 1)).

What is not covered: forgetting (old evidence weighs as much as new; a decay would let p_i follow
the policy faster), and prompts graded NaN (no parseable gold) stay undefined and so in the pool.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from rlvr import config
from rlvr.curation.base import Context, Groups, StepStats, check_state, new_rng, settings_from

NAME = "online_difficulty"


# The settings live in rlvr/config.py with the other params (validated when params.yaml loads).
OnlineDifficultySettings = config.OnlineDifficulty


def in_band(rate: np.ndarray, low: float, high: float) -> np.ndarray:
    """Pool membership: inside [low, high], or undefined (NaN: never graded, no prior)."""
    return np.isnan(rate) | ((rate >= low) & (rate <= high))


class OnlineDifficultySampler:
    """Draws K prompts a step from the pool of prompts whose running pass rate is in the band."""

    offline = False

    def __init__(self, settings: OnlineDifficultySettings, n_rows: int, seed: int,
                 prior_pass_rate: np.ndarray | None = None):
        if n_rows < 1:
            raise ValueError(f"n_rows must be >= 1, got {n_rows}")
        self.settings, self.n_rows = settings, int(n_rows)
        prior = np.full(self.n_rows, np.nan) if prior_pass_rate is None else np.asarray(prior_pass_rate, float)
        if prior.shape != (self.n_rows,):
            raise ValueError(f"prior_pass_rate has shape {prior.shape}, expected ({self.n_rows},)")
        bad = ~np.isnan(prior) & ((prior < 0) | (prior > 1))
        if bad.any():
            raise ValueError(f"prior pass rates must be in [0, 1]; row {int(np.flatnonzero(bad)[0])} has "
                             f"{prior[bad][0]}")
        has_prior = ~np.isnan(prior) & (settings.prior_samples > 0)
        self.correct = np.where(has_prior, settings.prior_samples * np.nan_to_num(prior), 0.0)
        self.graded = np.where(has_prior, float(settings.prior_samples), 0.0)
        self.in_pool = in_band(self.pass_rate(), settings.low, settings.high)
        self.updates = 0
        self._rng = new_rng(seed)
        self._last_draw = {"explored": 0.0, "filled": 0.0}

    @classmethod
    def from_settings(cls, values: Mapping[str, Any] | None, context: Context,
                      resources: Mapping[str, Any] | None = None) -> OnlineDifficultySampler:
        settings = settings_from(OnlineDifficultySettings, f"curation.{NAME}", values)
        prior = np.asarray(context.prior_pass_rate, float) if context.prior_pass_rate else None
        if context.n_rows < context.prompts_per_step:
            raise ValueError(f"{NAME} draws K = {context.prompts_per_step} distinct prompts a step but the "
                             f"training set has {context.n_rows}: lower train.prompts_per_step")
        return cls(settings, context.n_rows, context.seed, prior)

    def pass_rate(self) -> np.ndarray:
        """p_i = c_i / n_i, NaN where n_i = 0."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.graded > 0, self.correct / np.where(self.graded > 0, self.graded, 1.0), np.nan)

    def plan(self, steps: int) -> list[int]:
        raise TypeError(f"{NAME} is an online sampler: it draws at generation time (no plan)")

    def draw(self, k: int) -> list[int]:
        """k distinct rows (ascending): round(explore * k) from outside the pool (as many as there
        are), the rest from the pool; a pool too small is filled from outside."""
        if not 1 <= k <= self.n_rows:
            raise ValueError(f"k must be in [1, {self.n_rows}] (the training set), got {k}")
        pool, outside = np.flatnonzero(self.in_pool), np.flatnonzero(~self.in_pool)
        n_explore = min(round(self.settings.explore * k), len(outside))
        n_pool = min(k - n_explore, len(pool))
        n_outside = k - n_pool  # >= n_explore; the excess fills a small pool
        chosen = np.concatenate([self._rng.choice(pool, size=n_pool, replace=False),
                                 self._rng.choice(outside, size=n_outside, replace=False)])
        self._last_draw = {"explored": float(n_explore), "filled": float(n_outside - n_explore)}
        return sorted(int(i) for i in chosen)

    def update(self, stats: StepStats) -> dict[str, float]:
        """Add the step's graded rollouts to the counts; move prompts in and out of the pool."""
        groups: Groups = stats.groups
        graded = ~np.isnan(groups.rewards)
        rows = np.asarray(groups.prompts, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise ValueError(f"group prompts must be rows in [0, {self.n_rows}), got {rows.min()}..{rows.max()}")
        np.add.at(self.correct, rows, (np.where(graded, groups.rewards, 0.0) >= 1.0).sum(axis=1))
        np.add.at(self.graded, rows, graded.sum(axis=1))
        before = self.in_pool
        self.in_pool = in_band(self.pass_rate(), self.settings.low, self.settings.high)
        self.updates += 1
        return {
            f"{NAME}/pool_size": float(self.in_pool.sum()),
            f"{NAME}/left": float((before & ~self.in_pool).sum()),
            f"{NAME}/returned": float((~before & self.in_pool).sum()),
            **{f"{NAME}/{k}": v for k, v in self._last_draw.items()},
        }

    def _fixed(self) -> dict:
        s = self.settings
        return {"method": NAME, "n_rows": self.n_rows, "low": s.low, "high": s.high,
                "prior_samples": s.prior_samples, "explore": s.explore}

    def state_dict(self) -> dict:
        return {**self._fixed(), "correct": self.correct.tolist(), "graded": self.graded.tolist(),
                "in_pool": self.in_pool.tolist(), "updates": self.updates,
                "last_draw": dict(self._last_draw), "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self._fixed(), NAME)
        correct, graded = np.asarray(state["correct"], float), np.asarray(state["graded"], float)
        if correct.shape != (self.n_rows,) or graded.shape != (self.n_rows,) or not (
                np.all(correct >= 0) and np.all(correct <= graded) and all(map(math.isfinite, graded))):
            raise ValueError(f"checkpointed {NAME} state has inconsistent counts")
        self.correct, self.graded = correct, graded
        self.in_pool = np.asarray(state["in_pool"], dtype=bool)
        self.updates = int(state["updates"])
        self._last_draw = {k: float(v) for k, v in state["last_draw"].items()}
        self._rng.bit_generator.state = state["rng"]
