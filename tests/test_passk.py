"""pass@k estimator, per-problem vectorisation, bootstrap CI and the metrics dict."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from rlvr.passk import bootstrap_ci, pass_at_k, pass_at_k_per_problem, summarize


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The definition, with exact binomials: 1 - C(n - c, k) / C(n, k) (math.comb(m, k) = 0 for m < k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 3, 1, 0.3),  # k = 1: c/n
        (10, 0, 5, 0.0),  # no correct sample
        (10, 10, 10, 1.0),  # all correct
        (10, 6, 5, 1.0),  # n - c = 4 < k = 5: every draw of 5 holds a correct one
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 64])
def test_pass_at_1_is_fraction_correct(n):
    for c in range(n + 1):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


def test_pass_at_k_is_exactly_one_when_too_few_wrong_samples():
    assert pass_at_k(200, 150, 51) == 1.0
    assert pass_at_k(8, 4, 5) == 1.0


def test_pass_at_k_matches_binomial_definition_on_a_table():
    cases = [
        (n, c, k)
        for n in (1, 2, 3, 5, 8, 13, 50, 100)
        for c in range(0, n + 1, max(1, n // 7))
        for k in (1, 2, 3, 5, 10, n)
        if k <= n
    ]
    assert len(cases) > 100
    for n, c, k in cases:
        expected = brute_force_pass_at_k(n, c, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12), (n, c, k)


def test_pass_at_k_stays_finite_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 2e600 is not representable as a float; the product form never forms it.
    value = pass_at_k(2000, 3, 1000)
    assert value == pytest.approx(brute_force_pass_at_k(2000, 3, 1000), rel=1e-12)
    assert 0.0 < value < 1.0


def test_pass_at_k_grows_with_k_and_with_c():
    assert pass_at_k(16, 3, 1) < pass_at_k(16, 3, 4) < pass_at_k(16, 3, 8)
    assert pass_at_k(16, 2, 4) < pass_at_k(16, 3, 4) < pass_at_k(16, 5, 4)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (5, 2, 6, "k <= n"),
        (5, 2, 0, "k >= 1"),
        (5, 6, 1, "c <= n"),
        (-1, 0, 1, "n >= 0"),
        (5, -1, 1, "c >= 0"),
        (5, 2, -3, "k >= 1"),
    ],
)
def test_pass_at_k_rejects_impossible_arguments(n, c, k, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError, match="k must be an int"):
        pass_at_k(5, 2, 1.5)
    with pytest.raises(TypeError, match="n must be an int"):
        pass_at_k(True, 1, 1)


def test_per_problem_matches_scalar_estimator():
    rng = np.random.default_rng(0)
    correct = rng.random((40, 16)) < rng.random((40, 1))  # per-problem difficulty varies
    correct[0] = False
    correct[1] = True
    for k in (1, 2, 5, 16):
        expected = [pass_at_k(16, int(row.sum()), k) for row in correct]
        np.testing.assert_allclose(pass_at_k_per_problem(correct, k), expected, rtol=1e-12, atol=1e-12)
    assert pass_at_k_per_problem(correct, 4)[0] == 0.0
    assert pass_at_k_per_problem(correct, 4)[1] == 1.0


def test_per_problem_accepts_0_1_integers_and_rejects_other_values():
    ints = np.array([[1, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_allclose(pass_at_k_per_problem(ints, 2), [1 - 1 / 6, 0.0])  # 1 - C(2,2)/C(4,2)
    with pytest.raises(ValueError, match="0/1"):
        pass_at_k_per_problem(np.array([[0, 2]]), 1)
    with pytest.raises(ValueError, match="matrix"):
        pass_at_k_per_problem(np.array([True, False]), 1)
    with pytest.raises(ValueError, match=r"k=3 with n=2"):
        pass_at_k_per_problem(np.array([[True, False]]), 3)


def test_bootstrap_ci_contains_mean_and_is_deterministic_by_seed():
    rng = np.random.default_rng(1)
    values = rng.random(200)
    low, high = bootstrap_ci(values, n_boot=2000, seed=7)
    assert low < values.mean() < high
    assert bootstrap_ci(values, n_boot=2000, seed=7) == (low, high)
    assert bootstrap_ci(values, n_boot=2000, seed=8) != (low, high)


def test_bootstrap_ci_narrows_with_more_problems():
    rng = np.random.default_rng(2)
    few = rng.random(25)
    many = rng.random(2500)
    few_low, few_high = bootstrap_ci(few, seed=0)
    many_low, many_high = bootstrap_ci(many, seed=0)
    # The standard error shrinks like 1/sqrt(problems): 100x the problems, about 1/10 the width.
    assert (many_high - many_low) < 0.25 * (few_high - few_low)


def test_bootstrap_ci_width_matches_normal_approximation():
    values = np.random.default_rng(3).random(400)
    low, high = bootstrap_ci(values, n_boot=4000, confidence=0.95, seed=0)
    standard_error = values.std() / math.sqrt(values.size)
    assert (high - low) == pytest.approx(2 * 1.96 * standard_error, rel=0.1)


def test_bootstrap_ci_higher_confidence_is_wider():
    values = np.random.default_rng(4).random(100)
    low90, high90 = bootstrap_ci(values, confidence=0.90, seed=0)
    low99, high99 = bootstrap_ci(values, confidence=0.99, seed=0)
    assert low99 < low90 and high90 < high99


@pytest.mark.parametrize("values", [[0.3], [0.1] * 7, [1.0, 1.0]])
def test_bootstrap_ci_of_constant_values_is_the_value(values):
    assert bootstrap_ci(np.array(values)) == (values[0], values[0])


def test_bootstrap_ci_works_in_blocks_for_large_inputs():
    # 300 resamples x 20,000 problems is above one block; the answer must not depend on that.
    values = np.random.default_rng(5).random(20_000)
    low, high = bootstrap_ci(values, n_boot=300, seed=0)
    assert low < values.mean() < high
    assert high - low < 0.02


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"values": np.array([])}, "non-empty"),
        ({"values": np.ones((2, 2))}, "1-D"),
        ({"values": np.array([0.1, np.nan])}, "finite"),
        ({"values": np.array([0.1, 0.2]), "n_boot": 0}, "n_boot"),
        ({"values": np.array([0.1, 0.2]), "confidence": 1.0}, "confidence"),
    ],
)
def test_bootstrap_ci_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)


def test_summarize_keys_and_values():
    correct = np.array(
        [
            [1, 1, 0, 0],  # c=2: pass@1 = 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1
            [0, 0, 0, 0],  # c=0: all 0
            [1, 0, 0, 0],  # c=1: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1
        ],
        dtype=bool,
    )
    metrics = summarize(correct, ks=[1, 2, 4], n_boot=500, seed=0)
    assert set(metrics) == {
        "pass_at_1", "pass_at_1_ci_low", "pass_at_1_ci_high",
        "pass_at_2", "pass_at_2_ci_low", "pass_at_2_ci_high",
        "pass_at_4", "pass_at_4_ci_low", "pass_at_4_ci_high",
        "n_problems", "n_samples",
    }  # fmt: skip
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", name) for name in metrics)  # MLflow-legal, no "@"
    assert metrics["pass_at_1"] == pytest.approx((1 / 2 + 0 + 1 / 4) / 3)
    assert metrics["pass_at_2"] == pytest.approx((5 / 6 + 0 + 1 / 2) / 3)
    assert metrics["pass_at_4"] == pytest.approx(2 / 3)
    assert metrics["n_problems"] == 3
    assert metrics["n_samples"] == 4
    for k in (1, 2, 4):
        assert metrics[f"pass_at_{k}_ci_low"] <= metrics[f"pass_at_{k}"] <= metrics[f"pass_at_{k}_ci_high"]
    assert summarize(correct, ks=[1, 2, 4], n_boot=500, seed=0) == metrics


def test_summarize_rejects_k_above_n_naming_both():
    with pytest.raises(ValueError, match=r"k=5 with n=4"):
        summarize(np.zeros((3, 4), dtype=bool), ks=[1, 5], n_boot=10, seed=0)


def test_summarize_rejects_empty_or_repeated_ks():
    with pytest.raises(ValueError, match="at least one k"):
        summarize(np.zeros((3, 4), dtype=bool), ks=[], n_boot=10, seed=0)
    with pytest.raises(ValueError, match="repeated"):
        summarize(np.zeros((3, 4), dtype=bool), ks=[1, 1], n_boot=10, seed=0)
