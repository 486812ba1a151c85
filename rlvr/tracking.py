"""MLflow tracking for stage runs: one run per stage execution, with lineage through DVC digests.

Each stage run records the params, the git commit, the DVC stage name, every data/model input as an
MLflow dataset input whose digest is the md5 DVC records for it in dvc.lock, and every output's md5
as a tag (`output:<path>`), so a model can be traced back through the runs that produced its inputs.
Inputs and outputs come from the stage's entry in dvc.yaml, the one place they are declared.

The store is addressed by an absolute path: `dvc exp run` may execute a stage in a temporary copy
of the repository, and DVC then points `DVC_ROOT` at the original project, where the store lives.
`MLFLOW_TRACKING_URI` overrides everything (a running `mlflow server`, say).

A run ends FINISHED, FAILED (an exception) or KILLED (an interrupt: Ctrl-C, or the SIGTERM Prefect
turns into an exception). A SIGKILL ends nothing, so each run is tagged with its process (host, pid
and the process's start time, which tells a reused pid apart), and the next stage run (of any stage)
or `rlvr services status` marks RUNNING runs whose process is gone as KILLED (flows/sweep.py). What is
not covered: runs from another host (their processes cannot be checked from here; they stay RUNNING)
and runs without those tags (from older versions, or where /proc is missing).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import subprocess
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path

import yaml

from rlvr.config import Params, to_flat_dict
from rlvr.io import dvc_md5

log = logging.getLogger(__name__)

DATA_PREFIXES = ("data/", "models/")
PARENT_RUN_ENV = "RLVR_PARENT_RUN_ID"
PROCESS_TAGS = ("process.host", "process.pid", "process.start")
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless the experiment says otherwise
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
GONE_TAG = "process.gone"  # set on a run marked KILLED because its process was gone


def project_root() -> Path:
    """The original project folder, also when DVC runs the stage in a temporary copy."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def artifact_location(uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: mlruns/artifacts for a local store; None (the server's
    choice) when `uri` is a tracking server, which may proxy artifacts (mlflow-artifacts:/) so that
    clients never write to the storage themselves."""
    if uri and uri.startswith(("http://", "https://")):
        return None
    return (project_root() / "mlruns" / "artifacts").as_uri()


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def stage_io(stage: str, dvc_file: Path = Path("dvc.yaml")) -> tuple[list[str], list[str], list[str]]:
    """(data/model inputs, outputs, params sections) of `stage` as declared in dvc.yaml."""
    spec = yaml.safe_load(dvc_file.read_text())["stages"].get(stage)
    if spec is None:
        raise KeyError(f"{dvc_file}: no stage {stage!r}")

    def names(entries: list) -> list[str]:
        return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]

    inputs = [d for d in names(spec.get("deps")) if d.startswith(DATA_PREFIXES)]
    outputs = names(spec.get("outs")) + names(spec.get("metrics")) + names(spec.get("plots"))
    sections = []
    for entry in spec.get("params") or []:
        sections.extend(entry.keys() if isinstance(entry, dict) else [entry])
    return inputs, outputs, sections


def log_input(mlflow, dataset, attempts: int = 3) -> None:
    """`mlflow.log_input(dataset)`, retried when the store reports the dataset as a duplicate.

    The tracking server inserts a new (experiment, name, digest) dataset without a lock: two stage
    runs logging the same input at the same moment (two DVC experiments started together) make one
    of them fail with a unique-constraint violation on PostgreSQL (`dataset_pk`; seen in
    tests/test_concurrent_experiments.py). On the retry the dataset exists and is only linked.
    """
    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context="input")
            return
        except mlflow.exceptions.MlflowException as error:
            text = str(error)
            duplicate = "UniqueViolation" in text or "UNIQUE constraint failed" in text or "already exists" in text
            if not duplicate or attempt == attempts - 1:
                raise
            log.warning("MLflow: input %s was being logged by another run at the same time; retrying", dataset.name)


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> "a.b" keys, numbers only (DVC flattens metrics files the same way)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[name] = float(value)
    return flat


def _stage_params(params: Params, sections: list[str]) -> dict[str, str]:
    out = {}
    for section in sections:
        value = params
        for part in section.split("."):
            value = getattr(value, part)
        flat = to_flat_dict(value, f"{section}.")
        out.update({k: str(v)[:6000] for k, v in flat.items()})
    return out


def ensure_experiment(params: Params) -> str:
    """Create the project's experiment (artifacts under mlruns/) if needed, make it current, return its id.
    It is marked as model training, so MLflow 3's UI opens it on its runs table rather than on GenAI traces."""
    import mlflow

    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        try:
            mlflow.create_experiment(params.tracking.experiment,
                                     artifact_location=artifact_location(tracking_uri(params)))
        except MlflowException as error:  # a concurrent stage (another `dvc exp run`) created it first
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    current = mlflow.set_experiment(params.tracking.experiment)
    if current.tags.get(EXPERIMENT_KIND_TAG) is None:  # the user's own choice of view, if any, stays
        mlflow.MlflowClient().set_experiment_tag(current.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return current.experiment_id


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI's page of a run when `uri` is a tracking server (it serves the UI), else None."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# MLflow 3's UI opens an experiment (and its model registry) in the GenAI view unless the page asks for
# the model-training one; the URLs the project prints ask for it.
TRAINING_VIEW = "workflowType=machine_learning"


def runs_table_url(uri: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment, in the model-training view."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def registry_url(uri: str, model: str | None = None) -> str:
    """The MLflow UI's model registry (or one registered model's page), in the model-training view."""
    page = "models" if model is None else f"models/{urllib.parse.quote(model, safe='')}"
    return f"{uri.rstrip('/')}/#/{page}?{TRAINING_VIEW}"


def process_start(pid: int) -> str | None:
    """`<boot id>:<start time in clock ticks>` of process `pid`, from /proc: with the pid, it names one
    process for the life of the machine (a pid is reused, its start time is not). None when there is
    no such process, when it has exited (a zombie), or when there is no /proc (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces: count fields after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    state, start = fields[0], fields[19]  # fields 3 and 22 of proc(5)
    return None if state in ("Z", "X") else f"{boot}:{start}"


def process_tags() -> dict[str, str]:
    """This process, as the tags that let a later run tell whether it still runs (none without /proc)."""
    start = process_start(os.getpid())
    if start is None:
        return {}
    return dict(zip(PROCESS_TAGS, (socket.gethostname(), str(os.getpid()), start)))


def process_gone(tags: dict[str, str]) -> bool:
    """True only when the tagged process provably no longer runs: same host, and that pid is now
    absent or a different process. Untagged runs and other hosts' runs count as alive."""
    host, pid, start = (tags.get(key) for key in PROCESS_TAGS)
    if not (host and pid and start) or host != socket.gethostname() or process_start(os.getpid()) is None:
        return False
    return process_start(int(pid)) != start


def close_orphaned_runs(stage: str | None, params: Params) -> list[tuple[object, str]]:
    """Mark the RUNNING runs of `stage` (None: of every stage) whose process is gone (killed by SIGKILL,
    or the machine went down) as KILLED; returns (run, reason) for each. Runs of live processes, e.g. a
    concurrent `dvc exp run`, are left alone. Call it before `stage_run`."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(params))
    client = MlflowClient()
    only = f"tags.`dvc.stage` = '{stage}' and " if stage else ""
    running = client.search_runs([ensure_experiment(params)], filter_string=f"{only}attributes.status = 'RUNNING'")
    closed = []
    for run in running:
        tags = run.data.tags
        if process_gone(tags):
            reason = (f"process {tags['process.pid']} on {tags['process.host']} was gone when pid {os.getpid()} "
                      f"looked (a {tags.get('dvc.stage', 'stage')} run killed, e.g. by SIGKILL)")
            client.set_tag(run.info.run_id, GONE_TAG, reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            log.warning("MLflow run %s marked KILLED: %s", run.info.run_id, reason)
            closed.append((run, reason))
    return closed


@contextlib.contextmanager
def stage_run(stage: str, params: Params, dvc_file: Path = Path("dvc.yaml"),
              tags: dict[str, str] | None = None) -> Iterator[object]:
    """An MLflow run for one stage execution; yields the run, tags outputs when the block succeeds.

    The run ends FINISHED, FAILED when the block raises an exception, or KILLED when it is
    interrupted (KeyboardInterrupt, or another BaseException such as Prefect's TerminationSignal
    for SIGTERM). `tags` are added to the run's tags (a Prefect flow run id, say)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    inputs, outputs, sections = stage_io(stage, dvc_file)
    mlflow.set_tracking_uri(tracking_uri(params))
    ensure_experiment(params)
    run_tags = {"dvc.stage": stage, "git.commit": git_commit(), "project.root": str(project_root()),
                **process_tags(), **(tags or {})}
    if os.environ.get("DVC_EXP_NAME"):
        run_tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        run_tags["mlflow.parentRunId"] = parent
    run = mlflow.start_run(run_name=stage, tags=run_tags)
    try:
        mlflow.log_params(_stage_params(params, sections))
        for path in inputs:
            if Path(path).exists():
                with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
                    warnings.simplefilter("ignore", UserWarning)
                    source = resolve_dataset_source(str(Path(path).resolve()))
                dataset = MetaDataset(source=source, name=path, digest=dvc_md5(path))
                log_input(mlflow, dataset)
        yield run
        for path in outputs:
            if Path(path).exists():
                mlflow.set_tag(f"output:{path}", dvc_md5(path))
    except Exception:
        mlflow.end_run("FAILED")
        raise
    except BaseException:  # interrupted from outside: the stage was stopped, not broken
        _end_killed(run.info.run_id)
        raise
    mlflow.end_run("FINISHED")


def _end_killed(run_id: str) -> None:
    """End the active run KILLED, best effort: the interrupt may have landed inside one of MLflow's own
    writes (SQLite then stays locked until this process exits). The interrupt must go on regardless,
    and the run keeps its process tags, so the stage's next run closes it."""
    import mlflow

    try:
        mlflow.end_run("KILLED")
    except Exception as error:  # noqa: BLE001 - any failure here must not replace the interrupt
        log.warning("could not mark MLflow run %s KILLED now (%s); the stage's next run will", run_id, error)


def log_metrics(metrics: dict) -> None:
    import mlflow

    mlflow.log_metrics(flatten_metrics(metrics))
