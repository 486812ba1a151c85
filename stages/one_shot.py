"""Stage `one_shot`: 1-shot RLVR selection (Wang et al. 2025, arXiv:2504.20571), an offline prompt set.

The input is a training run's per-step per-prompt accuracy (`step, id, accuracy`: the fraction of the
prompt's rollouts graded correct at that step), the table every `train` run writes to
data/trained/prompt_accuracy.parquet. Each prompt's historical variance score is the variance of its
accuracy over the steps it was seen (rlvr/curation/one_shot.py); the top `curation.one_shot.m`
prompts become the prompt set `train.prompts: one_shot` trains on (m = 1: the paper's setting, the
one prompt repeated to fill every step).

The history is an input, not this pipeline's own train output (that would be a cycle in the DAG):
data/one_shot/history.parquet is a copy of a finished run's table, git-tracked, with its origin in
data/one_shot/SOURCE.md. To select from your own run: copy its data/trained/prompt_accuracy.parquet
there and `dvc repro one_shot`.

`train` checks that the selected ids are in its training set (a history from other data selects
prompts it does not have).

Inputs:  data/one_shot/history.parquet
Outputs: data/curated/one_shot.parquet (id, variance, mean_accuracy, n_observations, rank),
         metrics/one_shot.json
Run:     dvc repro one_shot   (or: python -m flows one_shot)
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlvr.config import Params
from rlvr.curation import one_shot
from rlvr.io import read_parquet, write_json

log = logging.getLogger(__name__)

HISTORY = Path("data/one_shot/history.parquet")
OUTPUT = Path("data/curated/one_shot.parquet")
METRICS = Path("metrics/one_shot.json")


def run(params: Params, history_path: Path = HISTORY):
    """The ranking of every prompt in the history, the selection, and the stage's metrics."""
    settings = params.curation.one_shot
    table = read_parquet(history_path, required=one_shot.HISTORY_COLUMNS)
    if table.empty:
        raise ValueError(f"{history_path}: no rows (copy a finished run's data/trained/prompt_accuracy.parquet here)")
    try:
        ranking = one_shot.rank_by_variance(one_shot.accuracy_history(table), settings.min_observations)
        selection = one_shot.select_top(ranking, settings.m)
    except ValueError as error:
        raise ValueError(f"{history_path}: {error}") from error
    metrics = {
        "history_steps": int(table["step"].nunique()),
        "history_prompts": int(len(ranking)),
        "eligible_prompts": int(ranking["eligible"].sum()),
        "selected": int(len(selection)),
        "top_variance": float(selection["variance"].iloc[0]),
        "top_mean_accuracy": float(selection["mean_accuracy"].iloc[0]),
    }
    return ranking, selection, metrics


def main(params: Params) -> dict:
    _, selection, metrics = run(params)
    one_shot.write_selection(OUTPUT, selection)
    write_json(METRICS, metrics)
    log.info("one_shot: %d of %d eligible prompts selected (top variance %.4f, id %s)", metrics["selected"],
             metrics["eligible_prompts"], metrics["top_variance"], selection["id"].iloc[0])
    return metrics
