"""MLflow tracking for stage runs: one run per stage execution, with lineage through DVC digests.

Each stage run records the params, the git commit, the DVC stage name, every data/model input as an
MLflow dataset input whose digest is the md5 DVC records for it in dvc.lock, and every output's md5
as a tag (`output:<path>`), so a model can be traced back through the runs that produced its inputs.
Inputs and outputs come from the stage's entry in dvc.yaml, the one place they are declared.

The store is addressed by an absolute path: `dvc exp run` may execute a stage in a temporary copy
of the repository, and DVC then points `DVC_ROOT` at the original project, where the store lives.
`MLFLOW_TRACKING_URI` overrides everything (a running `mlflow server`, say).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import yaml

from rlvr.config import Params, to_flat_dict
from rlvr.io import dvc_md5

log = logging.getLogger(__name__)

DATA_PREFIXES = ("data/", "models/")
PARENT_RUN_ENV = "RLVR_PARENT_RUN_ID"


def project_root() -> Path:
    """The original project folder, also when DVC runs the stage in a temporary copy."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(params: Params) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def artifact_location() -> str:
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
    """Create the project's experiment (artifacts under mlruns/) if needed, make it current, return its id."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        mlflow.create_experiment(params.tracking.experiment, artifact_location=artifact_location())
    return mlflow.set_experiment(params.tracking.experiment).experiment_id


@contextlib.contextmanager
def stage_run(stage: str, params: Params, dvc_file: Path = Path("dvc.yaml")) -> Iterator[object]:
    """An MLflow run for one stage execution; yields the run, tags outputs when the block succeeds."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    inputs, outputs, sections = stage_io(stage, dvc_file)
    mlflow.set_tracking_uri(tracking_uri(params))
    ensure_experiment(params)
    tags = {"dvc.stage": stage, "git.commit": git_commit(), "project.root": str(project_root())}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(_stage_params(params, sections))
        for path in inputs:
            if Path(path).exists():
                with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local files
                    warnings.simplefilter("ignore", UserWarning)
                    source = resolve_dataset_source(str(Path(path).resolve()))
                dataset = MetaDataset(source=source, name=path, digest=dvc_md5(path))
                mlflow.log_input(dataset, context="input")
        yield run
        for path in outputs:
            if Path(path).exists():
                mlflow.set_tag(f"output:{path}", dvc_md5(path))


def log_metrics(metrics: dict) -> None:
    import mlflow

    mlflow.log_metrics(flatten_metrics(metrics))
