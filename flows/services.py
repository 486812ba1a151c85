"""Local Prefect and MLflow servers for day-to-day use: start, stop, and the environment that uses them.

`up` starts `prefect server start` and `mlflow server` on 127.0.0.1 with their state under the project
(Prefect's database in .prefect/, MLflow's SQLite store and artifacts in mlruns/, the same store the
pipeline writes to without a server), logs in logs/, and records each server's PID, command line,
process start time, port and URL in .services/services.json. `down` signals a recorded PID only while
it is still that server (same start time, same command line): a PID reused by another process after
the server died is reported and left alone. While the servers run, `environment()` gives
PREFECT_API_URL and MLFLOW_TRACKING_URI for them (and the credentials, with --auth), so pipeline runs
report to the servers instead of starting Prefect's temporary server per stage. `rlvr services status`
also closes the runs of stage processes that were killed (`sweep_zombies`, flows/sweep.py).

MLflow's store. `up(backend="sqlite")` (the default) keeps mlruns/mlflow.db. `up(backend="postgres")`
uses the PostgreSQL database named by RLVR_MLFLOW_BACKEND_URI, or else starts a local PostgreSQL
server (flows/postgres.py: a cluster in .services/postgres/, 127.0.0.1, password login) as a third
recorded service, which `down` stops last with `pg_ctl stop`. With PostgreSQL, MLflow proxies
artifacts (`--serve-artifacts`): clients send them to the server, which stores them in a folder or an
object store (RLVR_MLFLOW_ARTIFACTS), so only the server needs storage credentials.

Security. Both servers listen on 127.0.0.1 only. Prefect refuses cross-origin writes
(flows/security.py: CSRF tokens, CORS only for its own origin). `up(auth=True)` adds logins:
MLflow's basic-auth app and Prefect's API auth string, both with the credentials in
RLVR_SERVICES_USER / RLVR_SERVICES_PASSWORD.
The password never touches the disk: it goes to the servers through their environment, and MLflow
keeps only a hash of it in its user store, .services/mlflow-auth.db.

The worker. `rlvr schedule` (flows/schedule.py) adds a third kind of recorded service, `worker`:
`prefect worker start --pool POOL` for the retrain deployment's process work pool, with its health
check server on 127.0.0.1. `down` stops it first (its process group holds the flow runs it started),
`status` shows its pool and health.

The vLLM server. `train.vllm_mode: server` makes TRL's GRPO trainer generate on a separate vLLM server at
train.vllm_server_host:vllm_server_port. `up --vllm` (`start_vllm`) starts it as the recorded service
`vllm`: exactly the process `trl vllm-serve --model M --host H --port P --dtype D ...` runs (TRL's own
command builder, which execs vLLM's OpenAI server with TRL's weight-transfer options), serving the model
the train stage starts from (models/warmup, or model.name when the warm-up is a pass-through), on
127.0.0.1 only, on the GPUs given with --vllm-gpus (training must be given the others). Health: its
/health endpoint, the one TRL's client polls. `down` stops it with the others.

Lightweight settings: Prefect's analytics, trigger and event-logger services are off (nothing here
uses automations); the scheduler (cron deployments), the foreman (marks workers that stopped
heartbeating offline) and the repossessor (frees the deployment concurrency slot of a run whose lease
lapsed) stay on. MLflow runs one worker and no job runner.

Not covered: the PID check needs /proc (Linux); elsewhere `down` signals nothing and says so.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flows import postgres
from flows.security import prefect_security

HOST = "127.0.0.1"
STATE = Path(".services/services.json")
MLFLOW_AUTH_CONFIG = Path(".services/mlflow-auth.ini")
MLFLOW_AUTH_DB = Path(".services/mlflow-auth.db")
LOGS = Path("logs")
USER_ENV = "RLVR_SERVICES_USER"
PASSWORD_ENV = "RLVR_SERVICES_PASSWORD"
MIN_PASSWORD = 12  # MLflow refuses shorter passwords for its users
BACKENDS = ("sqlite", "postgres")
BACKEND_URI_ENV = "RLVR_MLFLOW_BACKEND_URI"  # an existing PostgreSQL database for MLflow (may hold a password)
ARTIFACTS_ENV = "RLVR_MLFLOW_ARTIFACTS"  # where the PostgreSQL-backed server stores artifacts (folder or URI)
SERVED_ARTIFACTS = Path("mlruns/served-artifacts")  # its default

PREFECT_LIGHT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "true",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "true",
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
    command: list[str] = field(default_factory=list)  # as started; the running argv ends with it
    start: str = ""  # tracking.process_start(pid) right after the start
    auth: bool = False
    backend: str = ""  # MLflow: its store (no password); PostgreSQL: its data folder
    artifacts: str = ""  # MLflow: where artifacts go
    pool: str = ""  # worker: the work pool it polls (its backend is the Prefect API it polls)
    model: str = ""  # vllm: the model it serves (a local folder or a hub id)


def credentials() -> tuple[str, str]:
    """(user, password) for --auth, from RLVR_SERVICES_USER / RLVR_SERVICES_PASSWORD."""
    user, password = os.environ.get(USER_ENV, ""), os.environ.get(PASSWORD_ENV, "")
    if not user or not password:
        raise ServiceError(f"--auth needs credentials: export {USER_ENV}=<name> and {PASSWORD_ENV}=<password> "
                           f"(at least {MIN_PASSWORD} characters)")
    if ":" in user:
        raise ServiceError(f"{USER_ENV} may not contain ':' (HTTP basic auth separates name and password with it)")
    if len(password) < MIN_PASSWORD:
        raise ServiceError(f"{PASSWORD_ENV} has {len(password)} characters; MLflow needs at least {MIN_PASSWORD}")
    return user, password


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


def _status_with_login(url: str, user: str, password: str) -> int:
    """HTTP status of a GET with basic-auth credentials (0 when nothing answers)."""
    token = b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


def ui_pages(prefect_url: str, mlflow_url: str, experiment: str | None,
             login: tuple[str, str] | None = None) -> dict[str, str]:
    """The UI pages worth opening, by name: Prefect's flow runs, MLflow's runs table of `experiment`
    (once a stage created it) and its model registry, both in MLflow 3's model-training view (a bare
    experiment link opens the GenAI traces page). The experiment's id comes from MLflow's REST API."""
    from rlvr import tracking

    pages = {"Prefect flow runs": f"{prefect_url}/runs"}
    if experiment is None:
        pages["MLflow models"] = tracking.registry_url(mlflow_url)
        return pages
    query = urllib.parse.urlencode({"experiment_name": experiment})
    request = urllib.request.Request(f"{mlflow_url}/api/2.0/mlflow/experiments/get-by-name?{query}")
    if login is not None:
        request.add_header("Authorization", "Basic " + b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            experiment_id = json.load(response)["experiment"]["experiment_id"]
        pages["MLflow runs"] = tracking.runs_table_url(mlflow_url, experiment_id)
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        pass  # no stage has run yet (404), or the server is busy: the registry link still works
    pages["MLflow models"] = tracking.registry_url(mlflow_url)
    return pages


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def identify(service: Service) -> tuple[str, str]:
    """Whether the recorded PID is still the server `up` started: ("server", ""), or ("gone", why),
    ("other", why) for a PID now used by another process, ("unknown", why) for a record that cannot
    be checked.

    The start time names the process (a reused PID has a later one); the command line is checked
    too, as its tail: a console script runs as `python <script> ARGS`, so the recorded command
    appears after the interpreter."""
    from rlvr.tracking import process_start

    if not service.start or not service.command:
        return "unknown", (f"the record has no start time or command line (written by an older version), so "
                           f"pid {service.pid} cannot be checked; stop it by hand if it is the server")
    if process_start(os.getpid()) is None:
        return "unknown", f"no /proc on this system, so pid {service.pid} cannot be checked; stop it by hand"
    start = process_start(service.pid)
    if start is None:
        return "gone", f"pid {service.pid} is not running"
    actual = _cmdline(service.pid)
    if start != service.start:
        return "other", (f"pid {service.pid} is now another process (`{shlex.join(actual)}`), started after "
                         f"the recorded server")
    if actual[-len(service.command):] != service.command:
        return "other", f"pid {service.pid} runs `{shlex.join(actual)}`, not the recorded `{shlex.join(service.command)}`"
    return "server", ""


def _is_server(service: Service) -> bool:
    return identify(service)[0] == "server"


def read_state(root: Path) -> dict[str, Service]:
    path = root / STATE
    if not path.is_file():
        return {}
    try:
        return {name: Service(**spec) for name, spec in json.loads(path.read_text()).items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise ServiceError(f"{path} is not a services record ({error}); stop the servers it names by hand, "
                           "then delete it") from error


def _write_state(root: Path, services: dict[str, Service]) -> None:
    from rlvr.io import write_json

    write_json(root / STATE, {name: asdict(s) for name, s in services.items()})


def running(root: Path) -> dict[str, Service]:
    """The recorded servers that still run (checked by start time and command line)."""
    return {n: s for n, s in read_state(root.resolve()).items() if _is_server(s)}


def environment(root: Path) -> dict[str, str]:
    """What clients need for the running services: PREFECT_API_URL, MLFLOW_TRACKING_URI and, for
    servers started with --auth, PREFECT_API_AUTH_STRING and MLFLOW_TRACKING_USERNAME/PASSWORD from
    RLVR_SERVICES_USER / RLVR_SERVICES_PASSWORD. Empty when none are up."""
    services = running(root)
    env = {}
    if "prefect" in services:
        env["PREFECT_API_URL"] = services["prefect"].url + "/api"
    if "mlflow" in services:
        env["MLFLOW_TRACKING_URI"] = services["mlflow"].url
    if any(s.auth for s in services.values()):
        user, password = credentials()
        if "prefect" in services and services["prefect"].auth:
            env["PREFECT_API_AUTH_STRING"] = f"{user}:{password}"
        if "mlflow" in services and services["mlflow"].auth:
            env["MLFLOW_TRACKING_USERNAME"] = user
            env["MLFLOW_TRACKING_PASSWORD"] = password
    return env


# MLflow 3.17's telemetry thread sets and unsets an environment variable while the client's HTTP calls
# iterate os.environ: a stage logging to a tracking server failed once in 15 grid experiments with
# `KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`. The stages started through `rlvr` run with telemetry off
# unless the user's environment says otherwise (the machines have no network to send it anyway).
QUIET_MLFLOW = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a `dvc` subprocess: this interpreter's bin folder first on PATH, so that
    dvc.yaml's `python -m flows ...` runs in this virtual environment even when it is not activated.
    MLflow telemetry is off unless the environment sets MLFLOW_DISABLE_TELEMETRY (`QUIET_MLFLOW`)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**QUIET_MLFLOW, **os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), **(extra or {})}


def _spawn(root: Path, name: str, command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Start `command` in its own session (so `down` can signal its whole process group); returns
    its pid, process start time and log file."""
    from rlvr.tracking import process_start

    (root / LOGS).mkdir(exist_ok=True)
    log = root / LOGS / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=root, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    # Popen returns once the command is executing: its start time is already final.
    return process.pid, process_start(process.pid) or "", str(log)


def _mlflow_auth_env(root: Path, user: str, password: str) -> dict[str, str]:
    """MLflow's basic-auth app: a config file under .services/ with no secret in it (the admin comes
    from the environment, MLflow's own MLFLOW_AUTH_ADMIN_* variables) and a Flask secret key, new at
    each start, that only its CSRF check of the sign-up form uses."""
    from rlvr.io import write_text

    write_text(root / MLFLOW_AUTH_CONFIG,
               "# written by `rlvr services up --auth`; the admin's name and password come from the environment\n"
               "[mlflow]\n"
               "default_permission = READ\n"
               f"database_uri = sqlite:///{root / MLFLOW_AUTH_DB}\n"
               "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(root / MLFLOW_AUTH_CONFIG), "MLFLOW_AUTH_ADMIN_USERNAME": user,
            "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}


def _check_login(services: dict[str, Service], user: str, password: str) -> None:
    """With --auth, the credentials must open both servers. MLflow creates its admin only once, so an
    auth store from an earlier password refuses the current one."""
    probes = {"prefect": "/api/admin/version", "mlflow": "/api/2.0/mlflow/experiments/search?max_results=1"}
    for name, service in services.items():
        code = _status_with_login(service.url + probes[name], user, password)
        if code == 200:
            continue
        hint = (f"its user store {MLFLOW_AUTH_DB} was created with another password: use that one, or stop the "
                f"services and delete the file (it holds MLflow's users only)") if name == "mlflow" else \
            f"see {service.log}"
        raise ServiceError(f"{name} refused {USER_ENV}/{PASSWORD_ENV} (HTTP {code}); {hint}")


def default_backend() -> str:
    """postgres when RLVR_MLFLOW_BACKEND_URI names a database, sqlite otherwise."""
    return "postgres" if os.environ.get(BACKEND_URI_ENV) else "sqlite"


def _artifacts_destination(root: Path, artifacts: str | None) -> str:
    """The proxied artifact store: `artifacts`, else RLVR_MLFLOW_ARTIFACTS, else mlruns/served-artifacts; a
    plain path becomes a file URI (relative to the project), a URI (s3://, gs://, ...) is kept."""
    value = artifacts or os.environ.get(ARTIFACTS_ENV) or str(SERVED_ARTIFACTS)
    if "://" in value:
        return value
    folder = (root / value).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def _external_uri() -> str:
    uri = os.environ.get(BACKEND_URI_ENV, "")
    if uri and not uri.startswith(("postgresql://", "postgresql+psycopg2://")):
        raise ServiceError(f"{BACKEND_URI_ENV} must be a PostgreSQL URI "
                           "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE), "
                           f"not {postgres.redact(uri)!r}")
    return uri


def _start_postgres(root: Path, port: int, timeout_s: float) -> Service:
    """Initialise the project's cluster if needed, start it on 127.0.0.1:`port`, wait until it accepts
    the login, create MLflow's database. The record is written before the wait, so `down` can stop a
    server that never became ready."""
    try:
        bindir = postgres.require_bindir()
        uid = postgres.server_uid()
        postgres.init(root, bindir, uid)
    except postgres.PostgresError as error:
        raise ServiceError(str(error)) from None
    if port == 0:
        port = _free_port()
    elif _port_in_use(port):
        raise ServiceError(f"{HOST}:{port} is already in use; choose another port for postgres")
    command = postgres.server_command(bindir, root, port)
    pid, start, log = _spawn(root, "postgres", postgres.run_as(uid) + command, {})
    url = f"postgresql://{postgres.ROLE}@{HOST}:{port}"
    service = Service(name="postgres", pid=pid, port=port, url=url, health=url, log=log, command=command, start=start,
                      backend=str(root / postgres.DATA))
    _write_state(root, {**read_state(root), "postgres": service})
    deadline = time.monotonic() + timeout_s
    while not postgres.ready(root, port):
        if not _is_server(service):
            raise ServiceError(f"postgres exited during start-up; see {log}")
        if time.monotonic() > deadline:
            raise ServiceError(f"postgres did not accept a login in {timeout_s:.0f} s; see {log}")
        time.sleep(0.3)
    postgres.create_database(root, port)
    return service


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def up(root: Path, prefect_port: int = 4200, mlflow_port: int = 5000, timeout_s: float = 120.0,
       auth: bool = False, backend: str = "sqlite", postgres_port: int = 0,
       artifacts: str | None = None) -> dict[str, Service]:
    """Start the servers (those not already running) and wait until they answer.

    With `auth`, Prefect and MLflow require the credentials in RLVR_SERVICES_USER / RLVR_SERVICES_PASSWORD.
    `backend` is MLflow's store: "sqlite" (mlruns/mlflow.db) or "postgres": the database in
    RLVR_MLFLOW_BACKEND_URI when set, else a local PostgreSQL server under .services/postgres on
    `postgres_port` (0: a free port). With postgres, MLflow serves artifacts itself (proxied), storing them
    in `artifacts` (a folder or an object-store URI; default RLVR_MLFLOW_ARTIFACTS, else mlruns/served-artifacts)."""
    root = root.resolve()
    if backend not in BACKENDS:
        raise ServiceError(f"unknown MLflow backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    login = credentials() if auth else None
    external = _external_uri() if backend == "postgres" else ""
    services = running(root)
    for service in services.values():
        if service.name not in ("postgres", "vllm") and service.auth != auth:
            raise ServiceError(f"{service.name} already runs {'with' if service.auth else 'without'} --auth; "
                               "run `rlvr services down` first")
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    prefect_url, mlflow_url = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"
    prefect_env = {"PREFECT_HOME": str(root / ".prefect"), **PREFECT_LIGHT, **prefect_security(prefect_url),
                   # the UI's API address; without it the UI calls port 4200 whatever port the server is on
                   "PREFECT_UI_API_URL": f"{prefect_url}/api"}
    mlflow_command = [_bin("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port), "--workers", "1"]
    mlflow_env = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                  # the server's job runner starts a pool of background consumer processes this
                  # project never submits work to
                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if backend == "sqlite":
        store = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
        destination = (root / "mlruns" / "artifacts").as_uri()
        mlflow_command += ["--backend-store-uri", store, "--default-artifact-root", destination]
    else:
        destination = _artifacts_destination(root, artifacts)
        if external:
            store = postgres.redact(external)
            # through the environment: its password stays off the command line
            mlflow_env["MLFLOW_BACKEND_STORE_URI"] = postgres.with_driver(external)
        else:
            store = None  # known once PostgreSQL runs
        # clients read and write artifacts through the server (mlflow-artifacts:/), never the store itself
        mlflow_command += ["--serve-artifacts", "--artifacts-destination", destination]
    if "mlflow" in services:
        recorded = services["mlflow"].backend or f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"  # older records
        wanted = store if store is not None else \
            (postgres.uri(services["postgres"].port) if "postgres" in services else "a new local PostgreSQL server")
        if recorded != wanted:
            raise ServiceError(f"mlflow already runs on {recorded}, not {wanted}; run `rlvr services down` first")
    if store is None:
        if "postgres" not in services:
            services["postgres"] = _start_postgres(root, postgres_port, timeout_s)
        store = postgres.uri(services["postgres"].port)
        mlflow_command += ["--backend-store-uri", store]
        mlflow_env.update(postgres.client_env(root))
    if login:
        prefect_env["PREFECT_SERVER_API_AUTH_STRING"] = ":".join(login)
        mlflow_command += ["--app-name", "basic-auth"]
        mlflow_env.update(_mlflow_auth_env(root, *login))
    wanted = {
        "prefect": (prefect_port, prefect_url, "/api/health",
                    [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)], prefect_env,
                    f"sqlite:///{root / '.prefect' / 'prefect.db'}", ""),
        "mlflow": (mlflow_port, mlflow_url, "/health", mlflow_command, mlflow_env, store, destination),
    }
    started = {}
    for name, (port, url, health, command, env, store_, artifacts_) in wanted.items():
        if name in services:
            continue
        if _port_in_use(port):
            raise ServiceError(f"{HOST}:{port} is already in use; choose another port for {name}")
        pid, start, log = _spawn(root, name, command, env)
        started[name] = Service(name=name, pid=pid, port=port, url=url, health=url + health, log=log,
                                command=command, start=start, auth=auth, backend=store_, artifacts=artifacts_)
    services.update(started)
    _write_state(root, services)
    deadline = time.monotonic() + timeout_s
    for service in started.values():
        while not _healthy(service.health):
            if not _is_server(service):
                raise ServiceError(f"{service.name} exited during start-up; see {service.log}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{service.name} did not answer {service.health} in {timeout_s:.0f} s; "
                                   f"see {service.log}")
            time.sleep(0.5)
    if login:
        if (root / MLFLOW_AUTH_DB).exists():
            (root / MLFLOW_AUTH_DB).chmod(0o600)  # password hashes: for this user's eyes only
        _check_login(started, *login)
    return services


def prefect_client_env() -> dict[str, str]:
    """PREFECT_API_URL (and PREFECT_API_AUTH_STRING) of the Prefect settings in effect, for subprocesses
    that must talk to the same server as this process."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    if not api.url:
        raise ServiceError("no Prefect server: run `rlvr services up` first (or set PREFECT_API_URL); "
                           "Prefect's temporary server cannot hold deployments or work pools")
    env = {"PREFECT_API_URL": api.url}
    if api.auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = api.auth_string.get_secret_value()
    return env


def start_worker(root: Path, pool: str, timeout_s: float = 300.0) -> Service:
    """Start `prefect worker start --pool POOL --type process` as the recorded service `worker` (or return the
    one already polling `pool`) and wait until the Prefect server lists it online.

    The worker talks to the Prefect server of the settings in effect (`prefect_client_env`); the rest of
    this process's environment goes to the worker and from it to every flow run it starts
    (MLFLOW_TRACKING_URI, PREFECT_HOME, ...). Its health check server listens on 127.0.0.1, on a free port:
    /health answers 200 while the worker keeps polling the server."""
    root = root.resolve()
    client_env = prefect_client_env()
    current = running(root).get("worker")
    if current is not None:
        if current.pool != pool or current.backend != client_env["PREFECT_API_URL"]:
            raise ServiceError(f"a worker already runs for pool {current.pool!r} on {current.backend} (pid "
                               f"{current.pid}); `rlvr services down` stops it")
        return current
    port = _free_port()
    name = f"rlvr-{socket.gethostname()}-{secrets.token_hex(3)}"
    command = [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name,
               "--with-healthcheck"]
    env = {**client_env, "PREFECT_WORKER_WEBSERVER_HOST": HOST, "PREFECT_WORKER_WEBSERVER_PORT": str(port)}
    pid, start, log = _spawn(root, "worker", command, env)
    url = f"http://{HOST}:{port}"
    service = Service(name="worker", pid=pid, port=port, url=url, health=url + "/health", log=log,
                      command=command, start=start, auth="PREFECT_API_AUTH_STRING" in client_env,
                      backend=client_env["PREFECT_API_URL"], pool=pool)
    _write_state(root, {**read_state(root), "worker": service})
    deadline = time.monotonic() + timeout_s
    while not (_healthy(service.health) and _worker_online(pool, name)):
        if not _is_server(service):
            raise ServiceError(f"the worker for pool {pool!r} exited during start-up; see {log}")
        if time.monotonic() > deadline:
            raise ServiceError(f"the worker for pool {pool!r} was not online in {timeout_s:.0f} s; see {log}")
        time.sleep(0.5)
    return service


def _worker_online(pool: str, name: str) -> bool:
    """Whether the Prefect server (of the settings in effect) has a heartbeat from worker `name` in `pool`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return any(w.name == name and w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(pool))


VLLM_HOSTS = ("127.0.0.1", "localhost")  # the services bind to this machine only
VLLM_TIMEOUT_S = 1200.0  # a 7B model loads, profiles memory and captures CUDA graphs in several minutes


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def served_model(root: Path, params) -> str:
    """The model the train stage starts from, as vLLM loads it: models/warmup when the warm-up trains
    (its output must exist), else model.name (what the warm-up passes through); a local folder as an
    absolute path (pass-through references followed), a hub id as it is."""
    from rlvr import models
    from stages.train import MODEL  # the train stage's starting model, models/warmup

    if params.warmup.enabled:
        target = Path(models.resolve(root / MODEL))
        if not (target / "config.json").is_file():
            raise ServiceError(f"train starts from {MODEL}, which holds no model yet (warmup.enabled: true): "
                               f"run `dvc repro warmup` first, then `rlvr services up --vllm`")
        return str(target.resolve())
    local = root / params.model.name  # an absolute model.name stays as it is
    if not local.exists():
        return params.model.name  # a hub id
    target = Path(models.resolve(local))
    return str(target.resolve()) if target.exists() else str(target)


def vllm_command(params, model: str, tensor_parallel: int = 1, data_parallel: int = 1) -> list[str]:
    """The process `trl vllm-serve --model MODEL --host H --port P --dtype D ...` runs (TRL's own command
    builder: vLLM's OpenAI server with the weight-transfer options TRL's GRPO trainer needs), with host and
    port from train.vllm_server_host/port and the dtype from model.dtype."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    from rlvr import models

    dtype = str(models.torch_dtype(params.model.dtype)).removeprefix("torch.")
    args = ScriptArguments(model=model, host=params.train.vllm_server_host, port=params.train.vllm_server_port,
                           dtype=dtype, tensor_parallel_size=tensor_parallel, data_parallel_size=data_parallel,
                           trust_remote_code=params.model.trust_remote_code)
    return build_command(args)


def plan_vllm(root: Path, params, gpus: str | None = None, tensor_parallel: int = 1) -> tuple[str, list[str], dict]:
    """Check what `start_vllm` needs (params in server mode, a local host, the GPUs, vLLM installed, the
    model) and return the model, the command and its extra environment; each problem is one ServiceError."""
    t = params.train
    if not (t.use_vllm and t.vllm_mode == "server"):
        raise ServiceError(f"--vllm starts the server of train.vllm_mode: server, but params.yaml has "
                           f"train.use_vllm: {str(t.use_vllm).lower()}, train.vllm_mode: {t.vllm_mode}; set "
                           "train.use_vllm: true and train.vllm_mode: server (or apply a *-vllm-server recipe)")
    if t.vllm_server_host not in VLLM_HOSTS:
        raise ServiceError(f"params.yaml train.vllm_server_host is {t.vllm_server_host!r}: `rlvr services` starts "
                           f"servers on this machine, bound to {HOST} only; for a server elsewhere run "
                           "`trl vllm-serve` there, or set train.vllm_server_host: 127.0.0.1")
    if tensor_parallel < 1:
        raise ServiceError(f"--vllm-tensor-parallel must be at least 1, not {tensor_parallel}")
    devices = [d.strip() for d in gpus.split(",") if d.strip()] if gpus else []
    if len(devices) % tensor_parallel:
        raise ServiceError(f"--vllm-gpus names {len(devices)} GPUs, not a multiple of --vllm-tensor-parallel "
                           f"{tensor_parallel}")
    if not _vllm_installed():
        raise ServiceError("`rlvr services up --vllm` needs vLLM, which is not installed here: install the GPU "
                           "set, pip install -c requirements/gpu.txt -e '.[gpu,dev]'")
    model = served_model(root.resolve(), params)
    command = vllm_command(params, model, tensor_parallel, max(len(devices) // tensor_parallel, 1))
    # what `trl vllm-serve` sets before it execs the same command: the weight-transfer endpoints need it
    env = {"VLLM_SERVER_DEV_MODE": "1", **({"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else {})}
    return model, command, env


def start_vllm(root: Path, params, gpus: str | None = None, tensor_parallel: int = 1,
               timeout_s: float = VLLM_TIMEOUT_S) -> Service:
    """Start the vLLM server `train.vllm_mode: server` uses, as the recorded service `vllm` (or return the
    one already serving the same model on the same port), and wait until its /health answers.

    `gpus` ("6,7") becomes the server's CUDA_VISIBLE_DEVICES, data parallel over them in groups of
    `tensor_parallel`; without it the server sees what this process sees and uses `tensor_parallel` GPUs.
    The record is written before the wait, so `down` can stop a server that never became ready."""
    root = root.resolve()
    model, command, env = plan_vllm(root, params, gpus, tensor_parallel)
    host, port = params.train.vllm_server_host, params.train.vllm_server_port
    current = running(root).get("vllm")
    if current is not None:
        if current.model != model or current.port != port:
            raise ServiceError(f"a vLLM server already runs for {current.model} on port {current.port} (pid "
                               f"{current.pid}), not {model} on {port}; `rlvr services down` stops it")
        return current
    if _port_in_use(port):
        raise ServiceError(f"{HOST}:{port} (train.vllm_server_port) is already in use; stop what listens there "
                           "or choose another port in params.yaml")
    pid, start, log = _spawn(root, "vllm", command, env)
    url = f"http://{host}:{port}"
    devices = env.get("CUDA_VISIBLE_DEVICES", "")
    service = Service(name="vllm", pid=pid, port=port, url=url, health=url + "/health", log=log, command=command,
                      start=start, backend=f"CUDA_VISIBLE_DEVICES={devices}" if devices else "the GPUs it sees",
                      model=model)
    _write_state(root, {**read_state(root), "vllm": service})
    deadline = time.monotonic() + timeout_s
    while not _healthy(service.health):
        if not _is_server(service):
            raise ServiceError(f"the vLLM server exited during start-up; see {log}")
        if time.monotonic() > deadline:
            raise ServiceError(f"the vLLM server did not answer {service.health} in {timeout_s:.0f} s; see {log} "
                               "(`rlvr services down` stops it)")
        time.sleep(1.0)
    return service


def _signal_group(service: Service, signum: int) -> bool:
    """Signal the server's process group, after checking (again) that the PID is still the server."""
    if not _is_server(service):
        return False
    try:
        os.killpg(service.pid, signum)
    except ProcessLookupError:
        return False
    return True


def down(root: Path, grace_s: float = 15.0) -> dict[str, str]:
    """Stop the recorded servers (their whole process groups: SIGTERM, SIGKILL after `grace_s`), each
    only while its PID is still that server; returns what happened to each, in words."""
    root = root.resolve()
    outcome = {}
    keep = {}
    # the worker first (it reports its runs' end to Prefect); PostgreSQL last: MLflow closes its connections first
    order = {"worker": 0, "postgres": 2}
    for name, service in sorted(read_state(root).items(), key=lambda item: order.get(item[0], 1)):
        kind, why = identify(service)
        if kind == "unknown":
            keep[name] = service  # the server may still run: keep its record
            outcome[name] = f"not signalled: {why}"
            continue
        if kind == "gone":
            outcome[name] = f"was not running ({why})"
            continue
        if kind == "other":
            outcome[name] = f"not signalled: {why}; it is not the server `rlvr services up` started"
            continue
        if name == "postgres":
            outcome[name] = _stop_postgres(root, service, grace_s)
            continue
        _signal_group(service, signal.SIGTERM)
        # From here the PID and start time alone name the server: an exiting process loses its command
        # line (empty /proc/PID/cmdline) before it is gone, so the command check would end the wait early.
        if _wait_gone(service, grace_s):
            outcome[name] = f"stopped (pid {service.pid})"
            continue
        try:
            os.killpg(service.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(service, 10.0)
        outcome[name] = f"stopped (pid {service.pid}, SIGKILL after {grace_s:.0f} s)"
    if keep:
        _write_state(root, keep)
    else:
        (root / STATE).unlink(missing_ok=True)
    return outcome


def _stop_postgres(root: Path, service: Service, grace_s: float) -> str:
    """`pg_ctl stop -m fast` (disconnect clients, checkpoint, exit) on the recorded server, already checked to
    be that server; then `-m immediate`, then SIGKILL of the postmaster, each only while it still runs."""
    bindir = Path(service.command[0]).parent
    text = ""
    for mode in ("fast", "immediate"):
        if not _is_server(service):
            break
        ok, text = postgres.stop(root, bindir, mode, grace_s)
        if _wait_gone(service, grace_s if ok else 1.0):
            return f"stopped (pid {service.pid}, pg_ctl stop -m {mode})"
    if _signal_group(service, signal.SIGKILL):
        _wait_gone(service, 10.0)
        return f"stopped (pid {service.pid}, SIGKILL after pg_ctl stop failed: {text[-300:]})"
    return f"stopped (pid {service.pid})"


def _wait_gone(service: Service, timeout_s: float) -> bool:
    """Wait until the recorded process (PID and start time) no longer runs; False if it still does."""
    from rlvr.tracking import process_start

    deadline = time.monotonic() + timeout_s
    while True:
        _reap(service.pid)
        if process_start(service.pid) != service.start:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _reap(pid: int) -> None:
    """Collect a child we started ourselves (in tests); a no-op for other processes."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _service_healthy(root: Path, service: Service) -> bool:
    if service.name == "postgres":
        return postgres.ready(root, service.port)
    return _healthy(service.health)


def sweep_zombies(root: Path) -> list[str]:
    """What `rlvr services status` does besides reporting: close the runs of stage processes that are gone
    (flows/sweep.py), in the stores the environment points at (the CLI points it at the running servers):
    MLflow runs KILLED, Prefect flow runs Crashed. Without PREFECT_API_URL the flow runs wait for the next
    stage (its temporary server reads the same database); a recorded MLflow server that does not run, or a
    local MLflow store that does not exist yet, is left alone. Returns a line per run closed or side skipped."""
    from flows import sweep
    from rlvr import config, tracking

    params = config.load(str(root / "params.yaml"))
    lines = []
    prefect = sweep.prefect_server_known()
    if not prefect:
        lines.append("Prefect flow runs not swept: no Prefect server runs (the next stage run sweeps them)")
    uri = tracking.tracking_uri(params)
    mlflow = True
    if not os.environ.get("MLFLOW_TRACKING_URI") and "mlflow" in read_state(root) and "mlflow" not in running(root):
        mlflow, why = False, "the recorded MLflow server does not run"
    elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        mlflow, why = False, f"no MLflow store yet at {uri}"
    if not mlflow:
        lines.append(f"MLflow runs not swept: {why}")
    return sweep.sweep(params, prefect=prefect, mlflow=mlflow) + lines


def status(root: Path) -> dict[str, dict]:
    """Per recorded server: URL, PID, backend (its store; PostgreSQL: its data folder), artifact store, log,
    --auth, whether the PID is still that server (and why not), and whether it answers its health check."""
    root = root.resolve()
    report = {}
    for name, s in read_state(root).items():
        kind, why = identify(s)
        report[name] = {"url": s.url, "pid": s.pid, "backend": s.backend or "unrecorded (older version)",
                        "log": s.log, "auth": s.auth, "is_server": kind == "server",
                        "healthy": kind == "server" and _service_healthy(root, s)}
        if s.artifacts:
            report[name]["artifacts"] = s.artifacts
        if s.pool:
            report[name]["pool"] = s.pool
        if s.model:
            report[name]["model"] = s.model
        if why:
            report[name]["problem"] = why
    return report
