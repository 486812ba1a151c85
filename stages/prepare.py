"""Stage `prepare`: every data source -> one schema, cleaned, deduplicated and decontaminated.

For each source in `params.prepare.train` and `params.prepare.eval` (the built-in arithmetic task,
a local JSONL/JSON/Parquet file with a format preset, or a Hugging Face dataset name):
normalise to (id, problem, answer, source, meta, solution); drop and count rows whose gold answer
math-verify cannot parse; drop and count duplicate problems; then remove training rows that share a
word n-gram with any evaluation problem, and fail when more than
`prepare.decontamination.max_contaminated_frac` of the train set had to go (that much overlap means a
wrong file, not stray near-duplicates).

Inputs:  the files named in params (data/sources/ by default)
Outputs: data/prepared/{train.parquet, eval/<name>.parquet, report.json}, metrics/prepare.json
Run:     dvc repro prepare   (or: python -m flows prepare)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from rlvr import arith, data
from rlvr.config import Params, Source
from rlvr.errors import RlvrError
from rlvr.grading import Grader
from rlvr.io import atomic_dir, write_json

log = logging.getLogger(__name__)

OUTPUT = Path("data/prepared")
METRICS = Path("metrics/prepare.json")


class ContaminationError(RlvrError, RuntimeError):
    pass


def load_source(source: Source, role: str, params: Params) -> pd.DataFrame:
    """One source as a frame in `data.SCHEMA`; `role` is "train" or "eval"."""
    if source.builtin:
        a = params.prepare.arith
        records = arith.generate(source.size, params.seed, role, a.min_ops, a.max_ops, a.min_digits, a.max_digits)
        frame = pd.DataFrame(records)
        frame["source"] = source.name
        frame["meta"] = frame["meta"].map(lambda m: json.dumps(m, sort_keys=True))
        return frame[list(data.SCHEMA)]
    fields = dict(problem_field=source.problem_field, answer_field=source.answer_field,
                  answer_from=source.answer_from, solution_field=source.solution_field, limit=source.limit)
    if source.path:
        return data.load_file(source.path, source.name, source.preset, **fields)
    return data.load_hub(source.hub, source.name, source.preset, source.split, subset=source.subset, **fields)


def clean(frame: pd.DataFrame, grader: Grader) -> tuple[pd.DataFrame, dict]:
    """Drop unparseable gold answers and duplicate problems; return the frame and the counts."""
    loaded = len(frame)
    frame, unparseable = data.drop_unparseable(frame, grader.parseable(frame["answer"].tolist()))
    frame, duplicates = data.deduplicate(frame)
    data.check_frame(frame, where=str(frame["source"].iloc[0]) if len(frame) else "empty source")
    return frame.reset_index(drop=True), {"loaded": loaded, "unparseable": unparseable, "duplicates": duplicates}


def run(params: Params) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict]:
    """Build the train set, the eval sets and the report (no files written)."""
    counts: dict[str, dict] = {"train": {}, "eval": {}}
    evals: dict[str, pd.DataFrame] = {}
    trains = []
    with Grader(workers=params.grading.workers, timeout_s=params.grading.timeout_s) as grader:
        for role, sources in (("train", params.prepare.train), ("eval", params.prepare.eval)):
            for source in sources:
                frame, source_counts = clean(load_source(source, role, params), grader)
                if frame.empty:
                    raise data.DataError(f"source {source.name!r}: no usable rows left ({source_counts})")
                counts[role][source.name] = source_counts
                log.info("%s source %s: %s -> %d rows", role, source.name, source_counts, len(frame))
                if role == "train":
                    trains.append(frame)
                else:
                    evals[source.name] = frame
        gold_timeouts = grader.timeouts
    train, cross_duplicates = data.deduplicate(pd.concat(trains, ignore_index=True))
    d = params.prepare.decontamination
    train, decontamination = data.decontaminate(train, evals, d.ngram)
    report = {
        "sources": counts,
        "train_cross_source_duplicates": cross_duplicates,
        "gold_parse_timeouts": gold_timeouts,
        "decontamination": decontamination,
        "train_rows": len(train),
        "eval_rows": {name: len(frame) for name, frame in evals.items()},
    }
    if decontamination["contaminated_frac"] > d.max_contaminated_frac:
        raise ContaminationError(
            f"prepare: {decontamination['n_contaminated']} of {decontamination['n_train_before']} training "
            f"rows ({decontamination['contaminated_frac']:.1%}) share a {d.ngram}-gram with an eval set, above "
            f"prepare.decontamination.max_contaminated_frac = {d.max_contaminated_frac}. Check that no "
            f"benchmark file is listed as training data. Examples: "
            f"{json.dumps({k: v['examples'][:2] for k, v in decontamination['evals'].items()})}"
        )
    if train.empty:
        raise data.DataError("prepare: the training set is empty after cleaning")
    return train.reset_index(drop=True), evals, report


def metrics_from(report: dict) -> dict:
    """Flat, MLflow-legal numbers for metrics/prepare.json."""
    out = {"train_rows": report["train_rows"],
           "contaminated": report["decontamination"]["n_contaminated"],
           "contaminated_frac": report["decontamination"]["contaminated_frac"],
           "gold_parse_timeouts": report["gold_parse_timeouts"]}
    for role in ("train", "eval"):
        for name, c in report["sources"][role].items():
            for key, value in c.items():
                out[f"{role}_{name}_{key}"] = value
    for name, rows in report["eval_rows"].items():
        out[f"eval_{name}_rows"] = rows
    return out


def write(train: pd.DataFrame, evals: dict[str, pd.DataFrame], report: dict, output: Path = OUTPUT) -> None:
    """Write all outputs into a fresh folder and swap it in whole."""
    with atomic_dir(output) as tmp:
        train.to_parquet(tmp / "train.parquet", index=False)
        (tmp / "eval").mkdir()
        for name, frame in evals.items():
            frame.to_parquet(tmp / "eval" / f"{name}.parquet", index=False)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def main(params: Params) -> dict:
    train, evals, report = run(params)
    write(train, evals, report)
    metrics = metrics_from(report)
    write_json(METRICS, metrics)
    return metrics
