"""The MLflow model registry and lineage: register a trained policy, decide promotion, trace a version.

A registered version's source is a copy of `models/policy` logged as the `model` artifact of the
`train` run that produced it; its tags carry the policy's DVC md5, the train and evaluate run ids and
the evaluation metric it was compared on. The `champion` alias moves only when `decide` says so.

Lineage walks MLflow's own records: a run's inputs are datasets whose digest is the DVC md5 of the
file or folder it read, and a run's outputs are tags `output:<path>` = md5. The producer of an input
is therefore the run whose output tag for that path has the input's digest; walking producers from
the train run up reaches `prepare`, whose inputs are the source files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CHAMPION = "champion"
POLICY = "models/policy"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(new: float, champion: float | None, min_improvement: float) -> Decision:
    """Promote when there is no champion, or when `new` beats it by at least `min_improvement`."""
    if new is None or not math.isfinite(new):
        return Decision(False, f"the new model's metric is not a number ({new!r}): not promoted")
    if champion is None:
        return Decision(True, f"no champion yet: the new model ({new:.4f}) becomes champion")
    gain = new - champion
    if gain >= min_improvement - 1e-12:  # 0.41 - 0.40 is 0.00999... in floating point
        return Decision(True, f"{new:.4f} beats the champion's {champion:.4f} by {gain:+.4f} "
                              f"(>= {min_improvement}): promoted")
    return Decision(False, f"{new:.4f} vs the champion's {champion:.4f} ({gain:+.4f} < {min_improvement}): "
                           "not promoted")


def metric_tag(benchmark: str, metric: str) -> str:
    return f"metric.{benchmark}.{metric}"


def champion_version(client, name: str):
    """The version holding the champion alias, or None (also when the model is not registered yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_for_md5(client, name: str, md5: str):
    """The registered version of exactly this policy (same DVC md5), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matches = [v for v in versions if v.tags.get("dvc.md5") == md5]
    return max(matches, key=lambda v: int(v.version)) if matches else None


def register(client, name: str, train_run_id: str, policy_dir: Path, tags: dict[str, str]):
    """Log the policy folder as the train run's `model` artifact and register it as a new version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="GRPO policies trained by rlvr-pipeline")
    client.log_artifacts(train_run_id, str(policy_dir), artifact_path="model")
    source = client.get_run(train_run_id).info.artifact_uri.rstrip("/") + "/model"
    return client.create_model_version(name, source=source, run_id=train_run_id, tags=tags)


# ---------------------------------------------------------------------------------------------
# Lineage


@dataclass
class Node:
    """One run in a lineage tree, with the inputs it read and the runs that produced them."""

    stage: str
    run_id: str
    commit: str
    params: dict[str, str]
    inputs: list[dict] = field(default_factory=list)  # {"path", "digest", "producer": Node | None, "lock": ...}


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _dir_manifest(root: Path, dir_md5: str) -> dict[str, str]:
    """relpath -> md5 of a folder DVC cached under this .dir md5 (empty if not in the local cache)."""
    manifest = root / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]
    if not manifest.is_file():
        return {}
    return {entry["relpath"]: entry["md5"] for entry in json.loads(manifest.read_text())}


def producer_run(client, experiment_ids: list[str], path: str, digest: str, root: Path = Path(".")):
    """The latest run that wrote `path` with this md5.

    Either a run tagged `output:<path>` = digest, or (for a file inside an output folder, such as
    data/prepared/train.parquet in data/prepared) a run tagged `output:<folder>` whose folder, as
    DVC cached it, holds this file with this md5.
    """
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`output:{path}` = '{_quote(digest)}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        return runs[0]
    for folder in Path(path).parents:
        if str(folder) in (".", ""):
            break
        candidates = client.search_runs(experiment_ids, filter_string=f"tags.`output:{folder}` LIKE '%.dir'",
                                        order_by=["attributes.start_time DESC"], max_results=50)
        for run in candidates:
            files = _dir_manifest(root, run.data.tags[f"output:{folder}"])
            if files.get(str(Path(path).relative_to(folder))) == digest:
                return run
    return None


def trace(client, run, experiment_ids: list[str], lock: dict, root: Path = Path("."), depth: int = 0,
          seen: dict[str, Node] | None = None) -> Node:
    """The lineage tree above `run`: for every dataset input, the run that produced it, recursively.

    A run that feeds several stages (prepare feeds most of them) is traced once and shared.
    """
    seen = {} if seen is None else seen
    if run.info.run_id in seen:
        return seen[run.info.run_id]
    stage = run.data.tags.get("dvc.stage", run.info.run_name)
    node = Node(stage=stage, run_id=run.info.run_id, commit=run.data.tags.get("git.commit", "unknown"),
                params=dict(run.data.params))
    seen[run.info.run_id] = node
    locked = {d["path"]: d.get("md5") for d in lock.get("stages", {}).get(stage, {}).get("deps", [])}
    for dataset_input in run.inputs.dataset_inputs:
        path, digest = dataset_input.dataset.name, dataset_input.dataset.digest
        producer = producer_run(client, experiment_ids, path, digest, root) if depth < 16 else None
        node.inputs.append({
            "path": path,
            "digest": digest,
            "lock_md5": locked.get(path),
            "producer": trace(client, producer, experiment_ids, lock, root, depth + 1, seen) if producer else None,
        })
    return node


def evaluation_runs(client, experiment_ids: list[str], policy_md5: str) -> list:
    """Evaluate runs that read this exact policy (input models/policy with its md5)."""
    runs = client.search_runs(experiment_ids, filter_string="tags.`dvc.stage` = 'evaluate'",
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if any(i.dataset.name == POLICY and i.dataset.digest == policy_md5
                                   for i in r.inputs.dataset_inputs)]


def lineage(client, name: str, version: str, lock_file: Path = Path("dvc.lock")) -> dict:
    """Everything recorded about one registered version, from evaluation back to the source files."""
    mv = client.get_model_version(name, version)
    train_run = client.get_run(mv.run_id)
    experiment_ids = [train_run.info.experiment_id]
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else {}
    md5 = mv.tags.get("dvc.md5") or train_run.data.tags.get(f"output:{POLICY}")
    evals = evaluation_runs(client, experiment_ids, md5)
    return {
        "name": name,
        "version": mv.version,
        "aliases": list(mv.aliases or []),
        "source": mv.source,
        "policy_md5": md5,
        "evaluations": [{"run_id": r.info.run_id, "commit": r.data.tags.get("git.commit"),
                         "metrics": dict(r.data.metrics)} for r in evals],
        "train": trace(client, train_run, experiment_ids, lock, lock_file.parent),
    }


def render(record: dict, metric_keys: tuple[str, ...] = ("arith.pass_at_1", "arith.delta_pass_at_1")) -> str:
    """The lineage as indented text, newest first: evaluation -> train -> ... -> source files."""
    lines = [f"model {record['name']} version {record['version']}"
             + (f" (aliases: {', '.join(record['aliases'])})" if record["aliases"] else ""),
             f"  source: {record['source']}", f"  models/policy md5: {record['policy_md5']}"]
    if not record["evaluations"]:
        lines.append("  evaluations: none recorded for this policy")
    for e in record["evaluations"]:
        shown = ", ".join(f"{k} {e['metrics'][k]:.4f}" for k in metric_keys if k in e["metrics"])
        lines.append(f"  evaluate run {e['run_id']} (commit {e['commit']}){': ' + shown if shown else ''}")

    shown: set[str] = set()

    def walk(node: Node, indent: str) -> None:
        if node.run_id in shown:  # a run that feeds several stages is printed once
            lines.append(f"{indent}{node.stage} run {node.run_id} (shown above)")
            return
        shown.add(node.run_id)
        lines.append(f"{indent}{node.stage} run {node.run_id} (commit {node.commit}, {len(node.params)} params)")
        for item in node.inputs:
            check = ""
            if item["lock_md5"] is not None:
                check = " = dvc.lock" if item["lock_md5"] == item["digest"] else f" != dvc.lock ({item['lock_md5']})"
            origin = "" if item["producer"] else "  [source: no run produced it]"
            lines.append(f"{indent}  <- {item['path']} md5 {item['digest']}{check}{origin}")
            if item["producer"]:
                walk(item["producer"], indent + "     ")

    walk(record["train"], "  ")
    return "\n".join(lines)
