"""Dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale").

A group whose rollouts all get the same reward (all correct or all wrong) has GRPO advantage 0 for
every rollout: it adds no gradient, only noise in the loss normaliser. DAPO's objective carries the
constraint (with the full objective, and again in its "Dynamic Sampling" section; cited by section
here, since we could not check the equation numbers against the final text)

    0 < |{o_i : is_equivalent(a, o_i)}| < G

and its Algorithm 1 meets it by over-sampling: generate, drop the groups that break it, add the
rest to a buffer, and generate again until the buffer holds the step's N groups; the first N are
trained on and the surplus is discarded (the reference recipe cuts the buffer to the batch size).

Here:

- `informative(rewards)`: a group counts when its graded rewards (NaN = no grade, left out) are
  not all equal. A group with fewer than 2 graded rollouts cannot have a spread and is dropped:
  TRL gives it advantage 0 too. Rewards are compared exactly (the grader gives 1.0 / 0.0).
- `DynamicSamplingFilter`: the filter of one batch of groups (keeps whole groups), with the
  counts of each kind of drop.
- `collect(generate, target, max_extra_rounds)`: the accounting of the extra rounds. Round 0 is
  the step's own generation; each extra round calls `generate` again. It stops as soon as
  `target` informative groups are in hand, or after `max_extra_rounds` extra rounds. The
  reference recipe (verl's DAPO, `algorithm.filter_groups`: drop the groups whose metric has
  std 0) caps the rounds with `max_num_gen_batches`, which counts round 0 too (ours =
  max_num_gen_batches - 1), and raises an error when the cap is hit; here the step goes on short:
  it is filled up to `target` with dropped groups marked as not counting (keep = False), so the
  batch keeps the shape TRL expects and those groups carry no loss; `short` says how many.
  With several processes, `enough` makes every process stop at the same round (see `collect`).

Logged per step: `dynamic_sampling/dropped_frac` (dropped / generated groups, all rounds),
`extra_rounds`, `extra_groups` (groups generated beyond round 0: the extra generation cost),
`short`, `surplus` (informative groups generated but not used).

In the trainer (rlvr.grpo.RLVRGRPOTrainer): an extra round draws K prompts from the run's online
sampler (gain_rl, online_difficulty, dump), or, under a plan order (uniform, length, random, a
prompt set), K rows uniformly from the training set with the trainer's own seeded RNG (the plan
is TRL's to walk, one step at a time). Groups are told apart by the accuracy grades, also with
`train.reward: blend`. Extra rounds run on one process only (params refuse more).

What is not covered: rewards other than exact 1.0 / 0.0 grades (a continuous reward is almost
never all-equal, so nothing would be dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlvr import config
from rlvr.curation.base import Context, FilterResult, Groups, settings_from

NAME = "dynamic_sampling"


# The settings live in rlvr/config.py with the other params (validated when params.yaml loads).
DynamicSamplingSettings = config.DynamicSampling


def informative(rewards: np.ndarray) -> np.ndarray:
    """(n_groups,) bool: True where a group's graded rewards are not all equal (DAPO's constraint)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    graded = ~np.isnan(rewards)
    high = np.where(graded, rewards, -np.inf).max(axis=1)
    low = np.where(graded, rewards, np.inf).min(axis=1)
    return high > low  # one grade or none: no spread (an all-NaN row compares -inf > inf)


def drop_counts(rewards: np.ndarray) -> dict[str, float]:
    """How many groups are dropped, and why: all correct, all wrong, other equal, or too few grades."""
    rewards = np.asarray(rewards, dtype=np.float64)
    graded = ~np.isnan(rewards)
    dropped = ~informative(rewards)
    few = graded.sum(axis=1) < 2
    all_correct = dropped & ~few & np.all(np.where(graded, rewards == 1.0, True), axis=1)
    all_wrong = dropped & ~few & np.all(np.where(graded, rewards == 0.0, True), axis=1)
    return {
        "dropped": float(dropped.sum()),
        "dropped_all_correct": float(all_correct.sum()),
        "dropped_all_wrong": float(all_wrong.sum()),
        "dropped_other_equal": float((dropped & ~few & ~all_correct & ~all_wrong).sum()),
        "dropped_ungraded": float((dropped & few).sum()),
    }


class DynamicSamplingFilter:
    """Keeps the groups whose rewards differ; drops whole groups (DAPO dynamic sampling)."""

    def __init__(self, settings: DynamicSamplingSettings):
        self.settings = settings

    @classmethod
    def from_settings(cls, values: Mapping[str, Any] | None, context: Context,
                      resources: Mapping[str, Any] | None = None) -> DynamicSamplingFilter:
        return cls(settings_from(DynamicSamplingSettings, f"curation.{NAME}", values))

    def apply(self, groups: Groups) -> FilterResult:
        keep_group = informative(groups.rewards)
        counts = drop_counts(groups.rewards)
        stats = {f"{NAME}/{k}": v for k, v in counts.items()}
        stats[f"{NAME}/dropped_frac"] = counts["dropped"] / groups.n_groups
        keep = np.repeat(keep_group[:, None], groups.group_size, axis=1)
        return FilterResult(keep=keep, stats=stats)


@dataclass(frozen=True)
class Collected:
    """A step's groups after dynamic sampling: exactly `target` groups, the informative ones first
    (in generation order), then, if short, dropped ones as filler; `counts[i]` says whether group
    i counts (False for filler), and `stats` what it cost."""

    groups: Groups
    counts: np.ndarray
    stats: dict[str, float]


def collect(generate: Callable[[int], Groups], target: int, max_extra_rounds: int,
            enough: Callable[[int], bool] | None = None) -> Collected:
    """Generate rounds of groups until `target` informative ones are in hand or the cap is hit.

    `generate(round)` returns the graded groups of one round (round 0 = the step's own
    generation). Surplus informative groups beyond `target` are discarded, as DAPO's reference
    recipe does. `enough(n_informative)` decides when to stop (default: n >= target). With several
    processes each collecting its own groups, it must give the same answer on every process (e.g.
    the minimum of n over processes >= target), since every round is a collective generation call.
    """
    if target < 1:
        raise ValueError(f"dynamic sampling needs a target of at least 1 group, got {target}")
    if max_extra_rounds < 0:
        raise ValueError(f"curation.{NAME}.max_extra_rounds must be >= 0, got {max_extra_rounds}")
    enough = enough or (lambda n: n >= target)
    kept: list[Groups] = []
    dropped: list[Groups] = []
    n_kept = generated = round0 = 0
    rounds = 0
    while rounds <= max_extra_rounds and not (rounds and enough(n_kept)):
        batch = generate(rounds)
        if batch.n_groups < 1:
            raise ValueError(f"dynamic sampling: round {rounds} generated no groups")
        mask = informative(batch.rewards)
        kept.append(batch.select(np.flatnonzero(mask)))
        dropped.append(batch.select(np.flatnonzero(~mask)))
        n_kept += int(mask.sum())
        generated += batch.n_groups
        if rounds == 0:
            round0 = batch.n_groups
        rounds += 1
    informative_groups = Groups.concat([g for g in kept if g.n_groups] or [kept[0]])
    used = min(n_kept, target)
    short = target - used
    parts = [informative_groups.select(range(used))]
    if short:
        filler = Groups.concat([g for g in dropped if g.n_groups])
        if filler.n_groups < short:  # cannot happen: every round's groups are kept or dropped
            raise RuntimeError("dynamic sampling: fewer dropped groups than the step is short")
        parts.append(filler.select(range(short)))
    groups = Groups.concat(parts)
    counts = np.arange(target) < used
    stats = {
        f"{NAME}/dropped_frac": (generated - n_kept) / generated,
        f"{NAME}/extra_rounds": float(rounds - 1),
        f"{NAME}/extra_groups": float(generated - round0),
        f"{NAME}/short": float(short),
        f"{NAME}/surplus": float(n_kept - used),
    }
    return Collected(groups=groups, counts=counts, stats=stats)
