"""Stage `evaluate`: n samples per problem, graded by the shared grader, unbiased pass@k with CIs.

For each benchmark in `params.evaluate.benchmarks` (prepared by `prepare`), sample
`evaluate.n_samples` completions per problem (temperature, top_p and max_new_tokens from params;
transformers in-process, or vLLM when installed and selected), grade them with the same grader the
GRPO reward uses, and report pass@k for every k with percentile-bootstrap confidence intervals, plus
greedy accuracy when `evaluate.greedy` is on. Benchmarks other than the built-in task are cut to a
fixed subset of `evaluate.subset_size` problems (by a hash of the problem id) unless it is null.

With `evaluate.baseline` the warm-up model is evaluated with the same settings, and the paired
difference of pass@1 (same problems; bootstrap over problems) says whether RL helped.

Several processes (`launch.processes` > 1): the ranks split each benchmark's problems (runs that
fill one generation batch, seeded by their position: `generate`), rank 0 gathers the samples,
grades them and writes the outputs (rlvr/sharding.py). The samples, and so every metric, are the
same whatever the number of processes.

Inputs:  models/policy, models/warmup (baseline), data/prepared/eval/<name>.parquet
Outputs: metrics/eval.json (per benchmark; the baseline under "warmup"), metrics/passk/<benchmark>.csv,
         data/evaluated/<model>/<name>.parquet (per-problem samples, correctness matrix, greedy result)
Run:     dvc repro evaluate   (or: python -m flows evaluate)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rlvr import generation, models, passk, sharding
from rlvr.config import Params
from rlvr.generation import SamplingSettings, render, sample_transformers, sample_vllm
from rlvr.grading import Grader, extract_boxed, grade_matrix
from rlvr.io import atomic_dir, read_parquet, write_json

log = logging.getLogger(__name__)

MODEL = Path("models/policy")
BASELINE = Path("models/warmup")
EVAL_DIR = Path("data/prepared/eval")
OUTPUT = Path("data/evaluated")
METRICS = Path("metrics/eval.json")
PASSK = Path("metrics/passk")  # <benchmark>.csv: k, policy, warmup (for dvc plots)
BUILTIN_BENCHMARK = "arith"


def fixed_subset(frame: pd.DataFrame, size: int | None) -> pd.DataFrame:
    """The `size` problems with the smallest sha1(id): stable under reordering and appends."""
    if size is None or size >= len(frame):
        return frame.reset_index(drop=True)
    keys = frame["id"].map(lambda i: hashlib.sha1(i.encode()).hexdigest())
    return frame.loc[keys.sort_values(kind="stable").index[:size]].reset_index(drop=True)


def units(n_problems: int, n: int, batch_size: int) -> list[range]:
    """The units of sampling work: runs of whole problems that fill one generation batch (batch_size // n
    problems of n sequences each; one problem, in several batches, when n > batch_size)."""
    size = max(1, batch_size // n)
    return [range(first, min(first + size, n_problems)) for first in range(0, n_problems, size)]


def generate(params: Params, prompts: list[str], settings: SamplingSettings, desc: str, loaded: tuple,
             ranks: sharding.Ranks = sharding.ONE) -> list[list[str]] | None:
    """Sample with `loaded` = (transformers model or vLLM engine, tokenizer), as `load_sampler` built it;
    each rank samples its share of the `units`, and rank 0 gets every prompt's samples in order (None
    on the other ranks).

    Seeds, so that the samples do not depend on the number of processes: with transformers, a unit
    is sampled on its own with seed `settings.seed` + the index of its first sequence in the flat list
    (prompt-major, n per prompt): what one call over every prompt uses when batch_size is a multiple
    of n (or n of batch_size), so one process samples what it did before units existed. With vLLM
    every request carries `settings.seed` (vllm_sampling_params), whatever else is in the batch.
    """
    sampler, tokenizer = loaded
    n = 1 if settings.greedy else settings.n
    work = units(len(prompts), n, params.evaluate.batch_size)
    mine = ranks.share(range(len(work)))
    part: dict[int, list[list[str]]] = {}
    if not isinstance(sampler, torch.nn.Module):
        flat = [i for unit in mine for i in work[unit]]
        samples = iter(sample_vllm(sampler, [prompts[i] for i in flat], settings)) if flat else iter(())
        part = {unit: [next(samples) for _ in work[unit]] for unit in mine}
    else:
        with tqdm(total=sum(len(work[unit]) for unit in mine) * n, desc=desc, unit="seq", disable=None) as bar:
            for unit in mine:
                rows = work[unit]
                seeded = dataclasses.replace(settings, seed=settings.seed + rows.start * n)
                part[unit] = sample_transformers(sampler, tokenizer, [prompts[i] for i in rows], seeded,
                                                 params.evaluate.batch_size, progress=bar)
    parts = ranks.gather(part)
    if parts is None:
        return None
    return [row for unit in sharding.merge(parts, len(work)) for row in unit]


def load_sampler(params: Params, model_dir: Path) -> tuple:
    """(sampler, tokenizer) for one model, built once for every benchmark of the stage (rlvr.generation)."""
    return generation.load_sampler(model_dir, params.evaluate.backend, "evaluate.backend", params.seed,
                                   params.model.trust_remote_code, params.model.dtype)


def evaluate_benchmark(params: Params, name: str, frame: pd.DataFrame, loaded: tuple, grader: Grader | None,
                       ranks: sharding.Ranks = sharding.ONE) -> tuple[dict, pd.DataFrame] | None:
    """Sample, grade and summarise one benchmark; `loaded` is a model's (sampler, tokenizer) from `load_sampler`.
    The ranks split the sampling; rank 0 grades and summarises (the other ranks get None and need no grader)."""
    e = params.evaluate
    tokenizer = loaded[1]
    prompts = [render(tokenizer, p, params.prompt) for p in frame["problem"]]
    golds = frame["answer"].tolist()
    settings = SamplingSettings(n=e.n_samples, temperature=e.temperature, top_p=e.top_p,
                                max_new_tokens=e.max_new_tokens, seed=params.seed)
    start = time.perf_counter()
    samples = generate(params, prompts, settings, f"evaluate {name}", loaded, ranks)
    greedy = None
    if e.greedy:
        greedy = generate(params, prompts, SamplingSettings(1, 1.0, 1.0, e.max_new_tokens, greedy=True,
                                                            seed=params.seed), f"greedy {name}", loaded, ranks)
    if not ranks.main:
        return None
    timeouts_before = grader.timeouts
    scores = grade_matrix(grader, samples, golds)
    unparseable = np.isnan(scores).any(axis=1)
    if unparseable.all():
        raise RuntimeError(f"evaluate {name}: no problem has a gold answer the grader can parse")
    correct = scores[~unparseable] >= 1.0
    metrics = passk.summarize(correct, list(e.ks), n_boot=e.n_bootstrap, seed=params.seed)
    metrics["unparseable_gold"] = int(unparseable.sum())
    metrics["boxed_frac"] = float(np.mean([extract_boxed(s) is not None for row in samples for s in row]))
    metrics["mean_completion_chars"] = float(np.mean([len(s) for row in samples for s in row]))
    result = frame[["id", "problem", "answer"]].copy()
    result["samples"] = samples
    result["correct"] = [list(map(bool, row >= 1.0)) for row in scores]
    result["n_correct"] = [int((row >= 1.0).sum()) for row in scores]
    if greedy is not None:
        greedy_scores = grade_matrix(grader, greedy, golds)[:, 0]
        metrics["greedy_accuracy"] = float(np.mean(greedy_scores[~unparseable] >= 1.0))
        result["greedy"] = [g[0] for g in greedy]
        result["greedy_correct"] = greedy_scores >= 1.0
    metrics["grade_timeouts"] = grader.timeouts - timeouts_before
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics, result


def paired_delta(policy: pd.DataFrame, baseline: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """pass@1 of policy minus baseline on the same problems, with a paired bootstrap CI over problems."""
    if policy["id"].tolist() != baseline["id"].tolist():
        raise ValueError("paired_delta needs both models evaluated on the same problems in the same order")
    diff = np.array([np.mean(a) - np.mean(b) for a, b in zip(policy["correct"], baseline["correct"])])
    low, high = passk.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return {"delta_pass_at_1": float(diff.mean()), "delta_pass_at_1_ci_low": low, "delta_pass_at_1_ci_high": high}


def run(params: Params, model_dirs: dict[str, Path] | None = None, eval_dir: Path = EVAL_DIR,
        ranks: sharding.Ranks = sharding.ONE) -> tuple[dict, dict[str, pd.DataFrame]] | None:
    """Evaluate the policy (and the warm-up baseline when `evaluate.baseline`) on every benchmark.

    Returns metrics per benchmark (the policy's at the top level, the baseline's under "warmup",
    plus the paired pass@1 difference) and the per-problem frames keyed "<model>/<benchmark>";
    None on ranks other than 0, which only sample their share.
    """
    if model_dirs is None:
        model_dirs = {"policy": MODEL}
        if params.evaluate.baseline:
            model_dirs["warmup"] = BASELINE
    frames = {}
    for name in params.evaluate.benchmarks:
        frame = read_parquet(eval_dir / f"{name}.parquet", required=("id", "problem", "answer"))
        frames[name] = frame if name == BUILTIN_BENCHMARK else fixed_subset(frame, params.evaluate.subset_size)
    metrics: dict[str, dict] = {name: {} for name in frames}
    results: dict[str, pd.DataFrame] = {}
    grading = (Grader(workers=params.grading.workers, timeout_s=params.grading.timeout_s) if ranks.main
               else contextlib.nullcontext())
    with grading as grader:
        for label, model_dir in model_dirs.items():
            loaded = load_sampler(params, model_dir)
            for name, frame in frames.items():
                evaluated = evaluate_benchmark(params, name, frame, loaded, grader, ranks)
                if evaluated is None:
                    continue
                m, results[f"{label}/{name}"] = evaluated
                log.info("evaluate %s on %s: %s", label, name, {k: round(v, 4) for k, v in m.items()})
                if label == "policy":
                    metrics[name].update(m)
                else:
                    metrics[name][label] = m
            del loaded  # the next model's engine or weights need the memory
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if not ranks.main:
        return None
    if "policy" in model_dirs and "warmup" in model_dirs:
        for name in frames:
            metrics[name].update(paired_delta(results[f"policy/{name}"], results[f"warmup/{name}"],
                                              params.evaluate.n_bootstrap, params.seed))
    return metrics, results


def write(results: dict[str, pd.DataFrame], output: Path = OUTPUT) -> None:
    with atomic_dir(output) as tmp:
        for key, frame in results.items():
            (tmp / key).parent.mkdir(parents=True, exist_ok=True)
            frame.to_parquet(tmp / f"{key}.parquet", index=False)


def passk_curves(params: Params, metrics: dict) -> dict[str, str]:
    """Per benchmark, CSV text with pass@k of the policy (and the warm-up model) for every k: `dvc plots`."""
    curves = {}
    for name, m in metrics.items():
        rows = []
        for k in params.evaluate.ks:
            row = {"k": k, "policy": m[f"pass_at_{k}"]}
            if "warmup" in m:
                row["warmup"] = m["warmup"][f"pass_at_{k}"]
            rows.append(row)
        curves[name] = pd.DataFrame(rows).to_csv(index=False)
    return curves


def summary(metrics: dict) -> str:
    """A few lines a person reads after a run: pass@1 with its CI and greedy accuracy per benchmark."""
    lines = []
    for name, m in metrics.items():
        line = (f"{name:>10}: pass@1 {m['pass_at_1']:.3f} [{m['pass_at_1_ci_low']:.3f}, {m['pass_at_1_ci_high']:.3f}]"
                f" over {m['n_problems']} problems x {m['n_samples']} samples")
        if "greedy_accuracy" in m:
            line += f", greedy {m['greedy_accuracy']:.3f}"
        if "delta_pass_at_1" in m:
            line += (f"; vs warm-up: {m['delta_pass_at_1']:+.3f} "
                     f"[{m['delta_pass_at_1_ci_low']:+.3f}, {m['delta_pass_at_1_ci_high']:+.3f}]")
        lines.append(line)
    return "\n".join(lines)


def main(params: Params) -> dict:
    evaluated = run(params, ranks=sharding.join())
    if evaluated is None:  # not rank 0: its samples went to rank 0, which writes the outputs
        return {}
    metrics, results = evaluated
    write(results)
    with atomic_dir(PASSK) as tmp:
        for name, text in passk_curves(params, metrics).items():
            (tmp / f"{name}.csv").write_text(text)
    write_json(METRICS, metrics)  # last: a run that fails earlier leaves the previous metrics in place
    log.info("evaluation summary\n%s", summary(metrics))
    return metrics
