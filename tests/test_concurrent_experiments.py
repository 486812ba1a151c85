"""Two DVC experiments at once, each recording its stage runs in MLflow, per MLflow store.

The module fixture builds the small project (tests/test_pipeline.make_repo), runs the whole DAG once
with `dvc repro` and commits the outputs. Each test copies that project, starts the services the
way a user does (`rlvr services up`, MLflow on PostgreSQL or on SQLite), queues two experiments
(`dvc exp run --queue -S train.seed=.. -S evaluate.temperature=..`) and runs them at once with
`dvc queue start -j 2` (flows.grid.run_queue, what `rlvr grid -j 2` does), each in its own copy of
the repository under .dvc/tmp/exps, each rerunning `train` and `evaluate` (DVC's cache serves the
stages before). The stages find the servers through the environment DVC's queue workers inherit
(MLFLOW_TRACKING_URI, PREFECT_API_URL, as `rlvr grid` sets them). Then the test reads the store back:
for each experiment exactly one FINISHED run of `train` and one of `evaluate`, tagged with the
experiment's name, with the experiment's own params, the input digests its dvc.lock records and
metrics equal to its metrics files, and runs of the two experiments open at the same time. The third
case runs the same experiments without any server: the stages write to mlruns/mlflow.db directly (what
`dvc exp run` does by default) and each starts Prefect's temporary server. Each test prints its
numbers (runs recorded, seconds); run with `-s` to see them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from flows import postgres, services
from rlvr.tracking import flatten_metrics
from tests.conftest import free_port
from tests.test_pipeline import GIT_IDENTITY, STAGES, _dvc, make_repo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# name -> (train.seed, evaluate.temperature); params.yaml has 0 and 1.0. With the small config a new
# train.seed alone leaves models/policy byte-identical (4 GRPO steps of a model that solves almost
# nothing: equal rewards in every group, zero advantage), so DVC skips `evaluate`; the temperature
# makes it rerun. Both values are checked in the stage runs.
EXPERIMENTS = {"conc-11": (11, 0.7), "conc-12": (12, 0.8)}
RERUN = ("train", "evaluate")
METRICS = {"train": "metrics/train.json", "evaluate": "metrics/eval.json"}


def _git(repo: Path, *args: str) -> str:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    return subprocess.run([*git, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The small project after one full `dvc repro`, outputs committed (the experiments' baseline)."""
    repo = make_repo(tmp_path_factory.mktemp("baseline"))
    _dvc(repo, "repro")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "pipeline outputs")
    return repo


_IGNORE = {".": ["mlruns"], ".dvc": ["tmp"]}  # each test starts with an empty MLflow store and no DVC queue


def _copy(baseline: Path) -> Path:
    """A copy of the baseline project in a folder every user may traverse: as root, PostgreSQL runs as an
    unprivileged user who must reach .services/postgres (pytest's tmp_path is private to root)."""
    project = Path(tempfile.mkdtemp(prefix="rlvr-conc-"))
    shutil.copytree(baseline, project, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda folder, names: _IGNORE.get(Path(folder).relative_to(baseline).as_posix(), []))
    project.chmod(0o711)  # after the copy, which gives it the baseline's mode (private to its owner)
    return project


def _run_experiments(project: Path) -> tuple[dict[str, str], float]:
    """Queue the experiments (`dvc exp run --queue`) and run them 2 at once (`dvc queue start -j 2`, through
    flows.grid.run_queue, what `rlvr grid` does), with the services' environment, as `rlvr grid` passes it
    to DVC's queue workers. Returns each experiment's final queue state and the wall time."""
    from flows import grid

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "DVC_", "RLVR_"))}
    env.update(GIT_IDENTITY, PYTHONPATH=str(project), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **services.environment(project))
    started = time.monotonic()
    for name, (seed, temperature) in EXPERIMENTS.items():
        subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "run", "--queue", "--name", name,
                        "-S", f"train.seed={seed}", "-S", f"evaluate.temperature={temperature}"],
                       cwd=project, env=env, capture_output=True, text=True, check=True)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # grid.run_queue starts `dvc queue start` with this process's environment
    try:
        states = grid.run_queue(project, list(EXPERIMENTS), jobs=2, poll_s=5.0)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return states, time.monotonic() - started


def _experiments(project: Path) -> dict[str, str]:
    """name -> commit of each finished experiment of the grid."""
    refs = _git(project, "for-each-ref", "--format=%(objectname) %(refname:lstrip=-1)", "refs/exps").split("\n")
    found = dict(reversed(line.split(" ", 1)) for line in refs if line)
    return {name: found.get(name) for name in EXPERIMENTS}


def _show(project: Path, rev: str, path: str) -> str:
    return _git(project, "show", f"{rev}:{path}")


def _queue_log(project: Path, name: str) -> str:
    """What the experiment's run printed (`dvc queue logs NAME`)."""
    ran = subprocess.run([str(Path(sys.executable).parent / "dvc"), "queue", "logs", name], cwd=project,
                         capture_output=True, text=True)
    return ran.stdout + ran.stderr


def _stage_ran(project: Path, name: str) -> list[str]:
    """The stages whose 'Running stage' line is in the experiment's queue log."""
    out = _queue_log(project, name)
    return [stage for stage in STAGES if f"Running stage '{stage}'" in out]


def _recorded(project: Path, tracking_uri: str) -> dict[str, list]:
    """The grid's runs in the store, per experiment name (the dvc.exp_name tag DVC's queue sets)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    params = yaml.safe_load((project / "params.yaml").read_text())
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`dvc.exp_name` LIKE 'conc-%'",
                              max_results=1000)
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.data.tags["dvc.exp_name"], []).append(run)
    return found


def _check_recorded(project: Path, recorded: dict[str, list]) -> None:
    """Each experiment: one FINISHED run per rerun stage, with the experiment's own params, input digests
    (those its dvc.lock records) and metrics (those its metrics files hold)."""
    experiments = _experiments(project)
    assert sorted(recorded) == sorted(experiments), sorted(recorded)
    for name, rev in experiments.items():
        seed, temperature = EXPERIMENTS[name]
        mine = recorded[name]
        assert sorted(r.info.run_name for r in mine) == sorted(RERUN), (name, [r.info.run_name for r in mine])
        lock = yaml.safe_load(_show(project, rev, "dvc.lock"))["stages"]
        for run in mine:
            stage = run.info.run_name
            assert run.info.status == "FINISHED", (name, stage, run.info.status)
            assert run.data.tags["dvc.stage"] == stage
            if stage == "train":
                assert run.data.params["train.seed"] == str(seed), (name, run.data.params["train.seed"])
            else:
                assert float(run.data.params["evaluate.temperature"]) == temperature, name
                assert "train.seed" not in run.data.params  # evaluate reads no train params
            digests = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
            expected = {dep["path"]: dep["md5"] for dep in lock[stage]["deps"]
                        if dep["path"].startswith(("data/", "models/")) and not dep["path"].startswith("data/sources")}
            assert digests == expected, (name, stage)
            # the metrics file's values; the train run also holds TRL's per-step training metrics
            written = flatten_metrics(json.loads(_show(project, rev, METRICS[stage])))
            assert {k: run.data.metrics.get(k) for k in written} == pytest.approx(written, rel=1e-12), (name, stage)
        assert {r.data.tags["output:models/policy"] for r in mine if r.info.run_name == "train"} == \
            {next(o["md5"] for o in lock["train"]["outs"] if o["path"] == "models/policy")}


def _overlap_s(recorded: dict[str, list]) -> float:
    """Seconds during which every experiment had a stage run open (> 0: they really ran at once)."""
    spans = [(min(r.info.start_time for r in runs), max(r.info.end_time or 0 for r in runs))
             for runs in recorded.values()]
    return (min(end for _, end in spans) - max(start for start, _ in spans)) / 1000


def _wait_for_queue_workers(project: Path, timeout_s: float = 60.0) -> None:
    """DVC's queue workers exit about 10 s after the queue runs dry; wait, so the project can go."""
    dvc = str(Path(sys.executable).parent / "dvc")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([dvc, "queue", "status"], cwd=project, capture_output=True, text=True).stdout
        if "Worker status: 0 active, 0 idle" in out:
            return
        time.sleep(2.0)


@pytest.mark.parametrize("store", [
    pytest.param("postgres", marks=pytest.mark.skipif(
        postgres.bindir() is None,
        reason="no PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql/*/bin")),
    # SQLite through the server: both experiments completed and every run was recorded (docs/services.md);
    # run on demand (RLVR_TEST_SQLITE=1) to keep CI's time for the PostgreSQL case the issue asks for.
    pytest.param("sqlite-server", marks=pytest.mark.skipif(
        not os.environ.get("RLVR_TEST_SQLITE"), reason="SQLite through the server: RLVR_TEST_SQLITE=1 runs it")),
    # measured: one of the two experiments failed, or both left the fresh store half-migrated (MLflow's
    # SQLite schema migration raced between them); docs/services.md, "Two experiments at once"
    # Not run by default (it costs CI minutes to show a known failure); RLVR_TEST_SQLITE_RACE=1 runs it.
    pytest.param("sqlite-no-server", marks=pytest.mark.xfail(
        reason="two experiments creating a new SQLite store at once race in MLflow's migration", strict=False,
        run=bool(os.environ.get("RLVR_TEST_SQLITE_RACE")))),
])
def test_two_experiments_at_once_record_every_stage_run_with_their_own_inputs_and_metrics(baseline, store):
    project = _copy(baseline)
    running = {}
    try:
        started = time.monotonic()
        if store != "sqlite-no-server":
            running = services.up(project, prefect_port=free_port(), mlflow_port=free_port(),
                                  backend=store.removesuffix("-server"), timeout_s=300)
        up_s = time.monotonic() - started
        states, grid_s = _run_experiments(project)
        tracking_uri = running["mlflow"].url if running else f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
        recorded = _recorded(project, tracking_uri)
        runs = sum(len(r) for r in recorded.values())
        overlap = _overlap_s(recorded) if len(recorded) == len(EXPERIMENTS) else 0.0
        print(f"\n{store}: {len(EXPERIMENTS)} experiments at once, queue states {states}: {runs} of "
              f"{len(EXPERIMENTS) * len(RERUN)} stage runs recorded, experiments {grid_s:.0f} s, overlapped "
              f"{overlap:.0f} s (services up {up_s:.0f} s)")
        failed = {name: _queue_log(project, name)[-3000:] for name, state in states.items() if state != "Success"}
        for name, log in failed.items():
            print(f"--- {name} ({states[name]}), end of `dvc queue logs {name}`:\n{log}")
        assert not failed, f"experiments did not succeed: {states}; their logs are printed above"
        for name in _experiments(project):
            assert _stage_ran(project, name) == list(RERUN), name
        _check_recorded(project, recorded)
        assert overlap > 0, "the experiments ran one after the other: nothing concurrent was tested"
    finally:
        _wait_for_queue_workers(project)
        services.down(project)
        shutil.rmtree(project, ignore_errors=True)
