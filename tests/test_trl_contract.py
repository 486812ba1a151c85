"""The installed TRL still offers what rlvr.grpo relies on.

Each private TRL function in `rlvr.grpo.TRL_HOOKS` gets a test that fails with a message naming
the hook and the installed TRL version when the function is gone or its parameters changed. Two
more tests keep the list honest (every private TRL method the trainer overrides is listed) and pin
the behaviour of TRL's public pieces the trainer builds on: the sampler that walks the prompt plan,
the config fields it sets, and what one generation step returns.
"""

import importlib
import inspect

import pytest
import torch
import trl
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler

from rlvr import grpo

TRL = f"the installed TRL {trl.__version__}"


def _resolve(hook: grpo.TrlHook):
    owner = GRPOTrainer if hook.owner == "GRPOTrainer" else importlib.import_module(hook.owner)
    return getattr(owner, hook.name, None)


@pytest.mark.parametrize("hook", grpo.TRL_HOOKS, ids=lambda h: f"{h.owner}.{h.name}")
def test_every_private_trl_hook_is_still_there_with_its_parameters(hook):
    where = f"trl {hook.owner}.{hook.name}"
    function = _resolve(hook)
    assert function is not None, (
        f"rlvr.grpo relies on {where}, which {TRL} no longer has ({hook.why}); "
        "update rlvr/grpo.py and its TRL_HOOKS, or pin the TRL version it was written for")
    found = tuple(name for name in inspect.signature(function).parameters if name != "self")
    assert found == hook.parameters, (
        f"rlvr.grpo relies on {where}({', '.join(hook.parameters)}), which changed its signature in {TRL} "
        f"to ({', '.join(found)}); check what rlvr/grpo.py does with it ({hook.why})")


def test_every_private_trl_method_the_trainer_overrides_is_listed():
    listed = {h.name for h in grpo.TRL_HOOKS if h.owner == "GRPOTrainer"}
    overridden = {name for name in vars(grpo.RLVRGRPOTrainer)
                  if name.startswith("_") and not name.startswith("__") and hasattr(GRPOTrainer, name)}
    assert overridden == listed, (
        f"RLVRGRPOTrainer overrides private TRL methods {sorted(overridden - listed)} missing from TRL_HOOKS, "
        f"or TRL_HOOKS lists {sorted(listed - overridden)} it no longer overrides")


def test_trl_config_has_the_fields_the_trainer_sets():
    fields = ("shuffle_dataset", "steps_per_generation", "num_iterations", "generation_batch_size",
              "reward_weights", "scale_rewards", "num_generations")
    missing = [f for f in fields if f not in GRPOConfig.__dataclass_fields__]
    assert not missing, f"rlvr.grpo and stages/train.py set GRPOConfig fields {missing}, which {TRL} no longer has"


def test_trl_repeat_sampler_walks_an_unshuffled_plan_in_order_and_draws_uniform_like_prompt_plan():
    # shuffle=False: each index num_generations times, K per chunk, in the order given
    sampler = RepeatSampler(list(range(4)), mini_repeat_count=2, batch_size=2, repeat_count=1, shuffle=False)
    assert list(sampler) == [0, 0, 1, 1, 2, 2, 3, 3], f"{TRL}'s RepeatSampler no longer walks a dataset in order"
    # shuffle=True with a seed: the per-epoch permutations prompt_plan("uniform") writes down up front
    shuffled = RepeatSampler(list(range(10)), mini_repeat_count=1, batch_size=4, repeat_count=1, shuffle=True, seed=3)
    three_epochs = list(shuffled) + list(shuffled) + list(shuffled)
    assert three_epochs == grpo.prompt_plan("uniform", [], 10, prompts_per_step=4, steps=6, seed=3), (
        f"{TRL}'s RepeatSampler shuffles differently from rlvr.grpo.prompt_plan: `train.order: uniform` "
        "would no longer draw what TRL draws")


@pytest.mark.slow
def test_trl_generation_step_returns_what_prof_and_gain_rl_rewrite(tmp_path):
    from tests.test_grpo import _tiny_trainer, _varied_reward

    trainer, model = _tiny_trainer(tmp_path, reward=_varied_reward)
    model.train()
    inputs = [dict(trainer.train_dataset[i // 4]) for i in range(8)]  # 2 prompts x 4 generations, grouped
    output = GRPOTrainer._generate_and_score_completions(trainer, inputs)
    missing = [key for key in grpo.GENERATION_OUTPUT_KEYS if key not in output]
    assert not missing, (f"trl GRPOTrainer._generate_and_score_completions in {TRL} no longer returns {missing}, "
                         "which PROF and GAIN-RL read and rewrite")
    assert output["advantages"].shape == (8,) and output["completion_mask"].shape[0] == 8
    assert output["num_items_in_batch"] == output["completion_mask"].sum()
    assert torch.equal(output["prompt_mask"].sum(1) > 0, torch.ones(8, dtype=torch.bool))
