import json

import pandas as pd
import pytest

from rlvr import config, data
from stages import prepare
from tests.conftest import ROOT, small_params_dict


def test_prepare_writes_clean_sets(small_params, in_tmp):
    metrics = prepare.main(small_params)
    out = in_tmp / "data/prepared"
    train = pd.read_parquet(out / "train.parquet")
    evals = {p.stem: pd.read_parquet(p) for p in (out / "eval").glob("*.parquet")}
    assert set(evals) == {"arith", "gsm8k"}
    assert list(train.columns) == list(data.SCHEMA)
    assert train["id"].is_unique and train["problem"].map(data.normalize_text).is_unique
    # decontaminated: no train problem equals a held-out problem
    held_out = set(evals["arith"]["problem"].map(data.normalize_text))
    assert not train["problem"].map(data.normalize_text).isin(held_out).any()
    report = json.loads((out / "report.json").read_text())
    assert metrics["train_rows"] == len(train) == report["train_rows"]
    loaded = metrics["train_arith_loaded"]
    assert loaded == 300
    assert len(train) == loaded - metrics["train_arith_duplicates"] - metrics["contaminated"]
    assert metrics["eval_gsm8k_rows"] == 40
    assert json.loads((in_tmp / "metrics/prepare.json").read_text()) == metrics


def test_prepare_drops_and_counts_unparseable_gold(in_tmp):
    source = in_tmp / "extra.jsonl"
    rows = [{"q": "What is 1+1?", "a": "2"}, {"q": "Name it.", "a": "\\div"}, {"q": "Blank?", "a": " "}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = source.read_bytes()
    raw = small_params_dict()
    raw["prepare"]["train"].append({"name": "extra", "path": str(source), "preset": "generic",
                                    "problem_field": "q", "answer_field": "a"})
    metrics = prepare.main(config.from_dict(raw))
    assert metrics["train_extra_loaded"] == 3
    assert metrics["train_extra_unparseable"] == 2
    assert source.read_bytes() == before


def test_contamination_above_threshold_fails_and_keeps_earlier_outputs(in_tmp):
    prepare.main(config.from_dict(small_params_dict()))
    earlier = (in_tmp / "data/prepared/train.parquet").read_bytes()
    raw = small_params_dict()
    # a benchmark listed as training data: every one of its rows overlaps the eval set
    raw["prepare"]["train"].append({"name": "leak", "path": str(ROOT / "data/sources/benchmarks/gsm8k/test.jsonl"),
                                    "preset": "gsm8k", "limit": 40})
    with pytest.raises(prepare.ContaminationError, match="max_contaminated_frac"):
        prepare.main(config.from_dict(raw))
    assert (in_tmp / "data/prepared/train.parquet").read_bytes() == earlier


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "empty"), ('{"question": "q", "answer": "#### 3"}\n{broken\n', "line 2"),
     ('{"question": "q"}\n', "answer")],
)
def test_bad_source_file_names_file_and_line(in_tmp, content, message):
    bad = in_tmp / "bad.jsonl"
    bad.write_text(content)
    raw = small_params_dict()
    raw["prepare"]["eval"].append({"name": "bad", "path": str(bad), "preset": "gsm8k"})
    with pytest.raises(data.DataError, match=message) as error:
        prepare.main(config.from_dict(raw))
    assert str(bad) in str(error.value)
    assert not (in_tmp / "data/prepared").exists()


def test_load_source_takes_gold_from_the_last_box_of_a_solution_when_asked():
    """MATH500 ships both a worked solution and its answer: the last box of the one is the other."""
    path = str(ROOT / "data/sources/benchmarks/math500/test.jsonl")
    raw = small_params_dict()
    raw["prepare"]["eval"] += [
        {"name": "by_field", "path": path, "preset": "generic", "problem_field": "problem",
         "answer_field": "answer", "limit": 40},
        {"name": "by_box", "path": path, "preset": "generic", "problem_field": "problem",
         "answer_field": "solution", "answer_from": "last_boxed", "limit": 40}]
    params = config.from_dict(raw)
    from_field, from_box = (prepare.load_source(source, "eval", params) for source in params.prepare.eval[-2:])
    assert len(from_box) == 40
    assert from_box["answer"].tolist() == from_field["answer"].tolist()
