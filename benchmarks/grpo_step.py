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

`--processes P` (P > 1) times the same steps as a P-process job: the script starts itself under
`torchrun --standalone --nproc_per_node P` (gloo on a CPU, one process per GPU with CUDA), every rank
trains, rank 0 writes the result. train.prompts_per_step is per step over all processes, so the 1-
and the P-process runs do the same work per step; the ratio of their median step times is the
scaling number. `--workspace DIR` reads the warm-up model and data from DIR instead of the project root
(a workspace where `dvc repro score` ran, e.g. with small params).

Run: python benchmarks/grpo_step.py [--steps 20] [--order gain_rl] [--processes 2] [--workspace DIR]
         [--out benchmarks/results/grpo_step.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlvr import config  # noqa: E402
from rlvr.io import write_json  # noqa: E402
from stages import train  # noqa: E402


def relaunch(processes: int, argv: list[str], workdir: str) -> int:
    """Run this script as a `processes`-process torchrun job sharing `workdir` (checkpoints, policy)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(Path(__file__).resolve()), *argv, "--workdir", workdir]
    return subprocess.call(cmd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--order", default=None, help="train.order to time (default: params.yaml's)")
    parser.add_argument("--processes", type=int, default=1, help="processes of the job (torchrun), default 1")
    parser.add_argument("--workspace", default=str(ROOT), help="where the warm-up model and data are")
    parser.add_argument("--out", default="benchmarks/results/grpo_step.json")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)  # set by relaunch
    args = parser.parse_args()
    if args.processes > 1 and "RANK" not in os.environ:
        with tempfile.TemporaryDirectory() as tmp:
            sys.exit(relaunch(args.processes, sys.argv[1:], tmp))
    params = config.load(args.params)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, max_steps=args.steps,
                                                                   logging_steps=1, save_steps=10**6,
                                                                   eval_steps=0,  # GRPO steps only
                                                                   order=args.order or params.train.order))
    workspace = Path(args.workspace)
    with tempfile.TemporaryDirectory() as own:
        tmp = Path(args.workdir or own)
        metrics, rows = train.run(params, model_dir=workspace / train.MODEL, train_path=workspace / train.TRAIN,
                                  angles_path=workspace / train.ANGLES, prompts_path=workspace / train.PROMPTS,
                                  eval_dir=workspace / train.EVAL_DIR, checkpoints=tmp / "checkpoints",
                                  output=tmp / "policy")
    if not train.process_state().is_main_process:
        return
    step_times = [r["step_time"] for r in rows if "step_time" in r]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86'})"
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "processes": train.world_size(),
        "threads_per_process": torch.get_num_threads(),
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
