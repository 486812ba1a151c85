"""The retrain deployment on a Prefect work pool (`rlvr schedule`): prefect.yaml, its pool, its worker.

prefect.yaml (project root) declares the retrain deployment: entrypoint flows/retrain.py:retrain,
work pool `rlvr`, a concurrency limit of 1 (collision strategy ENQUEUE) and the cron schedule.
`rlvr schedule`:
1. `render` writes the retrain deployment's name, cron, time zone and params_file into prefect.yaml
   from params.yaml (retrain.deployment, retrain.cron, retrain.timezone) and --params. params.yaml
   stays the one place to edit them; the file is rewritten only where it differs, comments and
   every other key kept (ruamel.yaml round trip), so `prefect deploy` run by hand deploys the same
   thing, and tests/test_schedule.py fails when the committed prefect.yaml lags behind the committed
   params.yaml.
2. `ensure_pool` creates the deployment's work pool as a `process` pool when the server has none of
   that name (an existing pool of any type is left as it is).
3. `deploy` runs `prefect deploy --prefect-file prefect.yaml --name NAME`: Prefect itself reads the
   file, so what `rlvr schedule` deploys is exactly what the file declares.
4. `services.start_worker` starts `prefect worker start --pool POOL` as a recorded service, next to the
   servers: `rlvr services status` shows it, `rlvr services down` stops it. Only for a process pool;
   Docker and Kubernetes workers run where Docker or the cluster is (docs/operations.md).

Why a pool rather than `Flow.serve`: the schedule and the queue of runs live on the server; workers
may run on other machines, several may poll one pool, and the concurrency limit holds across all of
them. `rlvr schedule --serve` keeps the single-process path (no pool, no worker, blocks).

How the limit works (Prefect 3 server): the deployment owns a global concurrency limit of 1 slot. A
worker takes the slot when it moves a run to Pending, before it starts a process; a run that finds it
taken goes back to Scheduled, named AwaitingConcurrencySlot, for
PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS (30 s) and is tried again. The slot comes back
when the run ends, or through the server's repossessor when the run's lease lapses (its process was
killed with SIGKILL), which is why `rlvr services up` keeps that server service on.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flows import services
from rlvr.errors import RlvrError

PREFECT_FILE = Path("prefect.yaml")
ENTRYPOINT = "flows/retrain.py:retrain"
POOL_TYPE = "process"  # the pool type `rlvr schedule` creates and runs a worker for


class ScheduleError(RlvrError):
    pass


@dataclass
class Deployed:
    name: str                      # flow/deployment
    id: str
    pool: str
    pool_type: str
    pool_created: bool
    crons: list[str]
    concurrency_limit: int | None
    collision_strategy: str | None
    worker: services.Service | None  # None: --no-worker, or a pool that is not a process pool


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments and key order survive a rewrite
    yaml.preserve_quotes = True
    yaml.width = 4096  # never fold a long description onto a second line
    return yaml


def load(path: Path):
    """prefect.yaml as ruamel.yaml's round-trip mapping; one clear error when it is missing or malformed."""
    from ruamel.yaml.error import YAMLError

    if not path.is_file():
        raise ScheduleError(f"{path}: not found; `rlvr schedule` deploys what it declares (restore it from git)")
    try:
        data = _yaml().load(path.read_text())
    except YAMLError as error:
        raise ScheduleError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise ScheduleError(f"{path}: expected a mapping with a `deployments:` list")
    return data


def deployment(data, path: Path, *, name: str | None = None, entrypoint: str | None = None) -> dict:
    """The one deployment of prefect.yaml with this name (or this entrypoint), checked for a work pool."""
    key, value = ("name", name) if name is not None else ("entrypoint", entrypoint)
    found = [d for d in data["deployments"] if isinstance(d, dict) and d.get(key) == value]
    if len(found) != 1:
        raise ScheduleError(f"{path}: {len(found)} deployments have {key} {value!r}; exactly one must "
                            + ("(set retrain.deployment in params.yaml to its name)" if key == "name" else
                               f"(the retrain deployment, entrypoint {ENTRYPOINT})"))
    spec = found[0]
    if not isinstance(spec.get("work_pool"), dict) or not spec["work_pool"].get("name"):
        raise ScheduleError(f"{path}: deployment {spec.get('name')!r} names no work pool; add "
                            "`work_pool: {name: rlvr}` (a process pool `rlvr schedule` creates)")
    return spec


def render(root: Path, params, params_file: str = "params.yaml") -> list[str]:
    """Set the retrain deployment's name, first schedule's cron and time zone and params_file in
    prefect.yaml from params (retrain.deployment, retrain.cron, retrain.timezone) and `params_file`;
    rewrite the file (atomically) only when something differs. Returns the changes, in words (empty
    when the file already agrees)."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    from rlvr.io import write_text

    path = root / PREFECT_FILE
    data = load(path)
    spec = deployment(data, path, entrypoint=ENTRYPOINT)
    r = params.retrain
    others = [d.get("name") for d in data["deployments"] if isinstance(d, dict) and d is not spec]
    if r.deployment in others:
        raise ScheduleError(f"{path}: another deployment is already named {r.deployment!r}; choose another "
                            f"retrain.deployment in {params_file}")
    changes = []
    if spec.get("name") != r.deployment:
        changes.append(f"name {spec.get('name')!r} -> {r.deployment!r}")
        spec["name"] = r.deployment
    schedules = spec.get("schedules")
    if not isinstance(schedules, list) or not schedules or not isinstance(schedules[0], dict):
        changes.append(f"schedules -> cron {r.cron!r} in {r.timezone}")
        spec["schedules"] = [{"cron": DoubleQuotedScalarString(r.cron),
                              "timezone": DoubleQuotedScalarString(r.timezone)}]
    else:
        if schedules[0].get("cron") != r.cron:
            changes.append(f"cron {schedules[0].get('cron')!r} -> {r.cron!r}")
            schedules[0]["cron"] = DoubleQuotedScalarString(r.cron)
        if schedules[0].get("timezone") != r.timezone:  # absent: Prefect reads the cron in UTC
            changes.append(f"timezone {schedules[0].get('timezone')!r} -> {r.timezone!r}")
            schedules[0]["timezone"] = DoubleQuotedScalarString(r.timezone)
    if not isinstance(spec.get("parameters"), dict):
        spec["parameters"] = {}
    if spec["parameters"].get("params_file") != params_file:
        changes.append(f"parameters.params_file {spec['parameters'].get('params_file')!r} -> {params_file!r}")
        spec["parameters"]["params_file"] = params_file
    if changes:
        text = io.StringIO()
        _yaml().dump(data, text)
        write_text(path, text.getvalue())
    return changes


def ensure_pool(name: str) -> tuple[str, bool]:
    """The work pool's type, and whether it was created now (as a process pool, Prefect's default job
    template)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type, False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:  # created meanwhile by another `rlvr schedule` or a worker
            return client.read_work_pool(name).type, False
    return POOL_TYPE, True


def deploy(root: Path, name: str, worker: bool = True, timeout_s: float = 600.0) -> Deployed:
    """Deploy prefect.yaml's deployment `name` to the Prefect server in effect (creating its work pool
    when missing) and, with `worker` and a process pool, start the recorded worker service. `timeout_s`
    bounds `prefect deploy` and the worker's start, each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.schedules import CronSchedule

    root = root.resolve()
    path = root / PREFECT_FILE
    spec = deployment(load(path), path, name=name)
    client_env = services.prefect_client_env()
    pool = spec["work_pool"]["name"]
    pool_type, created = ensure_pool(pool)
    prefect = Path(sys.executable).parent / "prefect"
    # PREFECT_CLI_PROMPT=false: never ask (about Docker images, pull steps, saving the file); COLUMNS: the
    # output is read by people in an error message, not wrapped at 80 columns
    try:
        result = subprocess.run([str(prefect) if prefect.exists() else "prefect", "deploy", "--prefect-file",
                                 str(path), "--name", name], cwd=root, capture_output=True, text=True,
                                timeout=timeout_s,
                                env={**os.environ, **client_env, "PREFECT_CLI_PROMPT": "false", "COLUMNS": "200"})
    except subprocess.TimeoutExpired:
        raise ScheduleError(f"`prefect deploy --name {name}` did not finish in {timeout_s:.0f} s") from None
    if result.returncode != 0:
        tail = " | ".join(line.strip() for line in (result.stdout + result.stderr).splitlines()[-8:] if line.strip())
        raise ScheduleError(f"`prefect deploy --name {name}` from {path} failed: {tail}")
    with get_client(sync_client=True) as client:
        found = [d for d in client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[name]))) if d.entrypoint == spec["entrypoint"]]
        if len(found) != 1:
            raise ScheduleError(f"`prefect deploy` succeeded but the server has {len(found)} deployments named "
                                f"{name!r} with entrypoint {spec['entrypoint']}")
        record = found[0]
        flow_name = client.read_flow(record.flow_id).name
    limit = record.global_concurrency_limit.limit if record.global_concurrency_limit else None
    strategy = record.concurrency_options.collision_strategy.value if record.concurrency_options else None
    started = services.start_worker(root, pool, timeout_s) if worker and pool_type == POOL_TYPE else None
    return Deployed(name=f"{flow_name}/{record.name}", id=str(record.id), pool=pool, pool_type=pool_type,
                    pool_created=created, crons=[f"{s.schedule.cron} ({s.schedule.timezone or 'UTC'})"
                                                 for s in record.schedules if isinstance(s.schedule, CronSchedule)],
                    concurrency_limit=limit, collision_strategy=strategy, worker=started)
