"""Data sources -> one schema; dedup; decontamination.

Every data set the pipeline touches (training sets and evaluation benchmarks, local files or hub
data sets) is normalised to one pandas frame with the columns in `SCHEMA`:

    id        str, unique and stable: f"{name}-{row}" where row is the 0-based record position
              in the source (the source's own id, if any, is kept in `meta`)
    problem   str, the question as the model sees it
    answer    str, the normalised gold answer (source quirks removed, see the presets), or the
              content of the last \\boxed{} of a worked solution (`answer_from: last_boxed`)
    source    str, the name the caller gave the source
    meta      str, a JSON object with the source's extra fields (level, subject, url, original id)
              plus "row", the record position in the source
    solution  str, a worked solution when the source has one, else ""

Reading (`read_located`, `get_field`) and the per-source quirks (`PRESETS`) are pure functions that
raise `DataError` naming the file, the line or record, and the field. The curation steps
(`drop_unparseable`, `deduplicate`, `decontaminate`) return the cleaned frame and what they removed,
so the prepare stage can put the counts in its metrics.

What is covered: JSONL, a JSON array, parquet (nested structs/lists), `datasets.load_dataset`
(hub names, builder names such as "json" with `data_files`, local cache) and folders written by
`Dataset.save_to_disk`. What is not: math-verify parsing of gold answers (the caller passes the
flags to `drop_unparseable`) and near-duplicate detection beyond exact n-gram overlap.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from rlvr.config import ANSWER_FROM
from rlvr.errors import RlvrError
from rlvr.grading import extract_boxed

SCHEMA = ("id", "problem", "answer", "source", "meta", "solution")
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")

# DeepScaleR (verl format) appends this instruction to every problem; the pipeline renders its own
# prompt, so the suffix is removed to keep the problem text comparable with the other sources.
DEEPSCALER_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


class DataError(RlvrError, ValueError):
    """A data source or frame does not have the shape the pipeline expects."""


# --------------------------------------------------------------------------------------------
# Reading records


def read_located(path: Path) -> list[tuple[str, dict]]:
    """Every record of a `.jsonl`, `.json` (array of objects) or `.parquet` file, paired with its
    location ("line 3", "record 3"; 1-based) for error messages."""
    if path.suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.suffix == ".parquet":
        located = _read_parquet(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 ({exc})") from exc
        located = _read_jsonl(path, text) if path.suffix == ".jsonl" else _read_json(path, text)
    if not located:
        raise DataError(f"{path}: no records (empty file)")
    return located


def _read_jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    located = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, found {type(record).__name__}")
        located.append((f"line {number}", record))
    return located


def _read_json(path: Path, text: str) -> list[tuple[str, dict]]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, found a {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {number}: expected a JSON object, found {type(record).__name__}")
    return [(f"record {number}", record) for number, record in enumerate(data, start=1)]


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read parquet ({exc})") from exc
    # to_pylist turns structs into dicts and lists into lists (no numpy arrays), like JSON.
    return [(f"record {number}", record) for number, record in enumerate(table.to_pylist(), start=1)]


# --------------------------------------------------------------------------------------------
# Field access

_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_field_path(field: str) -> list[str | int]:
    parts: list[str | int] = []
    position = 0
    for match in _PATH_PART.finditer(field):
        gap = field[position:match.start()]
        is_name = match.group(1) is not None
        # A name follows "." (or starts the path); an index follows a name or index directly.
        expected = ("" if not parts else ".") if is_name else ("" if parts else None)
        if gap != expected:
            break
        parts.append(match.group(1) if is_name else int(match.group(2)))
        position = match.end()
    if not parts or position != len(field):
        raise DataError(
            f"invalid field path {field!r}; expected e.g. 'answer', 'reward_model.ground_truth', 'prompt[0].content'"
        )
    return parts


def get_field(record: Mapping, field: str, where: str = "") -> Any:
    """The value at a dotted path with list indices, e.g. "prompt[0].content".

    `where` ("data.jsonl line 3") is put in the error message when the field is missing.
    """
    value: Any = record
    walked = ""
    for part in _parse_field_path(field):
        if isinstance(part, int):
            step = f"{walked}[{part}]"
            if not isinstance(value, (list, tuple)) or part >= len(value):
                found = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
                raise DataError(_prefix(where, f"field {field!r}: no {step} (found {found})"))
        else:
            step = f"{walked}.{part}" if walked else part
            if not isinstance(value, Mapping) or part not in value:
                keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                raise DataError(_prefix(where, f"missing field {field!r}: no {step!r} (found {keys})"))
        value = value[part]
        walked = step
    return value


def _prefix(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def _present(record: Mapping, fields: Iterable[str]) -> dict:
    """The subset of top-level `fields` the record has (sources differ in which ones they carry)."""
    return {f: record[f] for f in fields if f in record and record[f] is not None}


# --------------------------------------------------------------------------------------------
# Answer normalisation and presets


def answer_to_str(value: Any) -> str:
    """A gold answer as a stripped string; integral floats lose the ".0" (AMC stores 27.0).

    A null answer becomes "" rather than an error: MATH train (rllm copy) has 2 null and 2 empty
    answers, and blank gold is dropped and counted by `drop_unparseable`, not fatal.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        raise DataError(f"answer must be a string or a number, found {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"answer must be a finite number, found {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    raise DataError(f"answer must be a string or a number, found {type(value).__name__}")


def _check_answer_from(answer_from: str) -> None:
    if answer_from not in ANSWER_FROM:
        raise DataError(f"unknown answer_from {answer_from!r}; available: {', '.join(ANSWER_FROM)}")


def answer_from_value(value: Any, answer_from: str = "field") -> str:
    """The gold answer string from the answer a preset read: the value as it is ("field", see
    `answer_to_str`), or the content of its last `\\boxed{}` ("last_boxed", for sources that ship
    only a worked solution, e.g. answer_field: solution).

    A value with no complete last box gives "", like a null answer: the row is dropped and counted
    by `drop_unparseable`, not fatal (a worked solution may end without a box).
    """
    _check_answer_from(answer_from)
    if answer_from == "field" or value is None:
        return answer_to_str(value)
    if not isinstance(value, str):
        raise DataError(f"answer_from 'last_boxed' needs a string, found {type(value).__name__} {value!r:.40}")
    return (extract_boxed(value) or "").strip()


_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_record(record: Mapping) -> tuple[Any, Any, str, dict]:
    """GSM8K: gold after the final "#### " with thousands commas removed; rationale as solution."""
    text = get_field(record, "answer")
    if not isinstance(text, str) or "####" not in text:
        raise DataError("field 'answer': no '####' marker before the final answer")
    rationale, gold = text.rsplit("####", 1)
    gold = _THOUSANDS_COMMA.sub("", gold).strip()
    solution = _CALCULATOR.sub("", rationale).strip()
    return get_field(record, "question"), gold, solution, {}


def math500_record(record: Mapping) -> tuple[Any, Any, str, dict]:
    """MATH500: bare LaTeX answer (kept as is), worked solution, subject/level/unique_id."""
    meta = _present(record, ("subject", "level", "unique_id"))
    return get_field(record, "problem"), get_field(record, "answer"), get_field(record, "solution"), meta


def aime_record(record: Mapping) -> tuple[Any, Any, str, dict]:
    """AIME: zero-padded integer strings ("025") become "25"; anything else (`336^\\circ`) is kept."""
    answer = get_field(record, "answer")
    if isinstance(answer, str) and re.fullmatch(r"\s*\d+\s*", answer):
        answer = str(int(answer))
    solution = record.get("solution") or ""
    return get_field(record, "problem"), answer, solution, _present(record, ("id", "url"))


def amc_record(record: Mapping) -> tuple[Any, Any, str, dict]:
    """AMC: the answer is a JSON float (27.0 -> "27" via answer_to_str); no solutions."""
    return get_field(record, "problem"), get_field(record, "answer"), "", _present(record, ("id", "url"))


def math_record(record: Mapping) -> tuple[Any, Any, str, dict]:
    """MATH train (rllm JSON array): bare LaTeX answer, difficulty/type; no solutions."""
    meta = _present(record, ("difficulty", "type"))
    return get_field(record, "problem"), get_field(record, "answer"), "", meta


def deepscaler_record(record: Mapping) -> tuple[Any, Any, str, dict]:
    """DeepScaleR (verl format): problem from the user turn minus the boxed instruction."""
    problem = get_field(record, "prompt[0].content")
    if isinstance(problem, str) and problem.endswith(DEEPSCALER_SUFFIX):
        problem = problem[: -len(DEEPSCALER_SUFFIX)]
    meta = dict(record.get("extra_info") or {})
    if "data_source" in record:
        meta["data_source"] = record["data_source"]
    return problem, get_field(record, "reward_model.ground_truth"), "", meta


def generic_record(
    record: Mapping,
    problem_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
) -> tuple[Any, Any, str, dict]:
    """Any source: the caller names the field paths; no meta beyond the row."""
    if not problem_field or not answer_field:
        raise DataError("preset 'generic' needs problem_field and answer_field (e.g. 'question', 'answer')")
    solution = get_field(record, solution_field) if solution_field else ""
    return get_field(record, problem_field), get_field(record, answer_field), solution, {}


PRESETS: dict[str, Callable[..., tuple[Any, Any, str, dict]]] = {
    "gsm8k": gsm8k_record,
    "math500": math500_record,
    "aime": aime_record,
    "amc": amc_record,
    "math": math_record,
    "deepscaler": deepscaler_record,
    "generic": generic_record,
}


def _preset_function(
    preset: str, problem_field: str | None, answer_field: str | None, solution_field: str | None
) -> Callable[[Mapping], tuple[Any, Any, str, dict]]:
    if preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    fields = {"problem_field": problem_field, "answer_field": answer_field, "solution_field": solution_field}
    if preset == "generic":
        if not problem_field or not answer_field:
            raise DataError("preset 'generic' needs problem_field and answer_field (e.g. 'question', 'answer')")
        return functools.partial(generic_record, **fields)
    given = [k for k, v in fields.items() if v is not None]
    if given:
        raise DataError(f"{', '.join(given)} only apply to preset 'generic', not {preset!r}")
    return PRESETS[preset]


# --------------------------------------------------------------------------------------------
# Loading


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, found {limit!r}")


def normalize_records(
    records: Iterable[tuple[str, Mapping]],
    name: str,
    preset: str,
    problem_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    limit: int | None = None,
    answer_from: str = "field",
) -> pd.DataFrame:
    """(location, record) pairs -> a frame in SCHEMA. Locations name records in error messages."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        raise DataError(f"source name must be a non-empty string without spaces, found {name!r}")
    _check_limit(limit)
    _check_answer_from(answer_from)
    convert = _preset_function(preset, problem_field, answer_field, solution_field)
    rows = []
    for row, (where, record) in enumerate(records):
        if limit is not None and row >= limit:
            break
        try:
            problem, answer, solution, meta = convert(record)
            if not isinstance(problem, str) or not problem.strip():
                raise DataError(f"problem must be a non-empty string, found {problem!r:.80}")
            if solution is None:
                solution = ""
            if not isinstance(solution, str):
                raise DataError(f"solution must be a string, found {type(solution).__name__}")
            meta = {**meta, "row": row}
            meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False, allow_nan=False)
            gold = answer_from_value(answer, answer_from)
            rows.append((f"{name}-{row}", problem.strip(), gold, name, meta_json, solution))
        except (DataError, TypeError, ValueError) as exc:
            raise DataError(f"{where} (preset {preset!r}): {exc}") from exc
    if not rows:
        raise DataError(f"{name}: no records")
    return pd.DataFrame(rows, columns=list(SCHEMA))


def load_file(
    path: str | Path,
    name: str,
    preset: str,
    problem_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    limit: int | None = None,
    answer_from: str = "field",
) -> pd.DataFrame:
    """Read a local source file and normalise it with `preset` (see PRESETS) into SCHEMA.

    `answer_from` ("field" or "last_boxed", see `answer_from_value`) says how the gold is taken from
    the answer the preset reads (with preset generic: `answer_field`).
    """
    path = Path(path)
    _preset_function(preset, problem_field, answer_field, solution_field)  # fail before reading
    _check_answer_from(answer_from)
    located = [(f"{path} {where}", record) for where, record in read_located(path)]
    return normalize_records(located, name, preset, problem_field, answer_field, solution_field, limit, answer_from)


def load_hub(
    dataset: str,
    name: str,
    preset: str,
    split: str,
    subset: str | None = None,
    data_files: str | list[str] | dict | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
    solution_field: str | None = None,
    limit: int | None = None,
    answer_from: str = "field",
) -> pd.DataFrame:
    """Load a split with `datasets` and normalise it like `load_file`.

    `dataset` is a hub name ("openai/gsm8k", needs the network or the local HF cache), a builder
    name with `data_files` ("json", "parquet"; works offline), or a folder written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
    """
    import datasets

    _preset_function(preset, problem_field, answer_field, solution_field)  # fail before loading
    _check_limit(limit)
    _check_answer_from(answer_from)
    label = f"{dataset}" + (f"/{subset}" if subset else "") + f" split {split!r}"
    local = Path(dataset)
    try:
        if local.is_dir() and (local / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(local))
        elif local.is_dir() and (local / "state.json").is_file():
            loaded = {split: datasets.load_from_disk(str(local))}  # a single saved split
        else:
            loaded = {
                split: datasets.load_dataset(
                    dataset, subset, split=split, data_files=data_files, revision=revision,
                    cache_dir=str(cache_dir) if cache_dir is not None else None,
                )
            }
    except (OSError, ValueError) as exc:
        raise DataError(f"{label}: cannot load ({type(exc).__name__}: {exc})") from exc
    if split not in loaded:
        raise DataError(f"{label}: no such split; available: {sorted(loaded)}")
    table = loaded[split]
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    if len(table) == 0:
        raise DataError(f"{label}: no records")
    located = ((f"{label} record {number}", record) for number, record in enumerate(table, start=1))
    return normalize_records(located, name, preset, problem_field, answer_field, solution_field, limit, answer_from)


# --------------------------------------------------------------------------------------------
# Curation


def drop_unparseable(frame: pd.DataFrame, parseable: list[bool]) -> tuple[pd.DataFrame, int]:
    """Drop rows whose gold answer is flagged unparseable or is blank; return (kept, n_dropped)."""
    flags = list(parseable)
    if len(flags) != len(frame):
        raise DataError(f"drop_unparseable: {len(flags)} flags for {len(frame)} rows")
    blank = frame["answer"].astype(str).str.strip().eq("").tolist()
    keep = [bool(ok) and not empty for ok, empty in zip(flags, blank)]
    kept = frame.loc[keep].reset_index(drop=True)
    return kept, len(frame) - len(kept)


def normalize_text(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, stripped (the dedup key)."""
    return " ".join(text.lower().split())


def deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows whose normalised problem repeats an earlier row (first kept, order stable)."""
    keys = frame["problem"].map(normalize_text)
    kept = frame.loc[~keys.duplicated(keep="first")].reset_index(drop=True)
    repeated = kept["id"][kept["id"].duplicated()].tolist()
    if repeated:
        raise DataError(f"deduplicate: duplicate ids {repeated[:5]} ({len(repeated)} in all); ids must be unique")
    return kept, len(frame) - len(kept)


def word_tokens(text: str) -> list[str]:
    """Lowercase whitespace-delimited words: "Compute 37+12-8." -> ["compute", "37+12-8."].

    Whitespace words (not regex word/symbol pieces) keep an expression such as "37+12" whole, so
    "37+12" and "37-12" differ, and keep LaTeX boilerplate (``$a$,``) from forming cheap shared
    13-grams: with symbol-level tokens 17% of MATH train matched MATH500 on phrases such as
    "$ a $ , $ b $ , $ c $", with whitespace words 1.3% do, mostly real sibling problems.
    """
    return text.lower().split()


def gram_sequence(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    """n-grams in text order; a text shorter than n is one gram (its whole token tuple)."""
    if n < 1:
        raise DataError(f"n-gram size must be >= 1, found {n}")
    if not tokens:
        return
    if len(tokens) < n:
        yield tuple(tokens)
        return
    for start in range(len(tokens) - n + 1):
        yield tuple(tokens[start:start + n])


MAX_EXAMPLES = 5  # examples per eval set in the report: enough to judge a hit, small enough to read


def decontaminate(
    train: pd.DataFrame, evals: Mapping[str, pd.DataFrame], n: int
) -> tuple[pd.DataFrame, dict]:
    """Remove train rows sharing any word n-gram with any eval problem; return (clean, report).

    Report: n, n_train_before, n_train_after, n_contaminated (rows removed), contaminated_frac, and
    per eval set {n_eval, n_flagged, examples: [{train_id, eval_id, ngram}]}. A row may be flagged by
    several eval sets, so per-set counts can add up to more than n_contaminated.
    Cost: one dict (gram -> first eval id) per eval set, then one pass over train.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"n-gram size must be a positive integer, found {n!r}")
    index: dict[str, dict[tuple[str, ...], str]] = {}
    for eval_name, frame in evals.items():
        grams: dict[tuple[str, ...], str] = {}
        for eval_id, problem in zip(frame["id"].tolist(), frame["problem"].tolist()):
            for gram in gram_sequence(word_tokens(problem), n):
                grams.setdefault(gram, eval_id)
        index[eval_name] = grams

    per_eval = {name: {"n_eval": len(evals[name]), "n_flagged": 0, "examples": []} for name in index}
    contaminated = []
    for train_id, problem in zip(train["id"].tolist(), train["problem"].tolist()):
        sequence = list(gram_sequence(word_tokens(problem), n))
        hit = False
        for eval_name, table in index.items():
            # First shared gram in text order (deterministic examples); one hash lookup per gram.
            first = next((gram for gram in sequence if gram in table), None)
            if first is None:
                continue
            hit = True
            entry = per_eval[eval_name]
            entry["n_flagged"] += 1
            if len(entry["examples"]) < MAX_EXAMPLES:
                entry["examples"].append({"train_id": train_id, "eval_id": table[first], "ngram": " ".join(first)})
        contaminated.append(hit)

    keep = [not hit for hit in contaminated]
    clean = train.loc[keep].reset_index(drop=True)
    removed = len(train) - len(clean)
    report = {
        "n": n,
        "n_train_before": len(train),
        "n_train_after": len(clean),
        "n_contaminated": removed,
        "contaminated_frac": removed / len(train) if len(train) else 0.0,
        "evals": per_eval,
    }
    return clean, report


# --------------------------------------------------------------------------------------------
# Validation


def check_frame(frame: pd.DataFrame, where: str) -> None:
    """Check a frame against SCHEMA: columns, str values, non-empty problem/answer, unique ids, meta JSON.

    Extra columns are allowed (later stages add e.g. pass rates); the schema columns must all exist.
    """
    if not isinstance(frame, pd.DataFrame):
        raise DataError(f"{where}: expected a pandas DataFrame, found {type(frame).__name__}")
    missing = [c for c in SCHEMA if c not in frame.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; expected {list(SCHEMA)}, found {list(frame.columns)}")
    if len(frame) == 0:
        raise DataError(f"{where}: no rows")
    for column in SCHEMA:
        bad = [i for i, v in enumerate(frame[column].tolist()) if not isinstance(v, str)]
        if bad:
            value = frame[column].iloc[bad[0]]
            raise DataError(
                f"{where}: column {column!r} must hold strings; row {bad[0]} has {type(value).__name__} {value!r:.60}"
                f" ({len(bad)} bad rows)"
            )
    for column in ("problem", "answer"):
        blank = frame.index[frame[column].str.strip().eq("")].tolist()
        if blank:
            raise DataError(f"{where}: empty {column!r} in {len(blank)} row(s), first id {frame['id'].loc[blank[0]]!r}")
    duplicated = frame["id"][frame["id"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{where}: duplicate ids {duplicated[:5]} ({len(duplicated)} in all)")
    for row_id, meta in zip(frame["id"].tolist(), frame["meta"].tolist()):
        try:
            parsed = json.loads(meta)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: id {row_id!r}: meta is not JSON ({exc.msg})") from exc
        if not isinstance(parsed, dict):
            raise DataError(f"{where}: id {row_id!r}: meta must be a JSON object, found {type(parsed).__name__}")
