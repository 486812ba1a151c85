"""1-shot RLVR selection (Wang et al. 2025, "Reinforcement Learning for Reasoning in Large Language
Models with One Training Example", arXiv:2504.20571).

The paper picks its single training example by the *historical variance score*: train once on the
full set, record each example's training accuracy s_{i,e} at every epoch e = 1..E (the fraction of
its rollouts that were correct), and rank examples by

    v_i = var(s_{i,1}, ..., s_{i,E})                                 (paper, Sec. 2, "data selection")

largest first; pi_1, the top example, is the paper's 1-shot setting (it is then repeated to fill
every batch). Examples whose accuracy swings most during training are the ones the paper found
most useful; a constant accuracy (always solved, never solved) gives 0.

Here the history is a run's per-step per-prompt table (one row per step and prompt seen at that
step: step, id, accuracy; `step_accuracy` makes a step's rows from its graded groups, for the
trainer to log). A prompt is not seen at every step, so its variance runs over the steps
at which it was seen; the population variance (ddof = 0) over at least `min_observations` values.
The reference release (data/data_selection.py of the paper's code) ranks by numpy's `np.std` of
each example's per-epoch accuracy list, which is ddof = 0 and gives the same order as the variance;
it repeats the chosen example 128 times to make a training file. With every prompt seen equally
often (the paper's epochs) ddof would not change the ranking anyway. Ties go by id. Prompts with fewer observations
are ranked last and never selected (counted in `eligible`).

`select_top(ranking, m)` keeps the top m (m = 1: the paper's setting) and `write_selection`
writes them atomically as a parquet with an `id` column, the shape `train` reads for a prompt set
(as `data/curated/prompts.parquet`); `train`'s TRL sampler then repeats the m prompts to fill every
step (rlvr.grpo.prompt_plan cycles a set smaller than K).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rlvr import config
from rlvr.curation.base import Groups, settings_from
from rlvr.io import write_parquet

NAME = "one_shot"
HISTORY_COLUMNS = ("step", "id", "accuracy")
SELECTION_COLUMNS = ("id", "variance", "mean_accuracy", "n_observations", "rank")


# The settings live in rlvr/config.py with the other params (validated when params.yaml loads).
OneShotSettings = config.OneShotSelection


def settings(values: Mapping[str, Any] | None) -> OneShotSettings:
    return settings_from(OneShotSettings, f"curation.{NAME}", values)


def step_accuracy(step: int, groups: Groups, ids: Sequence[str]) -> pd.DataFrame:
    """The rows of the history table for one training step: per prompt (dataset row -> `ids`), the
    fraction of its graded rollouts that are correct. A prompt drawn twice in a step pools its
    rollouts; a prompt with no graded rollout gets no row."""
    correct: dict[int, float] = {}
    graded: dict[int, int] = {}
    for row, rewards in zip(groups.prompts, groups.rewards, strict=True):
        grades = rewards[~np.isnan(rewards)]
        correct[row] = correct.get(row, 0.0) + float((grades >= 1.0).sum())
        graded[row] = graded.get(row, 0) + grades.size
    rows = [row for row in correct if graded[row] > 0]
    return pd.DataFrame({"step": np.full(len(rows), step, dtype=np.int64), "id": [str(ids[r]) for r in rows],
                         "accuracy": [correct[r] / graded[r] for r in rows]}, columns=list(HISTORY_COLUMNS))


def accuracy_history(table: pd.DataFrame) -> pd.DataFrame:
    """Steps x prompts matrix of training accuracy (NaN where a prompt was not seen at a step) from
    a long table with columns step, id, accuracy (one row per step and prompt)."""
    missing = [c for c in HISTORY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"the accuracy history needs columns {list(HISTORY_COLUMNS)}; missing {missing}")
    duplicated = table.duplicated(["step", "id"])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise ValueError(f"the accuracy history has more than one row for step {row['step']}, id {row['id']!r}")
    accuracy = table["accuracy"].astype(float)
    if ((accuracy < 0) | (accuracy > 1)).any():
        raise ValueError("accuracy values must lie in [0, 1] (fraction of a prompt's rollouts correct)")
    matrix = table.assign(accuracy=accuracy).pivot(index="step", columns="id", values="accuracy")
    return matrix.sort_index()


def rank_by_variance(history: pd.DataFrame, min_observations: int = 2) -> pd.DataFrame:
    """One row per prompt (a column of `history`): variance over its observed steps, mean, count,
    rank (0 = largest variance) and eligible; eligible prompts first by variance descending, ties by
    id, then the others by id."""
    values = history.to_numpy(dtype=np.float64)
    observed = ~np.isnan(values)
    n_obs = observed.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_obs > 0, np.nansum(values, axis=0) / np.maximum(n_obs, 1), np.nan)
        variance = np.where(observed, (values - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n_obs, 1)
    eligible = n_obs >= min_observations
    variance = np.where(eligible, variance, np.nan)
    frame = pd.DataFrame({"id": [str(c) for c in history.columns], "variance": variance, "mean_accuracy": mean,
                          "n_observations": n_obs.astype(np.int64), "eligible": eligible})
    order = sorted(range(len(frame)), key=lambda i: (not eligible[i], -variance[i] if eligible[i] else 0.0,
                                                     frame["id"].iat[i]))
    frame = frame.iloc[order].reset_index(drop=True)
    frame["rank"] = np.arange(len(frame), dtype=np.int64)
    return frame


def select_top(ranking: pd.DataFrame, m: int) -> pd.DataFrame:
    """The top m eligible prompts of `rank_by_variance`, columns SELECTION_COLUMNS."""
    eligible = ranking[ranking["eligible"]]
    if len(eligible) < m:
        raise ValueError(f"curation.{NAME}.m = {m}: only {len(eligible)} prompts have enough accuracy values "
                         f"for a variance (of {len(ranking)}); lower m or min_observations, or train longer")
    return eligible.head(m)[list(SELECTION_COLUMNS)].reset_index(drop=True)


def write_selection(path: str | Path, selection: pd.DataFrame) -> None:
    """Write the selection atomically (rlvr.io): a parquet with an `id` column, read by `train` as a
    prompt set."""
    missing = [c for c in SELECTION_COLUMNS if c not in selection.columns]
    if missing:
        raise ValueError(f"a 1-shot selection needs columns {list(SELECTION_COLUMNS)}; missing {missing}")
    write_parquet(path, selection[list(SELECTION_COLUMNS)])


def select(table: pd.DataFrame, values: Mapping[str, Any] | None) -> pd.DataFrame:
    """Settings + long accuracy table -> the top m prompts (what a `one_shot` stage would write)."""
    s = settings(values)
    return select_top(rank_by_variance(accuracy_history(table), s.min_observations), s.m)
