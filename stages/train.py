"""Stage `train`: GRPO (TRL) from the warm-up model, with the data ordering chosen in params.

The reward is the shared grader (1.0 / 0.0, None for an unparseable gold answer). `train.order`
picks which prompts each step sees: `gain_rl` (GAIN-RL dynamic sampling over the `score` ranking),
`length` (shortest question first), `random` (a seeded fixed permutation), `uniform` (a fresh
seeded permutation every pass, the ones TRL's sampler draws), `online_difficulty` (a running
pass-rate band) or `dump` (DUMP's UCB over distributions), so `dvc exp run -S train.order=length`
compares them at equal budget. `train.filters: [dynamic_sampling]` adds DAPO's dynamic sampling
(docs/curation.md has every method and its `curation` settings).

Checkpoints go to models/checkpoints (a `persist: true` output, so DVC does not delete them before a
rerun) every `train.save_steps` and at the last step. Each is complete only once its marker is written
last (rlvr.grpo.CheckpointState); a folder a kill interrupted is removed at the next start. A run that
finds complete checkpoints written with the same params and inputs (`fingerprint`) by a run that did
not finish resumes from the newest one (model, optimizer, scheduler, RNGs, data position, GAIN-RL mu
and sampler RNG) and ends with the same policy as an uninterrupted run; checkpoints from other params
or inputs, or of a finished run, are discarded. docs/checkpoints.md has the details and the kill
points tested.

With several processes (`launch.processes`, flows/launch.py) every process trains on its share of each
step's rollouts; the main process alone decides the resume point (and clears or prunes
models/checkpoints), writes the policy and the metrics, and marks the run finished
(docs/scaling.md, "Training on several processes").

Every `train.eval_steps` steps (and at step 0 and the last step) the policy is evaluated on the
prepared eval set `train.eval_set` (rlvr.heldout.HeldoutEval: sampled pass@1 and greedy accuracy,
graded by the reward's grader, without disturbing training's randomness); the points go to MLflow
and metrics/heldout_curve.csv, and their cost to metrics/train.json (docs/heldout.md).

`train.prompts: band` trains on the prompts the `filter` stage kept (pass rate in its band),
`one_shot` on the `one_shot` stage's selection (1-shot RLVR).
`train.prof: true` (or `prof` in `train.filters`) filters every group with PROF before the loss (rule: `prof`, PRM: `prm`), and
`train.reward: blend` adds `train.blend_weight` x the PRM's process value to the reward (PROF's
baseline).

Inputs:  models/warmup, data/prepared/train.parquet, data/curated/angles.parquet,
         data/rollouts/pass_rates.parquet (online_difficulty, dump), data/curated/one_shot.parquet (one_shot),
         data/curated/prompts.parquet, data/prepared/eval/<train.eval_set>.parquet
Outputs: models/policy, models/checkpoints (persist), data/trained/prompt_accuracy.parquet (step, id,
         accuracy: each prompt's training accuracy at each step that drew it), metrics/train.json,
         metrics/train_curve.csv, metrics/heldout_curve.csv
Run:     dvc repro train   (or: python -m flows train)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from datasets import Dataset
from trl import GRPOConfig

from rlvr import curation, gain_rl, grpo, heldout, models, prof
from rlvr.config import ConfigError, Params
from rlvr.curation import dump
from rlvr.generation import SamplingSettings, messages, render
from rlvr.grading import Grader
from rlvr.grpo import (GainRLSchedule, MlflowStepMetrics, ProcessValueReward, ProfInLoop, RewardFunction,
                       RLVRGRPOTrainer)
from rlvr.io import dvc_md5, read_parquet, write_json, write_parquet, write_text
from rlvr.progress import TrainerProgress

log = logging.getLogger(__name__)

MODEL = Path("models/warmup")
TRAIN = Path("data/prepared/train.parquet")
ANGLES = Path("data/curated/angles.parquet")
PROMPTS = Path("data/curated/prompts.parquet")
ONE_SHOT = Path("data/curated/one_shot.parquet")
PASS_RATES = Path("data/rollouts/pass_rates.parquet")
PROMPT_ACCURACY = Path("data/trained/prompt_accuracy.parquet")
OUTPUT = Path("models/policy")
CHECKPOINTS = Path("models/checkpoints")
METRICS = Path("metrics/train.json")
CURVE = Path("metrics/train_curve.csv")
EVAL_DIR = Path("data/prepared/eval")
HELDOUT_CURVE = Path("metrics/heldout_curve.csv")
FINGERPRINT = "fingerprint.json"


def process_state() -> PartialState:
    """The processes training together (accelerate's shared state; 1 unless launched with torchrun or
    accelerate launch). `cpu=True` without CUDA: accelerate forms a CPU (gloo) process group only when
    told it runs on the CPU; without it every rank of a CPU job would think it is alone."""
    return PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    """How many processes train together."""
    return process_state().num_processes


def on_main_process(fn, *args):
    """`fn(*args)` on the main process only, its result handed to every process (None everywhere if it
    returns None). The others wait for it: what it does to the file system is done when they go on."""
    state = process_state()
    result = [fn(*args) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    return result[0]


def save_policy(model, tokenizer, output: Path, accelerator=None) -> None:
    """The policy, written once, by the main process, atomically (rlvr.models.save_model); the others wait.

    With a trainer's `accelerator`, every process first takes part in `accelerator.get_state_dict` of
    the wrapped model, which gathers the full weights where an engine shards them (ZeRO-3 with
    `stage3_gather_16bit_weights_on_model_save`, FSDP's full state dict) and is the plain state dict
    under DDP or one process; the main process saves those weights.
    """
    state = process_state()
    weights = accelerator.get_state_dict(model) if accelerator is not None else None
    if state.is_main_process:
        models.save_model(accelerator.unwrap_model(model) if accelerator is not None else model, tokenizer, output,
                          state_dict=weights)
    state.wait_for_everyone()


def per_device_rollouts(prompts_per_step: int, num_generations: int, processes: int) -> int:
    """Rollouts per process and step: K x G over all processes together, split evenly between them."""
    rollouts = prompts_per_step * num_generations
    if rollouts % processes:
        raise ConfigError(
            f"train.prompts_per_step x train.num_generations = {prompts_per_step} x {num_generations} = {rollouts} "
            f"rollouts per step do not split over {processes} processes; choose values whose product is divisible "
            f"by {processes}, or another number of processes")
    return rollouts // processes


def grpo_config(params: Params, output_dir: str) -> GRPOConfig:
    """The one place where our train params become TRL's GRPOConfig.

    train.prompts_per_step (K) is per optimizer step over all processes: each process generates
    K x G / world size rollouts, so TRL's generation_batch_size is K x G whatever the process count.
    """
    t = params.train
    cuda = torch.cuda.is_available()
    precision = models.mixed_precision(params.launch.mixed_precision)
    return GRPOConfig(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=per_device_rollouts(t.prompts_per_step, t.num_generations, world_size()),
        num_generations=t.num_generations,
        steps_per_generation=1,  # with num_iterations 1: every step generates, so every checkpoint resumes exactly
        shuffle_dataset=False,  # TRL's sampler walks rlvr.grpo.prompt_plan in order (uniform is shuffled there)
        gradient_accumulation_steps=1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        beta=t.beta,
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=0,
        max_completion_length=t.max_completion_length,
        loss_type=t.loss_type,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,  # never below 2: the rotation runs before the newest checkpoint is marked complete
        logging_steps=t.logging_steps,
        reward_weights=[1.0, t.blend_weight] if t.reward == "blend" else None,
        report_to="none",
        seed=params.train.seed,
        data_seed=params.train.seed,
        use_cpu=not cuda,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        **models.checkpointing_off(GRPOConfig),  # TRL turns it on by default; on a CPU it only costs time
        use_vllm=t.use_vllm,
        vllm_mode=t.vllm_mode,
        vllm_server_host=t.vllm_server_host,
        vllm_server_port=t.vllm_server_port,
        remove_unused_columns=False,
        disable_tqdm=None,
    )


def gain_rl_schedule(params: Params, ranking: list[int]) -> GainRLSchedule:
    """The online GAIN-RL schedule over `ranking` (sigma, n and the delta bounds are fractions of its size)."""
    g = params.train.gain_rl
    return GainRLSchedule(ranking, sigma=g.sigma, mu0=g.mu0, n=g.n, alpha=g.alpha, beta=g.beta,
                          delta_min=g.delta_min, delta_max=g.delta_max, seed=params.train.seed, at_end=g.at_end)


def fingerprint(params: Params, inputs: list[Path]) -> str:
    """What a checkpoint must match to be resumed: train params, model, prompt, seed and input digests."""
    payload = {
        "train": asdict(params.train), "curation": asdict(params.curation), "model": asdict(params.model),
        "prompt": asdict(params.prompt),
        "prof": asdict(params.prof), "prm": asdict(params.prm), "seed": params.train.seed, "inputs": {str(p): dvc_md5(p) for p in inputs if p.exists()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def resume_point(checkpoints: Path, expected: str) -> Path | None:
    """The newest complete checkpoint of an unfinished run with the same fingerprint, else None (and a clean dir).

    Checkpoint folders a kill interrupted (no valid completeness marker) are removed either way. A run
    that finished marks its stamp (`mark_finished`): its checkpoints are never resumed, so a rerun for
    a reason the fingerprint does not cover (a code change) trains from the start. The stamp goes
    first when the folder is cleared, so a kill halfway through clearing leaves no stamp, and
    therefore nothing that could be resumed.
    """
    stamp = checkpoints / FINGERPRINT
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):  # none, or not ours: nothing here can be resumed
        recorded = {}
    if isinstance(recorded, dict) and recorded.get("fingerprint") == expected and not recorded.get("finished"):
        for name in grpo.discard_incomplete(checkpoints):
            log.warning("train: removed %s, a checkpoint a killed run left incomplete", checkpoints / name)
        last = grpo.last_complete_checkpoint(checkpoints)
        if last is not None:
            return last
    stamp.unlink(missing_ok=True)
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    write_json(stamp, {"fingerprint": expected})
    return None


def mark_finished(checkpoints: Path) -> None:
    """Record that the run with these checkpoints finished and wrote its outputs (never resumed again)."""
    stamp = checkpoints / FINGERPRINT
    write_json(stamp, {**json.loads(stamp.read_text()), "finished": True})


def dataset_and_ordering(params: Params, frame: pd.DataFrame, angles: pd.DataFrame) -> tuple[Dataset, list[int]]:
    """The GRPO dataset (conversational prompts + gold answers) and the training order of its rows."""
    dataset = Dataset.from_dict({
        "prompt": [messages(p, params.prompt) for p in frame["problem"]],
        "problem": frame["problem"].tolist(),  # for the PRM (PROF, blend reward)
        "answer": frame["answer"].tolist(),
        "id": frame["id"].tolist(),
    })
    order = params.train.order
    if order in ("uniform", "online_difficulty", "dump"):  # no ranking: a seeded plan, or drawn online
        return dataset, []
    missing = set(frame["id"]) - set(angles["id"])
    if missing:
        raise ValueError(f"{ANGLES}: {len(missing)} training ids have no angle score (rerun `dvc repro score`)")
    row_of = {id_: i for i, id_ in enumerate(frame["id"])}
    ids = gain_rl.order_positions(angles[angles["id"].isin(row_of)], order, params.train.seed)
    return dataset, [row_of[i] for i in ids]


def heldout_eval(params: Params, trainer: RLVRGRPOTrainer, frame: pd.DataFrame,
                 grader: Grader) -> heldout.HeldoutEval:
    """The held-out callback: `frame`'s problems, train's sampling settings, the reward's grader.

    Generation batches are the rollouts one process generates per training step (known to fit).
    The seed is train.seed at every point, so every point draws the same random numbers.
    """
    t = params.train
    settings = SamplingSettings(n=t.eval_n_samples, temperature=t.temperature, top_p=t.top_p,
                                max_new_tokens=t.eval_max_new_tokens, seed=t.seed)
    prompts = [render(trainer.processing_class, p, params.prompt) for p in frame["problem"]]
    return heldout.HeldoutEval(trainer, prompts, frame["answer"].tolist(), grader, t.eval_steps, settings,
                               batch_size=trainer.args.per_device_train_batch_size)


def select_prompts(params: Params, frame: pd.DataFrame, prompts_path: Path,
                   one_shot_path: Path = ONE_SHOT) -> pd.DataFrame:
    """All training rows, or those the filter stage kept (`train.prompts: band`) or the one_shot stage
    selected (`one_shot`), in file order."""
    if params.train.prompts == "all":
        return frame
    path = prompts_path if params.train.prompts == "band" else one_shot_path
    chosen = read_parquet(path, required=("id",))
    selected = frame[frame["id"].isin(set(chosen["id"]))].reset_index(drop=True)
    if selected.empty:
        raise ValueError(f"{path}: none of its {len(chosen)} prompt ids is in the training set")
    if len(selected) < len(chosen):
        raise ValueError(f"{path}: {len(chosen) - len(selected)} of its {len(chosen)} prompt ids are not in the "
                         "training set (it was made from other data; rerun the stage that writes it)")
    log.info("train.prompts = %s: %d of %d training prompts", params.train.prompts, len(selected), len(frame))
    return selected


def prior_pass_rates(frame: pd.DataFrame, pass_rates_path: Path) -> np.ndarray:
    """The rollout stage's pass rate of every training row (NaN for rows it did not roll out)."""
    rates = read_parquet(pass_rates_path, required=("id", "pass_rate"))
    by_id = dict(zip(rates["id"], rates["pass_rate"].astype(float), strict=True))
    return np.array([by_id.get(i, np.nan) for i in frame["id"]], dtype=np.float64)


def curation_sampler(params: Params, frame: pd.DataFrame, pass_rates_path: Path = PASS_RATES):
    """The online sampler of `train.order: online_difficulty | dump` (rlvr.curation), else None.

    online_difficulty's prior and dump's difficulty buckets are the rollout stage's pass rates
    (rows it did not roll out: no prior, bucket `pass_rate_unknown`); dump by source uses the
    prepared set's `source` column.
    """
    t, c = params.train, params.curation
    if t.order not in ("online_difficulty", "dump"):
        return None
    rates = prior_pass_rates(frame, pass_rates_path)
    labels: tuple[str, ...] = ()
    if t.order == "dump":
        labels = tuple(frame["source"].astype(str)) if c.dump.by == "source" else tuple(
            dump.difficulty_buckets(rates.tolist(), c.dump.bucket_edges))
    context = curation.Context(n_rows=len(frame), prompts_per_step=t.prompts_per_step, group_size=t.num_generations,
                               steps=t.max_steps, seed=t.seed, labels=labels, prior_pass_rate=tuple(rates.tolist()))
    sampler = curation.build_sampler(t.order, asdict(getattr(c, t.order)), context)
    if t.order == "dump":
        log.info("dump: %d distributions by %s: %s", len(sampler.names), c.dump.by,
                 {name: len(rows) for name, rows in zip(sampler.names, sampler.rows, strict=True)})
    return sampler


def prompt_accuracy_table(rows: list[tuple[int, int, int, int]], ids: list[str]) -> pd.DataFrame:
    """A run's per-step per-prompt training accuracy (step, id, accuracy, n_correct, n_graded) from the
    trainer's (step, row, correct, graded) tuples: the history the one_shot stage ranks
    (rlvr/curation/one_shot.py)."""
    return pd.DataFrame({
        "step": np.array([r[0] for r in rows], dtype=np.int64),
        "id": pd.Series([str(ids[r[1]]) for r in rows], dtype=object),
        "accuracy": np.array([r[2] / r[3] for r in rows], dtype=np.float64),
        "n_correct": np.array([r[2] for r in rows], dtype=np.int64),
        "n_graded": np.array([r[3] for r in rows], dtype=np.int64),
    })


def run(params: Params, model_dir: Path = MODEL, train_path: Path = TRAIN, angles_path: Path = ANGLES,
        checkpoints: Path = CHECKPOINTS, output: Path = OUTPUT,
        prompts_path: Path = PROMPTS, eval_dir: Path = EVAL_DIR) -> tuple[dict, list[dict], pd.DataFrame]:
    """Train; returns the metrics, the log history's rows (training and held-out points) and the
    per-prompt accuracy history (`prompt_accuracy_table`)."""
    frame = select_prompts(params, read_parquet(train_path, required=("id", "problem", "answer")), prompts_path)
    eval_path = eval_dir / f"{params.train.eval_set}.parquet"
    eval_frame = (read_parquet(eval_path, required=("problem", "answer")) if params.train.eval_steps > 0
                  and params.train.max_steps > 0 else None)
    if eval_frame is not None and eval_frame.empty:
        raise ValueError(f"{eval_path}: no problems to evaluate on (train.eval_set = {params.train.eval_set!r})")
    angles = read_parquet(angles_path, required=("id", "rank", "question_length", "valid"))
    model, tokenizer = models.load_policy(model_dir, trust_remote_code=params.model.trust_remote_code,
                                          dtype=models.torch_dtype(params.model.dtype))
    if params.train.max_steps == 0:
        save_policy(model, tokenizer, output)
        return {"steps": 0, "train_seconds": 0.0}, [], prompt_accuracy_table([], [])
    dataset, ordering = dataset_and_ordering(params, frame, angles)
    inputs = [model_dir, train_path, angles_path] + ([prompts_path] if params.train.prompts == "band" else [])
    inputs += [ONE_SHOT] if params.train.prompts == "one_shot" else []
    inputs += [PASS_RATES] if params.train.order in ("online_difficulty", "dump") else []
    inputs += [eval_path] if eval_frame is not None else []
    # One process checks and clears the checkpoints folder; every process resumes from what it found.
    resume = on_main_process(resume_point, checkpoints, fingerprint(params, inputs))
    t = params.train
    use_prof = "prof" in t.filter_names  # train.prof: true, or prof in train.filters
    prm = prof.load_prm(params.prm) if use_prof or t.reward == "blend" else None
    sampler = curation_sampler(params, frame)
    with Grader(workers=params.grading.workers, timeout_s=params.grading.timeout_s) as grader:
        reward_funcs = [RewardFunction(grader)]
        if t.reward == "blend":
            reward_funcs.append(ProcessValueReward(prm, params.prof.max_steps))
        prof_filter = (ProfInLoop(prm, params.prof.remove, params.prof.min_steps, params.prof.max_steps)
                       if use_prof else None)
        trainer = RLVRGRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=grpo_config(params, str(checkpoints)),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[MlflowStepMetrics(), TrainerProgress("train")],
            order=params.train.order,
            ordering=ordering,
            gain_rl_schedule=gain_rl_schedule(params, ordering) if params.train.order == "gain_rl" else None,
            prof_filter=prof_filter,
            sampler=sampler,
            dynamic_sampling_settings=params.curation.dynamic_sampling if "dynamic_sampling" in t.filters else None,
        )
        evaluation = heldout_eval(params, trainer, eval_frame, grader) if eval_frame is not None else None
        if evaluation is not None:
            trainer.add_callback(evaluation)
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - start
    save_policy(trainer.model_wrapped, tokenizer, output, trainer.accelerator)
    # The trainer state's log history survives a resume (it is saved in every checkpoint).
    rows = [{"step": e["step"], **{k: v for k, v in e.items() if k != "step"}} for e in trainer.state.log_history
            if "step" in e]
    rewards = [r["reward"] for r in rows if "reward" in r]
    if rewards and not np.isfinite(rewards).all():
        raise RuntimeError(f"train: non-finite rewards in the log: {rewards[-5:]}")
    resumed_at = grpo.checkpoint_step(resume) if resume else 0
    metrics = {
        "steps": int(result.global_step),
        "resumed_from_step": resumed_at,
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(result.global_step - resumed_at, 1), 4),
        "first_reward": float(rewards[0]) if rewards else float("nan"),
        "final_reward": float(np.mean(rewards[-3:])) if rewards else float("nan"),
    }
    if evaluation is not None:  # this run's evaluations (after a resume: the resumed part's), within train_seconds
        metrics["heldout_seconds"] = round(evaluation.seconds, 2)
        metrics["heldout_cost_frac"] = round(evaluation.seconds / seconds, 4)
    if params.train.order == "gain_rl":
        metrics["final_mu"] = float(trainer.gain_rl_schedule.sampler.mu)  # clipped to [0, N-1]
        metrics["gain_rl_end_step"] = trainer.gain_rl_schedule.end_step  # None: mu never reached N-1
    return metrics, rows, prompt_accuracy_table(trainer.prompt_accuracy, frame["id"].tolist())


# Columns a dvc.yaml plot draws that a run may not log: GAIN-RL's mu exists only with train.order
# gain_rl. Always writing them keeps `dvc plots show` free of missing-field warnings; a column the run
# did not log holds "NaN", which the plots leave out (a blank cell would be drawn as 0).
CURVE_ALWAYS = ("gain_rl/mu",)


def curve_csv(rows: list[dict]) -> str:
    """Training log rows as CSV for `dvc plots` (one row per logged step; blank where not logged)."""
    if not rows:
        return ",".join(("step", *CURVE_ALWAYS)) + "\n"
    frame = pd.DataFrame(rows).groupby("step", as_index=False).last()
    for column in CURVE_ALWAYS:
        if column not in frame.columns:
            frame[column] = "NaN"
    return frame.to_csv(index=False)


def main(params: Params) -> dict:
    """Train and write the outputs; with several processes every process trains and the main one writes."""
    metrics, rows, history = run(params)
    if not process_state().is_main_process:
        return metrics
    write_parquet(PROMPT_ACCURACY, history)
    write_text(CURVE, curve_csv([r for r in rows if not heldout.is_point(r)]))
    write_text(HELDOUT_CURVE, heldout.curve_csv(heldout.curve_rows(rows)))
    write_json(METRICS, {k: v for k, v in metrics.items() if v is None or np.isfinite(v)})  # None: JSON null
    # Last: a kill before this line resumes from the final checkpoint (zero steps) and rewrites the outputs.
    if params.train.max_steps > 0:
        mark_finished(CHECKPOINTS)
    return metrics
