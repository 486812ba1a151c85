"""Does GAIN-RL's offline ranking track difficulty, or only question length?

Joins the `score` stage's ranking (data/curated/angles.parquet) with the `rollout` stage's per-prompt
pass rates of the same warm-up model (data/rollouts/pass_rates.parquet) and reports, over the prompts
that have both:

- the mean pass rate per decile of the GAIN-RL rank (decile 1 = the highest angle concentration,
  the prompts GAIN-RL trains on first) and per decile of question length (decile 1 = shortest);
- Spearman correlations of pass rate with the score and with the question length, and the partial
  Spearman correlation of pass rate with the score given the length (Pearson correlation of the
  rank residuals after regressing both ranks on the length rank): what the score says about
  difficulty that length does not already say.

A ranking that tracks difficulty shows falling pass rates from decile 1 to 10 *and* a partial
correlation away from 0; one that only tracks length shows the same pattern as the length deciles
and a partial correlation near 0.

Run (after `dvc repro rollout score`): python benchmarks/gain_rl_ranking.py [--out benchmarks/results/gain_rl_ranking.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlvr.gain_rl import spearman  # noqa: E402
from rlvr.io import read_parquet, write_json  # noqa: E402


def _ranks(values: np.ndarray) -> np.ndarray:
    return pd.Series(values).rank(method="average").to_numpy()


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman correlation of x and y with z's (rank-linear) effect removed from both."""
    rx, ry, rz = _ranks(x), _ranks(y), _ranks(z)
    design = np.column_stack([np.ones_like(rz), rz])

    def residual(r: np.ndarray) -> np.ndarray:
        coef, *_ = np.linalg.lstsq(design, r, rcond=None)
        return r - design @ coef

    ex, ey = residual(rx), residual(ry)
    # a side that length explains completely has only rounding noise left: nothing to correlate
    spread = float(((rx - rx.mean()) ** 2).sum() + ((ry - ry.mean()) ** 2).sum())
    if min((ex * ex).sum(), (ey * ey).sum()) <= 1e-12 * spread:
        return float("nan")
    return float((ex * ey).sum() / np.sqrt((ex * ex).sum() * (ey * ey).sum()))


def deciles(frame: pd.DataFrame, by: str, ascending: bool) -> list[dict]:
    ordered = frame.sort_values([by, "id"], ascending=[ascending, True], kind="stable").reset_index(drop=True)
    bins = np.array_split(np.arange(len(ordered)), 10)
    return [{"decile": i + 1, "prompts": len(b), "mean_pass_rate": round(float(ordered.loc[b, "pass_rate"].mean()), 4),
             "mean_question_length": round(float(ordered.loc[b, "question_length"].mean()), 2)}
            for i, b in enumerate(bins)]


def analyse(angles: pd.DataFrame, pass_rates: pd.DataFrame) -> dict:
    frame = angles[angles["valid"]].merge(pass_rates[["id", "pass_rate"]], on="id", how="inner")
    if len(frame) < 20:
        raise SystemExit(f"only {len(frame)} prompts have both a score and a pass rate; run dvc repro rollout score")
    score, rate, length = (frame[c].to_numpy(dtype=float) for c in ("score", "pass_rate", "question_length"))
    return {
        "prompts": len(frame),
        "spearman_pass_rate_score": round(spearman(score, rate), 4),
        "spearman_pass_rate_length": round(spearman(length, rate), 4),
        "spearman_score_length": round(spearman(score, length), 4),
        "partial_spearman_pass_rate_score_given_length": round(partial_spearman(score, rate, length), 4),
        "by_gain_rl_rank": deciles(frame, "score", ascending=False),
        "by_length": deciles(frame, "question_length", ascending=True),
    }


def markdown(result: dict) -> str:
    lines = ["| decile | pass rate by GAIN-RL rank | pass rate by length | mean length (rank) | mean length (length) |",
             "|---|---|---|---|---|"]
    for a, b in zip(result["by_gain_rl_rank"], result["by_length"]):
        lines.append(f"| {a['decile']} | {a['mean_pass_rate']:.3f} | {b['mean_pass_rate']:.3f} | "
                     f"{a['mean_question_length']:.1f} | {b['mean_question_length']:.1f} |")
    lines.append("")
    lines.append(f"{result['prompts']} prompts. Spearman(pass rate, score) {result['spearman_pass_rate_score']:+.3f}, "
                 f"Spearman(pass rate, length) {result['spearman_pass_rate_length']:+.3f}, "
                 f"Spearman(score, length) {result['spearman_score_length']:+.3f}; partial Spearman(pass rate, "
                 f"score | length) {result['partial_spearman_pass_rate_score_given_length']:+.3f}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT), help="project folder with the score and rollout outputs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gain_rl_ranking.json"))
    args = parser.parse_args()
    root = Path(args.root)
    angles = read_parquet(root / "data/curated/angles.parquet", required=("id", "score", "valid", "question_length"))
    rates = read_parquet(root / "data/rollouts/pass_rates.parquet", required=("id", "pass_rate"))
    result = analyse(angles, rates)
    result["date"] = datetime.date.today().isoformat()
    write_json(Path(args.out), result)
    print(markdown(result))


if __name__ == "__main__":
    main()
