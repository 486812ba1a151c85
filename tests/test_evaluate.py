import json

import numpy as np
import pandas as pd
import pytest

from rlvr import models
from stages import evaluate, prepare


def test_fixed_subset_is_stable_under_reordering():
    frame = pd.DataFrame({"id": [f"p-{i}" for i in range(50)], "problem": ["x"] * 50, "answer": ["1"] * 50})
    subset = evaluate.fixed_subset(frame, 7)
    shuffled = evaluate.fixed_subset(frame.sample(frac=1, random_state=3), 7)
    assert len(subset) == 7 and sorted(subset["id"]) == sorted(shuffled["id"])
    assert len(evaluate.fixed_subset(frame, None)) == 50
    assert len(evaluate.fixed_subset(frame, 500)) == 50


def test_grade_matrix_shape_and_unparseable_gold():
    from rlvr.grading import Grader

    samples = [["\\boxed{3}", "\\boxed{4}", "no box"], ["\\boxed{1}", "\\boxed{1}", "\\boxed{1}"]]
    with Grader(workers=1, timeout_s=5) as grader:
        matrix = evaluate.grade_matrix(grader, samples, ["3", "\\div"])
    assert matrix.shape == (2, 3)
    assert matrix[0].tolist() == [1.0, 0.0, 0.0]
    assert np.isnan(matrix[1]).all()


@pytest.mark.slow
def test_evaluate_writes_sane_metrics_and_matrices(small_params, in_tmp):
    prepare.main(small_params)
    tokenizer = models.build_char_tokenizer()
    models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 1024, seed=0), tokenizer, "models/warmup")
    metrics = evaluate.main(small_params)
    assert set(metrics) == {"arith", "gsm8k"}
    for name, m in metrics.items():
        ks = small_params.evaluate.ks
        values = [m[f"pass_at_{k}"] for k in ks]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert values == sorted(values), "pass@k must not decrease with k"
        for k in ks:
            assert m[f"pass_at_{k}_ci_low"] <= m[f"pass_at_{k}"] <= m[f"pass_at_{k}_ci_high"]
        assert m["n_samples"] == small_params.evaluate.n_samples
        assert 0.0 <= m["greedy_accuracy"] <= 1.0
        frame = pd.read_parquet(in_tmp / f"data/evaluated/{name}.parquet")
        assert len(frame) == m["n_problems"]
        assert all(len(row) == small_params.evaluate.n_samples for row in frame["correct"])
        # pass@1 is exactly the mean of the saved correctness matrix
        assert m["pass_at_1"] == pytest.approx(np.mean([np.mean(row) for row in frame["correct"]]))
    assert metrics["gsm8k"]["n_problems"] == small_params.evaluate.subset_size
    assert json.loads((in_tmp / "metrics/eval.json").read_text()) == metrics
    assert "pass@" not in (in_tmp / "metrics/eval.json").read_text()


def test_missing_model_is_a_clear_error(small_params, in_tmp):
    prepare.main(small_params)
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        evaluate.run(small_params, model_dir=in_tmp / "models/nothing")
