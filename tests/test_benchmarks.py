"""The real data files: copies are byte-exact, and every gold answer grades as its own \\boxed{} answer.
Plus a small run of benchmarks/grader.py (Grader against grade_one and plain math-verify)."""

import hashlib
import json
import re
import subprocess
import sys

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


@pytest.mark.slow
def test_grader_benchmark_smoke_run_has_no_differing_grades(tmp_path):
    # benchmarks/grader.py on 2 golds per source: every Grader grade must equal grade_one's. A long
    # per-item limit, so that a loaded machine cannot turn a slow item into a one-sided timeout.
    out = tmp_path / "grader.json"
    command = [sys.executable, str(ROOT / "benchmarks/grader.py"), "--limit", "2", "--warmup", "1",
               "--repeats", "1", "--timeout", "60", "--out", str(out)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["golds"] == {name: 2 for name in BENCHMARKS}
    # five or six completions per gold (a non-numeric gold may have only one safe re-spelling)
    assert 5 * 10 <= report["items"] <= 6 * 10 and report["grader_differs_from_reference"] == 0
    assert 0 < report["runs"][0]["pairs_in_process"] < report["distinct_pairs"]
    # plain math-verify reads an answer that is not boxed (grade_one gives no credit without a box)
    assert report["plain_differs_from_reference"]["by_reason"]["no box: plain math-verify reads the answer from the text"] > 0


def test_gain_rl_ranking_partial_correlation_matches_the_formula_and_deciles_split_evenly():
    import numpy as np
    import pandas as pd

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gain_rl_ranking

    rng = np.random.default_rng(0)
    length = rng.permutation(100).astype(float)
    score = -length + rng.normal(0, 20, 100)
    rate = -length + rng.normal(0, 20, 100)
    # without ties, partial Spearman = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)) on the ranks
    r = np.corrcoef([pd.Series(v).rank() for v in (score, rate, length)])
    expected = (r[0, 1] - r[0, 2] * r[1, 2]) / np.sqrt((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2))
    assert gain_rl_ranking.partial_spearman(score, rate, length) == pytest.approx(expected, abs=1e-12)
    # a rate that is a function of length alone leaves nothing to correlate once length is removed
    assert np.isnan(gain_rl_ranking.partial_spearman(score, -length, length))

    angles = pd.DataFrame({"id": [f"p{i}" for i in range(20)], "score": np.arange(20, 0, -1.0), "valid": True,
                           "question_length": np.arange(20)})
    rates = pd.DataFrame({"id": [f"p{i}" for i in range(20)], "pass_rate": np.linspace(1, 0, 20)})
    result = gain_rl_ranking.analyse(angles, rates)
    assert [d["prompts"] for d in result["by_gain_rl_rank"]] == [2] * 10
    assert result["by_gain_rl_rank"][0]["mean_pass_rate"] == pytest.approx((1 + 1 - 1 / 19) / 2, abs=1e-4)
    assert result["spearman_pass_rate_score"] == pytest.approx(1.0)
    assert result["spearman_pass_rate_length"] == pytest.approx(-1.0)
