"""The `retrain` flow: rerun the pipeline through DVC, register the policy, promote only a better one.

1. `dvc status` says whether anything the pipeline depends on (data, params, code) changed. If not,
   nothing is trained: the flow says so (and registers the current policy only if it never was).
2. Otherwise `dvc repro` runs, so unchanged stages come from DVC's cache. Every stage run it starts
   nests under this flow's MLflow run (`retrain`), through RLVR_PARENT_RUN_ID.
3. The policy (identified by its DVC md5) is registered as a new version of `retrain.registered_model`
   unless that exact policy is already registered; the version's tags link the train and evaluate runs.
4. Its `retrain.metric` on `retrain.benchmark` (from metrics/eval.json) is compared with the champion's;
   the `champion` alias moves only when the gain is at least `retrain.min_improvement`.
5. A Prefect markdown artifact records the decision and the metrics table; the MLflow parent run
   records the same as tags and metrics.
6. After a promotion, `dvc push` sends the pipeline's outputs (the champion's model and everything it
   was made from) to the default DVC remote, when one is configured (`rlvr remote add URL`), so a
   fresh clone gets them with `dvc pull`. A push that fails after its retries fails the flow, after
   the promotion and the artifact are recorded.

Run once: `rlvr retrain`; on a schedule: `rlvr schedule` (cron from params, needs `rlvr services up`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.artifacts import create_markdown_artifact

from flows import remote, services, sweep
from rlvr import config, registry, tracking
from rlvr.io import dvc_md5

EVAL_METRICS = Path("metrics/eval.json")


def _dvc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(dvc) if dvc.exists() else "dvc", *args], capture_output=True, text=True,
                          env=services.dvc_env(env))


@task(name="dvc-status")
def pipeline_changes() -> dict:
    """Stages whose dependencies changed since their last run ({} when everything is up to date)."""
    result = _dvc("status", "--json")
    if result.returncode != 0:
        raise RuntimeError(f"dvc status failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout or "{}")


@task(name="dvc-repro")
def repro(parent_run_id: str) -> list[str]:
    """`dvc repro` with stage runs nested under the retrain run; returns the stages that ran."""
    result = _dvc("repro", env={tracking.PARENT_RUN_ENV: parent_run_id})
    log = get_run_logger()
    log.info("dvc repro output (tail):\n%s", result.stdout[-3000:])
    if result.returncode != 0:
        raise RuntimeError(f"dvc repro failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")]


@task(name="dvc-push", retries=2, retry_delay_seconds=10)
def push_champion() -> str:
    """Push every stage output in dvc.lock to the default DVC remote; says so, and pushes nothing, when
    there is none."""
    root = Path.cwd()
    name = remote.default(root)
    if name is None:
        return "no default DVC remote: nothing pushed (`rlvr remote add URL` configures one)"
    return f"pushed to {name}: {remote.push(root)}"


def _champion_value(client, champion, benchmark: str, metric: str) -> float | None:
    """The champion's metric: its version tag, else its evaluate run's MLflow metric."""
    if champion is None:
        return None
    tag = registry.metric_tag(benchmark, metric)
    if tag in champion.tags:
        return float(champion.tags[tag])
    run_id = champion.tags.get("evaluate_run_id")
    if run_id:
        return client.get_run(run_id).data.metrics.get(f"{benchmark}.{metric}")
    return None


def metrics_table(new: dict, champion: dict | None) -> str:
    keys = sorted(k for k, v in new.items() if isinstance(v, (int, float)) and not k.endswith(("_low", "_high")))
    rows = ["| metric | new | champion |", "|---|---|---|"]
    for key in keys:
        old = champion.get(key) if champion else None
        rows.append(f"| {key} | {new[key]:.4f} | {'-' if old is None else f'{old:.4f}'} |")
    return "\n".join(rows)


@flow(name="retrain")
def retrain(params_file: str = "params.yaml") -> dict:
    import mlflow
    from mlflow import MlflowClient

    log = get_run_logger()
    sweep.label_flow_run(flow_run.id)  # a killed retrain's flow run is crashed by the next sweep
    params = config.load(params_file)
    r = params.retrain
    mlflow.set_tracking_uri(tracking.tracking_uri(params))
    experiment = tracking.ensure_experiment(params)
    client = MlflowClient()
    changes = pipeline_changes()
    with mlflow.start_run(run_name="retrain", experiment_id=experiment,
                          tags={"rlvr.flow": "retrain", "git.commit": tracking.git_commit(),
                                **sweep.flow_run_tags()}) as parent:
        sweep.link_mlflow_run("retrain", parent, params)
        if changes:
            log.info("changed since the last run: %s", ", ".join(sorted(changes)))
            ran = repro(parent.info.run_id)
        else:
            log.info("nothing changed (data, params, code): no training")
            ran = []
        policy_md5 = dvc_md5(registry.POLICY)
        train_run = registry.producer_run(client, [experiment], registry.POLICY, policy_md5)
        evaluations = registry.evaluation_runs(client, [experiment], policy_md5)  # newest first
        eval_run = evaluations[0] if evaluations else None
        if train_run is None or eval_run is None:
            raise RuntimeError(f"no MLflow train/evaluate run records models/policy md5 {policy_md5}: "
                               "run the pipeline with tracking first (dvc repro)")
        evaluated = json.loads(EVAL_METRICS.read_text())[r.benchmark]
        value = float(evaluated[r.metric])
        champion = registry.champion_version(client, r.registered_model)
        existing = registry.version_for_md5(client, r.registered_model, policy_md5)
        tag = registry.metric_tag(r.benchmark, r.metric)
        if existing is not None:
            version, registered = existing, False
            is_champion = champion is not None and champion.version == existing.version
            decision = registry.Decision(False, f"this policy is already version {existing.version}"
                                                + (" (the champion)" if is_champion else "") + ": nothing to promote")
        else:
            version = registry.register(client, r.registered_model, train_run.info.run_id, Path(registry.POLICY), {
                "dvc.md5": policy_md5, "train_run_id": train_run.info.run_id,
                "evaluate_run_id": eval_run.info.run_id, tag: str(value), "git.commit": tracking.git_commit(),
            })
            registered = True
            champion_value = _champion_value(client, champion, r.benchmark, r.metric)
            if champion is not None and champion_value is None:
                decision = registry.Decision(False, f"the champion (version {champion.version}) has no recorded "
                                                    f"{r.benchmark}.{r.metric} to compare with: not promoted")
            else:
                decision = registry.decide(value, champion_value, r.min_improvement)
            if decision.promote:
                client.set_registered_model_alias(r.registered_model, registry.CHAMPION, version.version)
        summary = {
            "changed_stages": sorted(changes), "ran_stages": ran, "registered": registered,
            "version": version.version, "promoted": decision.promote, "reason": decision.reason,
            "metric": f"{r.benchmark}.{r.metric}", "value": value,
            "champion_version": champion.version if champion else None,
        }
        mlflow.set_tags({"retrain.version": version.version, "retrain.promoted": str(decision.promote),
                         "retrain.reason": decision.reason[:5000]})
        mlflow.log_metric(f"{r.benchmark}.{r.metric}", value)
    champion_metrics = None
    if champion is not None:
        champion_eval = champion.tags.get("evaluate_run_id")
        if champion_eval:
            champion_metrics = {k.split(".", 1)[1]: v for k, v in client.get_run(champion_eval).data.metrics.items()
                                if k.startswith(f"{r.benchmark}.") and k.count(".") == 1}
    header = "nothing changed: no stage ran" if not changes else f"stages run: {', '.join(ran) or 'none'}"
    uri = mlflow.get_tracking_uri()
    model_name = f"`{r.registered_model}`"
    if uri.startswith(("http://", "https://")):  # a tracking server serves the UI: link the model's page
        model_name = f"[{model_name}]({tracking.registry_url(uri, r.registered_model)})"
        summary["model_url"] = tracking.registry_url(uri, r.registered_model)
    create_markdown_artifact(
        key="retrain-decision",
        markdown=(f"## Retrain: {'promoted' if decision.promote else 'not promoted'}\n\n{decision.reason}\n\n"
                  f"- {header}\n- {model_name} version {version.version}"
                  f"{' (new)' if registered else ' (already registered)'}, policy md5 `{policy_md5}`\n"
                  f"- champion before: {champion.version if champion else 'none'}\n\n"
                  f"### `{r.benchmark}` metrics\n\n{metrics_table(evaluated, champion_metrics)}\n"),
        description=f"retrain decision for {r.registered_model}",
    )
    log.info("retrain: %s", decision.reason)
    if "model_url" in summary:
        log.info("the registered model in MLflow: %s", summary["model_url"])
    summary["pushed"] = push_champion() if decision.promote else None
    if summary["pushed"]:
        log.info("%s", summary["pushed"])
    return summary
