import json

import numpy as np
import pandas as pd
import pytest

from rlvr import generation, models
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
    models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 1024, seed=1), tokenizer, "models/policy")
    metrics = evaluate.main(small_params)
    assert set(metrics) == {"arith", "gsm8k"}
    ks = small_params.evaluate.ks
    for name, top in metrics.items():
        for label, m in (("policy", top), ("warmup", top["warmup"])):
            values = [m[f"pass_at_{k}"] for k in ks]
            assert all(0.0 <= v <= 1.0 for v in values)
            assert values == sorted(values), "pass@k must not decrease with k"
            for k in ks:
                assert m[f"pass_at_{k}_ci_low"] <= m[f"pass_at_{k}"] <= m[f"pass_at_{k}_ci_high"]
            assert m["n_samples"] == small_params.evaluate.n_samples
            assert 0.0 <= m["greedy_accuracy"] <= 1.0
            frame = pd.read_parquet(in_tmp / f"data/evaluated/{label}/{name}.parquet")
            assert len(frame) == m["n_problems"]
            assert all(len(row) == small_params.evaluate.n_samples for row in frame["correct"])
            # pass@1 is exactly the mean of the saved correctness matrix
            assert m["pass_at_1"] == pytest.approx(np.mean([np.mean(row) for row in frame["correct"]]))
        assert top["delta_pass_at_1"] == pytest.approx(top["pass_at_1"] - top["warmup"]["pass_at_1"])
        assert top["delta_pass_at_1_ci_low"] <= top["delta_pass_at_1"] <= top["delta_pass_at_1_ci_high"]
    assert metrics["gsm8k"]["n_problems"] == small_params.evaluate.subset_size
    assert json.loads((in_tmp / "metrics/eval.json").read_text()) == metrics
    assert "pass@" not in (in_tmp / "metrics/eval.json").read_text()
    assert "vs warm-up" in evaluate.summary(metrics)
    curve = pd.read_csv(in_tmp / "metrics/passk/arith.csv")
    assert curve["k"].tolist() == list(ks)
    assert curve["policy"].tolist() == [metrics["arith"][f"pass_at_{k}"] for k in ks]
    assert curve["warmup"].tolist() == [metrics["arith"]["warmup"][f"pass_at_{k}"] for k in ks]


def test_paired_delta_hand_worked():
    policy = pd.DataFrame({"id": ["a", "b"], "correct": [[True, True], [True, False]]})
    base = pd.DataFrame({"id": ["a", "b"], "correct": [[False, True], [False, False]]})
    # per problem: (1 - 0.5) and (0.5 - 0) -> mean 0.5; every resample of two values of 0.5 is 0.5
    assert evaluate.paired_delta(policy, base, 200, 0) == {
        "delta_pass_at_1": 0.5, "delta_pass_at_1_ci_low": 0.5, "delta_pass_at_1_ci_high": 0.5}
    with pytest.raises(ValueError, match="same problems"):
        evaluate.paired_delta(policy, base.iloc[::-1], 200, 0)


def test_missing_model_is_a_clear_error(small_params, in_tmp):
    prepare.main(small_params)
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        evaluate.run(small_params, model_dirs={"policy": in_tmp / "models/nothing"})


def test_vllm_backend_builds_one_engine_per_model_for_every_benchmark(small_params, in_tmp, monkeypatch):
    """Stand-in engine (vLLM needs a GPU): one engine per model serves every benchmark, sampled and greedy,
    and the transformers weights are never loaded next to it."""
    prepare.main(small_params)
    tokenizer = models.build_char_tokenizer()
    for folder in ("models/policy", "models/warmup"):
        models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 256, seed=0), tokenizer, folder)
    built, calls = [], []

    def fake_engine(source, seed, trust_remote_code, dtype):
        built.append(source)
        return f"engine:{source}"

    def fake_sample(engine, prompts, settings):
        calls.append((engine, len(prompts), settings.greedy))
        n = 1 if settings.greedy else settings.n
        return [["\\boxed{0}"] * n for _ in prompts]

    monkeypatch.setattr(generation, "choose_backend", lambda requested, key: "vllm")
    monkeypatch.setattr(generation, "vllm_engine", fake_engine)
    monkeypatch.setattr(evaluate, "sample_vllm", fake_sample)
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: pytest.fail("transformers weights loaded with vLLM"))
    metrics, _ = evaluate.run(small_params)
    assert built == ["models/policy", "models/warmup"]
    benchmarks = small_params.evaluate.benchmarks
    assert [engine for engine, _, _ in calls] == (["engine:models/policy"] * 2 * len(benchmarks)
                                                 + ["engine:models/warmup"] * 2 * len(benchmarks))
    assert set(metrics) == set(benchmarks)
