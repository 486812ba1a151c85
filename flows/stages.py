"""Each DVC stage as a Prefect flow: what every `cmd` in dvc.yaml runs.

A flow loads and validates params.yaml, opens the stage's MLflow run (params, git commit, inputs
with their DVC digests), runs the stage in a Prefect task, logs its metrics to MLflow, and the
dvc.yaml plots its outputs feed as PNG artifacts, and leaves a Prefect table artifact with the metrics. Logic lives in `stages/` and `rlvr/`; this module is wiring.
Retries are deliberately absent here: a stage failure is a bug or bad input, not a flaky call.

Run one stage by hand:  python -m flows prepare   (dvc repro runs the same command)
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from rlvr import config, plots, tracking
from stages import evaluate, prepare, rollout, score, train, warmup
from stages import filter as filter_stage


def _artifact_key(stage: str) -> str:
    return f"{stage}-metrics"


def log_plots(stage: str) -> None:
    """The dvc.yaml plots this stage's outputs feed, as PNG artifacts of its MLflow run (folder plots/)."""
    import mlflow

    _, outputs, _ = tracking.stage_io(stage)
    with tempfile.TemporaryDirectory() as tmp:
        for png in plots.render_for(outputs, Path(tmp)):
            mlflow.log_artifact(str(png), artifact_path="plots")


def run_stage(stage: str, main: Callable[[config.Params], dict], params_file: str) -> dict:
    params = task(config.load, name="load-params")(params_file)
    with tracking.stage_run(stage, params) as run:
        metrics = task(main, name=stage)(params)
        tracking.log_metrics(metrics)
        log_plots(stage)
    rows = [{"metric": k, "value": v} for k, v in tracking.flatten_metrics(metrics).items()]
    create_table_artifact(table=rows, key=_artifact_key(stage),
                          description=f"`{stage}` metrics (MLflow run {run.info.run_id})")
    return metrics


def stage_flow(stage: str, main: Callable[[config.Params], dict]):
    """A Prefect flow named after the stage that runs it through `run_stage`."""

    @flow(name=stage)
    def run(params_file: str = "params.yaml") -> dict:
        return run_stage(stage, main, params_file)

    return run


# In DAG order; the names are the DVC stage names, the Prefect flow names and the MLflow run names.
FLOWS = {name: stage_flow(name, module.main) for name, module in (
    ("prepare", prepare), ("warmup", warmup), ("score", score), ("rollout", rollout),
    ("filter", filter_stage), ("train", train), ("evaluate", evaluate))}
