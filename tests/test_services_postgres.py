"""MLflow on PostgreSQL (`rlvr services up --backend postgres`) and concurrent stage runs per store.

Fast tests cover finding the binaries, the URI rules and the refusals, without starting anything.
Slow tests start the real servers on free ports: PostgreSQL from the machine's binaries (skipped, with
the reason, where there are none), Prefect, and MLflow with proxied artifacts; every server is stopped
by the fixture, and the test checks that no PostgreSQL process is left.

The concurrency tests run 2 processes that each record RUNS_PER_PROCESS stage runs through
rlvr.tracking.stage_run (what every stage does: start, params, dataset inputs, metrics, end) at the
same time, against the PostgreSQL-backed server and against the SQLite store used without a server,
and check that every run is recorded with its own params, input digest and metrics. Each test prints
its numbers (runs recorded, seconds); run with `-s` to see them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from flows import postgres, services
from rlvr import tracking
from rlvr.io import file_md5
from tests.conftest import ROOT, free_port, small_params_dict

needs_postgres = pytest.mark.skipif(postgres.bindir() is None,
                                    reason="no PostgreSQL binaries (initdb, pg_ctl, postgres) on PATH or in "
                                           "/usr/lib/postgresql/*/bin")
RUNS_PER_PROCESS = 25
PROCESSES = 2


# --- fast: binaries, URIs, refusals -------------------------------------------------------------------

def _fake_install(folder: Path, programs=postgres.PROGRAMS) -> None:
    folder.mkdir(parents=True)
    for name in programs:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)


def test_bindir_takes_the_newest_complete_installation_when_none_is_on_path(tmp_path, monkeypatch):
    _fake_install(tmp_path / "13" / "bin")
    _fake_install(tmp_path / "16" / "bin", programs=("initdb", "pg_ctl"))  # no server: not usable
    _fake_install(tmp_path / "15" / "bin")
    monkeypatch.setattr(postgres, "SEARCH", tmp_path)
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    assert postgres.bindir() == tmp_path / "15" / "bin"
    monkeypatch.setattr(postgres, "SEARCH", tmp_path / "none")
    assert postgres.bindir() is None
    with pytest.raises(postgres.PostgresError, match="apt-get install postgresql.*RLVR_MLFLOW_BACKEND_URI"):
        postgres.require_bindir()


def test_uris_get_the_installed_driver_and_lose_their_password_for_display():
    assert postgres.uri(5433) == "postgresql+psycopg2://rlvr@127.0.0.1:5433/mlflow"
    assert postgres.with_driver("postgresql://u:pw@db:5432/m") == "postgresql+psycopg2://u:pw@db:5432/m"
    assert postgres.with_driver("postgresql+psycopg2://u@db/m") == "postgresql+psycopg2://u@db/m"
    assert postgres.redact("postgresql://team:s3cret@db.internal:5432/mlflow") == \
        "postgresql://team:***@db.internal:5432/mlflow"
    assert postgres.redact("postgresql://team@db/mlflow") == "postgresql://team@db/mlflow"


def test_an_external_uri_that_is_not_postgresql_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv(services.BACKEND_URI_ENV, "mysql://team:s3cret@db/mlflow")
    assert services.default_backend() == "postgres"
    with pytest.raises(services.ServiceError, match=f"{services.BACKEND_URI_ENV} must be a PostgreSQL URI") as error:
        services.up(tmp_path, prefect_port=free_port(), mlflow_port=free_port(), backend="postgres")
    assert "s3cret" not in str(error.value)
    assert not (tmp_path / services.STATE).exists()
    with pytest.raises(services.ServiceError, match="unknown MLflow backend 'oracle'"):
        services.up(tmp_path, backend="oracle")


@pytest.mark.skipif(os.geteuid() != 0, reason="the user switch applies to root only")
def test_as_root_postgres_needs_an_unprivileged_user(monkeypatch):
    monkeypatch.setenv(postgres.USER_ENV, "no-such-user-rlvr")
    with pytest.raises(postgres.PostgresError, match="no user 'no-such-user-rlvr'.*useradd"):
        postgres.server_uid()
    monkeypatch.setenv(postgres.USER_ENV, "root")
    with pytest.raises(postgres.PostgresError, match="is root"):
        postgres.server_uid()


def test_a_half_initialised_cluster_is_refused_with_the_fix(tmp_path):
    (tmp_path / postgres.DATA).mkdir(parents=True)  # initdb was interrupted: no PG_VERSION
    with pytest.raises(postgres.PostgresError, match="holds no cluster.*delete it"):
        postgres.init(tmp_path, Path("/nonexistent"), None)
    (tmp_path / postgres.DATA / "PG_VERSION").write_text("15\n")  # a cluster whose password file is lost
    with pytest.raises(postgres.PostgresError, match="password file .*pgpass does not"):
        postgres.init(tmp_path, Path("/nonexistent"), None)


def test_status_of_a_record_from_an_older_version_names_no_backend(tmp_path):
    services._write_state(tmp_path, {"mlflow": services.Service(
        name="mlflow", pid=1, port=1, url="http://127.0.0.1:1", health="http://127.0.0.1:1/health", log="x")})
    report = services.status(tmp_path)["mlflow"]
    assert report["backend"] == "unrecorded (older version)" and not report["healthy"]


# --- slow: the real servers --------------------------------------------------------------------------

def _postgres_pids() -> list[int]:
    """PIDs of running `postgres` processes (any cluster) on this machine."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "comm").read_text().strip() == "postgres" and tracking.process_start(int(proc.name)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def pg_services():
    """A project with the three servers up (MLflow on a local PostgreSQL). The project lives in a folder
    every user may traverse: as root, PostgreSQL runs as an unprivileged user who must reach it (pytest's
    tmp_path is private to root)."""
    if postgres.bindir() is None:
        pytest.skip("no PostgreSQL binaries")
    project = Path(tempfile.mkdtemp(prefix="rlvr-pg-"))
    project.chmod(0o711)
    (project / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(small_params_dict(), sort_keys=False))
    before = set(_postgres_pids())
    running = None
    try:
        started = time.monotonic()
        running = services.up(project, prefect_port=free_port(), mlflow_port=free_port(), backend="postgres",
                              timeout_s=300)
        print(f"\nservices up with PostgreSQL: {time.monotonic() - started:.1f} s")
        yield project, running
    finally:
        services.down(project)
        if running and "postgres" in running:
            assert tracking.process_start(running["postgres"].pid) is None, "PostgreSQL outlived the fixture"
        left = set(_postgres_pids()) - before
        shutil.rmtree(project, ignore_errors=True)
        assert not left, f"PostgreSQL processes left running: {sorted(left)}"


@needs_postgres
@pytest.mark.slow
def test_up_runs_mlflow_on_a_local_postgresql_bound_to_localhost_with_a_password(pg_services, tmp_path):
    project, running = pg_services
    assert sorted(running) == ["mlflow", "postgres", "prefect"]
    report = services.status(project)
    assert all(report[name]["is_server"] and report[name]["healthy"] for name in running), report
    pg = running["postgres"]
    assert report["mlflow"]["backend"] == postgres.uri(pg.port)
    assert report["mlflow"]["artifacts"] == (project / services.SERVED_ARTIFACTS).as_uri()
    assert report["postgres"]["backend"] == str(project / postgres.DATA)
    passfile = project / postgres.PASSFILE
    assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
    with postgres.connect(project, pg.port, "mlflow") as connection, connection.cursor() as cursor:
        cursor.execute("SHOW listen_addresses")
        assert cursor.fetchone()[0] == "127.0.0.1"
        cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'")
        assert cursor.fetchone()[0] == 1  # MLflow created its schema in PostgreSQL
    import psycopg2

    no_password = tmp_path / "pgpass"
    no_password.write_text("")
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(host="127.0.0.1", port=pg.port, user=postgres.ROLE, dbname="mlflow", passfile=str(no_password),
                         connect_timeout=5)
    # up again: everything already runs on the same store, nothing new is started
    again = services.up(project, prefect_port=running["prefect"].port, mlflow_port=running["mlflow"].port,
                        backend="postgres")
    assert {n: s.pid for n, s in again.items()} == {n: s.pid for n, s in running.items()}
    with pytest.raises(services.ServiceError, match="mlflow already runs on postgresql.*run `rlvr services down`"):
        services.up(project, prefect_port=running["prefect"].port, mlflow_port=running["mlflow"].port,
                    backend="sqlite")


def _stage_project(path: Path) -> Path:
    """dvc.yaml with one stage per worker (`work0`, `work1`), each with its own input file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "data").mkdir(exist_ok=True)
    stages = {}
    for worker in range(PROCESSES):
        (path / "data" / f"input-{worker}.txt").write_text(f"input of worker {worker}\n" * (worker + 1))
        stages[f"work{worker}"] = {"cmd": "true", "deps": [f"data/input-{worker}.txt"], "params": ["train"]}
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return path


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from rlvr import config, tracking
    from tests.conftest import small_params_dict

    worker, runs, experiment, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    data = small_params_dict()
    data["tracking"]["experiment"] = experiment
    import mlflow  # imported before the start signal: both processes then record at the same time
    while not go.exists():
        time.sleep(0.05)
    started, errors, recorded = time.monotonic(), [], 0
    for index in range(runs):
        data["train"]["seed"] = worker * 1000 + index
        params = config.from_dict(data)
        try:
            with tracking.stage_run(f"work{worker}", params, tags={"worker": str(worker), "index": str(index)}):
                tracking.log_metrics({"value": worker * 10000 + index, "nested": {"index": index}})
            recorded += 1
        except Exception as error:  # counted and reported: the test says what the store did
            errors.append(f"{type(error).__name__}: {str(error)[:300]}")
    print(json.dumps({"worker": worker, "recorded": recorded, "errors": errors,
                      "seconds": time.monotonic() - started}))
""")


def _record_concurrently(project: Path, tracking_uri: str, experiment: str) -> dict:
    """Start PROCESSES workers, release them together, return their reports and the wall time."""
    go = project / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RLVR_", "DVC_"))}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=tracking_uri, OMP_NUM_THREADS="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(w), str(RUNS_PER_PROCESS), experiment, str(go)],
                                cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for w in range(PROCESSES)]
    time.sleep(1.0)
    started = time.monotonic()
    go.touch()
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=900)
        assert worker.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {"reports": reports, "wall_s": time.monotonic() - started}


def _per_process(result: dict) -> str:
    return ", ".join(f"{report['seconds']:.1f} s" for report in result["reports"])


def _check_recorded(client, experiment: str, project: Path) -> dict[str, int]:
    """Every run of each worker: FINISHED, its own seed, metric, stage and input digest; returns counts."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    counts = {}
    for worker in range(PROCESSES):
        mine = [r for r in runs if r.data.tags.get("worker") == str(worker)]
        counts[f"work{worker}"] = len(mine)
        digest = file_md5(project / "data" / f"input-{worker}.txt")
        indices = sorted(int(r.data.tags["index"]) for r in mine)
        assert indices == sorted(set(indices)), f"worker {worker}: a run was recorded twice"
        for run in mine:
            index = int(run.data.tags["index"])
            assert run.info.status == "FINISHED", (worker, index, run.info.status)
            assert run.data.tags["dvc.stage"] == f"work{worker}"
            assert run.data.params["train.seed"] == str(worker * 1000 + index)
            assert run.data.metrics == {"value": worker * 10000 + index, "nested.index": index}
            inputs = run.inputs.dataset_inputs
            assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [(f"data/input-{worker}.txt", digest)]
    return counts


@needs_postgres
@pytest.mark.slow
def test_two_processes_record_stage_runs_concurrently_on_postgresql(pg_services, tmp_path):
    from mlflow import MlflowClient

    project, running = pg_services
    stages = _stage_project(tmp_path / "stages")
    result = _record_concurrently(stages, running["mlflow"].url, "concurrency")
    errors = [e for r in result["reports"] for e in r["errors"]]
    assert not errors, errors[:5]
    counts = _check_recorded(MlflowClient(running["mlflow"].url), "concurrency", stages)
    print(f"\nPostgreSQL server: {sum(counts.values())} of {PROCESSES * RUNS_PER_PROCESS} runs recorded in "
          f"{result['wall_s']:.1f} s ({_per_process(result)} per process)")
    assert counts == {f"work{w}": RUNS_PER_PROCESS for w in range(PROCESSES)}
    experiment = MlflowClient(running["mlflow"].url).get_experiment_by_name("concurrency")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location


@needs_postgres
@pytest.mark.slow
def test_artifacts_go_through_the_server_into_its_store(pg_services, tmp_path, monkeypatch):
    import mlflow

    project, running = pg_services
    monkeypatch.setenv("MLFLOW_TRACKING_URI", running["mlflow"].url)
    mlflow.set_tracking_uri(running["mlflow"].url)
    experiment = mlflow.create_experiment("artifacts")
    note = tmp_path / "note.txt"
    note.write_text("proxied\n")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(note), artifact_path="notes")
    stored = project / services.SERVED_ARTIFACTS / experiment / run.info.run_id / "artifacts" / "notes" / "note.txt"
    assert stored.read_text() == "proxied\n"  # the client sent it over HTTP; the server wrote it
    assert mlflow.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")


@needs_postgres
@pytest.mark.slow
def test_down_stops_postgresql_last_and_the_runs_survive_a_restart(pg_services):
    """Runs last in this module: it stops the fixture's servers."""
    project, running = pg_services
    outcome = services.down(project)
    assert list(outcome)[-1] == "postgres"
    assert outcome["postgres"] == f"stopped (pid {running['postgres'].pid}, pg_ctl stop -m fast)"
    assert all(tracking.process_start(s.pid) is None for s in running.values())
    assert services.read_state(project) == {}
    # the cluster is kept: a new server on another port finds the runs recorded before
    restarted = services._start_postgres(project, free_port(), timeout_s=120)
    try:
        with postgres.connect(project, restarted.port, "mlflow") as connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM runs")
            assert cursor.fetchone()[0] >= PROCESSES * RUNS_PER_PROCESS
    finally:
        assert services.down(project)["postgres"].startswith(f"stopped (pid {restarted.pid}")


@pytest.mark.slow
def test_two_processes_record_stage_runs_concurrently_on_sqlite(tmp_path):
    """The SQLite store used without a server (what stages and `dvc exp run` write to by default),
    initialised once first, as the pipeline does."""
    from mlflow import MlflowClient

    stages = _stage_project(tmp_path / "stages")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("concurrency", artifact_location=(tmp_path / "artifacts").as_uri())
    result = _record_concurrently(stages, uri, "concurrency")
    errors = [e for r in result["reports"] for e in r["errors"]]
    counts = _check_recorded(MlflowClient(uri), "concurrency", stages)
    print(f"\nSQLite store: {sum(counts.values())} of {PROCESSES * RUNS_PER_PROCESS} runs recorded in "
          f"{result['wall_s']:.1f} s ({_per_process(result)} per process); "
          f"{len(errors)} errors{': ' + errors[0] if errors else ''}")
    assert not errors, errors[:5]
    assert counts == {f"work{w}": RUNS_PER_PROCESS for w in range(PROCESSES)}
