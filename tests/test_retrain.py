"""End to end, real servers on loopback: services up, retrain three times, schedule (served, and on a work pool
with a worker), lineage, services down."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import services
from rlvr import registry, tracking
from tests.conftest import free_port
from tests.test_pipeline import make_repo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "DVC_"))}
    env.update(services.environment(repo))
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(repo)
    return env


def _rlvr(repo: Path, *args: str) -> str:
    result = subprocess.run([str(BIN / "rlvr"), *args], cwd=repo, env=_env(repo), capture_output=True, text=True)
    assert result.returncode == 0, f"rlvr {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _retrain(repo: Path) -> dict:
    out = _rlvr(repo, "retrain")
    return json.loads(out[out.rindex("\n{") + 1 :] if "\n{" in out else out)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = None

    def shrink(p):
        nonlocal params
        p["retrain"].update(min_improvement=0.05, cron="17 4 * * 1", timezone="Europe/Berlin")
        params = p

    repo = make_repo(tmp_path_factory.mktemp("retrain"), shrink)
    running = services.up(repo, prefect_port=free_port(), mlflow_port=free_port())
    assert all(s.url.startswith("http://127.0.0.1:") for s in running.values())
    yield repo, params, running
    services.down(repo)


@pytest.fixture(scope="module")
def client(project):
    from mlflow import MlflowClient

    repo, _, running = project
    return MlflowClient(tracking_uri=running["mlflow"].url)


def test_retrain_registers_schedules_and_traces(project, client):
    repo, params, running = project
    name = params["retrain"]["registered_model"]

    # 1. First retrain: the whole pipeline runs, nested under the retrain run; version 1 becomes champion.
    first = _retrain(repo)
    assert set(first["ran_stages"]) == {"prepare", "warmup", "score", "rollout", "filter", "one_shot", "train",
                                       "evaluate"}
    assert first["registered"] and first["promoted"] and first["version"] == "1"
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == "1"
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, "tags.`rlvr.flow` = 'retrain'")
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["dvc.stage"] for r in children) == sorted(first["ran_stages"])
    version = client.get_model_version(name, "1")
    assert version.source.endswith("/model") and (Path(version.source.removeprefix("file://")) / "config.json").is_file()

    # 2. Lineage of version 1 matches the runs and the digests that were recorded.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    text = _rlvr(repo, "lineage", "--version", "1")
    for run in children:
        assert run.info.run_id in text, f"{run.data.tags['dvc.stage']} run missing from the lineage"
    for stage in ("train", "warmup", "prepare", "filter", "rollout", "score"):
        for dep in lock[stage]["deps"]:
            if dep["path"].startswith(("data/", "models/")):
                assert f"{dep['path']} md5 {dep['md5']} = dvc.lock" in text
    assert version.tags["dvc.md5"] in text and "[source: no run produced it]" in text  # data/sources
    record = registry.lineage(client, name, "1", repo / "dvc.lock")
    assert record["train"].run_id == version.run_id
    assert [e["run_id"] for e in record["evaluations"]] == [version.tags["evaluate_run_id"]]

    # 3. Nothing changed: no stage runs, nothing new is registered or promoted.
    second = _retrain(repo)
    assert second["changed_stages"] == [] and second["ran_stages"] == []
    assert not second["registered"] and not second["promoted"] and second["version"] == "1"

    # 4. The schedule without a pool: `rlvr schedule --serve` serves the retrain flow; its deployment carries
    # the cron from params.
    deployment = f"retrain/{params['retrain']['deployment']}"
    proc = subprocess.Popen([str(BIN / "rlvr"), "schedule", "--serve"], cwd=repo, env=_env(repo),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cron = _wait_for_schedule(running["prefect"].url + "/api", deployment)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert cron == f"{params['retrain']['cron']} (Europe/Berlin)"

    # 4b. The default: `rlvr schedule` writes the cron into prefect.yaml, deploys it to the process pool with
    # its concurrency limit and starts a worker; a run triggered through the API completes on the worker and
    # records its MLflow retrain run (nothing changed, so it trains nothing).
    out = _rlvr(repo, "schedule")
    assert f"cron '0 3 * * *' -> '{params['retrain']['cron']}'" in out and "concurrency limit 1 (ENQUEUE)" in out, out
    assert "timezone 'UTC' -> 'Europe/Berlin'" in out and "(Europe/Berlin)" in out, out
    assert yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"][0]["schedules"] == \
        [{"cron": params["retrain"]["cron"], "timezone": "Europe/Berlin"}]
    worker = services.running(repo)["worker"]
    run = _run_deployment(running["prefect"].url + "/api", deployment)
    assert run.state.is_completed() and run.work_pool_name == "rlvr", run.state
    assert str(run.id) in Path(worker.log).read_text()  # the worker submitted it
    retrains = client.search_runs(experiments, "tags.`rlvr.flow` = 'retrain'")
    assert len(retrains) == 3 and all(r.info.status == "FINISHED" for r in retrains)
    assert services.status(repo)["worker"]["healthy"]

    # 5. A worse model (a shorter warm-up; the shrunk GRPO run cannot change a model that solves
    # nothing, so the warm-up decides): the stages from warmup on rerun, version 2 is registered, the
    # alias stays.
    changed = yaml.safe_load((repo / "params.yaml").read_text())
    changed["warmup"]["max_steps"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    third = _retrain(repo)
    assert set(third["ran_stages"]) == {"warmup", "score", "rollout", "filter", "train", "evaluate"}
    assert third["registered"] and third["version"] == "2" and not third["promoted"]
    assert third["value"] < first["value"] + params["retrain"]["min_improvement"]
    assert client.get_model_version_by_alias(name, registry.CHAMPION).version == "1"


def test_the_uis_show_the_stage_runs_the_decision_and_the_model(project, client, tmp_path):
    """After the retrain above: a real browser with no network opens the Prefect and MLflow UIs that
    `rlvr services up` serves and finds a stage's flow run, the retrain decision artifact, the runs
    table (MLflow's model-training view, not its GenAI one) and the registered model."""
    from tests.browser import chromium_path

    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    _, params, running = project
    name = params["retrain"]["registered_model"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    (stage,) = client.search_runs(experiments, "tags.`dvc.stage` = 'evaluate'", max_results=1)
    decision = latest_artifact(running["prefect"].url + "/api", "retrain-decision")
    pages = service_pages(running["prefect"].url, running["mlflow"].url, stage, decision, name, "1")
    seconds = check_pages(pages, tmp_path)
    print(f"chromium: {len(pages)} UI pages in {seconds:.1f} s")


def latest_artifact(api_url: str, key: str) -> str:
    """The id of the newest Prefect artifact with this key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                             sort=ArtifactSort.CREATED_DESC, limit=1)
    return str(artifact.id)


def service_pages(prefect: str, mlflow: str, stage, decision: str, model: str,
                  version: str) -> dict[str, tuple[str, list[str]]]:
    """Page -> (URL, texts it must show) for a stage's MLflow run `stage`, the retrain decision artifact
    (its id) and a registered model version. MLflow 3 opens an experiment in its GenAI view unless the
    URL asks for `workflowType=machine_learning`."""
    from flows.services import ui_pages
    from rlvr.tracking import registry_url

    experiment, flow_run = stage.info.experiment_id, stage.data.tags["prefect.flow_run_id"]
    # the pages `rlvr services up` prints (the experiment by name, as it looks it up) and the retrain's link
    printed = ui_pages(prefect, mlflow, mlflow_experiment_name(mlflow, experiment))
    assert printed["MLflow runs"] == f"{mlflow}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    return {
        "prefect-stage-run": (f"{prefect}/runs/flow-run/{flow_run}", [stage.data.tags["dvc.stage"], "Completed"]),
        "prefect-retrain-decisions": (f"{prefect}/artifacts/key/retrain-decision", ["retrain-decision", "Flow run"]),
        "prefect-retrain-decision": (f"{prefect}/artifacts/artifact/{decision}", ["retrain-decision", "Retrain:"]),
        "mlflow-runs": (printed["MLflow runs"], ["Model registry", "retrain", "matching run"]),
        "mlflow-registry": (printed["MLflow models"], ["Registered Models", model]),
        "mlflow-model": (registry_url(mlflow, model), [model, f"Version {version}"]),
    }


def mlflow_experiment_name(mlflow: str, experiment_id: str) -> str:
    import mlflow as mlflow_client

    return mlflow_client.MlflowClient(mlflow).get_experiment(experiment_id).name


# Errors the UIs log whatever the data: MLflow's UI asks for the signed-in user, an endpoint only its
# auth app serves; Prefect's server has no favicon, and its flow-run page asks for an icon named
# "undefined". All are 404s on this machine's own servers.
UI_NOISE = ("/ajax-api/2.0/mlflow/users/current", "/favicon.ico", "/ico/undefined.svg")


def check_pages(pages: dict[str, tuple[str, list[str]]], shots: Path) -> float:
    """Open each page offline; each must show its texts, with no script error and no request off the
    machine. Saves a screenshot per page into `shots`; returns the seconds it took."""
    from tests.browser import Browser

    start = time.monotonic()
    problems = []
    with Browser(offline=True, timeout=120) as browser:
        for label, (url, texts) in pages.items():
            ready = " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)
            visit = browser.visit(url, ready=f"!!document.body && {ready}", settle=1.0,
                                  evaluate={"text": "document.body ? document.body.innerText : ''"},
                                  screenshot=shots / f"{label}.png")
            errors = [e for e in visit.errors if not any(noise in e for noise in UI_NOISE)]
            if not visit.ready:
                shown = " | ".join(visit.values["text"].split())[:1500]
                problems.append(f"{label}: {url} does not show {texts}; it shows: {shown}")
            if visit.outside:
                problems.append(f"{label}: requests left the machine: {visit.outside}")
            if errors:
                problems.append(f"{label}: {url}: {errors}")
    assert problems == [], "\n".join(problems)
    return time.monotonic() - start


def _wait_for_schedule(api_url: str, deployment: str, timeout_s: float = 90.0) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> str | None:
        async with get_client() as prefect:
            try:
                found = await prefect.read_deployment_by_name(deployment)
            except ObjectNotFound:
                return None
            schedule = found.schedules[0].schedule if found.schedules else None
            return f"{schedule.cron} ({schedule.timezone})" if schedule else None

    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api_url}):
        while time.monotonic() < deadline:
            cron = asyncio.run(read())
            if cron:
                return cron
            time.sleep(1.0)
    raise AssertionError(f"deployment {deployment} with a schedule did not appear in {timeout_s} s")


def _run_deployment(api_url: str, deployment: str, timeout_s: float = 900.0):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        run = run_deployment(deployment, timeout=0)
        deadline = time.monotonic() + timeout_s
        with get_client(sync_client=True) as prefect:
            while time.monotonic() < deadline:
                run = prefect.read_flow_run(run.id)
                if run.state.is_final():
                    return run
                time.sleep(1.0)
    raise AssertionError(f"{deployment}: flow run {run.id} not finished in {timeout_s} s ({run.state})")


def test_services_down_stops_the_recorded_processes(tmp_path):
    (tmp_path / "mlruns").mkdir()
    running = services.up(tmp_path, prefect_port=free_port(), mlflow_port=free_port())
    pids = [s.pid for s in running.values()]
    assert all(services.status(tmp_path)[n]["healthy"] for n in running)
    outcome = services.down(tmp_path)
    assert sorted(outcome) == ["mlflow", "prefect"]
    assert all(text.startswith("stopped") for text in outcome.values()), outcome
    assert all(tracking.process_start(pid) is None for pid in pids)
    assert services.read_state(tmp_path) == {}
    assert (tmp_path / "logs" / "prefect.log").is_file() and (tmp_path / ".prefect").is_dir()
