"""Stage `score`: GAIN-RL offline ranking of the training prompts with the current policy.

Each training question is rendered as chat (system prompt, a fixed one-shot exchange, then the
question; generation prompt on) and prefilled once; at the input of the last decoder layer's MLP the
question's tokens give C_intra (mean cosine within the question) and C_inter (mean cosine between
question and prefix). score = w_intra * C_intra + w_inter * C_inter; rank 0 is trained on first.
The forward pass stops at the hook, so the last MLP and the LM head never run.

Several processes (`launch.processes` > 1): the ranks split the scoring batches, and rank 0 gathers
the angles and writes the outputs (rlvr/sharding.py); the batches, and so the scores, are the same
whatever the number of processes.

Inputs:  models/warmup, data/prepared/train.parquet
Outputs: data/curated/angles.parquet (id, c_intra, c_inter, score, rank, question_length, valid),
         metrics/score.json (Spearman correlation of score with question length, counts, timing)
Run:     dvc repro score   (or: python -m flows score)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from rlvr import gain_rl, models, sharding
from rlvr.config import Params
from rlvr.io import read_parquet, write_json, write_parquet

log = logging.getLogger(__name__)

MODEL = Path("models/warmup")
TRAIN = Path("data/prepared/train.parquet")
OUTPUT = Path("data/curated/angles.parquet")
METRICS = Path("metrics/score.json")


def run(params: Params, model_dir: Path = MODEL, train_path: Path = TRAIN,
        ranks: sharding.Ranks = sharding.ONE) -> tuple | None:
    """(angles, metrics) on rank 0; None on the other ranks, which score their share of the batches."""
    frame = read_parquet(train_path, required=("id", "problem"))
    model, tokenizer = models.load_policy(model_dir, trust_remote_code=params.model.trust_remote_code,
                                          dtype=models.torch_dtype(params.model.dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    s = params.score
    one_shot = (s.one_shot.question, s.one_shot.answer) if s.one_shot else None
    start = time.perf_counter()
    angles = gain_rl.score_prompts(model, tokenizer, frame["id"].tolist(), frame["problem"].tolist(), s.system,
                                   one_shot, s.batch_size, w_intra=s.w_intra, w_inter=s.w_inter, progress=True,
                                   rank=ranks.rank, world=ranks.world, gather=ranks.gather)
    if angles is None:
        return None
    seconds = time.perf_counter() - start
    valid = angles[angles["valid"]]
    metrics = {
        "prompts": len(angles),
        "invalid": int((~angles["valid"]).sum()),
        "spearman_score_length": gain_rl.spearman(valid["score"].tolist(), valid["question_length"].tolist()),
        "score_mean": float(valid["score"].mean()),
        "c_intra_mean": float(valid["c_intra"].mean()),
        "c_inter_mean": float(valid["c_inter"].mean()),
        "seconds": round(seconds, 2),
        "prompts_per_second": round(len(angles) / max(seconds, 1e-9), 1),
    }
    return angles, metrics


def main(params: Params) -> dict:
    result = run(params, ranks=sharding.join())
    if result is None:  # not rank 0: its batches went to rank 0, which writes the outputs
        return {}
    angles, metrics = result
    write_parquet(OUTPUT, angles)
    write_json(METRICS, metrics)
    return metrics
