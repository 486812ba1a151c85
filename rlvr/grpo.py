"""GRPO with TRL: the project's rewards, prompt orders and curation, PROF in the loop, and checkpoints that survive a kill.

`RLVRGRPOTrainer` is TRL's `GRPOTrainer` with these changes, made through TRL's public surface
wherever it has one:

- Which prompts a step sees (`order`). `length | random | uniform` are a *prompt plan* fixed up
  front (`prompt_plan`): the dataset handed to TRL is the training set laid out step by step, and
  `GRPOConfig.shuffle_dataset = False` makes TRL's own RepeatSampler walk it in order. `uniform`
  draws the same per-epoch permutations TRL's sampler would draw with the run's seed; writing them
  down makes the run one pass over the plan, so a resumed run skips exactly the batches it already
  trained on, across epoch boundaries too. `gain_rl` draws the K prompts of every step from the
  GAIN-RL Gaussian over rank positions *at generation time*, with the mu of that moment (a torch
  Sampler would be one batch late: accelerate fetches the next batch before the current step
  runs). K is per step over all processes: every process draws the same K and takes its slice.
  acc (fraction correct, known after grading) and ang (mean causal angle concentration of each
  rollout's own tokens at the input of the last MLP) move mu, which stays clipped to [0, N-1]; the
  step at which it first reaches N-1 is logged (`gain_rl/end_step`). ang costs no forward pass of
  its own: a hook on the last MLP takes the hidden states from the loss forward the step runs
  anyway (`compute_loss`), and mu moves right after it, before the next step draws its prompts.
  With several processes acc and ang are gathered over all of them before the update, so every
  process moves mu identically; after each update the processes compare their sampler states (mu,
  counts, RNG; one small gather) and the step fails if they differ.
- PROF (`prof_filter`): every group of rollouts is filtered after grading and before the loss:
  advantages are recomputed over the kept rollouts only (TRL's normalisation), dropped rollouts get
  advantage 0 and an all-zero completion mask (no loss, no gradient), and the loss normaliser
  `num_items_in_batch` is recounted over what is kept. With several processes each one scores only
  its own rollouts with the PRM; step counts, values and rewards are gathered in process order, every
  process takes the same decision over every group (a group may span two processes) and keeps its
  slice of the advantages and masks.
- The other curation methods (rlvr/curation, docs/curation.md): `online_difficulty` and `dump` are
  online samplers drawn like GAIN-RL (`_draw_inputs`) and updated after grading with every
  rollout of the step (gathered over processes: grades and TRL's advantages). Dynamic sampling
  (`train.filters: [dynamic_sampling]`, one process) keeps the groups whose grades differ and
  generates more rounds of K prompts until the step has K of them or the round cap is hit; the
  rounds' rows are merged into one generation output (`merge_rollouts`), and groups that fill a
  step left short carry no loss. Every step's per-prompt accuracy (all rounds) is kept in
  `prompt_accuracy` (the one_shot stage's history). The samplers' state, dynamic sampling's refill
  RNG and that history go into every checkpoint (`curation_state.json`).
- Rewards are TRL reward functions: `RewardFunction` (the project's one grader: 1.0 / 0.0, None
  for an unparseable gold) and `ProcessValueReward` (the PRM's process value, for PROF's blend
  baseline). Both keep their latest local values, which is where PROF and GAIN-RL read the step's
  rewards and completions (gathered over processes), not from TRL's internal logs.
- Curation metrics (`prof/*`, `gain_rl/*`, `dynamic_sampling/*`, `online_difficulty/*`, `dump/*`) are averaged per logging step and added in `log`.
- Checkpoints (`CheckpointState`, a callback): after TRL/transformers has written a checkpoint, the
  GAIN-RL sampler state (mu, RNG) goes in, then a completeness marker, last, listing every file and
  its size. A folder without a valid marker is a checkpoint a kill interrupted (or a rotation
  half-deleted): `last_complete_checkpoint` ignores it and `discard_incomplete` removes it.
  `train(resume_from_checkpoint=...)` restores the GAIN-RL state, then Trainer.train restores the
  rest (weights, optimizer, scheduler, torch / numpy / python RNGs, trainer state, data position).

Private TRL methods this class still overrides, and why, are listed once in `TRL_HOOKS`;
tests/test_trl_contract.py checks each against the installed TRL and names the hook it lost.
(Sampling needs no override: with activation checkpointing off, as stages/train.py configures it,
`generate` on the module in training mode measured as fast here as in eval mode, same samples.)
What resume guarantees, and the kill points tested, are in docs/checkpoints.md.

Not covered: resuming with different params (stages/train.py fingerprints them), and durability
against power loss (a marker proves a complete write by the process, not an fsync to disk).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from rlvr import gain_rl, prof
from rlvr.config import TRAIN_ORDERS, DynamicSampling
from rlvr.curation import Groups, StepStats, dynamic_sampling
from rlvr.curation.base import new_rng
from rlvr.grading import Grader
from rlvr.io import write_json

log = logging.getLogger(__name__)

GAIN_RL_STATE = "gain_rl_state.json"
CURATION_STATE = "curation_state.json"  # online sampler, dynamic sampling's refill RNG, per-prompt accuracy
ROW = "_row"  # the column RLVRGRPOTrainer adds to the training set: each row's index in it
# Orders whose prompts are drawn at generation time (the dataset TRL walks is then a placeholder).
ONLINE_ORDERS = ("gain_rl", "online_difficulty", "dump")
COMPLETE = "checkpoint_complete.json"  # written last into every checkpoint folder
REWARD_NAME = "accuracy"  # TRL names the reward column and its logged metrics after the function
# What `_generate_and_score_completions` must return for PROF and GAIN-RL to work on it.
GAIN_RL_MASK = "gain_rl_valid_mask"  # the key RLVRGRPOTrainer adds to a GAIN-RL step's generation output
GENERATION_OUTPUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                          "num_items_in_batch")


@dataclass(frozen=True)
class TrlHook:
    """A private TRL function this module relies on: where it lives, its parameters, and why."""

    owner: str  # "GRPOTrainer" for a method, else the module that defines the function
    name: str
    parameters: tuple[str, ...]  # in order, without `self`
    why: str


# The one list of TRL internals used here (the module docstring and tests/test_trl_contract.py read it).
# Everything else goes through TRL's public surface: reward functions, callbacks, GRPOConfig fields,
# Trainer.train and Trainer.log.
TRL_HOOKS = (
    TrlHook("GRPOTrainer", "_generate_and_score_completions", ("inputs",),
            "The online samplers replace the step's prompts before generation and update after grading; "
            "dynamic sampling calls it again for extra rounds and merges their rows; PROF rewrites "
            f"advantages, completion_mask and num_items_in_batch of its output (keys {GENERATION_OUTPUT_KEYS}). "
            "No public hook sits between grading and the loss."),
    TrlHook("trl.trainer.utils", "nanstd", ("tensor", "dim", "keepdim"),
            "kept_advantages normalises with TRL's own std so PROF's advantages match TRL's."),
)


class RewardFunction:
    """TRL reward function: 1.0 / 0.0 from the shared grader, None for an unparseable gold answer.

    Keeps the latest call's grades and completion texts (this process's rows) for PROF and GAIN-RL.
    """

    def __init__(self, grader: Grader):
        self.grader = grader
        self.__name__ = REWARD_NAME
        self.latest: list[float | None] = []
        self.latest_texts: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs) -> list[float | None]:
        self.latest_texts = _texts(completions)
        self.latest = self.grader.grade(self.latest_texts, list(answer))
        return self.latest


def _texts(completions) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


class ProcessValueReward:
    """TRL reward function: the PRM's process value of each completion (None where it has none)."""

    def __init__(self, prm: prof.ProcessRewardModel, max_steps: int):
        self.prm, self.max_steps = prm, max_steps
        self.__name__ = "process_value"
        self.latest: list[float | None] = []

    def __call__(self, prompts, completions, problem, **kwargs) -> list[float | None]:
        _, _, values = prof.score_responses(self.prm, list(problem), _texts(completions), self.max_steps)
        self.latest = [None if math.isnan(v) else v for v in values]
        return self.latest


class ProfInLoop:
    """PROF applied to every group of a GRPO step: which rollouts to keep, and their advantages.

    Two halves, so that with several processes each process scores only its own rollouts with the PRM
    (`score`) and every process then decides on the same gathered values (`decide`): the decision is a
    pure function of gathered numbers, hence identical on every process.
    """

    def __init__(self, prm: prof.ProcessRewardModel, remove: int | None = None, min_steps: int = 2,
                 max_steps: int = 30):
        self.prm, self.remove, self.min_steps, self.max_steps = prm, remove, min_steps, max_steps

    def score(self, problems: list[str], completions: list[str]) -> tuple[list[int], list[float]]:
        """Step counts and process values (NaN: no step scored) of these rollouts."""
        n_steps, _, values = prof.score_responses(self.prm, problems, completions, self.max_steps)
        return n_steps, values

    def decide(self, correct: list[bool], values: list[float], n_steps: list[int],
               num_generations: int) -> list[bool]:
        """Keep mask for a batch laid out in groups of `num_generations` (every process's rollouts)."""
        if not len(correct) == len(values) == len(n_steps):
            raise ValueError(f"PROF needs one grade, value and step count per rollout, got {len(correct)}, "
                             f"{len(values)} and {len(n_steps)}")
        if len(correct) % num_generations:
            raise ValueError(f"{len(correct)} rollouts do not split into groups of {num_generations}")
        kept: list[bool] = []
        for start in range(0, len(correct), num_generations):
            group = slice(start, start + num_generations)
            kept += prof.filter_group(correct[group], values[group], n_steps[group], k=self.remove,
                                      min_steps=self.min_steps, max_steps=self.max_steps).kept
        return kept


def kept_advantages(rewards: torch.Tensor, kept: torch.Tensor, num_generations: int,
                    scale_rewards: str = "group") -> torch.Tensor:
    """GRPO advantages computed over the kept rollouts of each group only; 0 for dropped ones.

    Mirrors TRL's normalisation, with TRL's own `nanstd`: (r - group mean) / (std + 1e-4) with the
    Bessel-corrected std of the group (`group`) or of every kept reward in the batch (`batch`), or no
    scaling (`none`). NaN rewards (unscorable) are left out of the statistics and get advantage 0, as
    in TRL; so does a group with a single kept rollout (its std is undefined, its advantage 0).
    """
    masked = torch.where(kept, rewards, torch.full_like(rewards, float("nan"))).view(-1, num_generations)
    mean = torch.nanmean(masked, dim=1, keepdim=True)
    if scale_rewards == "batch":
        std = nanstd(masked.flatten()).expand_as(masked)
    else:
        std = nanstd(masked, dim=1).unsqueeze(1).expand_as(masked)
    advantages = masked - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages.flatten(), nan=0.0)


def prompt_plan(order: str, ordering: Sequence[int], n_rows: int, prompts_per_step: int, steps: int,
                seed: int) -> list[int]:
    """The dataset rows of `steps` steps of K = `prompts_per_step` prompts, in the order steps see them.

    Built epoch by epoch the way TRL's RepeatSampler walks a dataset: `uniform` takes a fresh
    permutation every epoch from a torch Generator seeded with `seed` (the permutations TRL's
    sampler draws with `shuffle_dataset=True` and that seed), `length` and `random` repeat
    `ordering`, and each epoch's tail that does not fill a step is dropped. A set smaller than K is
    cycled to fill one step per epoch. The online orders (`gain_rl`, `online_difficulty`, `dump`)
    replace every step's rows at generation time, so their plan is only a placeholder of the right
    length (the rows in file order).
    """
    if order not in TRAIN_ORDERS:
        raise ValueError(f"order must be one of {', '.join(TRAIN_ORDERS)}, got {order!r}")
    if n_rows < 1 or prompts_per_step < 1 or steps < 0:
        raise ValueError(f"prompt_plan needs rows, K >= 1 and steps >= 0, got {n_rows}, {prompts_per_step}, {steps}")
    k = prompts_per_step
    generator = torch.Generator()
    generator.manual_seed(seed)
    plan: list[int] = []
    while len(plan) < steps * k:
        if order == "uniform":
            epoch = torch.randperm(n_rows, generator=generator).tolist()
        elif order in ONLINE_ORDERS:
            epoch = list(range(n_rows))
        else:
            epoch = [int(i) for i in ordering]
        if len(epoch) < k:
            plan += [epoch[i % len(epoch)] for i in range(k)]
        else:
            plan += epoch[: len(epoch) - len(epoch) % k]
    return plan[: steps * k]


# ---- checkpoints: complete or ignored ---------------------------------------------------------------

_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_step(folder: str | Path) -> int:
    """The global step in a checkpoint folder's name (`checkpoint-12` -> 12)."""
    match = _CHECKPOINT.match(Path(folder).name)
    if not match:
        raise ValueError(f"{folder}: not a checkpoint folder (expected {PREFIX_CHECKPOINT_DIR}-<step>)")
    return int(match[1])


def mark_complete(folder: Path) -> None:
    """Write the completeness marker: every file of the checkpoint and its size (atomic, written last)."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    write_json(folder / COMPLETE, {"step": checkpoint_step(folder), "files": files})


def is_complete(folder: Path) -> bool:
    """True when the marker exists and every file it lists is there with its recorded size.

    Sizes catch a file truncated or deleted after the marker was written (a rotation killed halfway
    through deleting an old checkpoint can leave the marker behind).
    """
    try:
        marker = json.loads((folder / COMPLETE).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return marker.get("step") == checkpoint_step(folder) and bool(files) and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def _checkpoint_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    complete = [p for p in _checkpoint_folders(root) if is_complete(p)]
    return complete[-1] if complete else None


def discard_incomplete(root: Path) -> list[str]:
    """Remove checkpoint folders without a valid marker (a kill interrupted them); return their names."""
    removed = []
    for folder in _checkpoint_folders(root):
        if not is_complete(folder):
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


class CheckpointState(TrainerCallback):
    """Completes every checkpoint the trainer writes: the GAIN-RL state first, the marker last.

    `on_save` runs right after transformers' `_save_checkpoint` has written weights, optimizer,
    scheduler, RNG states and trainer state (and rotated old checkpoints); the barrier makes every
    process's RNG file part of what the marker lists.
    """

    def __init__(self, gain_rl_schedule: GainRLSchedule | None = None, curation_state=None):
        self.gain_rl_schedule = gain_rl_schedule
        self.curation_state = curation_state  # a callable returning the trainer's curation state (JSON)

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if self.gain_rl_schedule is not None:
                write_json(folder / GAIN_RL_STATE, self.gain_rl_schedule.sampler.state_dict())
            if self.curation_state is not None:
                write_json(folder / CURATION_STATE, self.curation_state())
            mark_complete(folder)
        PartialState().wait_for_everyone()


class GainRLSchedule:
    """GAIN-RL's online state: the ranking, the Gaussian sampler and the mu-update constants.

    sigma, n, delta_min and delta_max are fractions of N = len(ranking) (train.gain_rl); they are
    turned into rank positions here, once. mu0 is a rank position.
    """

    def __init__(self, ranking: Sequence[int], sigma: float, mu0: float, n: float, alpha: float, beta: float,
                 delta_min: float, delta_max: float, seed: int, at_end: str):
        self.ranking = list(ranking)
        n_items = len(self.ranking)
        self.sampler = gain_rl.GaussianSampler(n_items=n_items, sigma=sigma * n_items, mu0=mu0, seed=seed,
                                               at_end=at_end)
        self.update_kwargs = dict(n=n * n_items, alpha=alpha, beta=beta, delta_min=delta_min * n_items,
                                  delta_max=delta_max * n_items)

    def draw(self, k: int) -> list[int]:
        return [self.ranking[int(p)] for p in self.sampler.draw(k)]

    def update(self, acc: float, ang: float) -> float:
        return self.sampler.update(acc, ang, **self.update_kwargs)

    @property
    def end_step(self) -> int | None:
        """The training step whose update first took mu to N-1 (None if it never did). One update per
        optimizer step (RLVRGRPOTrainer requires one generation per step with GAIN-RL), so the
        sampler's update count is the step."""
        return self.sampler.end_update


# Per-rollout tensors of TRL's generation output, by how TRL pads them (rlvr.grpo.merge_rollouts).
LEFT_PADDED = ("prompt_ids", "prompt_mask")
RIGHT_PADDED = ("completion_ids", "completion_mask", "old_per_token_logps", "sampling_per_token_logps",
                "ref_per_token_logps", "importance_sampling_ratio", "tool_mask")


@dataclass
class _Rollouts:
    """This process's rollouts of one generation round, in TRL's order: what curation reads."""

    rows: list[int]          # the training-set row of each rollout's prompt
    accuracy: torch.Tensor   # the grader's 1.0 / 0.0, NaN where it gave none
    rewards: torch.Tensor    # (rollouts, reward functions), NaN for None
    texts: list[str]         # completion texts
    problems: list[str]      # the problems (for the PRM)
    advantages: list[float]  # TRL's advantages

    @classmethod
    def of(cls, inputs: list[dict], trainer: RLVRGRPOTrainer, output: dict) -> _Rollouts:
        return cls(rows=[int(row[ROW]) for row in inputs], accuracy=_local(trainer.accuracy_reward),
                   rewards=torch.stack([_local(f) for f in trainer.reward_functions], dim=1),
                   texts=list(trainer.accuracy_reward.latest_texts),
                   problems=[row.get("problem", "") for row in inputs], advantages=output["advantages"].tolist())

    @classmethod
    def select(cls, rounds: list[_Rollouts], picks: list[tuple[int, int]]) -> _Rollouts:
        """The rollouts at `picks` ((round, index) pairs), in that order."""
        return cls(rows=[rounds[r].rows[i] for r, i in picks],
                   accuracy=torch.stack([rounds[r].accuracy[i] for r, i in picks]),
                   rewards=torch.stack([rounds[r].rewards[i] for r, i in picks]),
                   texts=[rounds[r].texts[i] for r, i in picks], problems=[rounds[r].problems[i] for r, i in picks],
                   advantages=[rounds[r].advantages[i] for r, i in picks])


def _pad_rows(rows: list[torch.Tensor], value, left: bool) -> torch.Tensor:
    """Stack rows of different lengths (dim 0 of each), padding on the left or the right with `value`."""
    if rows[0].dim() == 0:
        return torch.stack(rows)
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, row in enumerate(rows):
        if left:
            out[i, width - row.shape[0]:] = row
        else:
            out[i, : row.shape[0]] = row
    return out


def merge_rollouts(outputs: list[dict], picks: list[tuple[int, int]], pad_token_id: int) -> dict:
    """One generation output made of rows of several (rows `picks`: (output index, row) pairs).

    Each output is TRL's `_generate_and_score_completions` result of one round, padded to its own
    widths: prompts are left-padded, completions (and per-token values) right-padded, so rows are
    re-padded to the widest. `num_items_in_batch` is recounted from the merged completion mask (one
    process). A key whose layout is not known here (images, for instance) is an error rather than a
    silent mix-up.
    """
    keys = list(outputs[0])
    if any(list(o) != keys for o in outputs):
        raise RuntimeError(f"generation rounds returned different keys: {[sorted(o) for o in outputs]}")
    merged: dict = {}
    for key in keys:
        if key == "num_items_in_batch":
            continue
        rows = [outputs[r][key][i] for r, i in picks]
        if key == "advantages":
            merged[key] = torch.stack(rows)
        elif key in LEFT_PADDED or key in RIGHT_PADDED:
            value = pad_token_id if key.endswith("_ids") else 0
            merged[key] = _pad_rows(rows, value, left=key in LEFT_PADDED)
        else:
            raise RuntimeError(f"dynamic sampling cannot merge TRL's generation output {key!r} across rounds "
                               "(rlvr.grpo.merge_rollouts knows only text rollouts)")
    merged["num_items_in_batch"] = merged["completion_mask"].sum()
    return merged


class RLVRGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with a prompt order, GAIN-RL, PROF and kill-safe checkpoints (module docstring)."""

    def __init__(self, *args, order: str = "uniform", ordering: Sequence[int] | None = None,
                 gain_rl_schedule: GainRLSchedule | None = None, prof_filter: ProfInLoop | None = None,
                 sampler=None, dynamic_sampling_settings: DynamicSampling | None = None,
                 train_dataset=None, reward_funcs=None, **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if order not in TRAIN_ORDERS:
            raise ValueError(f"order must be one of {', '.join(TRAIN_ORDERS)}, got {order!r}")
        if order in ("length", "random") and not ordering:
            raise ValueError(f"order {order!r} needs the ordering of training rows")
        if order == "gain_rl" and gain_rl_schedule is None:
            raise ValueError("order 'gain_rl' needs a GainRLSchedule")
        if order in ONLINE_ORDERS and order != "gain_rl" and (sampler is None or sampler.offline):
            raise ValueError(f"order {order!r} needs its online sampler (rlvr.curation.build_sampler)")
        stepwise = order in ONLINE_ORDERS or dynamic_sampling_settings is not None
        if stepwise and config is not None and (config.steps_per_generation, config.num_iterations,
                                                config.gradient_accumulation_steps) != (1, 1, 1):
            raise ValueError(f"order {order!r} and dynamic sampling act once per optimizer step: they need "
                             "steps_per_generation, num_iterations and gradient_accumulation_steps of 1 "
                             "(stages.train.grpo_config)")
        if config is None or config.shuffle_dataset:
            raise ValueError("RLVRGRPOTrainer needs a GRPOConfig with shuffle_dataset=False: TRL's sampler "
                             "must walk the prompt plan in order (build it with stages.train.grpo_config)")
        if train_dataset is None:
            raise ValueError("RLVRGRPOTrainer needs a train_dataset")
        if config.max_steps < 1:
            raise ValueError(f"RLVRGRPOTrainer needs GRPOConfig.max_steps >= 1 (its prompt plan covers exactly "
                             f"max_steps steps), got {config.max_steps}")
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        self.accuracy_reward = next((f for f in funcs if isinstance(f, RewardFunction)), None)
        if (prof_filter is not None or order in ONLINE_ORDERS or dynamic_sampling_settings is not None) and \
                self.accuracy_reward is None:
            raise ValueError(f"PROF, the online orders and dynamic sampling need the {REWARD_NAME!r} reward (a "
                             "RewardFunction) to tell correct from incorrect rollouts")
        if prof_filter is not None and not all(isinstance(f, (RewardFunction, ProcessValueReward)) for f in funcs):
            raise ValueError("PROF recomputes the total reward, so every reward must be a RewardFunction or "
                             "a ProcessValueReward")
        self.order = order
        self.gain_rl_schedule = gain_rl_schedule
        self.prof_filter = prof_filter
        self.sampler = sampler if order in ONLINE_ORDERS and order != "gain_rl" else None
        self.dynamic_sampling = dynamic_sampling_settings
        # Extra rounds of dynamic sampling under a plan order draw uniformly from every row, from their own
        # RNG (the plan itself is TRL's to walk); its state is checkpointed.
        self._refill_rng = new_rng(config.seed + 1)
        self.prompt_accuracy: list[tuple[int, int, int, int]] = []  # (step, row, correct, graded)
        self.reward_functions = funcs  # TRL's order: the columns of its rewards and of reward_weights
        if ROW in train_dataset.column_names:
            raise ValueError(f"the training set has a column {ROW!r}; RLVRGRPOTrainer adds it itself")
        train_dataset = train_dataset.add_column(ROW, list(range(len(train_dataset))))
        self.prompt_rows = train_dataset  # online orders draw from the training set itself, not from the plan
        self.curation_metrics: dict[str, list[float]] = defaultdict(list)
        self._gain_rl_acc: float | None = None  # acc of the generation step whose loss step is next
        steps = -(-config.max_steps * config.gradient_accumulation_steps
                  // (config.steps_per_generation * config.num_iterations))
        plan = prompt_plan(order, list(ordering or []), len(train_dataset),
                           config.generation_batch_size // config.num_generations, steps, config.seed)
        super().__init__(*args, train_dataset=train_dataset.select(plan), reward_funcs=reward_funcs, **kwargs)
        self.add_callback(CheckpointState(gain_rl_schedule, self.curation_state_dict))

    # ---- public Trainer surface: resume and log ----------------------------------------------------

    def train(self, resume_from_checkpoint: str | Path | None = None, **kwargs):
        """Trainer.train, after restoring the GAIN-RL state saved in the checkpoint it resumes from."""
        if resume_from_checkpoint is not None and not is_complete(Path(resume_from_checkpoint)):
            raise ValueError(f"{resume_from_checkpoint}: not a complete checkpoint (no valid {COMPLETE})")
        if resume_from_checkpoint is not None and self.gain_rl_schedule is not None:
            state_file = Path(resume_from_checkpoint) / GAIN_RL_STATE
            if not state_file.is_file():
                raise FileNotFoundError(f"{state_file}: resuming a GAIN-RL run needs the sampler state")
            self.gain_rl_schedule.sampler.load_state_dict(json.loads(state_file.read_text()))
            log.info("GAIN-RL state restored from %s (mu = %.2f)", resume_from_checkpoint,
                     self.gain_rl_schedule.sampler.mu)
        if resume_from_checkpoint is not None:
            state_file = Path(resume_from_checkpoint) / CURATION_STATE
            if not state_file.is_file():
                raise FileNotFoundError(f"{state_file}: resuming needs the curation state (sampler, accuracy history)")
            self.load_curation_state_dict(json.loads(state_file.read_text()))
        checkpoint = None if resume_from_checkpoint is None else str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def curation_state_dict(self) -> dict:
        """What a checkpoint keeps of the curation: the online sampler's state, dynamic sampling's refill
        RNG and the per-prompt accuracy history so far (JSON)."""
        return {"sampler": None if self.sampler is None else self.sampler.state_dict(),
                "refill_rng": self._refill_rng.bit_generator.state,
                "prompt_accuracy": [list(row) for row in self.prompt_accuracy]}

    def load_curation_state_dict(self, state: dict) -> None:
        if (state.get("sampler") is None) != (self.sampler is None):
            raise ValueError("the checkpoint's curation state was written with another train.order; resume with "
                             "the same params")
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self._refill_rng.bit_generator.state = state["refill_rng"]
        self.prompt_accuracy = [tuple(int(v) for v in row) for row in state["prompt_accuracy"]]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of every curation metric since the last training log (finite values only).

        A log made in eval mode (rlvr.heldout's points) leaves them for the next training log, as
        TRL's GRPOTrainer.log does with its own training metrics.
        """
        if self.model.training:
            for name, values in self.curation_metrics.items():
                if values:
                    logs[name] = sum(values) / len(values)
            self.curation_metrics.clear()
        super().log(logs, start_time)

    def _record(self, name: str, value) -> None:
        if value is not None and math.isfinite(float(value)):
            self.curation_metrics[name].append(float(value))

    # ---- private TRL hooks (TRL_HOOKS) -------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:  # rlvr.heldout's evaluations and TRL's own: no curation
            return self._scored(inputs)
        if self.order == "gain_rl":
            inputs = self._gain_rl_inputs(inputs)
        elif self.sampler is not None:
            inputs = self._draw_inputs(inputs, self.sampler.draw(self._prompts_per_step()))
        output = self._scored(inputs)
        if self.accuracy_reward is None:  # a custom reward: no curation, no accuracy history
            return output
        step = _Rollouts.of(inputs, self, output)
        generated = [step]  # every round of this step (dynamic sampling adds rounds)
        counts = None
        if self.dynamic_sampling is not None:
            output, step, counts, generated = self._dynamic_sampling_step(output, step)
        if self.order == "gain_rl":
            self._gain_rl_after_grading(output, self._gather_floats(step.accuracy))
        if counts is not None:  # the groups dynamic sampling could not fill the step with carry no loss
            keep = counts.to(output["completion_mask"].device)
            output["completion_mask"] = output["completion_mask"] * keep.unsqueeze(1).to(output["completion_mask"].dtype)
            output["advantages"] = torch.where(keep.to(output["advantages"].device), output["advantages"],
                                               torch.zeros_like(output["advantages"]))
            output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()
        if self.prof_filter is not None:
            self._prof_step(output, step.problems, step.texts, step.rewards)
        self._after_step(generated)
        return output

    def _scored(self, inputs) -> dict:
        """TRL's generation, grading and advantages, with the keys rlvr.grpo relies on checked."""
        output = super()._generate_and_score_completions(inputs)
        missing = [key for key in GENERATION_OUTPUT_KEYS if key not in output]
        if missing:
            raise RuntimeError(f"trl GRPOTrainer._generate_and_score_completions no longer returns {missing}; "
                               "rlvr.grpo needs them (see TRL_HOOKS and tests/test_trl_contract.py)")
        return output

    # ---- curation -----------------------------------------------------------------------------

    def _prompts_per_step(self) -> int:
        """K: prompts per optimizer step over all processes (train.prompts_per_step)."""
        return self.args.generation_batch_size // self.args.num_generations

    def _gain_rl_inputs(self, local_inputs: list[dict]) -> list[dict]:
        """Replace the data loader's rows with the K prompts GAIN-RL draws now, grouped for TRL (see
        `_draw_inputs`)."""
        rows = self.gain_rl_schedule.draw(self._prompts_per_step())
        log.debug("GAIN-RL draw %d: rows %s", self.gain_rl_schedule.sampler.draws, rows)
        return self._draw_inputs(local_inputs, rows)

    def _draw_inputs(self, local_inputs: list[dict], rows: list[int]) -> list[dict]:
        """This process's rollouts of the K prompts `rows`, each repeated num_generations times.

        K = generation_batch_size // num_generations is the number of prompts of the step over all
        processes (train.prompts_per_step; grpo_config splits its rollouts over the processes). Every
        process draws the same K (same seed, same sampler state) and takes its own slice.
        """
        indices = gain_rl.expand_for_trl(rows, self.args.num_generations, 1)
        rank, per_rank = self.accelerator.process_index, len(local_inputs)
        mine = indices[rank * per_rank : (rank + 1) * per_rank]
        return [dict(self.prompt_rows[i]) for i in mine]

    def _gather_floats(self, values: torch.Tensor) -> torch.Tensor:
        """A per-rollout float tensor of this process, gathered over every process in TRL's order."""
        return torch.tensor(gather_object(values.tolist()), dtype=torch.float32)

    def _dynamic_sampling_step(self, output: dict, first: _Rollouts):
        """DAPO dynamic sampling (rlvr.curation.dynamic_sampling.collect) on one process: generate more
        rounds of K prompts until K groups have rewards that differ, or the round cap is hit.

        Returns the step's output (K groups: the informative ones in generation order, then, if short,
        dropped ones as filler), its rollouts, the per-rollout `counts` mask (False for filler) and
        every round's rollouts. Extra rounds draw from the online sampler (online orders) or uniformly
        from every training row (plan orders, from the trainer's own refill RNG).
        """
        k, g = self._prompts_per_step(), self.args.num_generations
        outputs, rounds = [output], [first]

        def generate(round_index: int) -> Groups:
            if round_index:
                if self.order == "gain_rl":
                    rows = self.gain_rl_schedule.draw(k)
                elif self.sampler is not None:
                    rows = self.sampler.draw(k)
                else:
                    rows = sorted(int(i) for i in self._refill_rng.choice(len(self.prompt_rows), size=k,
                                                                            replace=k > len(self.prompt_rows)))
                inputs = self._draw_inputs([{}] * (k * g), rows)
                outputs.append(self._scored(inputs))
                rounds.append(_Rollouts.of(inputs, self, outputs[-1]))
            done = rounds[round_index]
            where = [(round_index, i) for i in range(len(done.rows))]
            return Groups.from_flat(done.rows, done.accuracy.tolist(), g, info={"where": where})

        collected = dynamic_sampling.collect(generate, target=k, max_extra_rounds=self.dynamic_sampling.max_extra_rounds)
        for name, value in collected.stats.items():
            self._record(name, value)
        picks = list(collected.groups.info["where"])
        merged = merge_rollouts(outputs, picks, self.processing_class.pad_token_id)
        counts = torch.from_numpy(np.repeat(collected.counts, g))
        step = _Rollouts.select(rounds, picks)
        return merged, step, counts, rounds

    def _after_step(self, generated: list[_Rollouts]) -> None:
        """The step's bookkeeping over every rollout it generated (all rounds, every process): the
        per-prompt accuracy history, and the online sampler's update (its metrics are logged)."""
        rows = gather_object([(r, a, adv) for part in generated
                              for r, a, adv in zip(part.rows, part.accuracy.tolist(), part.advantages, strict=True)])
        g = self.args.num_generations
        groups = Groups.from_flat([r[0] for r in rows], [None if math.isnan(r[1]) else r[1] for r in rows], g,
                                  advantages=[r[2] for r in rows])
        step = self.state.global_step + 1  # the optimizer step these rollouts train
        tally: dict[int, list[int]] = {}
        for row, rewards in zip(groups.prompts, groups.rewards, strict=True):
            graded = rewards[~np.isnan(rewards)]
            counts = tally.setdefault(row, [0, 0])
            counts[0] += int((graded >= 1.0).sum())
            counts[1] += int(graded.size)
        self.prompt_accuracy += [(step, row, c, n) for row, (c, n) in sorted(tally.items()) if n > 0]
        if self.sampler is not None:
            for name, value in self.sampler.update(StepStats(groups=groups)).items():
                self._record(name, value)
            if self.accelerator.num_processes > 1:  # as for GAIN-RL: a difference is a bug, never ignored
                states = _same_on_every_process(self.sampler.state_dict())
                if states is not None:
                    raise RuntimeError(f"{self.order}: the processes' samplers differ after step {step}")

    def _prof_step(self, output: dict, problems: list[str], completions: list[str], rewards: torch.Tensor) -> None:
        """PROF on this step's groups, gathered over processes; rewrites this process's part of `output`.

        `problems`, `completions` and `rewards` are this process's rollouts, in `output`'s order (`rewards`:
        one column per reward function, in `reward_functions` order). Each process scores its own rollouts
        with the PRM; step counts, values and rewards are gathered in process order (TRL's layout, in which
        a group may span two processes), every process takes the same decision over all groups, and keeps
        its own slice of the advantages and keep mask.
        """
        n_steps, values = self.prof_filter.score(problems, completions)
        rows = gather_object([(s, v, r) for s, v, r in zip(n_steps, values, rewards.tolist(), strict=True)])
        n_steps = [row[0] for row in rows]
        values = [row[1] for row in rows]
        rewards = torch.tensor([row[2] for row in rows], dtype=torch.float32).view(len(rows), -1)
        accuracy = rewards[:, self.reward_functions.index(self.accuracy_reward)]
        correct = (accuracy >= 1.0).tolist()
        kept = self.prof_filter.decide(correct, values, n_steps, self.args.num_generations)
        weights = torch.tensor(self.args.reward_weights or [1.0] * len(self.reward_functions), dtype=torch.float32)
        total = (rewards * weights.unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = float("nan")
        kept_all = torch.tensor(kept)
        advantages = kept_advantages(total, kept_all, self.args.num_generations, self.args.scale_rewards)
        n_local = len(output["advantages"])
        local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        device = output["advantages"].device
        output["advantages"] = advantages[local].to(device=device, dtype=output["advantages"].dtype)
        keep_local = kept_all[local].to(device)
        output["completion_mask"] = output["completion_mask"] * keep_local.unsqueeze(1).to(output["completion_mask"].dtype)
        output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()
        values_t, correct_t = torch.tensor(values), torch.tensor(correct)
        self._record("prof/kept_frac", kept_all.float().mean())
        self._record("prof/kept_correct", (kept_all & correct_t).float().sum())
        self._record("prof/kept_incorrect", (kept_all & ~correct_t).float().sum())
        self._record("prof/dropped_correct", (~kept_all & correct_t).float().sum())
        self._record("prof/dropped_incorrect", (~kept_all & ~correct_t).float().sum())
        if (kept_all & correct_t).any():
            self._record("prof/value_kept_correct", torch.nanmean(values_t[kept_all & correct_t]))
        if (~kept_all & correct_t).any():
            self._record("prof/value_dropped_correct", torch.nanmean(values_t[~kept_all & correct_t]))
        self._record("prof/nan_values", torch.isnan(values_t).float().sum())

    def _gain_rl_after_grading(self, output: dict, accuracy: torch.Tensor) -> None:
        """acc of this step (fraction correct of the rollouts with a parseable gold, over every
        process), kept for the mu update in `compute_loss`; and each rollout's valid tokens (prompt +
        completion, before PROF masks anything) as `output[GAIN_RL_MASK]`, which TRL shuffles and
        splits together with the rollouts themselves."""
        valid = ~torch.isnan(accuracy)
        if not valid.any():
            raise RuntimeError("GAIN-RL: every reward of this step is NaN (no parseable gold answer)")
        self._gain_rl_acc = float((accuracy[valid] >= 1.0).float().mean())
        output[GAIN_RL_MASK] = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1).bool()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss; for GAIN-RL, the loss forward also yields the hidden states of ang (no extra pass)."""
        if not (self.model.training and self.order == "gain_rl"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        captured: list[torch.Tensor] = []
        mlp = self.accelerator.unwrap_model(model).model.layers[-1].mlp
        handle = mlp.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float()))
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("GAIN-RL: the loss forward did not run the last MLP (no hidden states for ang)")
        self._gain_rl_update(torch.cat(captured), inputs[GAIN_RL_MASK])
        return loss

    def _gain_rl_update(self, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """ang = mean over every rollout of every process of `gain_rl.causal_angle` of its valid tokens
        (`hidden`: the last MLP's input, (B, L, d)); then the mu update with this step's acc."""
        acc, self._gain_rl_acc = self._gain_rl_acc, None
        if acc is None:
            raise RuntimeError("GAIN-RL: a loss step without the acc of its generation step")
        local = gain_rl.causal_angle(hidden, mask.to(hidden.device))
        ang = float(self.accelerator.gather(local).mean())
        schedule = self.gain_rl_schedule
        delta = schedule.update(acc, ang)
        log.debug("GAIN-RL update %d on process %d: acc %r, ang %r, mu %r", schedule.sampler.updates,
                  self.accelerator.process_index, acc, ang, schedule.sampler.mu)
        if self.accelerator.num_processes > 1:
            self._gain_rl_check_agreement()
        for name, value in (("mu", schedule.sampler.mu), ("delta", delta), ("acc", acc), ("ang", ang)):
            self._record(f"gain_rl/{name}", value)
        if schedule.end_step is not None and schedule.end_step == schedule.sampler.updates:
            self._record("gain_rl/end_step", schedule.end_step)  # logged once, at the step mu reaches N-1

    def _gain_rl_check_agreement(self) -> None:
        """Fail the step if the processes' GAIN-RL samplers differ (mu, draw and update counts, RNG state).

        They cannot, as long as acc and ang are gathered over every process before the update and the
        draws use the sampler's own seeded RNG: a difference would be a bug that silently trains each
        process on other prompts. One small gather per step.
        """
        sampler = self.gain_rl_schedule.sampler
        states = _same_on_every_process(sampler.state_dict())
        if states is not None:
            raise RuntimeError(f"GAIN-RL: the processes' samplers differ after update {sampler.updates}: mu "
                               f"{[s['mu'] for s in states]}, draws {[s['draws'] for s in states]}")


def _same_on_every_process(state: dict) -> list[dict] | None:
    """None when `state` is the same on every process, else every process's state (in process order)."""
    states = gather_object([json.dumps(state, sort_keys=True)])
    return None if len(set(states)) == 1 else [json.loads(s) for s in states]


def _local(reward: RewardFunction | ProcessValueReward) -> torch.Tensor:
    """A reward function's latest values on this process (NaN where it gave None)."""
    return torch.tensor([math.nan if r is None else float(r) for r in reward.latest], dtype=torch.float32)


class MlflowStepMetrics(TrainerCallback):
    """Sends every numeric training log entry to the active MLflow run, keyed by global step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        mlflow = sys.modules.get("mlflow")  # no MLflow imported means no active run to log to
        if mlflow is None or mlflow.active_run() is None:
            return
        numbers = {k: float(v) for k, v in (logs or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            mlflow.log_metrics(numbers, step=state.global_step)
