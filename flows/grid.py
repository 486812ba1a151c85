"""Seed replicates and variant grids as DVC experiments, and the report that compares them.

`rlvr grid -S train.order=gain_rl,uniform -S train.seed=0,1,2` expands the cartesian product of the
values, queues one `dvc exp run --queue` per combination under a readable name (`<grid>-<values>`),
then runs the queue (`dvc queue start`) and waits for it. Each experiment reruns only the stages its
params touch (DVC's cache serves the rest), so a grid over `train.*` shares one warm-up model.

`rlvr compare --grid NAME --baseline train.order=uniform` collects every successful experiment of
the grid from the git refs DVC keeps (params.yaml, metrics/heldout_curve.csv) and its DVC cache
(data/evaluated/{policy,warmup}/<set>.parquet), hands them to `rlvr.compare`, and writes the report
(markdown, JSON, PNG) under reports/<grid>/, logged to MLflow as one parent run with a child run per
experiment.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from rlvr.errors import RlvrError

log = logging.getLogger(__name__)

REPORTS = Path("reports")
CURVE = "metrics/heldout_curve.csv"
EVALUATED = "data/evaluated"
SEED_KEY = "train.seed"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")


class GridError(RlvrError):
    """A grid or comparison the user asked for cannot be built (bad -S, unknown grid, no results)."""


def parse_sets(sets: list[str]) -> list[tuple[str, list[str]]]:
    """`-S key=v1,v2` options -> [(key, [v1, v2])]; each key once, at least one value each.

    Values are passed to DVC verbatim (YAML), so `-S evaluate.benchmarks=[arith]` works; a comma
    inside brackets is not a separator.
    """
    parsed: list[tuple[str, list[str]]] = []
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise GridError(f"-S {item!r}: expected key=value[,value...], e.g. -S train.seed=0,1,2")
        if key in (k for k, _ in parsed):
            raise GridError(f"-S {key}: given twice; list every value once, comma-separated")
        parsed.append((key, _split_values(values)))
    if not parsed:
        raise GridError("no -S options: a grid needs at least one key=value[,value...]")
    return parsed


def _split_values(text: str) -> list[str]:
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    if any(not v for v in values):
        raise GridError(f"-S ...={text!r}: an empty value; write values as v1,v2,...")
    return values


def combinations(parsed: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cartesian product, first key varying slowest."""
    keys = [k for k, _ in parsed]
    return [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in parsed))]


def experiment_name(grid: str, combo: dict[str, str]) -> str:
    """`<grid>-<value>-<value>...`, reduced to characters git ref names and DVC accept."""
    parts = [re.sub(r"[^A-Za-z0-9_.]+", "_", value).strip("_.") or "x" for value in combo.values()]
    return "-".join([grid, *parts])


def _run(args: list[str], root: Path, check: bool = True) -> subprocess.CompletedProcess:
    from flows.services import dvc_env

    result = subprocess.run(args, cwd=root, capture_output=True, text=True, env=dvc_env())
    if check and result.returncode != 0:
        log.error("%s failed (%d):\n%s\n%s", " ".join(args), result.returncode, result.stdout, result.stderr)
        raise GridError(f"`{' '.join(args)}` failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return result


def _dvc(root: Path) -> str:
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def queue(root: Path, grid: str, sets: list[str]) -> list[str]:
    """Queue one DVC experiment per combination; returns their names."""
    if not _NAME.match(grid):
        raise GridError(f"--name {grid!r}: use letters, digits, '_' and '.', starting with a letter or digit")
    combos = combinations(parse_sets(sets))
    names = [experiment_name(grid, combo) for combo in combos]
    if len(set(names)) != len(names):
        raise GridError("two combinations map to the same experiment name; use values that differ in letters "
                        "or digits")
    existing = set(_experiment_names(root))
    clash = sorted(existing & set(names))
    if clash:
        raise GridError(f"experiments {clash[:3]} already exist; pick another --name or remove them with "
                        f"`dvc exp remove {clash[0]}`")
    for name, combo in zip(names, combos):
        args = [_dvc(root), "exp", "run", "--queue", "--name", name]
        for key, value in combo.items():
            args += ["-S", f"{key}={value}"]
        _run(args, root)
        log.info("queued %s: %s", name, combo)
    return names


def _experiment_names(root: Path) -> list[str]:
    result = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], root, check=False)
    return [ref.rsplit("/", 1)[-1] for ref in result.stdout.split()]


def run_queue(root: Path, names: list[str], jobs: int, poll_s: float = 10.0) -> dict[str, str]:
    """`dvc queue start -j jobs`, then wait until none of `names` is queued or running; name -> state."""
    _run([_dvc(root), "queue", "start", "-j", str(jobs)], root)
    states: dict[str, str] = {}
    while True:
        states = queue_states(root, names)
        pending = [n for n, s in states.items() if s in ("Queued", "Running")]
        done = len(names) - len(pending)
        log.info("grid: %d/%d experiments finished (%s)", done, len(names),
                 ", ".join(f"{n}: {s}" for n, s in states.items() if s == "Running") or "none running")
        if not pending:
            return states
        time.sleep(poll_s)


def queue_states(root: Path, names: list[str]) -> dict[str, str]:
    """State of each named experiment from `dvc queue status` (Queued, Running, Success, Failed)."""
    out = _run([_dvc(root), "queue", "status"], root).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in names:
            found[fields[1]] = next((f for f in fields[2:] if f in ("Queued", "Running", "Success", "Failed")),
                                    "Unknown")
    done = set(_experiment_names(root))
    return {n: found.get(n, "Success" if n in done else "Unknown") for n in names}


# ---- collecting results ---------------------------------------------------------------------------


def experiments(root: Path, grid: str) -> dict[str, str]:
    """name -> commit of every finished experiment named `<grid>-...`."""
    result = _run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"], root, check=False)
    found = {}
    for line in result.stdout.splitlines():
        sha, ref = line.split(" ", 1)
        name = ref.rsplit("/", 1)[-1]
        if name.startswith(f"{grid}-"):
            found[name] = sha
    return dict(sorted(found.items()))


def _git_text(root: Path, rev: str, path: str) -> str:
    result = _run(["git", "show", f"{rev}:{path}"], root, check=False)
    if result.returncode != 0:
        raise GridError(f"experiment {rev[:10]} has no {path}; was it run with train.eval_steps > 0?")
    return result.stdout


def _correct_matrix(root: Path, rev: str, model: str, eval_set: str) -> tuple[list[str], np.ndarray] | None:
    import dvc.api

    path = f"{EVALUATED}/{model}/{eval_set}.parquet"
    try:
        with dvc.api.open(path, repo=str(root), rev=rev, mode="rb") as handle:
            frame = pd.read_parquet(io.BytesIO(handle.read()))
    except Exception as error:  # noqa: BLE001 - any DVC lookup failure means "not there"
        log.debug("no %s in %s: %s", path, rev, error)
        return None
    return _ids_and_matrix(frame)


def _ids_and_matrix(frame: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """An evaluate-stage frame (id, correct: one list of booleans per problem) as ids and a matrix."""
    return frame["id"].tolist(), np.array([list(row) for row in frame["correct"]], dtype=bool)


def read_warmup_eval(path: Path) -> tuple[list[str], np.ndarray]:
    """A warm-up evaluation in the evaluate stage's format (data/evaluated/warmup/<set>.parquet: id, correct)."""
    from rlvr.io import read_parquet

    return _ids_and_matrix(read_parquet(path, required=("id", "correct")))


def collect(root: Path, grid: str, eval_set: str = "arith", warmup_eval: Path | None = None) -> list:
    """RunResults of every finished experiment of `grid` (params, held-out curve, final correctness).

    The RL gain over the warm-up model needs the warm-up's evaluation: each experiment's own
    data/evaluated/warmup (evaluate.baseline: true), else `warmup_eval` (the same file from one run
    of the warm-up model, for a grid run with evaluate.baseline: false to save time), used only where
    its problems are the experiment's."""
    from rlvr import compare
    from rlvr.compare import RunResult

    shared_warmup = read_warmup_eval(warmup_eval) if warmup_eval is not None else None
    found = experiments(root, grid)
    if not found:
        raise GridError(f"no finished experiments named {grid}-*: run `rlvr grid --name {grid} -S ...` first "
                        "(`dvc exp show` lists what exists)")
    params = {name: compare.flatten(yaml.safe_load(_git_text(root, rev, "params.yaml"))) for name, rev in found.items()}
    varying = sorted(k for k in set().union(*params.values())
                     if k != SEED_KEY and len({json.dumps(p.get(k), sort_keys=True) for p in params.values()}) > 1)
    runs = []
    for name, rev in found.items():
        policy = _correct_matrix(root, rev, "policy", eval_set)
        if policy is None:
            raise GridError(f"experiment {name}: {EVALUATED}/policy/{eval_set}.parquet is not in the DVC cache; "
                            f"run the grid on this machine, or `dvc exp pull` it")
        warmup = _correct_matrix(root, rev, "warmup", eval_set) or shared_warmup
        curve = pd.read_csv(io.StringIO(_git_text(root, rev, CURVE)))
        p = params[name]
        runs.append(RunResult(
            name=name,
            variant=", ".join(f"{k}={p.get(k)}" for k in varying) or "all",
            seed=int(p[SEED_KEY]),
            curve=curve,
            problem_ids=policy[0],
            correct=policy[1],
            baseline_correct=warmup[1] if warmup is not None and warmup[0] == policy[0] else None,
            params={k: p[k] for k in varying + [SEED_KEY]},
        ))
    return runs


def report(root: Path, grid: str, baseline: str, eval_set: str = "arith", out: Path | None = None,
           mlflow_experiment: str | None = None, tracking_uri: str | None = None, n_boot: int = 2000,
           seed: int = 0, warmup_eval: Path | None = None) -> dict:
    """Collect the grid, compare against `baseline` (a variant label), write reports/<grid>/ and log it."""
    from rlvr import compare
    runs = collect(root, grid, eval_set, warmup_eval)
    variants = sorted({r.variant for r in runs})
    if baseline not in variants:
        raise GridError(f"--baseline {baseline!r} is not a variant of grid {grid}; its variants: {variants}")
    result = compare.compare(runs, baseline, n_boot=n_boot, seed=seed)
    files = compare.write_report(result, out or root / REPORTS / grid)
    run_id = None
    if mlflow_experiment is not None:
        from rlvr.tracking import artifact_location

        run_id = compare.log_to_mlflow(result, runs, mlflow_experiment, tracking_uri=tracking_uri,
                                       run_name=f"compare-{grid}", artifact_location=artifact_location(tracking_uri))
    text = compare.markdown(result)
    return {"files": {kind: str(path) for kind, path in files.items()}, "mlflow_run": run_id,
            "experiments": len(runs), "variants": variants, "markdown": text}

