"""Local Prefect and MLflow servers for day-to-day use: start, stop, and the environment that uses them.

`up` starts `prefect server start` and `mlflow server` on 127.0.0.1 with their state under the project
(Prefect's database in .prefect/, MLflow's SQLite store and artifacts in mlruns/, the same store the
pipeline writes to without a server), logs in logs/, and records PIDs, ports and URLs in
.services/services.json. `down` stops exactly those processes (SIGTERM to each process group, SIGKILL
after a grace period). While the file exists, `environment()` gives PREFECT_API_URL and
MLFLOW_TRACKING_URI for them, so pipeline runs report to the servers instead of starting Prefect's
temporary server per stage.

Lightweight settings: Prefect's analytics, foreman, repossessor, trigger and event-logger services
are off (nothing here uses work pools or automations); the scheduler stays on (cron deployments).
MLflow runs one worker and no job runner.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HOST = "127.0.0.1"
STATE = Path(".services/services.json")
LOGS = Path("logs")

PREFECT_LIGHT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true",
}


class ServiceError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    pid: int
    port: int
    url: str
    health: str
    log: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_state(root: Path) -> dict[str, Service]:
    path = root / STATE
    if not path.is_file():
        return {}
    return {name: Service(**spec) for name, spec in json.loads(path.read_text()).items()}


def _write_state(root: Path, services: dict[str, Service]) -> None:
    from rlvr.io import write_json

    write_json(root / STATE, {name: asdict(s) for name, s in services.items()})


def environment(root: Path) -> dict[str, str]:
    """PREFECT_API_URL / MLFLOW_TRACKING_URI for the running services (empty when none are up)."""
    services = read_state(root)
    env = {}
    if "prefect" in services and _alive(services["prefect"].pid):
        env["PREFECT_API_URL"] = services["prefect"].url + "/api"
    if "mlflow" in services and _alive(services["mlflow"].pid):
        env["MLFLOW_TRACKING_URI"] = services["mlflow"].url
    return env


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a `dvc` subprocess: this interpreter's bin folder first on PATH, so that
    dvc.yaml's `python -m flows ...` runs in this virtual environment even when it is not activated."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **(extra or {})}


def _spawn(root: Path, name: str, command: list[str], env: dict[str, str]) -> tuple[int, str]:
    (root / LOGS).mkdir(exist_ok=True)
    log = root / LOGS / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=root, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid, str(log)


def up(root: Path, prefect_port: int = 4200, mlflow_port: int = 5000, timeout_s: float = 120.0) -> dict[str, Service]:
    """Start both servers (those not already running) and wait until they answer."""
    root = root.resolve()
    services = {n: s for n, s in read_state(root).items() if _alive(s.pid)}
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    wanted = {
        "prefect": (prefect_port, [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
                    {"PREFECT_HOME": str(root / ".prefect"), **PREFECT_LIGHT}, "/api/health"),
        "mlflow": (mlflow_port, [_bin("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
                                 "--default-artifact-root", (root / "mlruns" / "artifacts").as_uri()],
                   {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                    # the server's job runner starts a pool of background consumer processes this
                    # project never submits work to
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, "/health"),
    }
    for name, (port, command, env, health) in wanted.items():
        if name in services:
            continue
        if _port_in_use(port):
            raise ServiceError(f"{HOST}:{port} is already in use; choose another port for {name}")
        pid, log = _spawn(root, name, command, env)
        url = f"http://{HOST}:{port}"
        services[name] = Service(name=name, pid=pid, port=port, url=url, health=url + health, log=log)
    _write_state(root, services)
    deadline = time.monotonic() + timeout_s
    for service in services.values():
        while not _healthy(service.health):
            if not _alive(service.pid):
                raise ServiceError(f"{service.name} exited during start-up; see {service.log}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{service.name} did not answer {service.health} in {timeout_s:.0f} s; "
                                   f"see {service.log}")
            time.sleep(0.5)
    return services


def down(root: Path, grace_s: float = 15.0) -> list[str]:
    """Stop the recorded servers (their whole process groups); returns the names stopped."""
    root = root.resolve()
    stopped = []
    for service in read_state(root).values():
        if not _alive(service.pid):
            continue
        try:
            os.killpg(service.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace_s
        while _alive(service.pid) and time.monotonic() < deadline:
            _reap(service.pid)
            time.sleep(0.2)
        if _alive(service.pid):
            os.killpg(service.pid, signal.SIGKILL)
            _reap(service.pid)
        stopped.append(service.name)
    (root / STATE).unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> None:
    """Collect a child we started ourselves (in tests); a no-op for other processes."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def status(root: Path) -> dict[str, dict]:
    return {name: {**asdict(s), "alive": _alive(s.pid), "healthy": _healthy(s.health)}
            for name, s in read_state(root.resolve()).items()}
