"""How a flow run and its MLflow run refer to each other, and closing what a killed stage left open.

Links: the MLflow run is tagged with the flow run's id and page (`flow_run_tags`), the flow run gets an
artifact leading to the MLflow run (`link_mlflow_run`); stages and the retrain flow both use them.

A killed stage: its Prefect flow run ends Crashed, its MLflow run KILLED.

A SIGKILL (`kill -9`, the OOM killer, a machine that went down) lets a stage process end nothing: its
flow run and its task run stay Running in Prefect, its MLflow run RUNNING. So both records carry the
process that runs them: the MLflow run as tags (rlvr/tracking.py), the Prefect flow run as labels with
the same keys (`process.host`, `process.pid`, `process.start`, the start time telling a reused pid
apart). `sweep()` looks for open records whose process provably no longer runs and closes them, each
on its own evidence: a flow run is Crashed by its own labels, whatever became of its MLflow run (an
exception in the MLflow store must not keep the flow run Running), and an MLflow run KILLED by its tags
also crashes the flow run it names.

Who sweeps: every stage, before its own run, for every stage (not only its own: a killed `train` is
closed by whatever runs next), and `rlvr services status`. Both talk to the Prefect server in effect:
the one of `rlvr services up`, or a stage's temporary server, which reads the same database
(.prefect/prefect.db under the project); `rlvr services status` without a running Prefect server
closes the MLflow runs and leaves the flow runs to the next stage.

Not covered: processes on another host (they cannot be checked from here; left open), a stage killed
between the creation of its flow run and its first statement (no labels yet; a fraction of a second),
and records written before these tags and labels existed.
"""

from __future__ import annotations

import logging

from rlvr import tracking
from rlvr.config import Params

log = logging.getLogger(__name__)

FLOW_RUN_TAG = "prefect.flow_run_id"  # on the MLflow run: the flow run that runs it
FLOW_RUN_URL_TAG = "prefect.flow_run_url"  # on the MLflow run: that flow run's page, when a Prefect UI runs
PAGE = 200  # flow runs per API call: the most Prefect's server returns at once


def flow_run_tags() -> dict[str, str]:
    """The MLflow tags that lead to this flow run: its id, and its page when a Prefect UI serves it."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    tags = {FLOW_RUN_TAG: str(flow_run.id)}
    url = url_for("flow-run", obj_id=str(flow_run.id))  # None for the temporary server, which has no UI
    if url:
        tags[FLOW_RUN_URL_TAG] = url
    return tags


def artifact_key(stage: str, what: str) -> str:
    """A Prefect artifact key for a stage: Prefect allows lowercase letters, digits and dashes only, so
    `one_shot` becomes `one-shot` (`one-shot-mlflow-run`)."""
    return f"{stage.lower().replace('_', '-')}-{what}"


def link_mlflow_run(stage: str, run, params: Params) -> str | None:
    """An artifact on the flow run that leads to its MLflow run; returns the run's URL (None: no server)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    uri = tracking.tracking_uri(params)
    url = tracking.run_url(uri, run.info.experiment_id, run.info.run_id)
    key = artifact_key(stage, "mlflow-run")
    if url:
        create_link_artifact(link=url, link_text=f"MLflow run {run.info.run_id} ({stage})", key=key,
                             description=f"The MLflow run of this `{stage}` flow run: params, inputs with their "
                                         "DVC digests, metrics and plots.")
    else:
        create_markdown_artifact(key=key, description=f"The MLflow run of this `{stage}` flow run", markdown=(
            f"MLflow run `{run.info.run_id}` (experiment {run.info.experiment_id}) in the local store `{uri}`.\n\n"
            f"Open it with `rlvr services up`: with a tracking server (MLFLOW_TRACKING_URI) this artifact is a "
            f"link to the run's page, `<MLflow URL>/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}`."))
    return url


def label_flow_run(flow_run_id: str) -> None:
    """Record this process on the flow run (labels), so a later sweep can tell that it is gone."""
    from prefect import get_client

    labels = tracking.process_tags()
    if labels:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(flow_run_id, labels)


def _crash(client, flow_run_id: str, reason: str) -> bool:
    """Crash the flow run and its task runs that are not final; False when there was nothing to do."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    try:
        state = client.read_flow_run(flow_run_id).state
    except ObjectNotFound:  # recorded by another Prefect server
        return False
    if state is None or state.is_final():
        return False
    open_tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
            any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]))))
    for task_run in open_tasks:
        client.set_task_run_state(task_run.id, Crashed(message=reason), force=True)
    client.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
    log.warning("Prefect flow run %s marked Crashed: %s", flow_run_id, reason)
    return True


def crash_flow_run(flow_run_id: str | None, reason: str) -> bool:
    """Mark a flow run that a killed stage left open as Crashed, with its open task runs."""
    from prefect import get_client

    if not flow_run_id:
        return False
    with get_client(sync_client=True) as client:
        return _crash(client, flow_run_id, reason)


def crash_zombie_flow_runs() -> list[str]:
    """Crash every Running flow run whose labelled process is gone; returns their ids."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    crashed = []
    only_running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with get_client(sync_client=True) as client:
        running = []  # read them all before changing any: crashing one shifts the pages
        while True:
            page = client.read_flow_runs(flow_run_filter=only_running, sort=FlowRunSort.ID_DESC, limit=PAGE,
                                         offset=len(running))
            running += page
            if len(page) < PAGE:
                break
        for run in running:
            labels = {key: str(run.labels.get(key, "")) for key in tracking.PROCESS_TAGS}
            if tracking.process_gone(labels):
                reason = (f"process {labels['process.pid']} on {labels['process.host']} that ran this flow run "
                          "is gone (killed)")
                if _crash(client, str(run.id), reason):
                    crashed.append(str(run.id))
    return crashed


def prefect_server_known() -> bool:
    """Whether a Prefect server is configured (PREFECT_API_URL): without one there is nothing to ask,
    and a sweep must not start a temporary server just to look."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def sweep(params: Params, prefect: bool = True, mlflow: bool = True) -> list[str]:
    """Close every open record of a process that is gone: MLflow runs of any stage KILLED (and the flow
    runs they name Crashed), then labelled Prefect flow runs Crashed. `prefect=False` / `mlflow=False`
    leave that side alone. Returns one line per record closed."""
    closed = []
    for run, reason in tracking.close_orphaned_runs(None, params) if mlflow else []:
        closed.append(f"MLflow run {run.info.run_id} ({run.data.tags.get('dvc.stage', '?')}) KILLED: {reason}")
        flow_run_id = run.data.tags.get(FLOW_RUN_TAG)
        if prefect and crash_flow_run(flow_run_id, reason):
            closed.append(f"Prefect flow run {flow_run_id} Crashed: {reason}")
    if prefect:
        closed += [f"Prefect flow run {flow_run_id} Crashed: its process is gone"
                   for flow_run_id in crash_zombie_flow_runs()]
    return closed
