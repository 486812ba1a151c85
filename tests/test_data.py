"""Tests for rlvr.data: the real source files, their quirks, bad input, dedup and decontamination."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlvr import data
from rlvr.data import DataError

SOURCES = Path(__file__).parents[1] / "data" / "sources"

# name -> (path under data/sources, preset, record count from SOURCE.md)
REAL = {
    "math500": ("benchmarks/math500/test.jsonl", "math500", 500),
    "gsm8k_test": ("benchmarks/gsm8k/test.jsonl", "gsm8k", 1319),
    "aime24": ("benchmarks/aime24/test.jsonl", "aime", 30),
    "aime25": ("benchmarks/aime25/test.jsonl", "aime", 30),
    "amc23": ("benchmarks/amc23/test.jsonl", "amc", 40),
    "gsm8k_train": ("train/gsm8k/train.jsonl", "gsm8k", 7473),
    "math_train": ("train/math/math.json", "math", 7474),
    "dsr": ("train/deepscaler_sub/dsr_sub.parquet", "deepscaler", 1209),
}


@functools.cache
def read_records(path) -> list[dict]:
    return [record for _, record in data.read_located(Path(path))]


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return set(data.gram_sequence(tokens, n))


def real_frame(name: str) -> pd.DataFrame:
    path, preset, _ = REAL[name]
    return data.load_file(SOURCES / path, name, preset)


@functools.cache
def raw_records(name: str) -> list[dict]:
    return read_records(SOURCES / REAL[name][0])


def frame_of(problems: list[str], prefix: str = "t") -> pd.DataFrame:
    rows = [(f"{prefix}-{i}", p, "1", prefix, "{}", "") for i, p in enumerate(problems)]
    return pd.DataFrame(rows, columns=list(data.SCHEMA))


# ---------------------------------------------------------------------------------------------
# Real sources


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_source_loads_in_schema(name):
    frame = real_frame(name)
    assert tuple(frame.columns) == data.SCHEMA
    assert len(frame) == REAL[name][2]
    assert frame["id"].is_unique
    assert frame["id"].iloc[0] == f"{name}-0"
    assert (frame["source"] == name).all()
    assert all(isinstance(json.loads(m), dict) for m in frame["meta"])
    assert [json.loads(m)["row"] for m in frame["meta"]] == list(range(len(frame)))


@pytest.mark.parametrize("name", sorted(set(REAL) - {"math_train", "dsr"}))
def test_real_source_passes_check_frame(name):
    data.check_frame(real_frame(name), name)


def test_math_train_blank_answers_are_dropped_and_counted():
    # The rllm MATH train copy has 2 null and 2 empty answers (records 887, 1010, 5329, 5331).
    frame = real_frame("math_train")
    blank = frame.index[frame["answer"].str.strip() == ""].tolist()
    assert blank == [886, 1009, 5328, 5330]
    with pytest.raises(DataError, match="math_train.*empty 'answer' in 4 row"):
        data.check_frame(frame, "math_train")
    kept, dropped = data.drop_unparseable(frame, [True] * len(frame))
    assert dropped == 4 and len(kept) == 7470
    data.check_frame(kept, "math_train")


def test_gsm8k_thousands_commas_stripped_and_rationale_kept():
    raw = raw_records("gsm8k_test")
    frame = real_frame("gsm8k_test")
    with_comma = [i for i, r in enumerate(raw) if "," in r["answer"].rsplit("#### ", 1)[1]]
    assert len(with_comma) == 14  # SOURCE.md: 14 test answers use thousands separators
    i = with_comma[0]
    assert frame["answer"].iloc[i] == raw[i]["answer"].rsplit("#### ", 1)[1].replace(",", "").strip()
    assert frame.set_index("id").loc["gsm8k_test-611", "answer"] == "1450000"  # raw "1,450,000"
    assert frame["answer"].str.fullmatch(r"-?\d+(\.\d+)?").all()
    assert frame["problem"].iloc[0] == raw[0]["question"].strip()
    solution = frame["solution"].iloc[0]
    assert solution and "####" not in solution and "<<" not in solution and ">>" not in solution
    # The rationale survives with the calculator annotation removed: "16 - 3 - 4 = <<16-3-4=9>>9" -> "...= 9".
    assert raw[0]["answer"].split("\n")[0].split("<<")[0] in solution


def test_aime_zero_padding_removed_and_degree_kept():
    raw24 = raw_records("aime24")
    aime24 = real_frame("aime24")
    padded = [i for i, r in enumerate(raw24) if r["answer"] == "025"]
    assert padded, "aime24 has an answer '025'"
    assert aime24["answer"].iloc[padded[0]] == "25"
    assert aime24["answer"].str.fullmatch(r"[1-9]\d*|0").all()
    assert json.loads(aime24["meta"].iloc[0])["id"] == 60
    assert "artofproblemsolving" in json.loads(aime24["meta"].iloc[0])["url"]
    aime25 = real_frame("aime25")
    assert aime25["answer"].iloc[19] == "336^\\circ"  # record 20 (2025 AIME II #5) is kept as is
    assert (aime25["solution"] == "").all()


def test_amc_float_answers_become_integers():
    amc = real_frame("amc23")
    assert raw_records("amc23")[0]["answer"] == 27.0
    assert amc["answer"].iloc[0] == "27"
    assert amc["answer"].str.fullmatch(r"-?\d+").all()
    assert json.loads(amc["meta"].iloc[0])["id"] == 0


def test_deepscaler_problem_without_instruction_and_gold_from_reward_model():
    raw = raw_records("dsr")
    dsr = real_frame("dsr")
    assert not dsr["problem"].str.endswith(data.DEEPSCALER_SUFFIX).any()
    assert not dsr["problem"].str.contains("Let's think step by step and output", regex=False).any()
    for i in (0, 500, 1208):
        assert dsr["problem"].iloc[i] + data.DEEPSCALER_SUFFIX == raw[i]["prompt"][0]["content"]
        assert dsr["answer"].iloc[i] == raw[i]["reward_model"]["ground_truth"].strip()
    assert dsr["answer"].iloc[0] == "\\frac{3}{7}"
    assert json.loads(dsr["meta"].iloc[0]) == {"data_source": "deepscaler", "index": 0, "split": "train", "row": 0}


def test_math500_latex_answers_intact():
    raw = raw_records("math500")
    frame = real_frame("math500")
    assert frame["answer"].tolist() == [r["answer"].strip() for r in raw]
    assert frame["answer"].iloc[0] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert frame["solution"].iloc[0] == raw[0]["solution"]
    meta = json.loads(frame["meta"].iloc[0])
    assert meta["subject"] == "Precalculus" and meta["level"] == 2 and meta["unique_id"] == "test/precalculus/807.json"


def test_math_train_meta():
    meta = json.loads(real_frame("math_train")["meta"].iloc[0])
    assert set(meta) == {"difficulty", "type", "row"}
    assert (real_frame("math_train")["solution"] == "").all()


def test_dsr_has_exactly_two_duplicate_prompts():
    kept, removed = data.deduplicate(real_frame("dsr"))
    assert removed == 2 and len(kept) == 1207


def test_limit_takes_the_first_records():
    frame = data.load_file(SOURCES / REAL["gsm8k_test"][0], "g", "gsm8k", limit=3)
    assert frame["id"].tolist() == ["g-0", "g-1", "g-2"]
    assert frame.equals(real_frame("gsm8k_test").head(3).assign(id=["g-0", "g-1", "g-2"], source="g"))
    with pytest.raises(DataError, match="limit"):
        data.load_file(SOURCES / REAL["gsm8k_test"][0], "g", "gsm8k", limit=0)


def test_gsm8k_train_barely_overlaps_gsm8k_test_at_13_grams():
    # SOURCE.md: no exact text overlap. Word 13-grams find 4 train rows that are sibling templates of a
    # test problem with different numbers (e.g. "A train/plane travels N miles in 3 hours. At the
    # same rate, how many additional hours ..."); none is an exact copy.
    train, test = real_frame("gsm8k_train"), real_frame("gsm8k_test")
    clean, report = data.decontaminate(train, {"gsm8k_test": test}, n=13)
    assert report["n_contaminated"] == report["evals"]["gsm8k_test"]["n_flagged"] == 4
    assert len(clean) == len(train) - 4
    exact = set(test["problem"].map(data.normalize_text))
    assert not train["problem"].map(data.normalize_text).isin(exact).any()


# ---------------------------------------------------------------------------------------------
# Readers and bad input (the input file must never be changed)


def write(path: Path, text: str) -> bytes:
    path.write_text(text, encoding="utf-8")
    return path.read_bytes()


def test_jsonl_blank_lines_skipped_and_json_array_read(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    write(jsonl, '{"q": "x", "a": 1}\n\n  \n{"q": "y", "a": 2}\n')
    assert read_records(jsonl) == [{"q": "x", "a": 1}, {"q": "y", "a": 2}]
    array = tmp_path / "a.json"
    write(array, json.dumps([{"q": "x"}, {"q": "y"}]))
    assert read_records(array) == [{"q": "x"}, {"q": "y"}]


def test_parquet_nested_fields_come_back_as_python(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"content": "2+2?", "role": "user"}], "rm": {"gt": "4"}}]), path)
    records = read_records(path)
    assert records == [{"prompt": [{"content": "2+2?", "role": "user"}], "rm": {"gt": "4"}}]
    frame = data.load_file(path, "n", "generic", problem_field="prompt[0].content", answer_field="rm.gt")
    assert frame[["problem", "answer", "solution"]].values.tolist() == [["2+2?", "4", ""]]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    before = write(path, '{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: malformed JSON"):
        data.load_file(path, "bad", "gsm8k")
    assert path.read_bytes() == before


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    before = write(path, '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list\.jsonl: line 2: expected a JSON object, found list"):
        read_records(path)
    assert path.read_bytes() == before


def test_json_that_is_not_an_array(tmp_path):
    path = tmp_path / "obj.json"
    before = write(path, '{"data": [{"a": 1}]}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON array of objects, found a dict"):
        read_records(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("suffix, text", [(".jsonl", ""), (".jsonl", "\n \n"), (".json", ""), (".json", "[]")])
def test_empty_file_is_an_error(tmp_path, suffix, text):
    path = tmp_path / f"empty{suffix}"
    before = write(path, text)
    with pytest.raises(DataError, match=rf"empty\{suffix}: no records"):
        data.load_file(path, "e", "gsm8k")
    assert path.read_bytes() == before


def test_empty_parquet_is_an_error(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"problem": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=r"empty\.parquet: no records"):
        read_records(path)


def test_missing_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "nofield.jsonl"
    before = write(path, '{"question": "a", "answer": "x #### 1"}\n\n{"question": "b"}\n')
    with pytest.raises(DataError, match=r"nofield\.jsonl line 3 .*missing field 'answer'"):
        data.load_file(path, "nf", "gsm8k")
    assert path.read_bytes() == before


def test_missing_nested_field_in_json_array_names_record(tmp_path):
    path = tmp_path / "arr.json"
    before = write(path, json.dumps([{"q": {"text": "a"}, "a": 1}, {"q": {}, "a": 2}]))
    with pytest.raises(DataError, match=r"arr\.json record 2 .*missing field 'q\.text'"):
        data.load_file(path, "arr", "generic", problem_field="q.text", answer_field="a")
    assert path.read_bytes() == before


def test_unknown_suffix_lists_supported(tmp_path):
    path = tmp_path / "data.csv"
    before = write(path, "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported .*\.jsonl, \.json, \.parquet"):
        data.load_file(path, "c", "generic", problem_field="a", answer_field="b")
    assert path.read_bytes() == before


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "x.jsonl"
    with pytest.raises(DataError, match=r"nowhere/x\.jsonl: file not found"):
        data.load_file(path, "x", "gsm8k")
    assert not path.parent.exists()


def test_unknown_preset_lists_presets(tmp_path):
    path = tmp_path / "a.jsonl"
    write(path, '{"question": "q", "answer": "#### 1"}\n')
    expected = "unknown preset 'gsm9k'; available: aime, amc, deepscaler, generic, gsm8k, math, math500"
    with pytest.raises(DataError, match=expected):
        data.load_file(path, "a", "gsm9k")
    assert sorted(data.PRESETS) == ["aime", "amc", "deepscaler", "generic", "gsm8k", "math", "math500"]


def test_field_paths_only_for_generic(tmp_path):
    path = tmp_path / "a.jsonl"
    write(path, '{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="problem_field only apply to preset 'generic'"):
        data.load_file(path, "a", "gsm8k", problem_field="question")
    with pytest.raises(DataError, match="generic' needs problem_field and answer_field"):
        data.load_file(path, "a", "generic", problem_field="question")


def test_gsm8k_without_marker_is_an_error(tmp_path):
    path = tmp_path / "g.jsonl"
    write(path, '{"question": "q", "answer": "the answer is 4"}\n')
    with pytest.raises(DataError, match=r"g\.jsonl line 1 .*no '####' marker"):
        data.load_file(path, "g", "gsm8k")


def test_answer_from_last_boxed_of_math500_solutions_gives_the_answer_field():
    # MATH500 ships both: the bare answer and a worked solution whose last \boxed{} holds it.
    path = SOURCES / REAL["math500"][0]
    from_solution = data.load_file(path, "m", "generic", problem_field="problem", answer_field="solution",
                                   answer_from="last_boxed")
    assert from_solution["answer"].tolist() == real_frame("math500")["answer"].tolist()


def test_answer_from_last_boxed_on_a_small_file(tmp_path):
    path = tmp_path / "solutions.jsonl"
    records = [
        {"q": "a", "sol": r"First $\boxed{1}$, corrected: so the answer is $\boxed{\frac{1}{2}}$."},
        {"q": "b", "sol": r"Nested braces: \boxed{\{1, 2\}} and \boxed{ x^{2} }"},
        {"q": "c", "sol": "A worked solution that never boxes its answer: 7."},
        {"q": "d", "sol": r"The last box is cut off: \boxed{3} then \boxed{4"},
        {"q": "e", "sol": None},
    ]
    before = write(path, "".join(json.dumps(r) + "\n" for r in records))
    frame = data.load_file(path, "s", "generic", problem_field="q", answer_field="sol", answer_from="last_boxed")
    assert frame["answer"].tolist() == [r"\frac{1}{2}", "x^{2}", "", "", ""]
    # Without a complete last box the gold is blank, like a null answer: dropped and counted, not fatal.
    kept, dropped = data.drop_unparseable(frame, [True] * len(frame))
    assert kept["problem"].tolist() == ["a", "b"] and dropped == 3
    # The default reads the field as it is.
    as_is = data.load_file(path, "s", "generic", problem_field="q", answer_field="sol")
    assert as_is["answer"].iloc[2] == "A worked solution that never boxes its answer: 7."
    assert path.read_bytes() == before


def test_answer_from_errors_name_the_file_and_the_choices(tmp_path):
    path = tmp_path / "s.jsonl"
    write(path, '{"q": "a", "sol": "\\\\boxed{1}"}\n{"q": "b", "sol": 5}\n{"q": "c"}\n')
    with pytest.raises(DataError, match=r"unknown answer_from 'lastboxed'; available: field, last_boxed"):
        data.load_file(path, "s", "generic", problem_field="q", answer_field="sol", answer_from="lastboxed")
    with pytest.raises(DataError, match=r"unknown answer_from 'lastboxed'"):
        data.load_file(tmp_path / "missing.jsonl", "s", "generic", problem_field="q", answer_field="sol",
                       answer_from="lastboxed")  # checked before the file is read
    with pytest.raises(DataError, match=r"s\.jsonl line 2 .*answer_from 'last_boxed' needs a string, found int"):
        data.load_file(path, "s", "generic", problem_field="q", answer_field="sol", answer_from="last_boxed", limit=2)
    # A missing field is the same error as without answer_from.
    with pytest.raises(DataError, match=r"s\.jsonl line 3 .*missing field 'sol'"):
        data.load_file(path, "s", "generic", problem_field="q", answer_field="sol", answer_from="field")
    with pytest.raises(DataError, match=r"s\.jsonl line 2 .*needs a string"):
        data.load_file(path, "s", "generic", problem_field="q", answer_field="sol", answer_from="last_boxed")


def test_params_check_answer_from_against_the_one_list():
    from rlvr import config
    from tests.conftest import small_params_dict

    params = small_params_dict()
    source = {"name": "m", "path": str(SOURCES / REAL["math500"][0]), "preset": "generic",
              "problem_field": "problem", "answer_field": "solution", "answer_from": "last_boxed"}
    params["prepare"]["eval"].append(source)
    loaded = config.from_dict(params)
    assert loaded.prepare.eval[-1].answer_from == "last_boxed"
    assert loaded.prepare.eval[0].answer_from == "field"  # the default
    source["answer_from"] = "lastboxed"
    with pytest.raises(config.ConfigError, match=r"prepare\.eval\[2\]\.answer_from = 'lastboxed': use one of "
                                                 r"\['field', 'last_boxed'\]"):
        config.from_dict(params)


def test_get_field_paths():
    record = {"prompt": [{"content": "hi", "role": "user"}], "reward_model": {"ground_truth": "3"}, "x": 0}
    assert data.get_field(record, "reward_model.ground_truth") == "3"
    assert data.get_field(record, "prompt[0].content") == "hi"
    assert data.get_field(record, "x") == 0
    with pytest.raises(DataError, match=r"f\.jsonl line 4: missing field 'reward_model\.style'"):
        data.get_field(record, "reward_model.style", where="f.jsonl line 4")
    with pytest.raises(DataError, match=r"field 'prompt\[1\]\.content': no prompt\[1\] \(found a list of 1\)"):
        data.get_field(record, "prompt[1].content")
    with pytest.raises(DataError, match=r"no 'x\.y'"):
        data.get_field(record, "x.y")
    for bad in ("a..b", ".a", "a.", "[0]", "a[0]b", "a[x]", ""):
        with pytest.raises(DataError, match="invalid field path"):
            data.get_field(record, bad)


@pytest.mark.parametrize(
    "value, expected",
    [(27.0, "27"), (-1.0, "-1"), (2.5, "2.5"), (7, "7"), (" 3 ", "3"), ("\\frac{1}{2}", "\\frac{1}{2}"), (None, "")],
)
def test_answer_to_str(value, expected):
    assert data.answer_to_str(value) == expected


@pytest.mark.parametrize("value", [True, float("nan"), float("inf"), [1], {"a": 1}])
def test_answer_to_str_rejects(value):
    with pytest.raises(DataError):
        data.answer_to_str(value)


# ---------------------------------------------------------------------------------------------
# Hub loader, offline (the "json" builder with local data_files, and save_to_disk folders)


def test_load_hub_json_builder_offline(tmp_path):
    path = tmp_path / "train.jsonl"
    # GSM8K style: calculator annotation in the rationale, thousands comma in the gold ("1,234").
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1:,}"}
            for i in (5, 1233)]
    before = write(path, "".join(json.dumps(r) + "\n" for r in rows))
    frame = data.load_hub("json", "hub", "gsm8k", split="train", data_files=str(path), cache_dir=tmp_path / "cache")
    assert tuple(frame.columns) == data.SCHEMA
    assert frame["id"].tolist() == ["hub-0", "hub-1"]
    assert frame["answer"].tolist() == ["6", "1234"]
    assert frame["solution"].tolist() == ["5+1=6", "1233+1=1234"]
    data.check_frame(frame, "hub")
    assert path.read_bytes() == before
    limited = data.load_hub("json", "hub", "gsm8k", split="train", data_files=str(path),
                            cache_dir=tmp_path / "cache", limit=1)
    assert limited["id"].tolist() == ["hub-0"]


def test_load_hub_nested_fields_and_save_to_disk(tmp_path):
    import datasets

    suffix = data.DEEPSCALER_SUFFIX
    rows = [
        {
            "prompt": [{"content": "Find $x$." + suffix, "role": "user"}],
            "reward_model": {"ground_truth": "2", "style": "rule"},
            "extra_info": {"index": 7, "split": "train"},
            "data_source": "deepscaler",
        },
    ]
    path = tmp_path / "dsr.jsonl"
    write(path, json.dumps(rows[0]) + "\n")
    frame = data.load_hub("json", "d", "deepscaler", split="train", data_files=str(path), cache_dir=tmp_path / "cache")
    assert frame[["problem", "answer"]].values.tolist() == [["Find $x$.", "2"]]
    assert json.loads(frame["meta"].iloc[0])["index"] == 7

    saved = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    from_disk = data.load_hub(str(saved), "d", "deepscaler", split="test")
    assert from_disk.equals(frame)
    with pytest.raises(DataError, match=r"no such split; available: \['test'\]"):
        data.load_hub(str(saved), "d", "deepscaler", split="train")


def test_load_hub_missing_data_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="json split 'train': cannot load"):
        data.load_hub("json", "x", "gsm8k", split="train", data_files=str(tmp_path / "missing.jsonl"),
                      cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# drop_unparseable, dedup, check_frame


def test_drop_unparseable_counts_flags_and_blank_answers():
    frame = frame_of(["p0", "p1", "p2", "p3"])
    frame.loc[2, "answer"] = "  "
    kept, dropped = data.drop_unparseable(frame, [True, False, True, True])
    assert dropped == 2
    assert kept["id"].tolist() == ["t-0", "t-3"]
    assert kept.index.tolist() == [0, 1]
    with pytest.raises(DataError, match="3 flags for 4 rows"):
        data.drop_unparseable(frame, [True] * 3)


def test_normalize_text():
    assert data.normalize_text("  What IS\n\t2 +  2? ") == "what is 2 + 2?"


def test_deduplicate_keeps_first_in_order():
    frame = frame_of(["A  b", "c", "a B", "C ", "d", "c"])
    kept, removed = data.deduplicate(frame)
    assert removed == 3
    assert kept["id"].tolist() == ["t-0", "t-1", "t-4"]
    assert kept["problem"].tolist() == ["A  b", "c", "d"]
    assert kept.index.tolist() == [0, 1, 2]


def test_deduplicate_rejects_duplicate_ids():
    frame = frame_of(["x", "y"])
    frame.loc[1, "id"] = "t-0"
    with pytest.raises(DataError, match=r"duplicate ids \['t-0'\]"):
        data.deduplicate(frame)


def test_check_frame_errors_name_where():
    good = frame_of(["a", "b"])
    data.check_frame(good, "ok")
    data.check_frame(good.assign(pass_rate=0.5), "extra columns allowed")
    cases = [
        (good.drop(columns=["meta"]), r"train\.parquet: missing column\(s\) \['meta'\]"),
        (good.iloc[:0], r"train\.parquet: no rows"),
        (good.assign(answer=[1, 2]), r"train\.parquet: column 'answer' must hold strings"),
        (good.assign(solution=[None, ""]), r"train\.parquet: column 'solution' must hold strings"),
        (good.assign(problem=["a", " "]), r"train\.parquet: empty 'problem' in 1 row\(s\), first id 't-1'"),
        (good.assign(answer=["", "1"]), r"train\.parquet: empty 'answer'"),
        (good.assign(id=["x", "x"]), r"train\.parquet: duplicate ids \['x'\]"),
        (good.assign(meta=["{}", "[]"]), r"train\.parquet: id 't-1': meta must be a JSON object"),
        (good.assign(meta=["{}", "{bad"]), r"train\.parquet: id 't-1': meta is not JSON"),
    ]
    for frame, message in cases:
        with pytest.raises(DataError, match=message):
            data.check_frame(frame, "train.parquet")
    with pytest.raises(DataError, match="expected a pandas DataFrame"):
        data.check_frame([], "train.parquet")


def test_check_frame_after_parquet_round_trip(tmp_path):
    from rlvr.io import read_parquet, write_parquet

    path = tmp_path / "f.parquet"
    write_parquet(path, real_frame("aime25"))
    data.check_frame(read_parquet(path, required=data.SCHEMA), "round trip")


# ---------------------------------------------------------------------------------------------
# Decontamination


def test_word_tokens_are_whitespace_words():
    assert data.word_tokens("What  is 37+12?") == ["what", "is", "37+12?"]
    assert data.word_tokens("37+12") != data.word_tokens("37-12")
    assert data.word_tokens("Let $\\frac{a}{b}$,\nthen") == ["let", "$\\frac{a}{b}$,", "then"]


def test_ngrams():
    tokens = ["a", "b", "c", "d"]
    assert ngrams(tokens, 2) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert ngrams(tokens, 4) == {("a", "b", "c", "d")}
    assert ngrams(tokens, 13) == {("a", "b", "c", "d")}  # short text: the whole tuple is one gram
    assert ngrams([], 3) == set()


WORDS = [f"w{i}" for i in range(40)]


def sentence(words: list[str]) -> str:
    return " ".join(words)


def test_decontaminate_flags_exactly_the_expected_rows():
    n = 13
    evals = {
        "long": frame_of([sentence(WORDS[:30]), sentence(WORDS[30:40])], "L"),
        "short": frame_of(["What is 37+12?", "Compute  2*3."], "S"),
    }
    train_problems = {
        "shares 13-gram": sentence(["x", "y"] + WORDS[5:18] + ["z"]),  # w5..w17 = 13 tokens
        "shares only 12 tokens": sentence(["x"] + WORDS[5:17] + ["z"]),  # w5..w16
        "12 + 12 split by a gap": sentence(WORDS[0:12] + ["gap"] + WORDS[12:24]),
        "short exact (case, spacing)": "what   IS 37+12?",
        "short, other operator": "What is 37-12?",
        "short, extra token": "What is 37+12? Explain.",
        "part of a short eval text": sentence(WORDS[31:36]),  # L-1 has 10 tokens: one whole-text gram
        "exact copy of short eval 2": "compute 2*3.",
        "13-gram of L-0, then short eval 1": sentence(WORDS[17:30]) + " what is 37+12?",
    }
    train = frame_of(list(train_problems))
    train["problem"] = list(train_problems.values())
    clean, report = data.decontaminate(train, evals, n)

    flagged = sorted(set(train["id"]) - set(clean["id"]))
    # t-0 and t-8 share a 13-gram with L-0; t-3 and t-7 are exact token copies of short eval texts.
    # t-8 also contains short eval 1, but a text of n tokens or more never matches a short gram.
    assert flagged == ["t-0", "t-3", "t-7", "t-8"]
    assert clean["id"].tolist() == ["t-1", "t-2", "t-4", "t-5", "t-6"]
    assert report["n"] == 13
    assert report["n_train_before"] == 9 and report["n_train_after"] == 5
    assert report["n_contaminated"] == 4
    assert report["contaminated_frac"] == pytest.approx(4 / 9)
    long, short = report["evals"]["long"], report["evals"]["short"]
    assert long["n_eval"] == 2 and short["n_eval"] == 2
    assert long["n_flagged"] == 2 and short["n_flagged"] == 2
    assert long["examples"] == [
        {"train_id": "t-0", "eval_id": "L-0", "ngram": sentence(WORDS[5:18])},
        {"train_id": "t-8", "eval_id": "L-0", "ngram": sentence(WORDS[17:30])},
    ]
    assert short["examples"] == [
        {"train_id": "t-3", "eval_id": "S-0", "ngram": "what is 37+12?"},
        {"train_id": "t-7", "eval_id": "S-1", "ngram": "compute 2*3."},
    ]
    json.dumps(report)  # goes into the metrics file as is


def test_decontaminate_counts_a_row_once_and_caps_examples():
    evals = {"a": frame_of(["same question"], "A"), "b": frame_of(["Same   QUESTION"], "B")}
    train = frame_of(["same question"] * 7 + ["other"])
    clean, report = data.decontaminate(train, evals, 13)
    assert clean["id"].tolist() == ["t-7"]
    assert report["n_contaminated"] == 7
    for name in ("a", "b"):
        assert report["evals"][name]["n_flagged"] == 7
        assert len(report["evals"][name]["examples"]) == data.MAX_EXAMPLES
        assert [e["train_id"] for e in report["evals"][name]["examples"]] == [f"t-{i}" for i in range(5)]


def test_decontaminate_without_evals_keeps_everything_and_rejects_bad_n():
    train = frame_of(["a b c"])
    clean, report = data.decontaminate(train, {}, 13)
    assert clean.equals(train) and report["n_contaminated"] == 0 and report["evals"] == {}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="n-gram size"):
            data.decontaminate(train, {}, bad)
