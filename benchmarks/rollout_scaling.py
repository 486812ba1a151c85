"""Rollout samples/s with 1 and with 2 (or more) processes: the `rollout` stage as a torchrun job.

Builds a workspace in a temporary folder (the built-in arith training prompts, `prepare`; a random
tiny Qwen2 model of `--hidden` x `--layers`, or `--model FOLDER` for a real one) and runs the
`rollout` stage there as a job of P processes (flows/launch.py `run_job`, torchrun standalone; P = 1
runs the one-process path), with an empty rollout cache every time, so every chunk is sampled. The
process counts take turns, run by run (1, 2, 1, 2, ...), so a machine whose speed drifts biases
none of them, and the ratio is taken pair by pair (same repeat) before the median.

Two figures per run:
- samples_per_second: the stage's own metric, every rank's samples over the slowest rank's
  sampling seconds (model loading, grading and process start-up excluded);
- job_seconds: the whole job's wall clock (start-up, model load, sampling, gather, grading, writes).

Threads: on a CPU each rank gets cores / P threads (`--threads` sets it), so 1 and P processes use
the same cores; on a GPU machine each rank samples on its own GPU (cuda:LOCAL_RANK) and P should
not exceed the GPU count.

Run: python benchmarks/rollout_scaling.py [--processes 1 2] [--repeats 3] [--out benchmarks/results/rollout_scaling.json]
     (on a GPU machine: --model models/warmup --prompts 512 --n-samples 8 --max-new-tokens 256)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows import launch  # noqa: E402
from rlvr import config, models  # noqa: E402
from rlvr.io import write_json  # noqa: E402
from stages import prepare  # noqa: E402


@contextlib.contextmanager
def workspace(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


def params_dict(args: argparse.Namespace) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare"]["train"] = [{"name": "arith", "builtin": True, "size": args.prompts}]
    raw["prepare"]["eval"] = [{"name": "arith", "builtin": True, "size": 8}]
    raw["evaluate"]["benchmarks"] = ["arith"]
    raw["rollout"].update(max_prompts=args.prompts, n_samples=args.n_samples, max_new_tokens=args.max_new_tokens,
                          chunk_size=args.chunk_size, batch_size=args.batch_size)
    return raw


def run_once(raw: dict, processes: int, threads: int) -> dict:
    raw = {**raw, "launch": {**raw["launch"], "processes": processes}}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    shutil.rmtree("data/rollout_cache", ignore_errors=True)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    metrics = launch.run_job(config.load("params.yaml"), "rollout", "params.yaml")
    return {"processes": processes, "threads_per_process": threads, "samples": metrics["samples"],
            "samples_per_second": metrics["samples_per_second"],
            "job_seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=8, help="prompts per chunk: the unit the ranks split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256, help="the random model's width (without --model)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--model", help="a model folder to sample from instead of the random tiny model")
    parser.add_argument("--threads", type=int, default=None, help="per process (default: cores / processes)")
    parser.add_argument("--out", default="benchmarks/results/rollout_scaling.json")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    cores = os.cpu_count() or 1
    os.environ.pop("DVC_ROOT", None)  # the cache goes under the temporary workspace
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    raw = params_dict(args)
    load_before = os.getloadavg()[0]  # other work on the machine: its noise shows in the spread of the runs
    runs = []
    with tempfile.TemporaryDirectory(prefix="rollout-scaling-") as tmp, workspace(Path(tmp)):
        prepare.main(config.from_dict(raw))
        if args.model:
            shutil.copytree(Path(args.model).resolve() if Path(args.model).is_absolute() else ROOT / args.model,
                            "models/warmup")
        else:
            tokenizer = models.build_char_tokenizer()
            heads = max(1, args.hidden // 64)
            model = models.build_tiny_qwen2(tokenizer, args.hidden, args.layers, heads, max(1, heads // 2),
                                            4 * args.hidden, 512, seed=0)
            models.save_model(model, tokenizer, "models/warmup")
        for repeat in range(args.repeats):
            for processes in args.processes:
                threads = args.threads or max(1, cores // processes)
                run = run_once(raw, processes, threads) | {"repeat": repeat}
                print(json.dumps(run), flush=True)
                runs.append(run)
    base = args.processes[0]
    summary = {}
    for processes in args.processes:
        mine = [r for r in runs if r["processes"] == processes]
        summary[str(processes)] = {
            "median_samples_per_second": statistics.median(r["samples_per_second"] for r in mine),
            "median_job_seconds": statistics.median(r["job_seconds"] for r in mine)}
        if processes != base:
            pairs = [(r, b) for r in mine for b in runs if b["processes"] == base and b["repeat"] == r["repeat"]]
            summary[str(processes)][f"samples_per_second_ratio_vs_{base}"] = round(statistics.median(
                r["samples_per_second"] / b["samples_per_second"] for r, b in pairs), 3)
            summary[str(processes)][f"job_speedup_vs_{base}"] = round(statistics.median(
                b["job_seconds"] / r["job_seconds"] for r, b in pairs), 3)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cores} cores)"
    result = {"date": datetime.date.today().isoformat(), "device": device, "platform": platform.platform(),
              "torch": torch.__version__, "load_average_1min": [load_before, os.getloadavg()[0]],
              "model": args.model or f"random qwen2 {args.hidden} x {args.layers}",
              "prompts": args.prompts, "n_samples": args.n_samples, "max_new_tokens": args.max_new_tokens,
              "chunk_size": args.chunk_size, "batch_size": args.batch_size, "summary": summary, "runs": runs}
    write_json(out, result)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
