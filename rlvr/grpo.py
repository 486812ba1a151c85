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

The reward is the project's one grader (`RewardFunction`), following TRL's reward contract:
one float per completion, `None` where the gold answer cannot be parsed.
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
from transformers import TrainerCallback
from trl import GRPOTrainer

from rlvr import gain_rl
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
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return self.grader.grade(texts, list(answer))


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
                 gain_rl_schedule: GainRLSchedule | None = None, **kwargs):
        if order not in ("uniform", "length", "random", "gain_rl"):
            raise ValueError(f"order must be uniform, length, random or gain_rl, got {order!r}")
        if order in ("length", "random") and not ordering:
            raise ValueError(f"order {order!r} needs the ordering of training rows")
        if order == "gain_rl" and gain_rl_schedule is None:
            raise ValueError("order 'gain_rl' needs a GainRLSchedule")
        self.order = order
        self.ordering = list(ordering or [])
        self.gain_rl_schedule = gain_rl_schedule
        super().__init__(*args, **kwargs)

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
        training = self.model.training and self.order == "gain_rl"
        if training:
            inputs = self._gain_rl_inputs(inputs)
        output = super()._generate_and_score_completions(inputs)
        if training:
            self._gain_rl_step(output)
        return output

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
