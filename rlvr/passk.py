"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code") with
percentile-bootstrap confidence intervals over problems.

For one problem with n samples of which c are correct, the probability that at least one of k
samples drawn without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

The product form avoids the huge binomials (C(200, 100) ~ 1e59) and is exactly 1.0 when n - c < k
(the factor with i = k is 0). A data set's pass@k is the mean over problems; its confidence
interval resamples problems, not samples, because problems are the unit we want to generalise over.

What is covered: the same n for every problem (a problems x n correctness matrix, as the evaluate
stage writes it). What is not: problems with different sample counts (call `pass_at_k` per problem
and average yourself), and uncertainty from the finite n per problem (the bootstrap treats each
problem's estimate as fixed).
"""

from __future__ import annotations

import numpy as np

# Bootstrap indices are drawn in blocks of at most this many (resample, problem) entries, so memory
# stays near 32 MiB of int64 however large n_boot x n_problems gets.
_BOOTSTRAP_BLOCK = 1 << 22


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    return int(value)


def _check_k(k: object, n: int) -> int:
    k = _check_int("k", k)
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n (samples per problem), got k={k} with n={n}")
    return k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k), in the stable product form."""
    n = _check_int("n", n)
    c = _check_int("c", c)
    if n < 0 or c < 0:
        raise ValueError(f"pass@k needs n >= 0 and c >= 0, got n={n}, c={c}")
    if c > n:
        raise ValueError(f"pass@k needs c <= n (correct <= samples), got c={c} with n={n}")
    k = _check_k(k, n)
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _as_correctness_matrix(correct: np.ndarray) -> np.ndarray:
    matrix = np.asarray(correct)
    if matrix.ndim != 2:
        raise ValueError(f"correct must be a (problems x samples) matrix, got shape {matrix.shape}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"correct needs at least one problem and one sample, got shape {matrix.shape}")
    if matrix.dtype != bool:
        if not np.isin(matrix, (0, 1)).all():
            raise ValueError("correct must hold booleans or 0/1 values")
        matrix = matrix.astype(bool)
    return matrix


def pass_at_k_per_problem(correct: np.ndarray, k: int) -> np.ndarray:
    """pass@k of each row of a (problems x n) bool/0-1 matrix, vectorised; float64, shape (problems,)."""
    matrix = _as_correctness_matrix(correct)
    n = matrix.shape[1]
    k = _check_k(k, n)
    c = matrix.sum(axis=1)
    # A row's pass@k depends only on its count c, which takes at most n + 1 values: one scalar
    # estimate per distinct count, looked up per row.
    counts, rows = np.unique(c, return_inverse=True)
    per_count = np.array([pass_at_k(n, int(count), k) for count in counts], dtype=np.float64)
    return per_count[rows]


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of values (one value per problem).

    Draws n_boot resamples of the problems with replacement from np.random.default_rng(seed); the
    interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles of the resampled means.
    A single value, or all values equal, gives (v, v).
    """
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("bootstrap_ci needs finite values")
    n_boot = _check_int("n_boot", n_boot)
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci needs n_boot >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci needs 0 < confidence < 1, got {confidence}")
    if (data == data[0]).all():
        # Every resampled mean is v, up to rounding in the sum; report it exactly.
        return float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    size = data.size
    rows_per_block = max(1, _BOOTSTRAP_BLOCK // size)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows_per_block):
        stop = min(start + rows_per_block, n_boot)
        means[start:stop] = data[rng.integers(0, size, size=(stop - start, size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarize(correct: np.ndarray, ks: list[int], n_boot: int, seed: int) -> dict[str, float]:
    """pass@k and its bootstrap CI for each k, with MLflow-legal flat names.

    Keys: pass_at_{k}, pass_at_{k}_ci_low, pass_at_{k}_ci_high for every k, n_problems, n_samples.
    Every k uses the same seed, so the CIs of different k come from the same resamples of problems.
    """
    matrix = _as_correctness_matrix(correct)
    n_problems, n_samples = matrix.shape
    if not ks:
        raise ValueError("summarize needs at least one k")
    if len(set(ks)) != len(ks):
        raise ValueError(f"summarize got repeated values of k: {list(ks)}")
    metrics: dict[str, float] = {}
    for k in ks:
        k = _check_k(k, n_samples)
        per_problem = pass_at_k_per_problem(matrix, k)
        low, high = bootstrap_ci(per_problem, n_boot=n_boot, seed=seed)
        metrics[f"pass_at_{k}"] = float(per_problem.mean())
        metrics[f"pass_at_{k}_ci_low"] = low
        metrics[f"pass_at_{k}_ci_high"] = high
    metrics["n_problems"] = n_problems
    metrics["n_samples"] = n_samples
    return metrics
