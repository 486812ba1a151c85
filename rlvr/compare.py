"""Seed replicates of training runs, aggregated into one comparison against a baseline variant.

Input: one `RunResult` per training run (a DVC experiment): its variant label (the params that differ
between runs, other than the training seed), its training seed, its held-out learning curve (pass@1
and greedy accuracy by step; step 0 is before training) and its final evaluation on the held-out
set (a problems x samples correctness matrix, and optionally the warm-up model's on the same problems).

Output: a `Report` with, per variant,
- the held-out curve: at each step, the mean over seeds and a 95% Student t interval over seeds;
- final pass@1 (the final evaluation: mean over problems and samples), mean and t interval over seeds;
- the difference from the baseline variant, paired by seed: a 95% percentile-bootstrap interval that
  resamples seeds and problems (two levels), and a t interval over the per-seed differences;
- steps to reach the baseline's final held-out pass@1 (the mean over the baseline's seeds of each
  curve's last point): per run the first logged step at or above it, per variant the mean and t
  interval over the runs that reached it, and how many of them did (a run that never reaches it is
  counted, never averaged);
- the RL gain over the warm-up model: per run, the paired per-problem difference with a bootstrap
  interval over problems (stages/evaluate.paired_delta's convention), per variant the mean over seeds.
The report renders as markdown (`markdown`) and a PNG (`plot`), and is logged to MLflow as one parent
run with one child run per experiment (`log_to_mlflow`). docs/compare.md explains every number.

What is covered: any number of variants and seeds, curves logged at different steps, seeds missing
from some variants (reported, and left out of the pairing). What is not: pairing runs evaluated on
different held-out problems (an error), intervals at levels other than 95%, and uncertainty inside
one curve point (a curve point is taken as exact; only the spread over seeds counts).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rlvr import passk
from rlvr.errors import RlvrError
from rlvr.io import atomic_path, write_json, write_text

# Two-sided 95% Student t quantiles t(0.975; dof) for dof = 1..30 (scipy.stats.t.ppf, 6 decimals).
# Beyond 30 the Cornish-Fisher expansion below is within 3e-8 of the exact quantile.
_T95 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
        2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
        2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
        2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054  # standard normal 0.975 quantile

# A curve point counts as reaching the target when it is at least target - _REACH_TOLERANCE: the target
# is a mean of fractions, and np.mean([0.1, 0.2, 0.3]) is 0.20000000000000004, not 0.2.
_REACH_TOLERANCE = 1e-9

# Bootstrap weights are drawn in blocks of at most this many (resample, problem) entries (~16 MiB).
_BOOTSTRAP_BLOCK = 1 << 21

# Characters MLflow accepts in metric and param names on every platform, minus '/' (a name is also a path).
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")

ARTIFACTS = {"markdown": "compare.md", "plot": "compare.png", "json": "compare.json"}


class CompareError(RlvrError, ValueError):
    """Runs that cannot be compared as given; the message names the run and the fix."""


@dataclass(frozen=True, eq=False)
class RunResult:
    """One training run (one DVC experiment) as the comparison sees it.

    curve: columns step (int >= 0, unique) and pass_at_1, optionally greedy_accuracy; a NaN value is
    a missing point. correct / baseline_correct: (problems x samples) bool or 0/1 matrices whose rows
    follow problem_ids; baseline_correct is the warm-up model on the same problems, in the same order.
    """

    name: str
    variant: str
    seed: int
    curve: pd.DataFrame
    problem_ids: list[str]
    correct: np.ndarray
    baseline_correct: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CompareError(f"RunResult.name must be a non-empty string, got {self.name!r}")
        where = f"run {self.name!r}"
        if not isinstance(self.variant, str) or not self.variant:
            raise CompareError(f"{where}: variant must be a non-empty string, got {self.variant!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise CompareError(f"{where}: seed must be an int, got {type(self.seed).__name__} {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "curve", _checked_curve(where, self.curve))
        ids = list(self.problem_ids)
        if not all(isinstance(i, str) for i in ids):
            raise CompareError(f"{where}: problem_ids must be strings")
        if len(set(ids)) != len(ids):
            raise CompareError(f"{where}: problem_ids has {len(ids) - len(set(ids))} repeated id(s); "
                               "each held-out problem must appear once")
        object.__setattr__(self, "problem_ids", ids)
        object.__setattr__(self, "correct", _checked_matrix(f"{where}: correct", self.correct, len(ids)))
        if self.baseline_correct is not None:
            object.__setattr__(self, "baseline_correct",
                               _checked_matrix(f"{where}: baseline_correct", self.baseline_correct, len(ids)))
        if not isinstance(self.params, dict):
            raise CompareError(f"{where}: params must be a dict, got {type(self.params).__name__}")

    def problem_rates(self) -> np.ndarray:
        """Per problem, the fraction of samples that are correct (its pass@1)."""
        return self.correct.mean(axis=1)

    def final_pass_at_1(self) -> float:
        return float(self.correct.mean())


def _checked_curve(where: str, curve: object) -> pd.DataFrame:
    if not isinstance(curve, pd.DataFrame):
        raise CompareError(f"{where}: curve must be a pandas DataFrame, got {type(curve).__name__}")
    missing = [c for c in ("step", "pass_at_1") if c not in curve.columns]
    if missing:
        raise CompareError(f"{where}: curve lacks column(s) {missing}; it needs step, pass_at_1 "
                           f"(and optionally greedy_accuracy), found {list(curve.columns)}")
    frame = pd.DataFrame({"step": curve["step"], "pass_at_1": curve["pass_at_1"],
                          "greedy_accuracy": curve["greedy_accuracy"] if "greedy_accuracy" in curve else np.nan})
    try:
        steps = frame["step"].to_numpy(dtype=float)
        values = frame[["pass_at_1", "greedy_accuracy"]].to_numpy(dtype=float)
    except (TypeError, ValueError) as error:
        raise CompareError(f"{where}: curve columns must be numbers ({error})") from None
    if not np.isfinite(steps).all() or (steps < 0).any() or (steps != np.round(steps)).any():
        raise CompareError(f"{where}: curve steps must be whole numbers >= 0, got {sorted(set(steps.tolist()))}")
    if len(set(steps.tolist())) != len(steps):
        raise CompareError(f"{where}: curve has repeated steps; one row per step")
    finite = values[np.isfinite(values)]
    if ((finite < 0) | (finite > 1)).any():
        raise CompareError(f"{where}: curve pass_at_1 and greedy_accuracy must lie in [0, 1]")
    frame = pd.DataFrame({"step": steps.astype(np.int64), "pass_at_1": values[:, 0], "greedy_accuracy": values[:, 1]})
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def _checked_matrix(where: str, value: object, n_problems: int) -> np.ndarray:
    matrix = np.asarray(value)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise CompareError(f"{where} must be a (problems x samples) matrix with at least one sample, "
                           f"got shape {matrix.shape}")
    if matrix.shape[0] != n_problems:
        raise CompareError(f"{where} has {matrix.shape[0]} rows but problem_ids has {n_problems}; "
                           "rows must follow problem_ids")
    if n_problems == 0:
        raise CompareError(f"{where}: no problems; the final evaluation needs at least one")
    if matrix.dtype != bool:
        if not np.isin(matrix, (0, 1)).all():
            raise CompareError(f"{where} must hold booleans or 0/1 values")
        matrix = matrix.astype(bool)
    return matrix


# ---------------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Estimate:
    """A mean with a 95% interval; n is how many values it came from. The interval is NaN when it cannot
    be computed (one value for a t interval; no values at all also makes the mean NaN)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int


def t_quantile_95(dof: int) -> float:
    """t(0.975; dof): the two-sided 95% Student t quantile (a table to 30, Cornish-Fisher beyond)."""
    if isinstance(dof, bool) or not isinstance(dof, (int, np.integer)) or dof < 1:
        raise ValueError(f"t_quantile_95 needs an int dof >= 1, got {dof!r}")
    if dof <= len(_T95):
        return _T95[dof - 1]
    z, n = _Z975, float(dof)
    # Abramowitz & Stegun 26.7.5, four terms.
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / n + g2 / n**2 + g3 / n**3 + g4 / n**4


def mean_ci(values: Sequence[float]) -> Estimate:
    """Mean and 95% t interval (n - 1 dof): mean +- t(0.975; n-1) * sd / sqrt(n), sd with ddof=1."""
    data = np.asarray(values, dtype=float)
    n = int(data.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(data.mean())
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1)
    half = t_quantile_95(n - 1) * float(data.std(ddof=1)) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def two_level_bootstrap_ci(diffs: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of a (seeds x problems) matrix, resampling both.

    Each resample draws seeds with replacement and problems with replacement (one problem draw shared
    by all seeds in that resample) and takes the mean of the selected cells; the interval is the 2.5%
    and 97.5% quantiles of the n_boot means. The draws are multinomial counts, which is the same
    distribution as drawing indices, so the mean is counts_seeds @ diffs @ counts_problems / (S * P).
    """
    data = np.asarray(diffs, dtype=float)
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"two_level_bootstrap_ci needs a non-empty (seeds x problems) matrix, got {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("two_level_bootstrap_ci needs finite values")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"two_level_bootstrap_ci needs an int n_boot >= 1, got {n_boot!r}")
    if (data == data.flat[0]).all():
        return float(data.flat[0]), float(data.flat[0])
    n_seeds, n_problems = data.shape
    rng = np.random.default_rng(seed)
    seed_p, problem_p = np.full(n_seeds, 1.0 / n_seeds), np.full(n_problems, 1.0 / n_problems)
    block = max(1, _BOOTSTRAP_BLOCK // (n_seeds + n_problems))
    means = np.empty(n_boot)
    for start in range(0, n_boot, block):
        stop = min(start + block, n_boot)
        seed_counts = rng.multinomial(n_seeds, seed_p, size=stop - start)
        problem_counts = rng.multinomial(n_problems, problem_p, size=stop - start)
        means[start:stop] = ((seed_counts @ data) * problem_counts).sum(axis=1) / (n_seeds * n_problems)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class CurvePoint:
    """One step of a variant's held-out curve; each Estimate's n is the seeds with a value there."""

    step: int
    pass_at_1: Estimate
    greedy_accuracy: Estimate


@dataclass(frozen=True)
class PairedDiff:
    """Final pass@1 of a variant minus the baseline variant's, paired by seed, on matched problems."""

    mean: float
    ci_low: float  # bootstrap over seeds and problems
    ci_high: float
    seeds_ci_low: float  # t interval over the per-seed differences
    seeds_ci_high: float
    n_pairs: int
    n_problems: int
    seeds: tuple[int, ...]  # paired
    unmatched_seeds: tuple[int, ...]  # this variant only: left out
    baseline_only_seeds: tuple[int, ...]  # the baseline only: left out


@dataclass(frozen=True)
class StepsToTarget:
    """Steps to reach the baseline's final held-out pass@1: mean and t interval over the runs that
    reached it (n_reached of n runs with a curve); the others never reached it within their curve."""

    target: float
    mean: float
    ci_low: float
    ci_high: float
    n_reached: int
    n: int


@dataclass(frozen=True)
class SeedResult:
    """One run's numbers; diff_vs_baseline is against the baseline variant's run with the same seed."""

    name: str
    variant: str
    seed: int
    final_pass_at_1: float
    n_problems: int
    n_samples: int
    last_step: int | None
    last_pass_at_1: float | None
    steps_to_target: int | None
    diff_vs_baseline: float | None
    gain_over_warmup: Estimate | None  # n = problems; interval: bootstrap over problems


@dataclass(frozen=True)
class VariantResult:
    variant: str
    seeds: tuple[int, ...]
    final_pass_at_1: Estimate
    diff_vs_baseline: PairedDiff | None  # None for the baseline variant itself
    steps_to_target: StepsToTarget
    gain_over_warmup: Estimate | None  # over the runs with a warm-up matrix; None when none has one
    curve: tuple[CurvePoint, ...]


@dataclass(frozen=True)
class Report:
    baseline_variant: str
    target_pass_at_1: float
    n_boot: int
    seed: int
    variants: tuple[VariantResult, ...]  # the baseline first, then in order of first appearance
    runs: tuple[SeedResult, ...]
    notes: tuple[str, ...]

    def variant(self, name: str) -> VariantResult:
        for result in self.variants:
            if result.variant == name:
                return result
        raise KeyError(f"no variant {name!r}; the report has {[v.variant for v in self.variants]}")

    def to_dict(self) -> dict:
        """Plain JSON types; NaN (an interval that cannot be computed) becomes None."""
        return _json_ready(dataclasses.asdict(self))


def _json_ready(value: object) -> object:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _finite_points(run: RunResult, column: str) -> pd.DataFrame:
    return run.curve.loc[np.isfinite(run.curve[column]), ["step", column]]


def _last_point(run: RunResult) -> tuple[int, float] | None:
    points = _finite_points(run, "pass_at_1")
    if points.empty:
        return None
    return int(points["step"].iloc[-1]), float(points["pass_at_1"].iloc[-1])


def steps_to_reach(curve: pd.DataFrame, target: float) -> int | None:
    """The first step whose pass@1 is at least target (within 1e-9), or None if no step is."""
    points = curve.loc[np.isfinite(curve["pass_at_1"])]
    hit = points.loc[points["pass_at_1"] >= target - _REACH_TOLERANCE, "step"]
    return int(hit.iloc[0]) if not hit.empty else None


def _curve(runs: list[RunResult]) -> tuple[CurvePoint, ...]:
    steps = sorted({int(s) for run in runs for s in run.curve["step"]})
    points = []
    for step in steps:
        per_metric = []
        for column in ("pass_at_1", "greedy_accuracy"):
            values = [float(r.curve.loc[r.curve["step"] == step, column].iloc[0]) for r in runs
                      if (r.curve["step"] == step).any()]
            per_metric.append(mean_ci([v for v in values if math.isfinite(v)]))
        if per_metric[0].n or per_metric[1].n:
            points.append(CurvePoint(step, per_metric[0], per_metric[1]))
    return tuple(points)


def _aligned(reference: RunResult, run: RunResult) -> np.ndarray:
    """run's per-problem rates in the order of `reference`'s problem ids; an error if the id sets differ."""
    if run.problem_ids == reference.problem_ids:
        return run.problem_rates()
    ref_ids, ids = set(reference.problem_ids), set(run.problem_ids)
    if ref_ids != ids:
        only_run, only_ref = sorted(ids - ref_ids), sorted(ref_ids - ids)
        raise CompareError(
            f"runs {run.name!r} ({run.variant}, seed {run.seed}) and {reference.name!r} ({reference.variant}, "
            f"seed {reference.seed}) were evaluated on different held-out problems: {len(only_run)} id(s) only "
            f"in the first (e.g. {only_run[:3]}), {len(only_ref)} only in the second (e.g. {only_ref[:3]}); "
            "a paired difference needs the same problems: evaluate both on the same held-out set")
    position = {pid: i for i, pid in enumerate(run.problem_ids)}
    return run.problem_rates()[[position[pid] for pid in reference.problem_ids]]


def _paired(variant_runs: dict[int, RunResult], baseline_runs: dict[int, RunResult], n_boot: int,
            seed: int) -> tuple[PairedDiff, dict[int, float]]:
    paired = sorted(set(variant_runs) & set(baseline_runs))
    unmatched = tuple(sorted(set(variant_runs) - set(baseline_runs)))
    baseline_only = tuple(sorted(set(baseline_runs) - set(variant_runs)))
    if not paired:
        return PairedDiff(math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, (), unmatched, baseline_only), {}
    reference = baseline_runs[paired[0]]
    diffs = np.stack([_aligned(reference, variant_runs[s]) - _aligned(reference, baseline_runs[s]) for s in paired])
    per_seed = diffs.mean(axis=1)
    low, high = two_level_bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    over_seeds = mean_ci(per_seed)
    result = PairedDiff(float(diffs.mean()), low, high, over_seeds.ci_low, over_seeds.ci_high, len(paired),
                        diffs.shape[1], tuple(paired), unmatched, baseline_only)
    return result, {s: float(d) for s, d in zip(paired, per_seed)}


def _gain(run: RunResult, n_boot: int, seed: int) -> Estimate | None:
    """stages/evaluate.paired_delta's number: per-problem pass@1 minus the warm-up's, bootstrap over problems."""
    if run.baseline_correct is None:
        return None
    diff = run.problem_rates() - run.baseline_correct.mean(axis=1)
    low, high = passk.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return Estimate(float(diff.mean()), low, high, int(diff.size))


def _check_runs(runs: Sequence[RunResult], baseline_variant: str) -> list[str]:
    if not runs:
        raise CompareError("compare needs at least one run")
    for run in runs:
        if not isinstance(run, RunResult):
            raise CompareError(f"compare needs RunResult objects, got {type(run).__name__}")
    names: dict[str, RunResult] = {}
    slots: dict[tuple[str, int], RunResult] = {}
    for run in runs:
        if run.name in names:
            raise CompareError(f"two runs are named {run.name!r}; experiment names must be unique")
        names[run.name] = run
        other = slots.get((run.variant, run.seed))
        if other is not None:
            raise CompareError(f"runs {other.name!r} and {run.name!r} are both variant {run.variant!r} with seed "
                               f"{run.seed}: one run per variant and seed; drop one or give it another seed")
        slots[(run.variant, run.seed)] = run
    variants = list(dict.fromkeys(run.variant for run in runs))
    if baseline_variant not in variants:
        raise CompareError(f"baseline variant {baseline_variant!r} is not among the runs' variants {variants}; "
                           "pick one of them")
    return [baseline_variant] + [v for v in variants if v != baseline_variant]


def compare(runs: Sequence[RunResult], baseline_variant: str, n_boot: int = 2000, seed: int = 0) -> Report:
    """Aggregate seed replicates per variant and compare every variant with `baseline_variant`."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise CompareError(f"compare needs an int n_boot >= 1, got {n_boot!r}")
    order = _check_runs(runs, baseline_variant)
    by_variant = {v: {r.seed: r for r in sorted(runs, key=lambda r: r.seed) if r.variant == v} for v in order}
    notes: list[str] = []

    baseline_last = [_last_point(r) for r in by_variant[baseline_variant].values()]
    baseline_last = [p[1] for p in baseline_last if p is not None]
    target = float(np.mean(baseline_last)) if baseline_last else math.nan
    if not baseline_last:
        notes.append(f"the baseline {baseline_variant} has no held-out curve point, so steps to its final "
                     "pass@1 cannot be computed")
    else:
        starts = [_finite_points(r, "pass_at_1") for r in by_variant[baseline_variant].values()]
        starts = [float(points["pass_at_1"].iloc[0]) for points in starts if not points.empty]
        if starts and target <= float(np.mean(starts)) + _REACH_TOLERANCE:
            notes.append(f"the baseline {baseline_variant} ends ({target:.3f}) no higher than it starts "
                         f"({float(np.mean(starts)):.3f}, its first curve point): steps to target then measure "
                         "no learning, and a run reaches the target at its first point")

    variant_results, seed_results = [], []
    for variant in order:
        members = by_variant[variant]
        if len(members) == 1:
            notes.append(f"{variant}: 1 seed, so no interval over seeds (n/a)")
        paired, per_seed_diff = (None, {}) if variant == baseline_variant else \
            _paired(members, by_variant[baseline_variant], n_boot, seed)
        if paired is not None:
            if paired.unmatched_seeds:
                notes.append(f"{variant}: seed(s) {list(paired.unmatched_seeds)} have no {baseline_variant} run "
                             "with the same seed and are left out of the paired difference")
            if paired.baseline_only_seeds:
                notes.append(f"{variant}: {baseline_variant} seed(s) {list(paired.baseline_only_seeds)} have no "
                             f"{variant} run and are left out of the paired difference")
        reached, with_curve, gains = [], 0, []
        for s, run in members.items():
            last = _last_point(run)
            steps = steps_to_reach(run.curve, target) if last is not None and math.isfinite(target) else None
            if last is None:
                notes.append(f"{variant} seed {s} ({run.name}): no held-out curve point; left out of steps to target")
            elif math.isfinite(target):
                with_curve += 1
                if steps is not None:
                    reached.append(steps)
            gain = _gain(run, n_boot, seed)
            if gain is None:
                notes.append(f"{variant} seed {s} ({run.name}): no warm-up matrix, so no gain over warm-up")
            else:
                gains.append(gain.mean)
            seed_results.append(SeedResult(
                name=run.name, variant=variant, seed=s, final_pass_at_1=run.final_pass_at_1(),
                n_problems=int(run.correct.shape[0]), n_samples=int(run.correct.shape[1]),
                last_step=None if last is None else last[0], last_pass_at_1=None if last is None else last[1],
                steps_to_target=steps, diff_vs_baseline=per_seed_diff.get(s), gain_over_warmup=gain))
        steps_estimate = mean_ci(reached)
        curve = _curve(list(members.values()))
        short = [p.step for p in curve if p.pass_at_1.n < len(members)]
        if short and len(members) > 1:
            notes.append(f"{variant}: held-out pass@1 at step(s) {short} comes from fewer than its "
                         f"{len(members)} seeds")
        variant_results.append(VariantResult(
            variant=variant, seeds=tuple(members),
            final_pass_at_1=mean_ci([r.final_pass_at_1() for r in members.values()]),
            diff_vs_baseline=paired,
            steps_to_target=StepsToTarget(target, steps_estimate.mean, steps_estimate.ci_low, steps_estimate.ci_high,
                                          len(reached), with_curve),
            gain_over_warmup=mean_ci(gains) if gains else None,
            curve=curve))
    return Report(baseline_variant=baseline_variant, target_pass_at_1=target, n_boot=int(n_boot), seed=int(seed),
                  variants=tuple(variant_results), runs=tuple(seed_results), notes=tuple(notes))


# ---------------------------------------------------------------------------------------------------
# Rendering


def _num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def _ci(low: float, high: float, fmt=_num) -> str:
    return "[n/a]" if not (math.isfinite(low) and math.isfinite(high)) else f"[{fmt(low)}, {fmt(high)}]"


def _steps(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: Report) -> str:
    """The comparison as markdown: one row per variant, one row per run, then the notes."""
    target = _num(report.target_pass_at_1)
    lines = [
        f"# Comparison against {_cell(report.baseline_variant)}",
        "",
        "Intervals are 95%: over seeds (Student t) unless marked; the difference from the baseline is paired "
        f"by seed, its first interval resamples seeds and problems ({report.n_boot} bootstrap resamples). "
        f"Steps to target: first logged step at which held-out pass@1 reaches {target}, the baseline's "
        "final held-out pass@1 (mean of its seeds' last curve points); mean over the runs that reached it. "
        "See docs/compare.md.",
        "",
        "| variant | seeds | final pass@1 [CI] | diff vs baseline [CI seeds+problems] | diff [CI seeds only] "
        f"| steps to {target} [CI] | reached | gain over warm-up [CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in report.variants:
        final = v.final_pass_at_1
        if v.diff_vs_baseline is None:
            diff, diff_seeds = "baseline", "baseline"
        else:
            d = v.diff_vs_baseline
            pairs = f"{d.n_pairs} pair" + ("" if d.n_pairs == 1 else "s")
            diff = f"{_signed(d.mean)} {_ci(d.ci_low, d.ci_high, _signed)} ({pairs})"
            diff_seeds = f"{_signed(d.mean)} {_ci(d.seeds_ci_low, d.seeds_ci_high, _signed)}"
        st = v.steps_to_target
        if st.n == 0:
            steps = "n/a"
        else:
            steps = f"{_steps(st.mean)} {_ci(st.ci_low, st.ci_high, _steps)}" if st.n_reached else "never"
        gain = "n/a" if v.gain_over_warmup is None else \
            f"{_signed(v.gain_over_warmup.mean)} {_ci(v.gain_over_warmup.ci_low, v.gain_over_warmup.ci_high, _signed)}"
        seeds = f"{len(v.seeds)} ({', '.join(map(str, v.seeds))})"
        lines.append(f"| {_cell(v.variant)} | {seeds} | {_num(final.mean)} {_ci(final.ci_low, final.ci_high)} | "
                     f"{diff} | {diff_seeds} | {steps} | {st.n_reached}/{st.n} | {gain} |")
    lines += [
        "",
        "## Per run",
        "",
        "| variant | seed | experiment | final pass@1 | diff vs baseline (same seed) | last curve point "
        f"| steps to {target} | gain over warm-up [CI over problems] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.runs:
        last = "none" if r.last_step is None else f"{_num(r.last_pass_at_1)} at step {r.last_step}"
        if r.variant == report.baseline_variant:
            diff = "baseline"
        else:
            diff = "unpaired" if r.diff_vs_baseline is None else _signed(r.diff_vs_baseline)
        if r.last_step is None or not math.isfinite(report.target_pass_at_1):
            steps = "n/a"
        else:
            steps = "never" if r.steps_to_target is None else str(r.steps_to_target)
        g = r.gain_over_warmup
        gain = "n/a" if g is None else f"{_signed(g.mean)} {_ci(g.ci_low, g.ci_high, _signed)}"
        lines.append(f"| {_cell(r.variant)} | {r.seed} | {_cell(r.name)} | {_num(r.final_pass_at_1)} | {diff} | "
                     f"{last} | {steps} | {gain} |")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {_cell(note)}" for note in report.notes]
    return "\n".join(lines) + "\n"


def plot(report: Report, path: str | Path) -> Path:
    """Held-out pass@1 by step per variant (mean over seeds, shaded 95% t band) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for v in report.variants:
        points = [p for p in v.curve if p.pass_at_1.n]
        if not points:
            continue
        steps = np.array([p.step for p in points])
        mean = np.array([p.pass_at_1.mean for p in points])
        low = np.array([p.pass_at_1.ci_low for p in points])
        high = np.array([p.pass_at_1.ci_high for p in points])
        line, = ax.plot(steps, mean, marker="o" if len(points) <= 20 else None, markersize=3,
                        label=f"{v.variant} ({len(v.seeds)} seed{'s' if len(v.seeds) != 1 else ''})")
        band = np.isfinite(low) & np.isfinite(high)
        if band.any():
            ax.fill_between(steps, np.where(band, low, np.nan), np.where(band, high, np.nan),
                            color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if math.isfinite(report.target_pass_at_1):
        ax.axhline(report.target_pass_at_1, color="grey", linestyle="--", linewidth=1,
                   label=f"{report.baseline_variant} final ({report.target_pass_at_1:.3f})")
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no held-out curve points", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out pass@1")
    ax.set_title("Held-out pass@1: mean over seeds, 95% CI")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """compare.md, compare.png and compare.json in out_dir, each written atomically; returns their paths."""
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in ARTIFACTS.items()}
    write_text(paths["markdown"], markdown(report))
    plot(report, paths["plot"])
    write_json(paths["json"], report.to_dict())
    return paths


# ---------------------------------------------------------------------------------------------------
# MLflow


def metric_key(label: str) -> str:
    """A variant label as a metric-name prefix MLflow accepts: other characters become '_'
    ("train.order=gain_rl" -> "train.order_gain_rl")."""
    key = _METRIC_UNSAFE.sub("_", label).strip("._-")
    return key or "variant"


def summary_metrics(report: Report) -> dict[str, float]:
    """The parent run's metrics (finite values only): `<variant key>.<name>`, plus target_pass_at_1."""
    keys = {v.variant: metric_key(v.variant) for v in report.variants}
    if len(set(keys.values())) != len(keys):
        raise CompareError(f"variant labels {list(keys)} give the same MLflow name after replacing characters "
                           "MLflow rejects; make the labels differ in letters, digits, '.', '_' or '-'")
    metrics = {"target_pass_at_1": report.target_pass_at_1}
    for v in report.variants:
        k = keys[v.variant]
        f = v.final_pass_at_1
        metrics.update({f"{k}.n_seeds": len(v.seeds), f"{k}.final_pass_at_1_mean": f.mean,
                        f"{k}.final_pass_at_1_ci_low": f.ci_low, f"{k}.final_pass_at_1_ci_high": f.ci_high})
        if v.diff_vs_baseline is not None:
            d = v.diff_vs_baseline
            metrics.update({f"{k}.diff_vs_baseline": d.mean, f"{k}.diff_vs_baseline_ci_low": d.ci_low,
                            f"{k}.diff_vs_baseline_ci_high": d.ci_high,
                            f"{k}.diff_vs_baseline_seeds_ci_low": d.seeds_ci_low,
                            f"{k}.diff_vs_baseline_seeds_ci_high": d.seeds_ci_high,
                            f"{k}.diff_vs_baseline_n_pairs": d.n_pairs})
        st = v.steps_to_target
        metrics.update({f"{k}.steps_to_target_mean": st.mean, f"{k}.steps_to_target_ci_low": st.ci_low,
                        f"{k}.steps_to_target_ci_high": st.ci_high, f"{k}.steps_to_target_n_reached": st.n_reached,
                        f"{k}.steps_to_target_n": st.n})
        if v.gain_over_warmup is not None:
            g = v.gain_over_warmup
            metrics.update({f"{k}.gain_over_warmup_mean": g.mean, f"{k}.gain_over_warmup_ci_low": g.ci_low,
                            f"{k}.gain_over_warmup_ci_high": g.ci_high})
    return {name: float(value) for name, value in metrics.items() if math.isfinite(value)}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> dotted keys ("train.order"), leaves unchanged."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _flat_params(params: dict) -> dict[str, str]:
    """Params as MLflow accepts them: dotted keys with other characters replaced, values as text."""
    return {re.sub(r"[^A-Za-z0-9_.\- ]+", "_", key): str(value)[:6000]  # MLflow's param value limit
            for key, value in flatten(params).items()}


def log_to_mlflow(report: Report, runs: Sequence[RunResult], experiment_name: str, tracking_uri: str | None = None,
                  run_name: str = "compare", artifact_location: str | None = None) -> str:
    """Log the report as one parent run (summary metrics, per-variant curves, compare.md/.png/.json) with one
    nested child run per experiment (its params, tags compare.variant / compare.seed / dvc.exp_name, final
    pass@1, gain over warm-up, and its held-out curve as step metrics under the training stage's names,
    heldout/pass_at_1 and heldout/greedy_accuracy). Returns the parent run id.

    tracking_uri None: MLflow's own choice (MLFLOW_TRACKING_URI, else its default store). artifact_location
    is used only when the experiment does not exist yet.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    by_name = {run.name: run for run in runs}
    reported = {r.name for r in report.runs}
    if set(by_name) != reported:
        raise CompareError(f"log_to_mlflow needs the runs the report was built from: missing "
                           f"{sorted(reported - set(by_name))}, not in the report {sorted(set(by_name) - reported)}")
    parent_metrics = summary_metrics(report)  # checks the variant keys before anything is created
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment is not None else \
        client.create_experiment(experiment_name, artifact_location=artifact_location)
    now = int(time.time() * 1000)

    def metrics(values: dict[str, float], step: int = 0) -> list[Metric]:
        return [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(v)]

    parent = client.create_run(experiment_id, run_name=run_name,
                               tags={"compare.baseline_variant": report.baseline_variant})
    parent_id = parent.info.run_id
    try:
        curve_metrics = []
        for v in report.variants:
            k = metric_key(v.variant)
            for p in v.curve:
                curve_metrics += metrics({f"{k}.heldout_pass_at_1_mean": p.pass_at_1.mean,
                                          f"{k}.heldout_pass_at_1_ci_low": p.pass_at_1.ci_low,
                                          f"{k}.heldout_pass_at_1_ci_high": p.pass_at_1.ci_high}, p.step)
        client.log_batch(parent_id, metrics=metrics(parent_metrics) + curve_metrics,
                         params=[Param("baseline_variant", report.baseline_variant[:6000]),
                                 Param("n_boot", str(report.n_boot)), Param("bootstrap_seed", str(report.seed)),
                                 Param("n_runs", str(len(report.runs)))])
        with tempfile.TemporaryDirectory(prefix="rlvr-compare-") as folder:
            for path in write_report(report, folder).values():
                client.log_artifact(parent_id, str(path))
        for r in report.runs:
            run = by_name[r.name]
            child = client.create_run(experiment_id, run_name=r.name, tags={
                "mlflow.parentRunId": parent_id, "compare.variant": r.variant, "compare.seed": str(r.seed),
                "dvc.exp_name": r.name})
            child_id = child.info.run_id
            try:
                values = {"final_pass_at_1": r.final_pass_at_1, "diff_vs_baseline": r.diff_vs_baseline,
                          "steps_to_target": None if r.steps_to_target is None else float(r.steps_to_target)}
                if r.gain_over_warmup is not None:
                    values.update({"gain_over_warmup": r.gain_over_warmup.mean,
                                   "gain_over_warmup_ci_low": r.gain_over_warmup.ci_low,
                                   "gain_over_warmup_ci_high": r.gain_over_warmup.ci_high})
                curve = []
                for row in run.curve.itertuples(index=False):
                    curve += metrics({"heldout/pass_at_1": row.pass_at_1,
                                      "heldout/greedy_accuracy": row.greedy_accuracy}, int(row.step))
                client.log_batch(child_id, metrics=metrics(values) + curve,
                                 params=[Param(k, v) for k, v in _flat_params(run.params).items()])
            except BaseException:
                client.set_terminated(child_id, status="FAILED")
                raise
            client.set_terminated(child_id, status="FINISHED")
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return parent_id
