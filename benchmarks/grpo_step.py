"""Seconds per GRPO step of the `train` stage on this machine (CPU, or CUDA with bf16).

Runs `stages.train.run` with the params in `--params` (default: the project's params.yaml), its
`train.max_steps` replaced by `--steps`, from the warm-up model and data that `dvc repro score` left
in the workspace, writing its checkpoints and policy into a temporary folder (the workspace's own
outputs are not touched). Reports the stage's own wall-clock seconds per step (generation, grading,
loss and optimizer step together) and, per logged step, TRL's `step_time`, whose median is the
number to quote (the first steps include warm-up costs: CUDA context, kernel selection).

`--order gain_rl` (or any train.order) times that ordering instead of params.yaml's; run it next to
the default one to get the cost of an ordering per step (GAIN-RL's ang reuses the loss forward, so
the target is <= 1.05x uniform).

Run: python benchmarks/grpo_step.py [--steps 20] [--order gain_rl] [--out benchmarks/results/grpo_step.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlvr import config  # noqa: E402
from rlvr.io import write_json  # noqa: E402
from stages import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--order", default=None, help="train.order to time (default: params.yaml's)")
    parser.add_argument("--out", default="benchmarks/results/grpo_step.json")
    args = parser.parse_args()
    params = config.load(args.params)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, max_steps=args.steps,
                                                                   logging_steps=1, save_steps=10**6,
                                                                   eval_steps=0,  # GRPO steps only
                                                                   order=args.order or params.train.order))
    with tempfile.TemporaryDirectory() as tmp:
        metrics, rows = train.run(params, model_dir=ROOT / train.MODEL, train_path=ROOT / train.TRAIN,
                                  angles_path=ROOT / train.ANGLES, checkpoints=Path(tmp) / "checkpoints",
                                  output=Path(tmp) / "policy")
    step_times = [r["step_time"] for r in rows if "step_time" in r]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "steps": args.steps,
        "order": params.train.order,
        "prompts_per_step": params.train.prompts_per_step,
        "num_generations": params.train.num_generations,
        "max_completion_length": params.train.max_completion_length,
        "stage_seconds_per_step": metrics["seconds_per_step"],
        "median_step_time_s": statistics.median(step_times[2:] or step_times) if step_times else None,
        "step_times_s": step_times,
        "first_reward": metrics["first_reward"],
        "final_reward": metrics["final_reward"],
    }
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}, indent=2))


if __name__ == "__main__":
    main()
