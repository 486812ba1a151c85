"""Services and stage processes: what `rlvr services` starts and stops, what a stopped stage leaves.

Fast tests use stand-in processes (`sleep`, a Python sleeper) and a throwaway SQLite MLflow store.
Slow tests run the real thing: `python -m flows prepare` killed mid-stage (SIGKILL, SIGTERM, SIGINT),
and both servers started by `services.up` on free ports on 127.0.0.1, with CSRF and --auth.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from flows import services
from flows.security import prefect_security
from rlvr import tracking
from tests.conftest import ROOT, free_port, small_params_dict

USER, PASSWORD = "rlvr-admin", "correct-horse-battery"


def _sleeper(tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "120"], cwd=tmp_path)


def _record(root: Path, **fields) -> services.Service:
    spec = {"name": "prefect", "port": 4200, "url": "http://127.0.0.1:4200", "health": "http://127.0.0.1:4200/api/health",
            "log": str(root / "logs" / "prefect.log"), "command": [services._bin("prefect"), "server", "start"], **fields}
    service = services.Service(**spec)
    services._write_state(root, {service.name: service})
    return service


# --- rlvr services down: only what it started ------------------------------------------------------

def test_down_does_not_signal_a_pid_now_used_by_another_process(tmp_path):
    """The recorded server died and its PID now belongs to `sleep`: same PID, later start time."""
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    sleeper = _sleeper(tmp_path)
    try:
        boot = tracking.process_start(sleeper.pid).split(":")[0]
        _record(tmp_path, pid=sleeper.pid, start=f"{boot}:1")  # the server started at tick 1
        out = subprocess.run([sys.executable, "-m", "flows.cli", "services", "down"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert sleeper.poll() is None, "down killed a process it did not start"
        line = out.stdout.strip()
        assert line.startswith("prefect") and "not signalled" in line and "another process" in line, line
        assert "sleep 120" in line and "not the server `rlvr services up` started" in line
        assert services.read_state(tmp_path) == {}  # the record named a dead server: dropped
    finally:
        sleeper.kill()
        sleeper.wait()


def test_down_does_not_signal_a_pid_whose_command_line_differs(tmp_path):
    sleeper = _sleeper(tmp_path)
    try:
        _record(tmp_path, pid=sleeper.pid, start=tracking.process_start(sleeper.pid))
        outcome = services.down(tmp_path, grace_s=1)
        assert sleeper.poll() is None
        assert "not signalled" in outcome["prefect"] and "runs `sleep 120`" in outcome["prefect"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_down_keeps_a_record_it_cannot_check(tmp_path):
    sleeper = _sleeper(tmp_path)
    try:
        _record(tmp_path, pid=sleeper.pid, start="", command=[])  # as written before start times were recorded
        outcome = services.down(tmp_path, grace_s=1)
        assert sleeper.poll() is None and "cannot be checked" in outcome["prefect"]
        assert services.read_state(tmp_path)["prefect"].pid == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_damaged_record_is_one_clear_error(tmp_path):
    (tmp_path / services.STATE).parent.mkdir()
    (tmp_path / services.STATE).write_text('{"prefect": {"pid": 1}}')
    with pytest.raises(services.ServiceError, match="services.json is not a services record"):
        services.down(tmp_path)


def test_down_stops_the_process_group_it_started_and_status_tells_them_apart(tmp_path):
    # a stand-in server with a child of its own, as `mlflow server` has its uvicorn workers
    command = [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"]
    pid, start, log = services._spawn(tmp_path, "mlflow", command, {})
    record = services.Service(name="mlflow", pid=pid, port=1, url="http://127.0.0.1:1", health="http://127.0.0.1:1/health",
                              log=log, command=command, start=start)
    sleeper = _sleeper(tmp_path)
    try:
        other = _record(tmp_path, pid=sleeper.pid, start=tracking.process_start(sleeper.pid))
        services._write_state(tmp_path, {"mlflow": record, "prefect": other})
        deadline = time.monotonic() + 30
        while len(_children(pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        grandchild = _children(pid)[0]
        report = services.status(tmp_path)
        assert report["mlflow"]["is_server"] and report["mlflow"]["pid"] == pid
        assert report["mlflow"]["url"] == "http://127.0.0.1:1" and not report["mlflow"]["healthy"]
        assert not report["prefect"]["is_server"] and "runs `sleep 120`" in report["prefect"]["problem"]

        outcome = services.down(tmp_path, grace_s=10)
        assert outcome["mlflow"] == f"stopped (pid {pid})"
        assert tracking.process_start(pid) is None and tracking.process_start(grandchild) is None
        assert sleeper.poll() is None and "not signalled" in outcome["prefect"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_down_waits_for_an_exiting_server_whose_command_line_is_already_gone(tmp_path, monkeypatch):
    """While a process exits, /proc/PID/cmdline is empty before the PID is gone: down must keep waiting
    on PID and start time, not return while the server still runs (seen as a flaky CI failure)."""
    ready = tmp_path / "ready"
    command = [sys.executable, "-c", "import pathlib, signal, sys, time; "
               "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), sys.exit(0))); "
               f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)"]
    pid, start, log = services._spawn(tmp_path, "mlflow", command, {})
    record = services.Service(name="mlflow", pid=pid, port=1, url="http://127.0.0.1:1", health="http://127.0.0.1:1/health",
                              log=log, command=command, start=start)
    services._write_state(tmp_path, {"mlflow": record})
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:  # its SIGTERM handler is in place
        time.sleep(0.1)
    signalled = []
    real_killpg = os.killpg
    monkeypatch.setattr(services.os, "killpg", lambda p, s: (signalled.append(s), real_killpg(p, s)))
    real_cmdline = services._cmdline
    monkeypatch.setattr(services, "_cmdline", lambda p: [] if signalled else real_cmdline(p))
    outcome = services.down(tmp_path, grace_s=10)
    assert outcome["mlflow"] == f"stopped (pid {pid})"
    assert tracking.process_start(pid) is None
    assert signalled == [signal.SIGTERM]


def test_down_kills_a_server_that_ignores_sigterm_after_the_grace_period(tmp_path):
    ready = tmp_path / "ready"
    command = [sys.executable, "-c", "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               f"pathlib.Path({str(ready)!r}).touch(); time.sleep(120)"]
    pid, start, log = services._spawn(tmp_path, "prefect", command, {})
    services._write_state(tmp_path, {"prefect": services.Service(
        name="prefect", pid=pid, port=1, url="http://127.0.0.1:1", health="http://127.0.0.1:1/health", log=log,
        command=command, start=start)})
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    outcome = services.down(tmp_path, grace_s=1)
    assert outcome["prefect"] == f"stopped (pid {pid}, SIGKILL after 1 s)"
    assert tracking.process_start(pid) is None


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


# --- environment and settings -------------------------------------------------------------------------

def test_environment_names_only_running_servers_and_adds_credentials_for_auth(tmp_path, monkeypatch):
    command = [sys.executable, "-c", "import time; time.sleep(120)"]
    pid, start, log = services._spawn(tmp_path, "prefect", command, {})
    try:
        server = services.Service(name="prefect", pid=pid, port=4321, url="http://127.0.0.1:4321",
                                  health="http://127.0.0.1:4321/api/health", log=log, command=command, start=start,
                                  auth=True)
        services._write_state(tmp_path, {"prefect": server})
        monkeypatch.delenv(services.USER_ENV, raising=False)
        monkeypatch.delenv(services.PASSWORD_ENV, raising=False)
        with pytest.raises(services.ServiceError, match=services.PASSWORD_ENV):
            services.environment(tmp_path)
        monkeypatch.setenv(services.USER_ENV, USER)
        monkeypatch.setenv(services.PASSWORD_ENV, PASSWORD)
        assert services.environment(tmp_path) == {"PREFECT_API_URL": "http://127.0.0.1:4321/api",
                                                  "PREFECT_API_AUTH_STRING": f"{USER}:{PASSWORD}"}
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert services.environment(tmp_path) == {}  # recorded, but no longer running


@pytest.mark.parametrize(("user", "password", "message"), [
    ("", PASSWORD, services.USER_ENV),
    (USER, "", services.PASSWORD_ENV),
    (USER, "short", "at least 12"),
    ("a:b", PASSWORD, "may not contain ':'"),
])
def test_credentials_are_checked_before_anything_starts(tmp_path, monkeypatch, user, password, message):
    monkeypatch.setenv(services.USER_ENV, user)
    monkeypatch.setenv(services.PASSWORD_ENV, password)
    with pytest.raises(services.ServiceError, match=message):
        services.up(tmp_path, prefect_port=free_port(), mlflow_port=free_port(), auth=True)
    assert not (tmp_path / services.STATE).exists()


def test_prefect_refuses_cross_origin_writes_by_its_settings():
    settings = prefect_security("http://127.0.0.1:4200")
    assert settings["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true"
    assert settings["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4200,http://localhost:4200"


# --- MLflow runs of stopped stages ----------------------------------------------------------------------

def test_process_start_names_a_process_and_not_its_pid(tmp_path):
    me = tracking.process_start(os.getpid())
    assert me and me == tracking.process_start(os.getpid())
    child = subprocess.Popen(["true"])
    child.wait()
    assert tracking.process_start(child.pid) is None
    assert tracking.process_tags()["process.pid"] == str(os.getpid())


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); tests use their own stage names."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri


@pytest.fixture
def store(mlflow_db, tmp_path, monkeypatch, small_params):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_db)
    return mlflow.MlflowClient(), tracking.ensure_experiment(small_params), small_params


def _dead_pid() -> str:
    child = subprocess.Popen(["true"])
    child.wait()
    return str(child.pid)


def test_the_next_run_closes_runs_whose_process_is_gone_and_only_those(store):
    client, experiment, params = store
    me = tracking.process_tags()
    cases = {
        "killed": {**me, "process.pid": _dead_pid()},
        "pid reused": {**me, "process.start": me["process.start"].split(":")[0] + ":1"},
        "alive": me,  # a concurrent run of the same stage, e.g. `dvc exp run`
        "other host": {**me, "process.host": "elsewhere", "process.pid": _dead_pid()},
        "untagged": {},
    }
    runs = {name: client.create_run(experiment, tags={"dvc.stage": "score", **tags}).info.run_id
            for name, tags in cases.items()}
    other_stage = client.create_run(experiment, tags={"dvc.stage": "train", **cases["killed"]}).info.run_id

    closed = tracking.close_orphaned_runs("score", params)

    assert sorted(run.info.run_id for run, _ in closed) == sorted([runs["killed"], runs["pid reused"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"killed": "KILLED", "pid reused": "KILLED", "alive": "RUNNING", "other host": "RUNNING",
                      "untagged": "RUNNING"}
    assert "was gone" in client.get_run(runs["killed"]).data.tags[tracking.GONE_TAG]
    assert client.get_run(other_stage).info.status == "RUNNING"

    # what every stage and `rlvr services status` run: all stages at once (a killed train, closed by evaluate)
    assert [run.info.run_id for run, _ in tracking.close_orphaned_runs(None, params)] == [other_stage]
    assert client.get_run(other_stage).info.status == "KILLED"
    assert client.get_run(runs["alive"]).info.status == "RUNNING"


def test_services_status_sweeps_mlflow_runs_and_says_when_prefect_has_no_server(store, tmp_path):
    client, experiment, params = store
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params_dict(), sort_keys=False))
    gone = client.create_run(experiment, tags={"dvc.stage": "evaluate", **tracking.process_tags(),
                                               "process.pid": _dead_pid()}).info.run_id
    lines = services.sweep_zombies(tmp_path)  # no PREFECT_API_URL in the tests' environment
    assert client.get_run(gone).info.status == "KILLED"
    assert any(line.startswith(f"MLflow run {gone} (evaluate) KILLED") for line in lines), lines
    assert any("Prefect flow runs not swept: no Prefect server runs" in line for line in lines), lines


@pytest.mark.parametrize(("error", "status"), [(None, "FINISHED"), (ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_stage_run_ends_finished_failed_or_killed(store, error, status):
    client, _, params = store
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"warmup": {"cmd": "true"}}}))
    seen = {}
    try:
        with tracking.stage_run("warmup", params, tags={"prefect.flow_run_id": "abc"}) as run:
            seen["id"] = run.info.run_id
            if error is not None:
                raise error("stop")
    except (ValueError, KeyboardInterrupt):
        pass
    recorded = client.get_run(seen["id"])
    assert recorded.info.status == status
    assert recorded.data.tags["prefect.flow_run_id"] == "abc"
    assert recorded.data.tags["process.pid"] == str(os.getpid())


def test_an_interrupt_stays_an_interrupt_when_mlflow_cannot_record_it(store, monkeypatch):
    """A signal landing inside one of MLflow's own SQLite writes can leave the store locked: the run
    is then closed by the stage's next run, and the interrupt still reaches Prefect."""
    import mlflow

    client, _, params = store
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"rollout": {"cmd": "true"}}}))
    set_terminated = mlflow.MlflowClient.set_terminated

    def locked(self, run_id, status=None, end_time=None):
        if status == "KILLED":
            raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")
        return set_terminated(self, run_id, status, end_time)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", locked)
    seen = {}
    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run("rollout", params) as run:
            seen["id"] = run.info.run_id
            raise KeyboardInterrupt
    assert client.get_run(seen["id"]).info.status == "RUNNING"  # left for the next run to close
    assert mlflow.active_run() is None


@pytest.mark.slow  # importing Prefect's server app takes seconds
def test_the_temporary_server_hook_still_exists_in_prefect():
    """flows/temporary_server.py replaces how Prefect spawns its temporary server; it relies on
    SubprocessASGIServer calling `_run_uvicorn_command` from `start()` and keeping one instance per port."""
    from prefect.server.api.server import SubprocessASGIServer

    assert callable(getattr(SubprocessASGIServer, "_run_uvicorn_command", None)), \
        "prefect's SubprocessASGIServer._run_uvicorn_command is gone: update flows/temporary_server.py"
    assert isinstance(getattr(SubprocessASGIServer, "_instances", None), dict), \
        "prefect's SubprocessASGIServer._instances is gone: update flows/temporary_server.py"


# --- slow: a real stage process, stopped mid-stage ------------------------------------------------------

def _project(path: Path, arith_size: int) -> Path:
    """dvc.yaml, the small params (with `arith_size` training problems) and the data sources."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    (path / "data").mkdir(exist_ok=True)
    if not (path / "data" / "sources").exists():
        (path / "data" / "sources").symlink_to(ROOT / "data" / "sources")
    params = small_params_dict()
    params["prepare"]["train"][0]["size"] = arith_size
    params["prepare"]["eval"][1]["path"] = "data/sources/benchmarks/gsm8k/test.jsonl"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "DVC_", "RLVR_"))}
    env["PYTHONPATH"] = str(ROOT)
    # a fresh project migrates Prefect's database at the first start: slow on a busy machine
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return {**env, **(extra or {})}


def _start_stage(project: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows", "prepare"], cwd=project, env=env or _stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _runs(project: Path) -> list[tuple[str, str]]:
    """(run id, status) of the prepare runs in the project's MLflow store, read without MLflow."""
    db = project / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE t.key = 'dvc.stage' AND t.value = 'prepare' ORDER BY r.start_time").fetchall()
    except sqlite3.OperationalError:  # being created
        return []


def _prefect_server_child(pid: int) -> int | None:
    for child in _children(pid):
        if "prefect.server.api.server:create_app" in " ".join(services._cmdline(child)):
            return child
    return None


def _at_work(project: Path, run_id: str) -> bool:
    """The run has logged its inputs, the last thing `stage_run` records before the stage's own work."""
    with sqlite3.connect(f"file:{project / 'mlruns' / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as con:
        return con.execute("SELECT 1 FROM inputs WHERE destination_id = ?", (run_id,)).fetchone() is not None


def _wait_mid_stage(process: subprocess.Popen, project: Path, timeout_s: float = 600) -> tuple[str, int]:
    """Wait until the stage is at work inside its RUNNING MLflow run (the server is up by then);
    returns the run id and the pid of the temporary server."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the stage ended before it could be stopped:\n{process.stdout.read()[-3000:]}"
        running = [run_id for run_id, status in _runs(project) if status == "RUNNING"]
        server = _prefect_server_child(process.pid)
        if running and server and _at_work(project, running[-1]):
            return running[-1], server
        time.sleep(0.2)
    raise AssertionError("the stage did not reach its MLflow run in time")


def _gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while tracking.process_start(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    return tracking.process_start(pid) is None


def _flow_run_state(project: Path, flow_run_id: str) -> str:
    with sqlite3.connect(project / ".prefect" / "prefect.db") as con:
        return con.execute("SELECT state_type FROM flow_run WHERE id = ?", (flow_run_id,)).fetchone()[0]


@pytest.mark.slow
def test_sigkill_mid_stage_leaves_no_server_and_the_next_run_closes_its_runs(tmp_path):
    from mlflow import MlflowClient

    project = _project(tmp_path / "project", arith_size=40000)
    stage = _start_stage(project)
    run_id, server = _wait_mid_stage(stage, project)
    os.kill(stage.pid, signal.SIGSTOP)  # hold it mid-stage while we look
    assert dict(_runs(project))[run_id] == "RUNNING"
    port = services._cmdline(server)[services._cmdline(server).index("--port") + 1]
    status, body = _response(f"http://127.0.0.1:{port}/api/flows/", "POST", {"name": "planted"},
                             {"Origin": "http://evil.example"})
    assert status == 403 and "CSRF" in body  # the temporary server refuses cross-origin writes too
    stage.kill()
    stage.wait()
    assert _gone(server), f"the temporary Prefect server (pid {server}) outlived the killed stage"
    assert dict(_runs(project))[run_id] == "RUNNING"  # nobody could close it yet

    _project(project, arith_size=300)  # the next run of the stage, small enough to finish
    rerun = _start_stage(project)
    output = rerun.communicate(timeout=900)[0]
    assert rerun.returncode == 0, output[-3000:]
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and str(stage.pid) in killed.data.tags[tracking.GONE_TAG]
    assert _flow_run_state(project, killed.data.tags["prefect.flow_run_id"]) == "CRASHED"
    latest = _runs(project)[-1]
    assert latest[0] != run_id and latest[1] == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_mid_stage_ends_the_runs_killed_and_stops_the_server(tmp_path, signum):
    from mlflow import MlflowClient

    project = _project(tmp_path / "project", arith_size=40000)
    stage = _start_stage(project)
    run_id, server = _wait_mid_stage(stage, project)
    stage.send_signal(signum)
    output = stage.communicate(timeout=120)[0]
    assert stage.returncode != 0
    assert _gone(server), f"the temporary Prefect server (pid {server}) outlived the stopped stage"
    run = MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED", output[-3000:]
    assert _flow_run_state(project, run.data.tags["prefect.flow_run_id"]) == "CRASHED"


# --- slow: real servers with CSRF and --auth ------------------------------------------------------------

def _response(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _request(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> int:
    return _response(url, method, body, headers)[0]


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    project = _project(tmp_path_factory.mktemp("services") / "project", arith_size=300)
    saved = {k: os.environ.get(k) for k in (services.USER_ENV, services.PASSWORD_ENV)}
    os.environ[services.USER_ENV], os.environ[services.PASSWORD_ENV] = USER, PASSWORD
    try:
        running = services.up(project, prefect_port=free_port(), mlflow_port=free_port(), auth=True,
                              timeout_s=300)
        yield project, running
    finally:
        services.down(project)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
def test_auth_refuses_unauthenticated_requests_on_both_servers(servers):
    _, running = servers
    prefect, mlflow = running["prefect"].url, running["mlflow"].url
    assert all(s.url.startswith("http://127.0.0.1:") for s in running.values())
    assert _request(f"{prefect}/api/flows/filter", "POST", {}) in (401, 403)
    assert _request(f"{prefect}/api/flows/filter", "POST", {}, _basic(USER, "wrong-password-123")) in (401, 403)
    assert _request(f"{prefect}/api/admin/version", headers=_basic(USER, "wrong-password-123")) == 401
    assert _request(f"{prefect}/api/admin/version") == 401
    assert _request(f"{prefect}/api/admin/version", headers=_basic(USER, PASSWORD)) == 200
    assert _request(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _request(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", headers=_basic(USER, "x" * 12)) == 401
    assert _request(f"{mlflow}/api/2.0/mlflow/experiments/search?max_results=1", headers=_basic(USER, PASSWORD)) == 200


@pytest.mark.slow
def test_prefect_refuses_a_cross_origin_post_without_csrf_token(servers):
    _, running = servers
    prefect = running["prefect"].url
    evil = {"Origin": "http://evil.example", **_basic(USER, PASSWORD)}
    # what a page elsewhere would send: valid session, no CSRF token (before: 201 Created)
    status, body = _response(f"{prefect}/api/flows/", "POST", {"name": "planted"}, evil)
    assert status == 403 and "CSRF" in body
    preflight = urllib.request.Request(f"{prefect}/api/flows/", method="OPTIONS", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "prefect-csrf-token,content-type"})
    try:
        with urllib.request.urlopen(preflight, timeout=30) as response:
            allowed = response.headers.get("access-control-allow-origin")
    except urllib.error.HTTPError as error:
        allowed = error.headers.get("access-control-allow-origin")
    assert allowed not in ("*", "http://evil.example")


@pytest.mark.slow
def test_a_stage_still_records_to_both_servers_with_credentials(servers):
    from mlflow import MlflowClient

    project, running = servers
    env = _stage_env(services.environment(project))
    assert env["MLFLOW_TRACKING_USERNAME"] == USER and env["PREFECT_API_AUTH_STRING"] == f"{USER}:{PASSWORD}"
    stage = _start_stage(project, env)
    output = stage.communicate(timeout=900)[0]
    assert stage.returncode == 0, output[-3000:]
    assert "Starting temporary server" not in output  # it reported to the running Prefect server

    os.environ.update({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    try:
        client = MlflowClient(running["mlflow"].url)
        runs = client.search_runs([client.get_experiment_by_name(small_params_dict()["tracking"]["experiment"])
                                   .experiment_id], filter_string="tags.`dvc.stage` = 'prepare'")
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    assert [r.info.status for r in runs] == ["FINISHED"]
    flow_run_id = runs[0].data.tags["prefect.flow_run_id"]
    state = urllib.request.Request(f"{running['prefect'].url}/api/flow_runs/{flow_run_id}", headers=_basic(USER, PASSWORD))
    with urllib.request.urlopen(state, timeout=30) as response:
        assert json.loads(response.read())["state"]["type"] == "COMPLETED"

    report = services.status(project)
    assert all(report[name]["is_server"] and report[name]["healthy"] and report[name]["auth"] for name in running)

    # the two records lead to each other: a link artifact on the flow run, the flow run's page on the MLflow run
    run = runs[0]
    mlflow_page = f"{running['mlflow'].url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    # Prefect stores a link artifact as markdown, `[text](url)`, which its UI renders as a link
    assert _artifacts(running["prefect"].url, flow_run_id)["prepare-mlflow-run"] == (
        "markdown", f"[MLflow run {run.info.run_id} (prepare)]({mlflow_page})")
    assert run.data.tags["prefect.flow_run_url"] == f"{running['prefect'].url}/runs/flow-run/{flow_run_id}"
    with urllib.request.urlopen(urllib.request.Request(
            f"{running['mlflow'].url}/api/2.0/mlflow/experiments/get?experiment_id={run.info.experiment_id}",
            headers=_basic(USER, PASSWORD)), timeout=30) as response:
        tags = {t["key"]: t["value"] for t in json.loads(response.read())["experiment"].get("tags", [])}
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # MLflow 3 opens the runs table


def _prefect(prefect_url: str, path: str, body: dict | None = None) -> dict | list:
    """A Prefect API call with the test's login (GET without a body, POST with one and a CSRF token, as
    Prefect's own client sends it: the server refuses POSTs without one)."""
    headers = {"Content-Type": "application/json", **_basic(USER, PASSWORD)}
    if body is not None:
        client = str(uuid.uuid4())
        with urllib.request.urlopen(urllib.request.Request(f"{prefect_url}/api/csrf-token?client={client}",
                                                           headers=headers), timeout=30) as response:
            headers.update({"Prefect-Csrf-Token": json.loads(response.read())["token"], "Prefect-Csrf-Client": client})
    request = urllib.request.Request(f"{prefect_url}/api/{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _artifacts(prefect_url: str, flow_run_id: str) -> dict[str, tuple[str, str]]:
    found = _prefect(prefect_url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: (a["type"], a["data"]) for a in found}


def _flow_run_logs(prefect_url: str, flow_run_id: str) -> list[str]:
    found = _prefect(prefect_url, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return [entry["message"] for entry in found]


def _stage_runs(project: Path, stage: str) -> list[tuple[str, str, str | None]]:
    """(run id, status, Prefect flow run id) of the stage's MLflow runs, oldest first, read from SQLite."""
    with sqlite3.connect(f"file:{project / 'mlruns' / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as con:
        return con.execute(
            "SELECT r.run_uuid, r.status, (SELECT value FROM tags f WHERE f.run_uuid = r.run_uuid AND "
            "f.key = 'prefect.flow_run_id') FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'dvc.stage' AND t.value = ? ORDER BY r.start_time", (stage,)).fetchall()


@pytest.mark.slow
def test_a_killed_stage_is_crashed_by_services_status_after_its_progress_reached_prefect(servers):
    """SIGKILL `python -m flows warmup` once its progress lines are in the flow run's logs; then
    `rlvr services status` ends the flow run (and its task runs) Crashed and the MLflow run KILLED."""
    from mlflow import MlflowClient

    project, running = servers
    prefect_url = running["prefect"].url
    env = _stage_env({**services.environment(project), "RLVR_PROGRESS_SECONDS": "0",  # a line per step
                      services.USER_ENV: USER, services.PASSWORD_ENV: PASSWORD})
    if not (project / "data/prepared/train.parquet").exists():  # when run alone
        assert _start_stage(project, env).wait(timeout=900) == 0
    original = (project / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["warmup"]["max_steps"] = 100000  # runs until it is killed
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage = subprocess.Popen([sys.executable, "-m", "flows", "warmup"], cwd=project, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, lines, run = time.monotonic() + 600, [], None
        while not lines:
            assert stage.poll() is None, f"warmup ended before it was killed:\n{stage.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no progress line reached the flow run's logs"
            time.sleep(1)
            open_runs = [r for r in _stage_runs(project, "warmup") if r[1] == "RUNNING" and r[2]]
            if open_runs:
                run = open_runs[-1]
                lines = [m for m in _flow_run_logs(prefect_url, run[2]) if m.startswith("warmup: step ")]
        os.kill(stage.pid, signal.SIGKILL)
        stage.wait(timeout=60)
    finally:
        stage.kill()
        (project / "params.yaml").write_text(original)
    run_id, _, flow_run_id = run
    assert re.match(r"warmup: step \d+/100000 \(\d+%\)", lines[0]), lines[0]
    assert _prefect(prefect_url, f"flow_runs/{flow_run_id}")["state"]["type"] == "RUNNING"  # left open by the kill
    link = _artifacts(prefect_url, flow_run_id)["warmup-mlflow-run"][1]  # made before the kill
    assert f"]({running['mlflow'].url}/#/experiments/" in link and link.endswith(f"/runs/{run_id})"), link

    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "services", "status"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"rlvr services status with the sweep: {time.monotonic() - started:.1f} s")
    flow = _prefect(prefect_url, f"flow_runs/{flow_run_id}")
    assert flow["state"]["type"] == "CRASHED" and str(stage.pid) in flow["state"]["message"], flow["state"]
    assert flow["labels"]["process.pid"] == str(stage.pid)
    tasks = _prefect(prefect_url, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert tasks and all(t["state"]["type"] in ("COMPLETED", "CRASHED") for t in tasks), [t["state"] for t in tasks]
    assert any(t["state"]["type"] == "CRASHED" for t in tasks)  # the warmup task itself
    assert f"Prefect flow run {flow_run_id} Crashed" in out.stdout and f"MLflow run {run_id}" in out.stdout

    os.environ.update({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
    try:
        killed = MlflowClient(running["mlflow"].url).get_run(run_id)
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    assert killed.info.status == "KILLED" and str(stage.pid) in killed.data.tags[tracking.GONE_TAG]


@pytest.mark.slow
def test_auth_with_another_password_than_the_first_is_refused_with_the_fix(servers, monkeypatch):
    """MLflow creates its admin once: a later `up --auth` with a new password must say what to do.
    Runs last in this module: it restarts the servers of the `servers` fixture."""
    project, running = servers
    outcome = services.down(project)
    assert sorted(outcome) == sorted(running)
    assert all(outcome[name].startswith(f"stopped (pid {s.pid}") for name, s in running.items())
    assert not any(tracking.process_start(s.pid) for s in running.values())
    monkeypatch.setenv(services.PASSWORD_ENV, "another-password-456")
    with pytest.raises(services.ServiceError, match="mlflow refused .*mlflow-auth.db was created with another password"):
        services.up(project, prefect_port=free_port(), mlflow_port=free_port(), auth=True,
                    timeout_s=300)
