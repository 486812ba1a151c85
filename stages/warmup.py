"""Stage `warmup`: supervised fine-tuning on worked solutions, so that RL starts with signal.

For the built-in model this stage builds the character tokenizer and the tiny Qwen2 from
`params.model.builtin` and teaches it the answer format (steps, then ``\\boxed{}``) with TRL's
`SFTTrainer`, loss on the completion only. For a real base model it can be switched off
(`warmup.enabled: false`): the output folder then only references the base model.

Inputs:  data/prepared/train.parquet (rows with a non-empty `solution`)
Outputs: models/warmup (model + tokenizer, or a `model_ref.json` pass-through), metrics/warmup.json
Run:     dvc repro warmup   (or: python -m flows warmup)
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlvr import models
from rlvr.config import Params
from rlvr.generation import messages
from rlvr.io import read_parquet, write_json
from rlvr.progress import TrainerProgress

log = logging.getLogger(__name__)

TRAIN = Path("data/prepared/train.parquet")
OUTPUT = Path("models/warmup")
METRICS = Path("metrics/warmup.json")


def sft_dataset(frame: pd.DataFrame, params: Params) -> Dataset:
    """Conversational prompt/completion pairs (TRL masks the prompt tokens out of the loss)."""
    rows = frame[frame["solution"].str.len() > 0]
    if rows.empty:
        raise ValueError("warmup: no training rows have a worked solution; add a source with solutions "
                         "or set warmup.enabled: false")
    return Dataset.from_dict(
        {
            "prompt": [messages(p, params.prompt) for p in rows["problem"]],
            "completion": [[{"role": "assistant", "content": s}] for s in rows["solution"]],
        }
    )


def sft_config(params: Params, output_dir: str) -> SFTConfig:
    """The one place where our warm-up params become TRL's SFTConfig."""
    w = params.warmup
    return SFTConfig(
        output_dir=output_dir,
        max_steps=w.max_steps,
        per_device_train_batch_size=w.batch_size,
        learning_rate=w.learning_rate,
        lr_scheduler_type=w.lr_scheduler,
        warmup_steps=math.ceil(w.warmup_ratio * w.max_steps),
        weight_decay=w.weight_decay,
        max_length=w.max_length,
        logging_steps=w.logging_steps,
        completion_only_loss=True,
        packing=False,
        save_strategy="no",
        report_to="none",
        seed=params.seed,
        data_seed=params.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        **models.checkpointing_off(SFTConfig),  # TRL turns it on by default; on a CPU it only costs time
        dataloader_num_workers=0,
        dataset_num_proc=None,
        disable_tqdm=None,
    )


def initial_model(params: Params):
    if params.model.is_builtin:
        tokenizer = models.build_char_tokenizer()
        b = params.model.builtin
        model = models.build_tiny_qwen2(
            tokenizer, b.hidden_size, b.num_layers, b.num_heads, b.num_kv_heads, b.intermediate_size,
            b.max_positions, seed=params.seed,
        )
        return model, tokenizer
    return models.load_policy(params.model.name, trust_remote_code=params.model.trust_remote_code)


def run(params: Params, train_path: Path = TRAIN, output: Path = OUTPUT) -> dict:
    """Train (or pass through) and save the warm-up model; return the stage metrics."""
    if not params.warmup.enabled:
        models.load_policy(params.model.name, trust_remote_code=params.model.trust_remote_code)
        models.write_model_ref(output, params.model.name)
        return {"enabled": 0, "train_seconds": 0.0}
    frame = read_parquet(train_path, required=("problem", "solution"))
    dataset = sft_dataset(frame, params)
    model, tokenizer = initial_model(params)
    with tempfile.TemporaryDirectory(prefix="warmup-") as scratch:
        trainer = SFTTrainer(model=model, args=sft_config(params, scratch), train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[TrainerProgress("warmup")])
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"warmup: training loss is not finite: {losses[-5:]}")
    models.save_model(trainer.model, tokenizer, output)
    return {
        "enabled": 1,
        "train_examples": len(dataset),
        "steps": int(result.global_step),
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(result.global_step, 1), 4),
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-1]),
        "parameters": int(sum(p.numel() for p in trainer.model.parameters())),
    }


def main(params: Params) -> dict:
    metrics = run(params)
    write_json(METRICS, metrics)
    return metrics
