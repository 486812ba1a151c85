"""The real data files: copies are byte-exact, and every gold answer grades as its own \\boxed{} answer."""

import hashlib
import re

import pytest

from rlvr import data
from rlvr.grading import Grader
from tests.conftest import ROOT

SOURCES = ROOT / "data/sources"
BENCHMARKS = {
    "math500": ("benchmarks/math500/test.jsonl", "math500"),
    "gsm8k": ("benchmarks/gsm8k/test.jsonl", "gsm8k"),
    "aime24": ("benchmarks/aime24/test.jsonl", "aime"),
    "aime25": ("benchmarks/aime25/test.jsonl", "aime"),
    "amc23": ("benchmarks/amc23/test.jsonl", "amc"),
}
TRAIN = {
    "gsm8k_train": ("train/gsm8k/train.jsonl", "gsm8k"),
    "math_train": ("train/math/math.json", "math"),
    "dsr": ("train/deepscaler_sub/dsr_sub.parquet", "deepscaler"),
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS) + sorted(TRAIN))
def test_copies_match_the_sha256_in_source_md(name):
    relative = {**BENCHMARKS, **TRAIN}[name][0]
    path = SOURCES / relative
    recorded = re.search(r"sha256: `([0-9a-f]{64})`", (path.parent / "SOURCE.md").read_text()).group(1)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=2, timeout_s=10.0) as pool:
        yield pool


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_gold_grades_as_its_own_boxed_answer(name, grader):
    relative, preset = BENCHMARKS[name]
    frame = data.load_file(SOURCES / relative, name, preset)
    golds = frame["answer"].tolist()
    scores = grader.grade([f"\\boxed{{{g}}}" for g in golds], golds)
    assert scores == [1.0] * len(golds), [g for g, s in zip(golds, scores) if s != 1.0][:5]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAIN))
def test_training_golds_grade_as_their_own_boxed_answer_or_are_unparseable(name, grader):
    relative, preset = TRAIN[name]
    frame = data.load_file(SOURCES / relative, name, preset)
    golds = frame["answer"].tolist()
    parseable = grader.parseable(golds)
    kept = [g for g, ok in zip(golds, parseable) if ok]
    # a handful of MATH train golds are empty or not math (e.g. "\\sin^2 t"); nothing else is
    assert len(golds) - len(kept) <= 10
    scores = grader.grade([f"\\boxed{{{g}}}" for g in kept], kept)
    assert scores == [1.0] * len(kept)
