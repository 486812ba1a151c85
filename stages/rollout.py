"""Stage `rollout`: n samples per training prompt with the current policy, graded; pass rate per prompt.

The training prompts (the first `rollout.max_prompts` in file order, or all) are split into chunks of
`rollout.chunk_size`. Each chunk is sampled and graded, then written to data/rollout_cache/ under
a key that hashes what determines its content: the model's DVC digest, the rendered prompts and gold
answers, and the sampling settings. The cache is a `persist: true` output, so DVC keeps it when it
reruns the stage: a killed run reuses every chunk it finished, and a rerun that changes nothing the
key covers samples nothing. A chunk's sampling seed comes from its key, so a chunk's samples do not
depend on which other chunks exist. After a successful run, cached chunks this run did not use are
deleted.

Inputs:  models/warmup, data/prepared/train.parquet
Outputs: data/rollouts/rollouts.parquet (id, problem, answer, sample, completion, reward),
         data/rollouts/pass_rates.parquet (id, n_samples, n_correct, pass_rate),
         data/rollout_cache/ (persist), metrics/rollout.json
Run:     dvc repro rollout   (or: python -m flows rollout)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from rlvr import models
from rlvr.config import Params
from rlvr.generation import SamplingSettings, render, sample_transformers
from rlvr.grading import Grader
from rlvr.io import dvc_md5, read_parquet, write_json, write_parquet

log = logging.getLogger(__name__)

MODEL = Path("models/warmup")
TRAIN = Path("data/prepared/train.parquet")
OUTPUT = Path("data/rollouts")
CACHE = Path("data/rollout_cache")
METRICS = Path("metrics/rollout.json")
COLUMNS = ("id", "problem", "answer", "sample", "completion", "reward")


def chunk_key(model_digest: str, settings: dict, prompts: list[str], rows: pd.DataFrame) -> str:
    """A digest of everything that determines a chunk's rollouts (content, never file paths)."""
    payload = {"model": model_digest, "settings": settings, "prompts": prompts,
               "ids": rows["id"].tolist(), "answers": rows["answer"].tolist()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def roll_chunk(model, tokenizer, grader: Grader, rows: pd.DataFrame, prompts: list[str],
               settings: SamplingSettings, batch_size: int, bar: tqdm) -> pd.DataFrame:
    samples = sample_transformers(model, tokenizer, prompts, settings, batch_size, progress=bar)
    flat = [(i, j, text) for i, row_samples in enumerate(samples) for j, text in enumerate(row_samples)]
    answers = rows["answer"].tolist()
    rewards = grader.grade([text for _, _, text in flat], [answers[i] for i, _, _ in flat])
    return pd.DataFrame({
        "id": [rows["id"].iat[i] for i, _, _ in flat],
        "problem": [rows["problem"].iat[i] for i, _, _ in flat],
        "answer": [answers[i] for i, _, _ in flat],
        "sample": np.array([j for _, j, _ in flat], dtype=np.int64),
        "completion": [text for _, _, text in flat],
        "reward": np.array([np.nan if r is None else r for r in rewards], dtype=np.float64),
    })


def pass_rates(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: samples, correct samples and pass rate (NaN where the gold could not be graded)."""
    graded = rollouts.assign(correct=rollouts["reward"] >= 1.0, graded=rollouts["reward"].notna())
    table = graded.groupby("id", sort=False).agg(n_samples=("sample", "size"), n_correct=("correct", "sum"),
                                                 n_graded=("graded", "sum")).reset_index()
    table["pass_rate"] = np.where(table["n_graded"] > 0, table["n_correct"] / table["n_graded"].clip(lower=1),
                                  np.nan)
    return table.drop(columns="n_graded").astype({"n_samples": "int64", "n_correct": "int64"})


def run(params: Params, model_dir: Path = MODEL, train_path: Path = TRAIN,
        cache: Path = CACHE) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    r = params.rollout
    frame = read_parquet(train_path, required=("id", "problem", "answer"))
    if r.max_prompts is not None:
        frame = frame.iloc[: r.max_prompts].reset_index(drop=True)
    model, tokenizer = models.load_policy(model_dir, trust_remote_code=params.model.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    model_digest = dvc_md5(model_dir)
    sampling = {"n": r.n_samples, "temperature": r.temperature, "top_p": r.top_p,
                "max_new_tokens": r.max_new_tokens, "seed": params.seed, "prompt": asdict(params.prompt)}
    cache.mkdir(parents=True, exist_ok=True)
    for partial in cache.glob(".*.tmp"):  # a chunk being written when an earlier run was killed
        partial.unlink()
    chunks, used, reused = [], set(), 0
    start = time.perf_counter()
    sampled_seconds, sampled = 0.0, 0
    with Grader(workers=2, timeout_s=params.prepare.grade_timeout_s) as grader, \
            tqdm(total=len(frame) * r.n_samples, desc="rollout", unit="sample", disable=None) as bar:
        for first in range(0, len(frame), r.chunk_size):
            rows = frame.iloc[first : first + r.chunk_size]
            prompts = [render(tokenizer, p, params.prompt) for p in rows["problem"]]
            key = chunk_key(model_digest, sampling, prompts, rows)
            path = cache / f"{key}.parquet"
            used.add(path.name)
            if path.is_file():
                chunks.append(read_parquet(path, required=COLUMNS))
                reused += 1
                bar.update(len(rows) * r.n_samples)
                continue
            settings = SamplingSettings(n=r.n_samples, temperature=r.temperature, top_p=r.top_p,
                                        max_new_tokens=r.max_new_tokens, seed=int(key[:8], 16))
            t0 = time.perf_counter()
            chunk = roll_chunk(model, tokenizer, grader, rows, prompts, settings, r.batch_size, bar)
            sampled_seconds += time.perf_counter() - t0
            sampled += len(chunk)
            write_parquet(path, chunk)
            chunks.append(chunk)
    for stale in cache.glob("*.parquet"):
        if stale.name not in used:
            stale.unlink()
    rollouts = pd.concat(chunks, ignore_index=True)
    rates = pass_rates(rollouts)
    metrics = {
        "prompts": len(rates),
        "samples": len(rollouts),
        "chunks": len(used),
        "chunks_reused": reused,
        "mean_pass_rate": float(rates["pass_rate"].mean()),
        "frac_pass_rate_0": float((rates["pass_rate"] == 0).mean()),
        "frac_pass_rate_1": float((rates["pass_rate"] == 1).mean()),
        "ungraded_samples": int(rollouts["reward"].isna().sum()),
        "seconds": round(time.perf_counter() - start, 2),
        "samples_per_second": round(sampled / sampled_seconds, 1) if sampled else 0.0,
    }
    return rollouts, rates, metrics


def main(params: Params) -> dict:
    rollouts, rates, metrics = run(params)
    write_parquet(OUTPUT / "rollouts.parquet", rollouts)
    write_parquet(OUTPUT / "pass_rates.parquet", rates)
    write_json(METRICS, metrics)
    log.info("rollout: %d prompts x %d samples, mean pass rate %.3f", metrics["prompts"],
             params.rollout.n_samples, metrics["mean_pass_rate"])
    return metrics
