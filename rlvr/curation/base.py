"""The curation interface: what a sampler and a group filter see, return and checkpoint.

A training step goes: the sampler draws K prompts (dataset rows) -> the trainer generates
`group_size` rollouts per prompt and grades them -> the filter decides which groups / rollouts
count -> advantages and the loss use what is kept -> the sampler's `update` sees the step's groups.

Every object here is plain Python / numpy, so it can be built, tested and checkpointed without
torch. Everything a sampler or filter decides depends only on its settings, its seed and the
step statistics it is given; every process gets the same (gathered) statistics, so every process
holds the same state and draws the same prompts (each then takes its own slice, as GAIN-RL does).

What is not covered: sharing one filter decision across processes that saw different data - the
trainer must hand every process the gathered groups of the whole step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from rlvr.config import ConfigError


@dataclass(frozen=True)
class Groups:
    """The graded rollouts of one step (over every process), one row per prompt group.

    prompts:    the dataset row of each group, (n_groups,)
    rewards:    the grader's 1.0 / 0.0 per rollout, NaN where it gave no grade (unparseable gold),
                (n_groups, group_size)
    advantages: the trainer's GRPO advantages per rollout, same shape, or None before they exist
    info:       per-rollout extras, flat in group order (length n_groups * group_size), e.g.
                "problem" and "completion" texts for PROF
    """

    prompts: tuple[int, ...]
    rewards: np.ndarray
    advantages: np.ndarray | None = None
    info: Mapping[str, Sequence[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rewards = np.asarray(self.rewards, dtype=np.float64)
        if rewards.ndim != 2 or rewards.shape[0] != len(self.prompts) or rewards.shape[1] < 1:
            raise ValueError(f"rewards must be (n_groups={len(self.prompts)}, group_size >= 1), "
                             f"got shape {rewards.shape}")
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "prompts", tuple(int(p) for p in self.prompts))
        if self.advantages is not None:
            advantages = np.asarray(self.advantages, dtype=np.float64)
            if advantages.shape != rewards.shape:
                raise ValueError(f"advantages have shape {advantages.shape}, rewards {rewards.shape}")
            object.__setattr__(self, "advantages", advantages)
        for name, values in self.info.items():
            if len(values) != rewards.size:
                raise ValueError(f"info[{name!r}] has {len(values)} values, expected one per rollout ({rewards.size})")

    @property
    def n_groups(self) -> int:
        return len(self.prompts)

    @property
    def group_size(self) -> int:
        return self.rewards.shape[1]

    @classmethod
    def from_flat(cls, prompts: Sequence[int], rewards: Sequence[float | None], group_size: int,
                  advantages: Sequence[float] | None = None, info: Mapping[str, Sequence[Any]] | None = None
                  ) -> Groups:
        """From TRL's flat layout: rollouts in groups of `group_size`, `prompts` one per rollout
        (each repeated group_size times in a row, as TRL's RepeatSampler lays them out)."""
        if group_size < 1 or len(rewards) % group_size:
            raise ValueError(f"{len(rewards)} rollouts do not split into groups of {group_size}")
        per_group = [prompts[i] for i in range(0, len(prompts), group_size)]
        if len(prompts) != len(rewards) or any(
                prompts[i] != per_group[i // group_size] for i in range(len(prompts))):
            raise ValueError("prompts must name one row per rollout, the same row for a whole group")
        grid = np.array([np.nan if r is None else float(r) for r in rewards]).reshape(-1, group_size)
        adv = None if advantages is None else np.asarray(advantages, dtype=np.float64).reshape(-1, group_size)
        return cls(tuple(per_group), grid, adv, dict(info or {}))

    @classmethod
    def concat(cls, parts: Sequence[Groups]) -> Groups:
        """The groups of `parts`, in order (all with the same group size and info keys)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        sizes = {p.group_size for p in parts}
        keys = {tuple(sorted(p.info)) for p in parts}
        with_advantages = {p.advantages is not None for p in parts}
        if len(sizes) > 1 or len(keys) > 1 or len(with_advantages) > 1:
            raise ValueError("groups to concatenate differ in group size, info keys or advantages")
        advantages = np.concatenate([p.advantages for p in parts]) if with_advantages == {True} else None
        info = {k: [v for p in parts for v in p.info[k]] for k in parts[0].info}
        return cls(tuple(r for p in parts for r in p.prompts), np.concatenate([p.rewards for p in parts]),
                   advantages, info)

    def select(self, rows: Sequence[int]) -> Groups:
        """The groups at positions `rows`, in that order."""
        rows = list(rows)
        n = self.group_size
        info = {k: [v[r * n + j] for r in rows for j in range(n)] for k, v in self.info.items()}
        advantages = None if self.advantages is None else self.advantages[rows]
        return Groups(tuple(self.prompts[r] for r in rows), self.rewards[rows], advantages, info)


@dataclass(frozen=True)
class StepStats:
    """What a sampler's `update` sees after a step: its groups and any step-level scalars (GAIN-RL's
    `ang`, measured in the loss forward)."""

    groups: Groups
    scalars: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FilterResult:
    """A filter's decision: which rollouts count (n_groups, group_size), and numbers to log."""

    keep: np.ndarray
    stats: dict[str, float]

    @property
    def kept_groups(self) -> np.ndarray:
        """Positions of the groups with at least one rollout kept."""
        return np.flatnonzero(self.keep.any(axis=1))


class Sampler(Protocol):
    """Which prompts a step sees.

    `offline` samplers fix every step's prompts up front (`plan`), which the trainer hands to TRL as
    the dataset; online ones draw at generation time and move with `update`. `draw` and `update`
    return plain values; `state_dict` is JSON-serialisable and restores the sampler exactly.
    """

    offline: bool

    def plan(self, steps: int) -> list[int]: ...

    def draw(self, k: int) -> list[int]: ...

    def update(self, stats: StepStats) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class GroupFilter(Protocol):
    """Which rollouts of a step count (applied to the graded groups, before advantages)."""

    def apply(self, groups: Groups) -> FilterResult: ...


@dataclass(frozen=True)
class Context:
    """What every method may need to know about the run, built once by the trainer.

    n_rows:           rows in the training set (row i = dataset row i)
    prompts_per_step: K, prompts per optimizer step over every process
    group_size:       rollouts per prompt (train.num_generations)
    steps:            generation steps of the run
    seed:             train.seed
    ordering:         rows in a precomputed order (`score` stage: length / random / GAIN-RL rank)
    labels:           a distribution label per row (source or difficulty bucket), for DUMP
    prior_pass_rate:  the `rollout` stage's pass rate per row (NaN where it has none)
    """

    n_rows: int
    prompts_per_step: int
    group_size: int
    steps: int
    seed: int
    ordering: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    prior_pass_rate: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.n_rows < 1 or self.prompts_per_step < 1 or self.group_size < 1 or self.steps < 0:
            raise ValueError(f"a curation context needs rows, K, group size >= 1 and steps >= 0, got "
                             f"{self.n_rows}, {self.prompts_per_step}, {self.group_size}, {self.steps}")
        for name in ("labels", "prior_pass_rate"):
            values = getattr(self, name)
            if values and len(values) != self.n_rows:
                raise ValueError(f"context.{name} has {len(values)} values for {self.n_rows} rows")


def settings_from(cls: type, section: str, values: Mapping[str, Any] | None):
    """`cls(**values)` for a frozen settings dataclass; an unknown key is one ConfigError line
    naming `section.key` (the dataclass's own __post_init__ names bad values)."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return cls(**values)


def require(condition: bool, key: str, value: object, fix: str) -> None:
    """One-line ConfigError naming the param, its value and the fix (as rlvr.config does)."""
    if not condition:
        raise ConfigError(f"{key} = {value!r}: {fix}")


def new_rng(seed: int) -> np.random.Generator:
    """The samplers' RNG: PCG64 seeded with `seed`; its state is JSON-serialisable."""
    return np.random.Generator(np.random.PCG64(seed))


def check_state(state: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Refuse a checkpointed state whose fixed settings differ from this run's."""
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"checkpointed {what} state has {key}={state.get(key)!r}, this run has {value!r}; "
                             "resume with the same data and curation params")
