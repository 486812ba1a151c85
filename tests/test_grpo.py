import json

import pytest
import torch
from datasets import Dataset

from rlvr import config, models
from rlvr.generation import messages
from rlvr.grading import Grader
from rlvr.grpo import OrderedRepeatSampler, RewardFunction, RLVRGRPOTrainer
from stages import train
from tests.conftest import small_params_dict


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=1, timeout_s=5) as pool:
        yield pool


def test_reward_function_follows_trl_contract(grader):
    reward = RewardFunction(grader)
    completions = [[{"role": "assistant", "content": "1+2=3\n\n\\boxed{3}"}],
                   [{"role": "assistant", "content": "\\boxed{4}"}],
                   [{"role": "assistant", "content": "\\boxed{3}"}]]
    assert reward(prompts=[None] * 3, completions=completions, answer=["3", "3", "\\div"]) == [1.0, 0.0, None]
    assert reward(prompts=[None], completions=["plain text \\boxed{7}"], answer=["7"]) == [1.0]
    assert reward.__name__ == "accuracy"


def test_ordered_sampler_keeps_trl_grouping():
    sampler = OrderedRepeatSampler([5, 3, 9, 1, 7], num_generations=2, prompts_per_step=2, repeat_count=2)
    # chunks of K=2 in the given order, each index twice in a row, each chunk twice; the tail (7) is dropped
    assert list(sampler) == [5, 5, 3, 3, 5, 5, 3, 3, 9, 9, 1, 1, 9, 9, 1, 1]
    assert len(sampler) == len(list(sampler))
    small = OrderedRepeatSampler([4], num_generations=3, prompts_per_step=2, repeat_count=1)
    assert list(small) == [4, 4, 4, 4, 4, 4]


def _tiny_trainer(tmp_path, order="uniform", ordering=None, reward=None, **overrides):
    raw = small_params_dict()
    raw["train"].update(max_steps=1, prompts_per_step=2, num_generations=4, max_completion_length=8,
                        learning_rate=1e-2, logging_steps=1, order=order, **overrides)
    params = config.from_dict(raw)
    tokenizer = models.build_char_tokenizer()
    model = models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 128, seed=0)
    problems = ["Compute 1+2.", "Compute 5-3.", "Compute 2+2.", "Compute 9-1."]
    dataset = Dataset.from_dict({"prompt": [messages(p, params.prompt) for p in problems],
                                 "answer": ["3", "2", "4", "8"], "id": ["a", "b", "c", "d"]})
    trainer = RLVRGRPOTrainer(model=model, reward_funcs=[reward], args=train.grpo_config(params, str(tmp_path)),
                              train_dataset=dataset, processing_class=tokenizer, order=order, ordering=ordering)
    return trainer, model


def _varied_reward(prompts, completions, **kwargs):
    # a reward with spread inside each group, so every advantage is non-zero for a random model
    return [float(len(c[-1]["content"]) % 3) for c in completions]


@pytest.mark.slow
def test_a_grpo_step_changes_every_trainable_parameter(tmp_path):
    trainer, model = _tiny_trainer(tmp_path, reward=_varied_reward)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} unchanged after a GRPO step"


def test_grpo_config_is_cpu_safe(small_params, tmp_path):
    cfg = train.grpo_config(small_params, str(tmp_path))
    assert cfg.gradient_checkpointing is False and cfg.activation_checkpointing is False
    assert cfg.top_k == 0
    assert cfg.per_device_train_batch_size == small_params.train.prompts_per_step * small_params.train.num_generations
    assert cfg.bf16 is False or torch.cuda.is_available()


def test_resume_point_discards_checkpoints_of_other_params(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert train.resume_point(ckpts, "a") is None
    (ckpts / "checkpoint-10").mkdir()
    (ckpts / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert train.resume_point(ckpts, "a").endswith("checkpoint-10")
    assert train.resume_point(ckpts, "b") is None
    assert not (ckpts / "checkpoint-10").exists()
    assert json.loads((ckpts / train.FINGERPRINT).read_text()) == {"fingerprint": "b"}
