"""GRPO with TRL, plus the data orderings this project compares: GAIN-RL, length, random, uniform.

`RLVRGRPOTrainer` is TRL's `GRPOTrainer` with two changes, both about *which prompts* a step sees:

- `order: length | random` walks a fixed ordering of the training prompts (a curriculum), K prompts
  per step, through `OrderedRepeatSampler`, which keeps TRL's grouping contract (each index
  repeated num_generations times in a row, the chunk repeated for num_iterations x
  steps_per_generation, the same sequence on every rank).
- `order: gain_rl` draws the K prompts of every step from the GAIN-RL Gaussian over rank positions
  *at generation time*, with the mu of that moment. (A torch Sampler would be one batch late:
  accelerate's data loader fetches the next batch before the current step runs, so an update of mu
  after step t could only reach step t + 2.) After the rollouts are graded, acc (fraction correct)
  and ang (mean causal angle concentration of each rollout's own tokens at the input of the last
  MLP, one extra no-grad forward pass) move mu, and the next step samples with the new mu. mu and
  the sampler's RNG are saved in every checkpoint and restored on resume.
- `order: uniform` is TRL's own shuffled `RepeatSampler`.

With `prof` set (a `ProfInLoop`), every group of rollouts is filtered by PROF after grading and
before the loss: advantages are recomputed over the kept rollouts only (same normalisation as TRL's
`scale_rewards`), dropped rollouts get advantage 0 and an all-zero completion mask (no loss, no
gradient), and the loss normaliser `num_items_in_batch` is recounted over what is kept.

The reward is the project's one grader (`RewardFunction`), following TRL's reward contract:
one float per completion, `None` where the gold answer cannot be parsed. `ProcessValueReward`
adds the PRM's process value, for PROF's blend baseline (accuracy + w x value).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Sampler
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from rlvr import gain_rl, prof
from rlvr.grading import Grader

log = logging.getLogger(__name__)

GAIN_RL_STATE = "gain_rl_state.json"
REWARD_NAME = "accuracy"  # TRL names the reward column and its logged metrics after the function


class RewardFunction:
    """TRL reward function: 1.0 / 0.0 from the shared grader, None for an unparseable gold answer."""

    def __init__(self, grader: Grader):
        self.grader = grader
        self.__name__ = REWARD_NAME

    def __call__(self, prompts, completions, answer, **kwargs) -> list[float | None]:
        return self.grader.grade(_texts(completions), list(answer))


def _texts(completions) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


class ProcessValueReward:
    """TRL reward function: the PRM's process value of each completion (None where it has none)."""

    def __init__(self, prm: prof.ProcessRewardModel, max_steps: int):
        self.prm, self.max_steps = prm, max_steps
        self.__name__ = "process_value"

    def __call__(self, prompts, completions, problem, **kwargs) -> list[float | None]:
        _, _, values = prof.score_responses(self.prm, list(problem), _texts(completions), self.max_steps)
        return [None if math.isnan(v) else v for v in values]


class ProfInLoop:
    """PROF applied to every group of a GRPO step: which rollouts to keep, and their advantages."""

    def __init__(self, prm: prof.ProcessRewardModel, remove: int | None = None, min_steps: int = 2,
                 max_steps: int = 30):
        self.prm, self.remove, self.min_steps, self.max_steps = prm, remove, min_steps, max_steps

    def decide(self, problems: list[str], completions: list[str], correct: list[bool],
               num_generations: int) -> tuple[list[bool], list[float]]:
        """Keep mask and process values for a batch laid out in groups of `num_generations`."""
        if len(completions) % num_generations:
            raise ValueError(f"{len(completions)} rollouts do not split into groups of {num_generations}")
        n_steps, _, values = prof.score_responses(self.prm, problems, completions, self.max_steps)
        kept: list[bool] = []
        for start in range(0, len(completions), num_generations):
            group = slice(start, start + num_generations)
            kept += prof.filter_group(correct[group], values[group], n_steps[group], k=self.remove,
                                      min_steps=self.min_steps, max_steps=self.max_steps).kept
        return kept, values


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


class OrderedRepeatSampler(Sampler[int]):
    """A fixed ordering of prompt indices, K per step, laid out the way TRL's RepeatSampler does."""

    def __init__(self, order: Sequence[int], num_generations: int, prompts_per_step: int, repeat_count: int):
        if not order:
            raise ValueError("OrderedRepeatSampler needs a non-empty ordering")
        self.order = list(order)
        self.num_generations = num_generations
        self.prompts_per_step = prompts_per_step
        self.repeat_count = repeat_count

    def __iter__(self):
        k = self.prompts_per_step
        usable = len(self.order) - len(self.order) % k if len(self.order) >= k else 0
        if usable == 0:  # fewer prompts than one step needs: cycle through them
            chunk = [self.order[i % len(self.order)] for i in range(k)]
            yield from gain_rl.expand_for_trl(chunk, self.num_generations, self.repeat_count)
            return
        for start in range(0, usable, k):
            yield from gain_rl.expand_for_trl(self.order[start : start + k], self.num_generations, self.repeat_count)

    def __len__(self) -> int:
        k = self.prompts_per_step
        steps = max(len(self.order) // k, 1)
        return steps * k * self.num_generations * self.repeat_count


class GainRLSchedule:
    """GAIN-RL's online state: the ranking, the Gaussian sampler and the mu-update constants."""

    def __init__(self, ranking: Sequence[int], sigma: float, mu0: float, n: float, alpha: float, beta: float,
                 delta_min: float, delta_max: float, seed: int):
        self.ranking = list(ranking)
        self.sampler = gain_rl.GaussianSampler(n_items=len(self.ranking), sigma=sigma, mu0=mu0, seed=seed)
        self.update_kwargs = dict(n=n, alpha=alpha, beta=beta, delta_min=delta_min, delta_max=delta_max)

    def draw(self, k: int) -> list[int]:
        return [self.ranking[int(p)] for p in self.sampler.draw(k)]

    def update(self, acc: float, ang: float) -> float:
        return self.sampler.update(acc, ang, **self.update_kwargs)


class RLVRGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, order: str = "uniform", ordering: Sequence[int] | None = None,
                 gain_rl_schedule: GainRLSchedule | None = None, prof_filter: ProfInLoop | None = None, **kwargs):
        if order not in ("uniform", "length", "random", "gain_rl"):
            raise ValueError(f"order must be uniform, length, random or gain_rl, got {order!r}")
        if order in ("length", "random") and not ordering:
            raise ValueError(f"order {order!r} needs the ordering of training rows")
        if order == "gain_rl" and gain_rl_schedule is None:
            raise ValueError("order 'gain_rl' needs a GainRLSchedule")
        self.order = order
        self.ordering = list(ordering or [])
        self.gain_rl_schedule = gain_rl_schedule
        self.prof_filter = prof_filter
        super().__init__(*args, **kwargs)
        if prof_filter is not None and REWARD_NAME not in self.reward_func_names:
            raise ValueError(f"PROF needs the {REWARD_NAME!r} reward to tell correct from incorrect rollouts")

    # ---- which prompts a step sees -------------------------------------------------------------

    def _get_train_sampler(self, dataset=None):
        if self.order in ("length", "random"):
            return OrderedRepeatSampler(
                self.ordering,
                num_generations=self.num_generations,
                prompts_per_step=self.args.generation_batch_size // self.num_generations,
                repeat_count=self.num_iterations * self.args.steps_per_generation,
            )
        return super()._get_train_sampler(dataset)

    def _gain_rl_inputs(self, local_inputs: list[dict]) -> list[dict]:
        """Replace the data loader's rows with the K prompts GAIN-RL draws now, grouped for TRL."""
        k = self.args.generation_batch_size // self.num_generations
        indices = gain_rl.expand_for_trl(self.gain_rl_schedule.draw(k), self.num_generations, 1)
        rank, per_rank = self.accelerator.process_index, len(local_inputs)
        mine = indices[rank * per_rank : (rank + 1) * per_rank]
        return [dict(self.train_dataset[i]) for i in mine]

    def _generate_and_score_completions(self, inputs):
        gain = self.model.training and self.order == "gain_rl"
        if gain:
            inputs = self._gain_rl_inputs(inputs)
        output = super()._generate_and_score_completions(inputs)
        if gain:
            self._gain_rl_step(output)
        if self.model.training and self.prof_filter is not None:
            n_all = len(output["advantages"]) * self.accelerator.num_processes
            rewards = {name: list(self._logs["rewards"][name])[-n_all:] for name in self.reward_func_names}
            completions = _texts(list(self._logs["completion"])[-n_all:])
            problems = gather_object([row["problem"] for row in inputs])
            self._prof_step(output, problems, completions, rewards)
        return output

    def _prof_step(self, output: dict, problems: list[str], completions: list[str],
                   rewards: dict[str, list[float]]) -> None:
        """PROF on this step's groups (gathered over processes); rewrites this process's part of `output`."""
        accuracy = torch.tensor(rewards[REWARD_NAME], dtype=torch.float32)
        correct = (accuracy >= 1.0).tolist()
        kept, values = self.prof_filter.decide(problems, completions, correct, self.num_generations)
        per_func = torch.tensor([rewards[name] for name in self.reward_func_names], dtype=torch.float32).T
        total = (per_func * self.reward_weights.cpu().unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(per_func).all(dim=1)] = float("nan")
        kept_all = torch.tensor(kept)
        advantages = kept_advantages(total, kept_all, self.num_generations, self.scale_rewards)
        n_local = len(output["advantages"])
        local = slice(self.accelerator.process_index * n_local, (self.accelerator.process_index + 1) * n_local)
        device = output["advantages"].device
        output["advantages"] = advantages[local].to(device=device, dtype=output["advantages"].dtype)
        keep_local = kept_all[local].to(device)
        output["completion_mask"] = output["completion_mask"] * keep_local.unsqueeze(1).to(output["completion_mask"].dtype)
        output["num_items_in_batch"] = self.accelerator.gather(output["completion_mask"].sum()).sum()
        values_t, correct_t = torch.tensor(values), torch.tensor(correct)
        stats = {
            "kept_frac": kept_all.float().mean(),
            "kept_correct": (kept_all & correct_t).float().sum(),
            "kept_incorrect": (kept_all & ~correct_t).float().sum(),
            "dropped_correct": (~kept_all & correct_t).float().sum(),
            "dropped_incorrect": (~kept_all & ~correct_t).float().sum(),
            "value_kept_correct": torch.nanmean(values_t[kept_all & correct_t]) if (kept_all & correct_t).any() else None,
            "value_dropped_correct": (torch.nanmean(values_t[~kept_all & correct_t])
                                      if (~kept_all & correct_t).any() else None),
            "nan_values": torch.isnan(values_t).float().sum(),
        }
        for name, value in stats.items():
            if value is not None and math.isfinite(float(value)):
                self._metrics["train"][f"prof/{name}"].append(float(value))

    def _gain_rl_step(self, output: dict) -> None:
        """acc and ang of this step's rollouts, then the mu update (same values on every rank)."""
        # TRL keeps the gathered rewards of the latest generation batch at the end of this log.
        n_rollouts = len(output["advantages"]) * self.accelerator.num_processes
        if REWARD_NAME not in self.reward_func_names:
            raise RuntimeError(f"GAIN-RL needs the {REWARD_NAME!r} reward; got {self.reward_func_names}")
        rewards = torch.tensor(list(self._logs["rewards"][REWARD_NAME])[-n_rollouts:])
        valid = ~torch.isnan(rewards)
        if not valid.any():
            raise RuntimeError("GAIN-RL: every reward of this step is NaN (no parseable gold answer)")
        acc = float((rewards[valid] >= 1.0).float().mean())
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1).bool()
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            hidden = gain_rl.mlp_inputs(model, ids, mask.long(), stop_early=True)
            local = gain_rl.causal_angle(hidden, mask)
        ang = float(self.accelerator.gather(local.mean().reshape(1)).mean())
        delta = self.gain_rl_schedule.update(acc, ang)
        for name, value in (("mu", self.gain_rl_schedule.sampler.mu), ("delta", delta), ("acc", acc), ("ang", ang)):
            self._metrics["train"][f"gain_rl/{name}"].append(float(value))

    # ---- sampling speed ---------------------------------------------------------------------------

    def _generate_single_turn(self, *args, **kwargs):
        """Sample with the module in eval mode, then restore training mode.

        Measured here with transformers 5.24 on CPU: `generate` on a module left in training mode ran
        several times slower for the same batch (no effect on what is sampled: dropout is 0 in
        Qwen2, and any dropout would be wrong at sampling time anyway).
        """
        module = self.accelerator.unwrap_model(self.model)
        was_training = module.training
        module.eval()
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            module.train(was_training)

    # ---- checkpoints carry the GAIN-RL state ---------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.gain_rl_schedule is not None and self.accelerator.is_main_process:
            path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}" / GAIN_RL_STATE
            path.write_text(json.dumps(self.gain_rl_schedule.sampler.state_dict()))

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if self.gain_rl_schedule is not None and checkpoint is not None:
            state_file = Path(checkpoint) / GAIN_RL_STATE
            if not state_file.is_file():
                raise FileNotFoundError(f"{state_file}: resuming a GAIN-RL run needs the sampler state")
            self.gain_rl_schedule.sampler.load_state_dict(json.loads(state_file.read_text()))
            log.info("GAIN-RL state restored from %s (mu = %.2f)", checkpoint, self.gain_rl_schedule.sampler.mu)


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
