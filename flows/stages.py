"""Each DVC stage as a Prefect flow: what every `cmd` in dvc.yaml runs.

A flow loads and validates params.yaml, opens the stage's MLflow run (params, git commit, inputs
with their DVC digests), runs the stage in a Prefect task, logs its metrics to MLflow, and the
dvc.yaml plots its outputs feed as PNG artifacts, and leaves a Prefect table artifact with the metrics.
Logic lives in `stages/` and `rlvr/`; this module is wiring.
Retries are deliberately absent here: a stage failure is a bug or bad input, not a flaky call.

The two records point at each other. The flow run gets a link artifact `<stage>-mlflow-run` (dashes
for underscores: `one-shot-mlflow-run`), made as
soon as the MLflow run exists (a killed stage has it too): the run's page in the MLflow UI when
MLFLOW_TRACKING_URI is a tracking server (`rlvr services up`), else a note with the run id and how to
open the local store. The MLflow run gets tags `prefect.flow_run_id` and, when a Prefect server with a
UI runs (not the temporary one), `prefect.flow_run_url`. Long stages log progress lines (step, rate,
ETA, loss/reward) that Prefect shows in the flow run's logs (rlvr/progress.py).

A stage process leaves nothing behind when it is stopped:
- without PREFECT_API_URL, Prefect's temporary server is started first and dies with the process,
  even on SIGKILL (flows/temporary_server.py);
- Ctrl-C and SIGTERM end the flow run Crashed (Prefect turns SIGTERM into an exception) and the MLflow
  run KILLED (rlvr/tracking.py);
- a SIGKILL ends nothing, so the next stage run (any stage) or `rlvr services status` marks the runs it
  left open as KILLED (MLflow) and Crashed (Prefect, with its task runs): both records carry the
  process that ran them (flows/sweep.py).

With `launch.processes x launch.machines > 1`, the flows of score, rollout, train and evaluate run
the stage as a multi-process job (flows/launch.py) inside the same task, MLflow run and artifacts;
each rank runs `run_worker`.

Run one stage by hand:  python -m flows prepare   (dvc repro runs the same command)
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL

from flows import LOGGERS, launch, sweep
from rlvr import config, plots, tracking
from rlvr.errors import RlvrError, log_file, one_line, write_traceback
from rlvr.io import write_json
from stages import evaluate, one_shot, prepare, rollout, score, train, warmup
from stages import filter as filter_stage


FLOW_RUN_TAG = sweep.FLOW_RUN_TAG
FLOW_RUN_URL_TAG = sweep.FLOW_RUN_URL_TAG


def log_plots(stage: str) -> None:
    """The dvc.yaml plots this stage's outputs feed, as PNG artifacts of its MLflow run (folder plots/)."""
    import mlflow

    _, outputs, _ = tracking.stage_io(stage)
    with tempfile.TemporaryDirectory() as tmp:
        for png in plots.render_for(outputs, Path(tmp)):
            mlflow.log_artifact(str(png), artifact_path="plots")


def run_stage(stage: str, main: Callable[[config.Params], dict], params_file: str) -> dict:
    sweep.label_flow_run(flow_run.id)
    params = task(config.load, name="load-params")(params_file)
    sweep.sweep(params)
    with tracking.stage_run(stage, params, tags=sweep.flow_run_tags()) as run:
        sweep.link_mlflow_run(stage, run, params)
        if params.launch.distributed and stage in launch.STAGES:
            metrics = task(launch.run_job, name=stage)(params, stage, params_file, run.info.run_id)
        else:
            metrics = task(main, name=stage)(params)
        tracking.log_metrics(metrics)
        log_plots(stage)
    rows = [{"metric": k, "value": v} for k, v in tracking.flatten_metrics(metrics).items()]
    create_table_artifact(table=rows, key=sweep.artifact_key(stage, "metrics"),
                          description=f"`{stage}` metrics (MLflow run {run.info.run_id})")
    return metrics


def stage_flow(stage: str, main: Callable[[config.Params], dict]):
    """A Prefect flow named after the stage that runs it through `run_stage`."""

    @flow(name=stage)
    def run(params_file: str = "params.yaml") -> dict:
        return run_stage(stage, main, params_file)

    return run


def run_in_process(prefect_flow: Callable[..., dict], params_file: str = "params.yaml") -> dict:
    """What `python -m flows STAGE` calls: the temporary Prefect server first, from the main thread so
    that it is tied to this process (only without PREFECT_API_URL), then the stage's flow."""
    if not PREFECT_API_URL.value():
        from flows import temporary_server  # imports Prefect's server app: only when one is needed

        temporary_server.start()
    return prefect_flow(params_file=params_file)


# In DAG order; the names are the DVC stage names, the Prefect flow names and the MLflow run names.
MAINS = {"prepare": prepare.main, "warmup": warmup.main, "score": score.main, "rollout": rollout.main,
         "filter": filter_stage.main, "one_shot": one_shot.main, "train": train.main, "evaluate": evaluate.main}
FLOWS = {name: partial(run_in_process, stage_flow(name, main)) for name, main in MAINS.items()}


@contextlib.contextmanager
def stage_run_of_job(params: config.Params, rank: int) -> Iterator[None]:
    """Rank 0 of a launched job logs into the stage's MLflow run (the flow's, resumed here): what a stage
    logs while it runs (GRPO's step metrics) lands where it does in-process. MLflow marks the run
    FINISHED or FAILED when the rank leaves it; the flow then logs the metrics and ends the run again,
    so the run's final state is the flow's."""
    run_id = os.environ.get(launch.RUN_ID_ENV)
    if rank != 0 or not run_id:
        yield
        return
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(params))
    with mlflow.start_run(run_id=run_id):
        yield


def run_worker(stage: str, params_file: str, result: Path) -> int:
    """One rank of a launched stage (`python -m flows STAGE --worker-result R`, flows/launch.py): the stage's
    main; rank 0 writes its metrics to `result`. An expected error is one marked line (the launching flow
    reports it as the stage's error) and its traceback goes to logs/<stage>.rank<N>.log."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for name in LOGGERS.split(","):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        params = config.load(params_file)
        with stage_run_of_job(params, rank):
            metrics = MAINS[stage](params)
    except RlvrError as error:
        write_traceback(log_file(f"{stage}.rank{rank}"), stage, error)
        print(f"{launch.EXPECTED_MARK}{one_line(error)}", flush=True)
        return 1
    if rank == 0:
        write_json(result, metrics)
    return 0
