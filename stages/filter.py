"""Stage `filter`: PROF over the rollouts, and the difficulty band of prompts that `train` can use.

Every rollout's steps are scored by the process reward model (`prm`: the built-in exact step checker
or a transformers PRM), its process value is the mean step score, and PROF (rlvr/prof.py, rule in
`prof`) removes k of each prompt's n rollouts. The kept and dropped rollouts are written with their
step scores, value and the reason each was dropped. Separately, the prompts whose pass rate lies in
[`filter.pass_rate_min`, `filter.pass_rate_max`] form the prompt set that `train.prompts: band` uses.

"Right answer, wrong steps": a correct response with a step scored below 0.5.

Inputs:  data/rollouts/rollouts.parquet, data/rollouts/pass_rates.parquet
Outputs: data/curated/prof.parquet (id, sample, correct, n_steps, step_scores, value, kept, reason),
         data/curated/prompts.parquet (id, pass_rate: the band), metrics/filter.json,
         metrics/prof_keep.csv (kept correct/incorrect by correct count before PROF: dvc plots)
Run:     dvc repro filter   (or: python -m flows filter)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rlvr import prof
from rlvr.config import Params
from rlvr.io import read_parquet, write_json, write_parquet, write_text

log = logging.getLogger(__name__)

ROLLOUTS = Path("data/rollouts/rollouts.parquet")
PASS_RATES = Path("data/rollouts/pass_rates.parquet")
OUTPUT = Path("data/curated/prof.parquet")
PROMPTS = Path("data/curated/prompts.parquet")
METRICS = Path("metrics/filter.json")
KEEP_TABLE = Path("metrics/prof_keep.csv")  # per correct-before count: groups, mean kept correct/incorrect
SCORE_CHUNK = 4096  # responses per PRM call (bounds memory; the PRM batches inside)


def score(prm: prof.ProcessRewardModel, rollouts: pd.DataFrame, max_steps: int) -> pd.DataFrame:
    """n_steps, step_scores and value for every rollout."""
    n_steps, scores, values = [], [], []
    problems, completions = rollouts["problem"].tolist(), rollouts["completion"].tolist()
    for start in range(0, len(rollouts), SCORE_CHUNK):
        chunk = slice(start, start + SCORE_CHUNK)
        a, b, c = prof.score_responses(prm, problems[chunk], completions[chunk], max_steps)
        n_steps += a
        scores += b
        values += c
    return rollouts.assign(n_steps=np.array(n_steps, dtype=np.int64), step_scores=scores,
                           value=np.array(values, dtype=np.float64))


def apply_prof(scored: pd.DataFrame, params: Params) -> pd.DataFrame:
    """PROF per prompt group (rows of one id, in sample order): adds `correct`, `kept`, `reason`."""
    scored = scored.sort_values(["id", "sample"], kind="stable").reset_index(drop=True)
    scored["correct"] = scored["reward"] >= 1.0
    kept = np.zeros(len(scored), dtype=bool)
    reasons = np.empty(len(scored), dtype=object)
    for _, index in scored.groupby("id", sort=False).indices.items():
        group = scored.iloc[index]
        k = params.prof.remove
        if k is not None and k > len(index):
            raise ValueError(f"prof.remove = {k} but prompt {group['id'].iat[0]!r} has only {len(index)} rollouts")
        decision = prof.filter_group(group["correct"].tolist(), group["value"].tolist(), group["n_steps"].tolist(),
                                     k=k, min_steps=params.prof.min_steps, max_steps=params.prof.max_steps)
        kept[index] = decision.kept
        reasons[index] = decision.reasons
    return scored.assign(kept=kept, reason=reasons)


def band(rates: pd.DataFrame, params: Params) -> pd.DataFrame:
    f = params.filter
    inside = rates["pass_rate"].between(f.pass_rate_min, f.pass_rate_max)
    return rates.loc[inside, ["id", "pass_rate"]].reset_index(drop=True)


def keep_statistics(filtered: pd.DataFrame) -> dict:
    correct, kept = filtered["correct"], filtered["kept"]
    flawed = correct & filtered["step_scores"].map(lambda s: any(x < 0.5 for x in s))

    def mean(mask) -> float | None:
        values = filtered.loc[mask, "value"].dropna()
        return float(values.mean()) if len(values) else None

    return {
        "rollouts": len(filtered),
        "kept_correct": int((kept & correct).sum()),
        "kept_incorrect": int((kept & ~correct).sum()),
        "dropped_correct": int((~kept & correct).sum()),
        "dropped_incorrect": int((~kept & ~correct).sum()),
        "mean_value_kept_correct": mean(kept & correct),
        "mean_value_dropped_correct": mean(~kept & correct),
        "right_answer_wrong_steps": int(flawed.sum()),
        "right_answer_wrong_steps_removed": int((flawed & ~kept).sum()),
        "right_answer_wrong_steps_kept": int((flawed & kept).sum()),
        "nan_values": int(filtered["value"].isna().sum()),
        "dropped_for_step_count": int((filtered["reason"] == prof.STEP_COUNT).sum()),
    }


def keep_table(filtered: pd.DataFrame) -> pd.DataFrame:
    """Mean kept correct / incorrect per group, by how many of the group were correct before PROF."""
    groups = filtered.groupby("id", sort=False).agg(
        correct_before=("correct", "sum"),
        kept_correct=("kept", lambda k: int((k & filtered.loc[k.index, "correct"]).sum())),
        kept_incorrect=("kept", lambda k: int((k & ~filtered.loc[k.index, "correct"]).sum())))
    table = groups.groupby("correct_before").agg(groups=("kept_correct", "size"), kept_correct=("kept_correct", "mean"),
                                                 kept_incorrect=("kept_incorrect", "mean")).reset_index()
    return table


def run(params: Params, rollouts_path: Path = ROLLOUTS, rates_path: Path = PASS_RATES):
    rollouts = read_parquet(rollouts_path, required=("id", "problem", "sample", "completion", "reward"))
    rates = read_parquet(rates_path, required=("id", "pass_rate"))
    start = time.perf_counter()
    scored = score(prof.load_prm(params.prm, progress=True), rollouts, params.prof.max_steps)
    if scored["value"].isna().all():
        raise ValueError(f"prm {params.prm.name!r} could not score any rollout (every process value is NaN): "
                         "is it the right PRM for this data?")
    filtered = apply_prof(scored, params)
    prompts = band(rates, params)
    if prompts.empty:
        raise ValueError(f"no prompt has a pass rate in [{params.filter.pass_rate_min}, "
                         f"{params.filter.pass_rate_max}]: widen the filter band")
    metrics = {
        **keep_statistics(filtered),
        "band_prompts": len(prompts),
        "band_frac": len(prompts) / len(rates),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return filtered, prompts, metrics


def main(params: Params) -> dict:
    filtered, prompts, metrics = run(params)
    write_parquet(OUTPUT, filtered)
    write_parquet(PROMPTS, prompts)
    write_text(KEEP_TABLE, keep_table(filtered).to_csv(index=False))
    write_json(METRICS, {k: v for k, v in metrics.items() if v is not None})
    log.info("filter: kept %d correct / %d incorrect; %d 'right answer, wrong steps' removed; %d prompts in band",
             metrics["kept_correct"], metrics["kept_incorrect"], metrics["right_answer_wrong_steps_removed"],
             metrics["band_prompts"])
    return metrics
