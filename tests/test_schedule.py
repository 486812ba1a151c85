"""`rlvr schedule`: prefect.yaml rendered from params, and (e2e) the work pool, the deployment with its
concurrency limit, and the worker on a real Prefect server on loopback."""

import difflib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from flows import schedule, services
from rlvr import config, tracking
from tests.conftest import ROOT, free_port, real_params_dict, small_params_dict


def _params(**retrain):
    data = small_params_dict()
    data["retrain"].update(retrain)
    return config.from_dict(data)


def _project(tmp_path: Path) -> Path:
    shutil.copy2(ROOT / schedule.PREFECT_FILE, tmp_path / schedule.PREFECT_FILE)
    return tmp_path


def test_committed_prefect_yaml_agrees_with_params_and_declares_the_limit(tmp_path):
    from prefect.cli.deploy._models import PrefectYamlModel

    root = _project(tmp_path)
    before = (root / "prefect.yaml").read_bytes()
    assert schedule.render(root, config.load(ROOT / "params.yaml")) == [], \
        "prefect.yaml lags behind params.yaml: run `rlvr schedule` (or edit retrain.* in params.yaml back)"
    assert (root / "prefect.yaml").read_bytes() == before
    # Prefect's own reader of the file accepts it, and sees what `rlvr schedule` relies on
    model = PrefectYamlModel.model_validate(yaml.safe_load(before))
    (retrain,) = [d for d in model.deployments if d.entrypoint == schedule.ENTRYPOINT]
    params = real_params_dict()["retrain"]
    assert retrain.name == params["deployment"] and [s.cron for s in retrain.schedules] == [params["cron"]]
    assert [s.timezone for s in retrain.schedules] == [params["timezone"]] == ["UTC"]  # stated, not implied
    assert retrain.concurrency_limit.limit == 1 and retrain.concurrency_limit.collision_strategy == "ENQUEUE"
    assert retrain.work_pool.name and retrain.parameters == {"params_file": "params.yaml"}
    path, function = schedule.ENTRYPOINT.split(":")
    assert f"def {function}(" in (ROOT / path).read_text()


def test_render_writes_name_cron_and_params_file_and_keeps_the_rest(tmp_path):
    root = _project(tmp_path)
    before = (root / "prefect.yaml").read_text()
    changes = schedule.render(root, _params(cron="17 4 * * 1", deployment="weekly"), "other.yaml")
    assert len(changes) == 3 and any("'17 4 * * 1'" in c for c in changes), changes
    after = (root / "prefect.yaml").read_text()
    changed = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]
    # exactly three lines replaced: the comments, the pool and the concurrency limit stay as written
    assert len(changed) == 6, "\n".join(changed)
    old, new = yaml.safe_load(before), yaml.safe_load(after)
    old["deployments"][0].update(name="weekly", schedules=[{"cron": "17 4 * * 1", "timezone": "UTC"}],
                                 parameters={"params_file": "other.yaml"})
    assert new == old
    assert schedule.render(root, _params(cron="17 4 * * 1", deployment="weekly"), "other.yaml") == []
    assert (root / "prefect.yaml").read_text() == after


def test_render_writes_the_time_zone_and_prefect_reads_the_cron_in_it(tmp_path):
    from prefect.cli.deploy._models import PrefectYamlModel

    root = _project(tmp_path)
    assert schedule.render(root, _params(timezone="Europe/Berlin")) == ["timezone 'UTC' -> 'Europe/Berlin'"]
    data = yaml.safe_load((root / "prefect.yaml").read_text())
    assert data["deployments"][0]["schedules"] == [{"cron": "0 3 * * *", "timezone": "Europe/Berlin"}]
    (retrain,) = PrefectYamlModel.model_validate(data).deployments
    (cron,) = retrain.schedules
    assert cron.timezone == "Europe/Berlin"
    # A prefect.yaml without a time zone (as before retrain.timezone existed) gets one written.
    data["deployments"][0]["schedules"] = [{"cron": "0 3 * * *"}]
    (root / "prefect.yaml").write_text(yaml.safe_dump(data))
    assert schedule.render(root, _params()) == ["timezone None -> 'UTC'"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["deployments"][0].update(entrypoint="flows/other.py:other"), "the retrain deployment"),
    (lambda d: d["deployments"].append({**d["deployments"][0], "entrypoint": "x.py:x"}), "another deployment"),
    (lambda d: d["deployments"][0].pop("work_pool"), "names no work pool"),
])
def test_render_refuses_a_prefect_yaml_it_cannot_use(tmp_path, edit, message):
    data = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    edit(data)
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(schedule.ScheduleError, match=message) as error:
        schedule.render(tmp_path, config.load(ROOT / "params.yaml"))
    assert "prefect.yaml" in str(error.value)


def test_deploy_without_a_server_says_how_to_start_one(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = _project(tmp_path)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(services.ServiceError, match="rlvr services up"):
        schedule.deploy(root, real_params_dict()["retrain"]["deployment"])


# ---------------------------------------------------------------------------------------------------------
# End to end: pool, deploy (with the concurrency limit), worker, two runs through the API.

PROBE = '''\
import json
import os
import time
from pathlib import Path

from prefect import flow


def _ancestors() -> list[int]:
    pids, pid = [], os.getpid()
    while pid > 1:
        pids.append(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return pids


@flow(name="probe")
def probe(seconds: float, tag: str) -> None:
    """Sleeps, then says where it ran."""
    time.sleep(seconds)
    Path("runs").mkdir(exist_ok=True)
    Path("runs", tag + ".json").write_text(json.dumps({"ancestors": _ancestors(), "cwd": os.getcwd()}))
'''


def _wait_final(client, run_id, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} not finished in {timeout_s} s: {run.state}")


@pytest.mark.slow
@pytest.mark.e2e
def test_pool_deploy_worker_and_the_concurrency_limit(tmp_path, monkeypatch):
    """The path of `rlvr schedule` (schedule.deploy: pool, `prefect deploy` of prefect.yaml, worker service)
    with a small flow in place of the retrain: both runs complete on the worker, the second waits for the
    first (AwaitingConcurrencySlot) and starts only after it ended."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    root = tmp_path
    (root / "mlruns").mkdir()
    (root / "probe.py").write_text(PROBE)
    # the deployment as shipped (pool, concurrency limit), with the probe flow in place of the retrain
    data = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (spec,) = [d for d in data["deployments"] if d["entrypoint"] == schedule.ENTRYPOINT]
    spec.update(name="probe", entrypoint="probe.py:probe", parameters={"seconds": 0, "tag": "default"},
                schedules=[])
    (root / "prefect.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    # shorter waits than in production (30 s before a waiting run is tried again, 10 s between polls)
    monkeypatch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")
    monkeypatch.setenv("PREFECT_WORKER_QUERY_SECONDS", "1")
    monkeypatch.setenv("PREFECT_HOME", str(root / ".prefect"))
    for key in [k for k in os.environ if k.startswith(("PREFECT_API_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    try:
        # generous timeouts: a loaded 2-core machine takes minutes where an idle one takes 30 s
        running = services.up(root, prefect_port=free_port(), mlflow_port=free_port(), timeout_s=600)
        api = running["prefect"].url + "/api"
        with temporary_settings({PREFECT_API_URL: api}):
            deployed = schedule.deploy(root, "probe", timeout_s=600)
            assert deployed.name == "probe/probe" and deployed.pool == spec["work_pool"]["name"]
            assert deployed.pool_type == "process" and deployed.pool_created
            assert deployed.concurrency_limit == 1 and deployed.collision_strategy == "ENQUEUE"
            worker = deployed.worker
            assert worker is not None and services.status(root)["worker"]["healthy"]
            assert services.status(root)["worker"]["pool"] == deployed.pool
            # a second `rlvr schedule` keeps the pool and the worker
            assert schedule.ensure_pool(deployed.pool) == ("process", False)
            assert services.start_worker(root, deployed.pool).pid == worker.pid

            with get_client(sync_client=True) as client:
                record = client.read_deployment(deployed.id)
                assert record.pull_steps == [
                    {"prefect.deployments.steps.set_working_directory": {"directory": str(root.resolve())}}]
                first = run_deployment("probe/probe", parameters={"seconds": 6, "tag": "first"}, timeout=0)
                deadline = time.monotonic() + 600
                while client.read_flow_run(first.id).state.type.value not in ("PENDING", "RUNNING"):
                    assert time.monotonic() < deadline, "the worker did not pick up the first run"
                    time.sleep(0.3)
                second = run_deployment("probe/probe", parameters={"seconds": 0, "tag": "second"}, timeout=0)
                first = _wait_final(client, first.id, 600)
                second = _wait_final(client, second.id, 600)
                waits = [s.name for s in client.read_flow_run_states(second.id)]
        assert first.state.is_completed() and second.state.is_completed(), (first.state, second.state)
        assert "AwaitingConcurrencySlot" in waits, waits
        assert second.start_time >= first.end_time, (first.start_time, first.end_time, second.start_time)
        assert first.work_pool_name == second.work_pool_name == deployed.pool
        for tag in ("first", "second"):
            where = json.loads((root / "runs" / f"{tag}.json").read_text())
            assert worker.pid in where["ancestors"] and where["cwd"] == str(root.resolve())
    finally:
        outcome = services.down(root)
    assert outcome["worker"].startswith("stopped"), outcome
    assert tracking.process_start(worker.pid) is None
    print(f"\nwork pool e2e: {time.monotonic() - started:.1f} s (first run {first.start_time} - {first.end_time}, "
          f"second {second.start_time} - {second.end_time})")


def test_down_stops_the_worker_before_the_servers(tmp_path):
    """The worker goes first: it reports the end of the runs it started to a Prefect server still up."""
    import sys

    order = tmp_path / "order"

    def stand_in(name: str) -> services.Service:
        code = (f"import signal, sys, time\n"
                f"def stop(*_):\n    open({str(order)!r}, 'a').write('{name}\\n')\n    sys.exit(0)\n"
                f"signal.signal(signal.SIGTERM, stop)\nopen({str(tmp_path / name)!r}, 'w').close()\ntime.sleep(120)\n")
        command = [sys.executable, "-c", code]
        pid, start, log = services._spawn(tmp_path, name, command, {})
        return services.Service(name=name, pid=pid, port=1, url="http://127.0.0.1:1", health="http://127.0.0.1:1/health",
                                log=log, command=command, start=start, pool="rlvr" if name == "worker" else "")

    records = {name: stand_in(name) for name in ("prefect", "mlflow", "worker")}
    services._write_state(tmp_path, records)
    deadline = time.monotonic() + 120
    while not all((tmp_path / name).exists() for name in records):  # signal handlers installed
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert services.status(tmp_path)["worker"]["pool"] == "rlvr"
    outcome = services.down(tmp_path)
    assert list(outcome)[0] == "worker" and all(v.startswith("stopped") for v in outcome.values()), outcome
    stopped = order.read_text().splitlines()
    assert stopped[0] == "worker" and sorted(stopped[1:]) == ["mlflow", "prefect"]
