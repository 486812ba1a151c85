"""Stage `rollout`: n samples per training prompt with the current policy, graded; pass rate per prompt.

The training prompts (the first `rollout.max_prompts` in file order, or all) are split into chunks of
`rollout.chunk_size`. Each chunk's completions are kept in the rollout cache, one file per chunk,
named by a key that hashes everything that determines them: the model's DVC digest, the rendered
prompts, the sampling settings (n, temperature, top_p, max_new_tokens, batch size, seed) and the
sampler (rlvr/generation.py's source, the torch and transformers versions). A chunk's sampling seed
comes from its key, so its samples do not depend on which other chunks exist or which run wrote it.
Grading is not cached: every run grades all completions with the current grader, so a grader change
never reuses stale rewards.

The cache lives at `<project root>/data/rollout_cache/`, where the project root is `DVC_ROOT` when
DVC sets it (inside `dvc exp run --temp` and queued experiments, which run in a copy under
.dvc/tmp/exps/, it names the workspace) and the working directory otherwise. So a killed run reuses
every chunk it finished, an unchanged rerun samples nothing, and every experiment of a workspace
shares one cache. It is not a DVC output: DVC neither deletes nor versions it, and nothing deletes
old chunks; `rm -rf data/rollout_cache` clears it. Chunks are written as temp file + rename, so two
runs at once (two experiments) may both sample a chunk but only ever write whole, equal files: no
lock is needed.

Several processes (`launch.processes` > 1, rlvr/sharding.py): rank 0 reads the cache and names the
missing chunks; the ranks sample them round robin, each writing its chunks to its cache as it goes,
and send them to rank 0, which grades every sample and writes the outputs. A chunk's samples depend
only on its key, so 1 and N processes give the same rollouts and pass rates (on a CPU, with the same
number of threads per process: torchrun sets OMP_NUM_THREADS=1 per rank unless it is set).

What is not covered: the device. A chunk sampled on a GPU is reused on a CPU (both are valid samples
with the chunk's seed, but not bit-identical ones), and a hub model behind a pass-through folder is
keyed by its name, not its weights.

Inputs:  models/warmup, data/prepared/train.parquet
Outputs: data/rollouts/rollouts.parquet (id, problem, answer, sample, completion, reward),
         data/rollouts/pass_rates.parquet (id, n_samples, n_correct, pass_rate), metrics/rollout.json
Run:     dvc repro rollout   (or: python -m flows rollout)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

from rlvr import generation, models, sharding
from rlvr.config import Params
from rlvr.generation import SamplingSettings, render, sample_transformers
from rlvr.grading import Grader
from rlvr.io import atomic_dir, dvc_md5, file_md5, read_parquet, remove_orphans, write_json, write_parquet
from rlvr.progress import ProgressBar
from rlvr.tracking import project_root

log = logging.getLogger(__name__)

MODEL = Path("models/warmup")
TRAIN = Path("data/prepared/train.parquet")
OUTPUT = Path("data/rollouts")
CACHE = Path("data/rollout_cache")  # under the project root, not the working directory
METRICS = Path("metrics/rollout.json")
CHUNK_COLUMNS = ("row", "sample", "completion")  # row: the prompt's position in its chunk


def cache_dir() -> Path:
    """The workspace's rollout cache, shared by every experiment of the workspace."""
    return project_root() / CACHE


def sampler_identity() -> dict:
    """What, besides model, prompts and settings, decides the samples: our sampling code and its libraries."""
    return {"code": file_md5(generation.__file__), "torch": torch.__version__,
            "transformers": transformers.__version__}


def chunk_key(model_digest: str, sampling: dict, sampler: dict, prompts: list[str]) -> str:
    """A digest of everything that determines a chunk's completions (content, never file paths)."""
    payload = {"model": model_digest, "sampling": sampling, "sampler": sampler, "prompts": prompts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def chunk_seed(key: str) -> int:
    return int(key[:8], 16)


def sample_chunk(model, tokenizer, prompts: list[str], settings: SamplingSettings, batch_size: int,
                 bar: tqdm) -> pd.DataFrame:
    """One chunk's samples: with a vLLM engine (every request carries the chunk's seed) or transformers."""
    if isinstance(model, torch.nn.Module):
        samples = sample_transformers(model, tokenizer, prompts, settings, batch_size, progress=bar)
    else:
        samples = generation.sample_vllm(model, prompts, settings)
        bar.update(sum(len(texts) for texts in samples))
    flat = [(i, j, text) for i, texts in enumerate(samples) for j, text in enumerate(texts)]
    return pd.DataFrame({"row": np.array([i for i, _, _ in flat], dtype=np.int64),
                         "sample": np.array([j for _, j, _ in flat], dtype=np.int64),
                         "completion": [text for _, _, text in flat]})


def read_chunk(path: Path, n_rows: int, n_samples: int) -> pd.DataFrame | None:
    """A cached chunk, or None when there is none or it is not the complete (rows x samples) grid.

    Writes are atomic, so an incomplete file means outside damage; it is resampled and overwritten.
    """
    if not path.is_file():
        return None
    try:
        chunk = pd.read_parquet(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        log.warning("rollout cache: %s is unreadable (%s); resampling it", path, error)
        return None
    expected = [(i, j) for i in range(n_rows) for j in range(n_samples)]
    if list(chunk.columns) != list(CHUNK_COLUMNS) or list(zip(chunk["row"], chunk["sample"])) != expected:
        log.warning("rollout cache: %s does not hold %d x %d samples; resampling it", path, n_rows, n_samples)
        return None
    return chunk


def pass_rates(rollouts: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: samples, correct samples and pass rate (NaN where the gold could not be graded)."""
    graded = rollouts.assign(correct=rollouts["reward"] >= 1.0, graded=rollouts["reward"].notna())
    table = graded.groupby("id", sort=False).agg(n_samples=("sample", "size"), n_correct=("correct", "sum"),
                                                 n_graded=("graded", "sum")).reset_index()
    table["pass_rate"] = np.where(table["n_graded"] > 0, table["n_correct"] / table["n_graded"].clip(lower=1),
                                  np.nan)
    return table.drop(columns="n_graded").astype({"n_samples": "int64", "n_correct": "int64"})


def run(params: Params, model_dir: Path = MODEL, train_path: Path = TRAIN, cache: Path | None = None,
        ranks: sharding.Ranks = sharding.ONE) -> tuple[pd.DataFrame, pd.DataFrame, dict] | None:
    """Sample (the chunks not in the cache, split across `ranks`), grade and summarise; None on ranks other
    than 0, which only sample their share of the chunks."""
    r = params.rollout
    cache = cache_dir() if cache is None else cache
    frame = read_parquet(train_path, required=("id", "problem", "answer"))
    if r.max_prompts is not None:
        frame = frame.iloc[: r.max_prompts].reset_index(drop=True)
    model, tokenizer = generation.load_sampler(model_dir, r.backend, "rollout.backend", params.seed,
                                               params.model.trust_remote_code, params.model.dtype)
    model_digest, sampler = dvc_md5(model_dir), sampler_identity()
    # the prompt params are in the key through the rendered prompts
    sampling = {"n": r.n_samples, "temperature": r.temperature, "top_p": r.top_p,
                "max_new_tokens": r.max_new_tokens, "batch_size": r.batch_size, "seed": params.seed}
    dtype = models.torch_dtype(params.model.dtype) if not isinstance(model, torch.nn.Module) else model.dtype
    if dtype != torch.float32:  # fp32 keys stay as they were, so existing caches stay valid
        sampling["dtype"] = str(dtype)
    if not isinstance(model, torch.nn.Module):  # vLLM samples differently: its chunks are its own
        sampling["backend"] = "vllm"
    firsts = list(range(0, len(frame), r.chunk_size))
    prompts = [[render(tokenizer, p, params.prompt) for p in frame["problem"].iloc[first : first + r.chunk_size]]
               for first in firsts]
    keys = [chunk_key(model_digest, sampling, sampler, chunk) for chunk in prompts]
    start = time.perf_counter()
    # rank 0 alone reads the cache and says which chunks are missing: with several machines the cache
    # folders may differ, and rank 0's is the one the pipeline runs from
    cached: dict[int, pd.DataFrame] = {}
    invalid = 0
    if ranks.main:
        cache.mkdir(parents=True, exist_ok=True)
        remove_orphans(cache)  # chunks being written by runs that were killed (a running one's are kept)
        for index, key in enumerate(keys):
            path = cache / f"{key}.parquet"
            chunk = read_chunk(path, len(prompts[index]), r.n_samples)
            if chunk is not None:
                cached[index] = chunk
            else:
                invalid += int(path.is_file())
    missing = ranks.broadcast([index for index in range(len(keys)) if index not in cached])
    mine = ranks.share(range(len(missing)))
    sampled_part: dict[int, pd.DataFrame] = {}
    sampled_seconds = 0.0
    with ProgressBar(total=sum(len(prompts[missing[u]]) for u in mine) * r.n_samples, desc="rollout",
                     unit="sample", disable=None) as bar:
        for unit in mine:
            index = missing[unit]
            settings = SamplingSettings(n=r.n_samples, temperature=r.temperature, top_p=r.top_p,
                                        max_new_tokens=r.max_new_tokens, seed=chunk_seed(keys[index]))
            t0 = time.perf_counter()
            chunk = sample_chunk(model, tokenizer, prompts[index], settings, r.batch_size, bar)
            sampled_seconds += time.perf_counter() - t0
            cache.mkdir(parents=True, exist_ok=True)
            write_parquet(cache / f"{keys[index]}.parquet", chunk)  # kept even if another rank fails later
            sampled_part[unit] = chunk
    gathered = ranks.gather((sampled_part, sampled_seconds))
    if gathered is None:
        return None
    for unit, chunk in enumerate(sharding.merge([part for part, _ in gathered], len(missing))):
        index = missing[unit]
        path = cache / f"{keys[index]}.parquet"
        if not path.is_file():  # sampled on another machine, whose cache folder is not this one
            write_parquet(path, chunk)
        cached[index] = chunk
    sampled = sum(len(cached[index]) for index in missing)
    # throughput of the whole job: every rank's samples over the slowest rank's sampling time
    sampled_seconds = max(seconds for _, seconds in gathered)
    reused = len(keys) - len(missing)
    parts = [cached[index].assign(row=cached[index]["row"] + first) for index, first in enumerate(firsts)]
    completions = pd.concat(parts, ignore_index=True)
    rollouts = frame[["id", "problem", "answer"]].iloc[completions["row"]].reset_index(drop=True)
    rollouts["sample"] = completions["sample"].to_numpy()
    rollouts["completion"] = completions["completion"].to_numpy()
    grade_start = time.perf_counter()
    with Grader(workers=params.grading.workers, timeout_s=params.grading.timeout_s) as grader:
        rewards = grader.grade(rollouts["completion"].tolist(), rollouts["answer"].tolist())
        timeouts = grader.timeouts
    rollouts["reward"] = np.array([np.nan if x is None else x for x in rewards], dtype=np.float64)
    rates = pass_rates(rollouts)
    n_chunks = len(keys)
    metrics = {
        "prompts": len(rates),
        "samples": len(rollouts),
        "chunks": n_chunks,
        "chunks_reused": reused,
        "chunks_sampled": n_chunks - reused,
        "chunks_invalid": invalid,
        "mean_pass_rate": float(rates["pass_rate"].mean()),
        "frac_pass_rate_0": float((rates["pass_rate"] == 0).mean()),
        "frac_pass_rate_1": float((rates["pass_rate"] == 1).mean()),
        "ungraded_samples": int(rollouts["reward"].isna().sum()),
        "grade_timeouts": timeouts,
        "grade_seconds": round(time.perf_counter() - grade_start, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "samples_per_second": round(sampled / sampled_seconds, 1) if sampled else 0.0,
    }
    return rollouts, rates, metrics


def main(params: Params) -> dict:
    ranks = sharding.join()
    result = run(params, ranks=ranks)
    if result is None:  # not rank 0: its chunks went to rank 0, which writes the outputs
        return {}
    rollouts, rates, metrics = result
    with atomic_dir(OUTPUT) as tmp:
        rollouts.to_parquet(tmp / "rollouts.parquet", index=False)
        rates.to_parquet(tmp / "pass_rates.parquet", index=False)
    write_json(METRICS, metrics)  # last: a run that fails earlier leaves the previous metrics in place
    log.info("rollout: %d prompts x %d samples (%d of %d chunks from the cache), mean pass rate %.3f",
             metrics["prompts"], params.rollout.n_samples, metrics["chunks_reused"], metrics["chunks"],
             metrics["mean_pass_rate"])
    return metrics
