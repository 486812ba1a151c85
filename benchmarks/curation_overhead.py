"""What each curation method's bookkeeping costs per GRPO step, next to uniform GRPO, in one run.

For each method (uniform, online_difficulty, dump, dynamic_sampling, one_shot prompts) the script
runs `stages.train.run` for `--steps` steps with the project's params (train.eval_steps 0, no
held-out curve), from the warm-up model and data that `dvc repro` left in the workspace, writing
checkpoints and policy into a temporary folder (the workspace's outputs are not touched). Methods
are interleaved, `--repeats` rounds of all of them, in one process.

Per step it measures, by wrapping the trainer's methods:
- `step`: the optimizer step's wall time (callback, step begin to step end);
- `generate`: RLVRGRPOTrainer._generate_and_score_completions in training mode (prompt draw,
  generation rounds, grading, TRL's advantages, every curation decision);
- `scored`: the time inside its generation rounds (`_scored`: TRL's generation, grading and
  advantages, once per round; dynamic sampling's extra rounds are counted here);
- `bookkeeping = generate - scored`: the curation code itself (sampler draw and update, dynamic
  sampling's grouping and merge of rounds, the per-prompt accuracy history), which is the number the
  5% target is about, as a fraction of the step; the extra generations dynamic sampling asks for are
  not bookkeeping, and are reported as rounds per step.

Reports per method: the medians over all its steps (the first step of every run is left out: it
holds one-time costs), bookkeeping / step, and its median step time / uniform's.

Run: python benchmarks/curation_overhead.py [--steps 6] [--repeats 3] [--out benchmarks/results/curation_overhead_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlvr import config, grpo  # noqa: E402
from rlvr.io import write_json  # noqa: E402
from stages import train  # noqa: E402

METHODS = {
    "uniform": {},
    "online_difficulty": {"order": "online_difficulty"},
    "dump": {"order": "dump"},
    "dynamic_sampling": {"filters": ["dynamic_sampling"]},
    "one_shot": {"prompts": "one_shot"},
}


class Timings:
    """Per-step wall times of the wrapped trainer methods (training mode only)."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict = {}

    def _timed(self, method, name: str, count: str | None = None):
        """`method` adding its wall time (and a call count) to the current step's `name`, in training mode."""
        timings = self

        def timed(trainer, inputs):
            start = time.perf_counter()
            try:
                return method(trainer, inputs)
            finally:
                if trainer.model.training:
                    timings.current[name] = timings.current.get(name, 0.0) + time.perf_counter() - start
                    if count:
                        timings.current[count] = timings.current.get(count, 0) + 1

        return timed

    def wrap(self):
        trainer = grpo.RLVRGRPOTrainer
        trainer._generate_and_score_completions = self._timed(trainer._generate_and_score_completions, "generate")
        trainer._scored = self._timed(trainer._scored, "scored", count="rounds")


class StepClock(TrainerCallback):
    def __init__(self, timings: Timings):
        self.timings = timings

    def on_step_begin(self, args, state, control, **kwargs):
        self.timings.current = {"start": time.perf_counter()}

    def on_step_end(self, args, state, control, **kwargs):
        current = self.timings.current
        current["step"] = time.perf_counter() - current.pop("start")
        self.timings.steps.append(current)


def run_method(params_raw: dict, overrides: dict, steps: int, timings: Timings, workdir: Path) -> list[dict]:
    """`steps` steps of the train stage with `overrides` in train; the timings of each step."""
    raw = json.loads(json.dumps(params_raw))
    raw["train"].update(overrides, max_steps=steps, eval_steps=0, save_steps=10_000)
    method_params = config.from_dict(raw)
    timings.steps = []
    original = train.RLVRGRPOTrainer.__init__

    def with_clock(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StepClock(timings)]
        original(self, *args, **kwargs)

    train.RLVRGRPOTrainer.__init__ = with_clock
    try:
        train.run(method_params, checkpoints=workdir / "checkpoints", output=workdir / "policy")
    finally:
        train.RLVRGRPOTrainer.__init__ = original
    return list(timings.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/curation_overhead_cpu.json"))
    args = parser.parse_args()
    os.chdir(ROOT)
    params_raw = config.parse_yaml((ROOT / "params.yaml").read_text())
    timings = Timings()
    timings.wrap()
    per_method: dict[str, list[dict]] = {m: [] for m in args.methods}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for method in args.methods:
                steps = run_method(params_raw, METHODS[method], args.steps, timings, Path(tmp) / f"{method}-{repeat}")
                per_method[method] += steps[1:]  # the first step holds one-time costs
                print(f"repeat {repeat} {method}: median step {statistics.median(s['step'] for s in steps[1:]):.2f} s",
                      flush=True)
    summary = {}
    for method, steps in per_method.items():
        bookkeeping = [s["generate"] - s["scored"] for s in steps]
        summary[method] = {
            "steps": len(steps),
            "median_step_s": statistics.median(s["step"] for s in steps),
            "median_generate_s": statistics.median(s["generate"] for s in steps),
            "median_bookkeeping_ms": 1000 * statistics.median(bookkeeping),
            "median_bookkeeping_frac": statistics.median(b / s["step"] for b, s in zip(bookkeeping, steps, strict=True)),
            "max_bookkeeping_frac": max(b / s["step"] for b, s in zip(bookkeeping, steps, strict=True)),
            "median_rounds": statistics.median(s["rounds"] for s in steps),
        }
    base = summary.get("uniform", {}).get("median_step_s")
    for method, row in summary.items():
        row["step_vs_uniform"] = row["median_step_s"] / base if base else None
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "steps_per_run": args.steps, "repeats": args.repeats, "methods": summary,
    }
    write_json(Path(args.out), result)
    print(f"{'method':<18} {'step s':>7} {'bookkeeping ms':>15} {'bk/step':>8} {'max bk/step':>11} {'rounds':>6} "
          f"{'step/uniform':>12}")
    for method, row in summary.items():
        print(f"{method:<18} {row['median_step_s']:>7.2f} {row['median_bookkeeping_ms']:>15.1f} "
              f"{row['median_bookkeeping_frac']:>8.2%} {row['max_bookkeeping_frac']:>11.2%} {row['median_rounds']:>6} "
              f"{row['step_vs_uniform']:>12.2f}")

if __name__ == "__main__":
    main()
