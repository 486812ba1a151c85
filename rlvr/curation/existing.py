"""The methods the trainer already has, behind the curation interface, on top of their own code.

- `PlanSampler` (`uniform`, `length`, `random`): offline; its plan is `rlvr.grpo.prompt_plan`,
  the rows TRL's sampler walks today, and `draw` walks the same plan K rows at a time.
- `GainRLSampler` (`gain_rl`): online; a `rlvr.grpo.GainRLSchedule` (the Gaussian over rank
  positions and the mu update of rlvr.gain_rl). `update` takes acc from the step's grades (the
  fraction correct among graded rollouts, as RLVRGRPOTrainer computes it) and ang from the step's
  scalars (measured in the loss forward).
- `ProfFilter` (`prof`): `rlvr.grpo.ProfInLoop.decide` on the step's groups (info "problem" and
  "completion" per rollout), with the `prof/*` counts RLVRGRPOTrainer logs.

They add no logic of their own: tests/test_curation.py checks that each gives exactly the draws,
mu values and keep masks of the existing code path.

rlvr.grpo is imported inside the methods, not at the top: it loads TRL (slow), and once rlvr.grpo
itself imports rlvr.curation (the wiring), a top-level import here would be circular.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlvr.config import GainRL, Prof
from rlvr.curation.base import Context, FilterResult, Groups, StepStats, check_state, settings_from

PLAN_ORDERS = ("uniform", "length", "random")


@dataclass(frozen=True)
class NoSettings:
    """Plan orders take no curation settings (their ordering comes from the `score` stage); any key
    given to one is an error."""


class PlanSampler:
    """A fixed prompt plan (`uniform`, `length`, `random`): rlvr.grpo.prompt_plan, walked K at a time."""

    offline = True

    def __init__(self, order: str, ordering: Sequence[int], context: Context):
        if order not in PLAN_ORDERS:
            raise ValueError(f"a plan order is one of {list(PLAN_ORDERS)}, got {order!r}")
        if order != "uniform" and not ordering:
            raise ValueError(f"order {order!r} needs the ordering of training rows (the score stage's)")
        self.order, self.ordering, self.context = order, [int(i) for i in ordering], context
        self.position = 0
        self._plan: list[int] | None = None

    @classmethod
    def from_order(cls, order: str, values: Mapping[str, Any] | None, context: Context,
                   resources: Mapping[str, Any] | None = None) -> PlanSampler:
        """The registry's constructor, one per order (`functools.partial(PlanSampler.from_order, order)`)."""
        settings_from(NoSettings, f"curation.{order}", values)
        return cls(order, context.ordering, context)

    def plan(self, steps: int) -> list[int]:
        from rlvr import grpo

        c = self.context
        return grpo.prompt_plan(self.order, self.ordering, c.n_rows, c.prompts_per_step, steps, c.seed)

    def draw(self, k: int) -> list[int]:
        if k != self.context.prompts_per_step:
            raise ValueError(f"a plan is laid out in steps of K = {self.context.prompts_per_step} prompts, "
                             f"asked for {k}")
        if self._plan is None:
            self._plan = self.plan(self.context.steps)
        if self.position + k > len(self._plan):
            raise ValueError(f"the prompt plan covers {self.context.steps} steps; all of them are drawn")
        rows = self._plan[self.position : self.position + k]
        self.position += k
        return rows

    def update(self, stats: StepStats) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"method": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, {"method": self.order}, self.order)
        self.position = int(state["position"])


class GainRLSampler:
    """GAIN-RL's online sampler: a rlvr.grpo.GainRLSchedule over the `score` stage's ranking."""

    offline = False

    def __init__(self, settings: GainRL, ranking: Sequence[int], seed: int):
        from rlvr import grpo

        if not ranking:
            raise ValueError("gain_rl needs the score stage's ranking of training rows")
        self.schedule = grpo.GainRLSchedule(list(ranking), sigma=settings.sigma, mu0=settings.mu0, n=settings.n,
                                            alpha=settings.alpha, beta=settings.beta,
                                            delta_min=settings.delta_min, delta_max=settings.delta_max,
                                            seed=seed, at_end=settings.at_end)

    @classmethod
    def from_settings(cls, values: Mapping[str, Any] | None, context: Context,
                      resources: Mapping[str, Any] | None = None) -> GainRLSampler:
        # GAIN-RL's params stay where they are (train.gain_rl), validated by rlvr.config.GainRL.
        return cls(settings_from(GainRL, "train.gain_rl", values), context.ordering, context.seed)

    def plan(self, steps: int) -> list[int]:
        raise TypeError("gain_rl is an online sampler: it draws at generation time (no plan)")

    def draw(self, k: int) -> list[int]:
        return self.schedule.draw(k)

    def update(self, stats: StepStats) -> dict[str, float]:
        """mu moves by acc (fraction correct among graded rollouts) and ang (stats.scalars["ang"])."""
        if "ang" not in stats.scalars:
            raise ValueError("gain_rl's update needs the step's ang (mean causal angle concentration) in "
                             "stats.scalars['ang']")
        acc = accuracy(stats.groups.rewards)
        ang = float(stats.scalars["ang"])
        delta = self.schedule.update(acc, ang)
        sampler = self.schedule.sampler
        metrics = {"gain_rl/mu": sampler.mu, "gain_rl/delta": delta, "gain_rl/acc": acc, "gain_rl/ang": ang}
        if self.schedule.end_step is not None and self.schedule.end_step == sampler.updates:
            metrics["gain_rl/end_step"] = float(self.schedule.end_step)  # once, at the step mu reaches N-1
        return metrics

    def state_dict(self) -> dict:
        return self.schedule.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.sampler.load_state_dict(state)


def accuracy(rewards: np.ndarray) -> float:
    """GAIN-RL's acc: the fraction of graded rollouts (non-NaN) that are correct (>= 1.0).

    In float32, as RLVRGRPOTrainer computes it (`(accuracy >= 1.0).float().mean()` in torch): a
    float64 mean differs in the last bits, and mu would drift from the existing path. The count is
    exact and one float32 division rounds it the way torch does (checked for every count of up to
    1,024 rollouts)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    graded = ~np.isnan(rewards)
    if not graded.any():
        raise ValueError("GAIN-RL: every reward of this step is NaN (no parseable gold answer)")
    return float(np.float32((rewards[graded] >= 1.0).sum()) / np.float32(graded.sum()))


class ProfFilter:
    """PROF in the loop: rlvr.grpo.ProfInLoop on the step's groups."""

    def __init__(self, prof_in_loop):
        self.prof_in_loop = prof_in_loop

    @classmethod
    def from_settings(cls, values: Mapping[str, Any] | None, context: Context,
                      resources: Mapping[str, Any] | None = None) -> ProfFilter:
        """PROF's rule params stay in `prof` (rlvr.config.Prof); the PRM is a resource the trainer
        loads (`resources["prm"]`, rlvr.prof.load_prm(params.prm))."""
        from rlvr import grpo

        settings = settings_from(Prof, "prof", values)
        prm = (resources or {}).get("prm")
        if prm is None:
            raise ValueError("the prof filter needs a process reward model (resources['prm'])")
        return cls(grpo.ProfInLoop(prm, settings.remove, settings.min_steps, settings.max_steps))

    def apply(self, groups: Groups) -> FilterResult:
        missing = [k for k in ("problem", "completion") if k not in groups.info]
        if missing:
            raise ValueError(f"PROF needs the problem and completion of every rollout; the groups lack {missing}")
        flat_rewards = groups.rewards.reshape(-1)
        correct = [bool(r >= 1.0) for r in flat_rewards]  # NaN (no grade) counts as incorrect, as in the trainer
        n_steps, values = self.prof_in_loop.score(list(groups.info["problem"]), list(groups.info["completion"]))
        kept = self.prof_in_loop.decide(correct, values, n_steps, groups.group_size)
        keep = np.array(kept, dtype=bool)
        is_correct, value = np.array(correct, dtype=bool), np.array(values, dtype=np.float64)
        stats = {
            "prof/kept_frac": float(keep.mean()),
            "prof/kept_correct": float((keep & is_correct).sum()),
            "prof/kept_incorrect": float((keep & ~is_correct).sum()),
            "prof/dropped_correct": float((~keep & is_correct).sum()),
            "prof/dropped_incorrect": float((~keep & ~is_correct).sum()),
            "prof/nan_values": float(np.isnan(value).sum()),
        }
        for name, where in (("prof/value_kept_correct", keep & is_correct),
                            ("prof/value_dropped_correct", ~keep & is_correct)):
            if where.any() and not np.isnan(value[where]).all():
                stats[name] = float(np.nanmean(value[where]))
        return FilterResult(keep=keep.reshape(groups.n_groups, groups.group_size), stats=stats)
