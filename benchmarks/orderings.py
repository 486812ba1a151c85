"""The four `train.order` settings at the same budget: held-out pass@1 and steps to a target reward.

For each order (uniform first, then gain_rl, length, random) the script runs `stages.train.run` with
the params in params.yaml, only `train.order` changed and every step logged, from the warm-up model
and the data that `dvc repro score` left in the workspace, into a temporary folder. Each policy is then
evaluated with `stages.evaluate` on the built-in held-out set (`arith`) with the evaluate params, and
paired against the warm-up model on the same problems and samples settings.

Steps to target: uniform's final training reward is the mean reward of its last `--window` steps;
for every order, the first step at which the mean reward of the trailing `--window` steps reaches it
(None if it never does). Training reward depends on which prompts a step sees, so an order that feeds
easy prompts first (length) reaches a reward sooner without having learned more; read it next to
the held-out pass@1.

Run: python benchmarks/orderings.py [--orders uniform gain_rl length random] [--window 10] [--seed N]
                                    [--out benchmarks/results/orderings.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlvr import config  # noqa: E402
from rlvr.io import write_json  # noqa: E402
from stages import evaluate, train  # noqa: E402

ORDERS = ("uniform", "gain_rl", "length", "random")


def steps_to_reach(rewards: list[tuple[int, float]], target: float, window: int) -> int | None:
    """First step whose trailing `window`-step mean reward is >= target (None if never)."""
    values = [r for _, r in rewards]
    for i in range(window - 1, len(values)):
        if np.mean(values[i - window + 1 : i + 1]) >= target:
            return rewards[i][0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--seed", type=int, help="replace params.seed (GRPO sampling and data order, evaluation "
                                                   "sampling; the warm-up model stays the workspace's)")
    parser.add_argument("--out", default="benchmarks/results/orderings.json")
    args = parser.parse_args()
    if args.orders[0] != "uniform":
        parser.error("the first order must be uniform: it sets the target reward")
    base = config.load(args.params)
    if args.seed is not None:
        base = dataclasses.replace(base, seed=args.seed)
    eval_params = dataclasses.replace(base.evaluate, benchmarks=[evaluate.BUILTIN_BENCHMARK])
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for order in args.orders:
            params = dataclasses.replace(base, train=dataclasses.replace(base.train, order=order, logging_steps=1),
                                         evaluate=eval_params)
            policy = Path(tmp) / order
            start = time.perf_counter()
            metrics, rows = train.run(params, model_dir=ROOT / train.MODEL, train_path=ROOT / train.TRAIN,
                                      angles_path=ROOT / train.ANGLES, checkpoints=Path(tmp) / f"ckpt-{order}",
                                      output=policy)
            train_seconds = time.perf_counter() - start
            dirs = {"policy": policy, "warmup": ROOT / evaluate.BASELINE}
            scores, _ = evaluate.run(params, model_dirs=dirs, eval_dir=ROOT / evaluate.EVAL_DIR)
            held_out = scores[evaluate.BUILTIN_BENCHMARK]
            runs[order] = {
                "rewards": [(r["step"], r["reward"]) for r in rows if "reward" in r],
                "train_seconds": round(train_seconds, 1),
                "seconds_per_step": metrics["seconds_per_step"],
                "final_mu": metrics.get("final_mu"),
                **{k: held_out[k] for k in ("pass_at_1", "pass_at_1_ci_low", "pass_at_1_ci_high", "greedy_accuracy",
                                            "delta_pass_at_1", "delta_pass_at_1_ci_low", "delta_pass_at_1_ci_high")},
                "warmup_pass_at_1": held_out["warmup"]["pass_at_1"],
            }
            print(f"{order}: {json.dumps({k: v for k, v in runs[order].items() if k != 'rewards'})}", flush=True)
    target = float(np.mean([r for _, r in runs["uniform"]["rewards"][-args.window:]]))
    for run in runs.values():
        run["steps_to_target"] = steps_to_reach(run["rewards"], target, args.window)
        run["final_reward"] = float(np.mean([r for _, r in run["rewards"][-args.window:]]))
    t = base.train
    result = {
        "date": datetime.date.today().isoformat(),
        "seed": base.seed,
        "budget": {"max_steps": t.max_steps, "prompts_per_step": t.prompts_per_step,
                   "num_generations": t.num_generations, "learning_rate": t.learning_rate},
        "window": args.window,
        "target_reward": target,
        "runs": runs,
    }
    write_json(Path(args.out), result)
    print(f"\ntarget (uniform's final {args.window}-step mean reward): {target:.3f}")
    print("| order | held-out pass@1 [95% CI] | vs warm-up [95% CI] | greedy | final reward | steps to target | s/step |")
    print("|---|---|---|---|---|---|---|")
    for order, r in runs.items():
        print(f"| {order} | {r['pass_at_1']:.3f} [{r['pass_at_1_ci_low']:.3f}, {r['pass_at_1_ci_high']:.3f}] "
              f"| {r['delta_pass_at_1']:+.3f} [{r['delta_pass_at_1_ci_low']:+.3f}, {r['delta_pass_at_1_ci_high']:+.3f}] "
              f"| {r['greedy_accuracy']:.3f} | {r['final_reward']:.3f} | {r['steps_to_target']} | {r['seconds_per_step']:.2f} |")


if __name__ == "__main__":
    main()
