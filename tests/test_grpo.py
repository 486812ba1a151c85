import json

import pytest
import torch
from datasets import Dataset

from rlvr import config, grpo, models
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
    train.mark_complete(ckpts)  # a finished run's checkpoints are not resumed, even with the same params
    assert train.resume_point(ckpts, "a") is None and not (ckpts / "checkpoint-10").exists()
    (ckpts / "checkpoint-10").mkdir()
    (ckpts / "checkpoint-10" / "trainer_state.json").write_text("{}")
    assert train.resume_point(ckpts, "b") is None
    assert not (ckpts / "checkpoint-10").exists()
    assert json.loads((ckpts / train.FINGERPRINT).read_text()) == {"fingerprint": "b"}


def test_kept_advantages_are_renormalised_over_the_kept_rollouts():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    kept = torch.tensor([True, False, True, True, True, True, False, False])
    adv = grpo.kept_advantages(rewards, kept, num_generations=4)
    # group 1 keeps [1, 0, 0]: mean 1/3, Bessel std sqrt(1/3); group 2 keeps [1, 0]: mean 1/2, std sqrt(1/2)
    s1, s2 = (1 / 3) ** 0.5 + 1e-4, 0.5**0.5 + 1e-4
    expected = [(2 / 3) / s1, 0.0, (-1 / 3) / s1, (-1 / 3) / s1, 0.5 / s2, -0.5 / s2, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected))
    unscaled = grpo.kept_advantages(rewards, kept, num_generations=4, scale_rewards="none")
    torch.testing.assert_close(unscaled[:4], torch.tensor([2 / 3, 0.0, -1 / 3, -1 / 3]))
    all_kept = grpo.kept_advantages(rewards, torch.ones(8, dtype=torch.bool), num_generations=4)
    assert all_kept[:2].gt(0).all() and all_kept[2:4].lt(0).all()
    nan = grpo.kept_advantages(torch.tensor([1.0, float("nan"), 0.0, 0.0]), torch.ones(4, dtype=torch.bool), 4)
    assert nan[1] == 0.0 and torch.isfinite(nan).all()


class _ListPRM:
    """A PRM that returns fixed process values per completion text (one step score = the value)."""

    def __init__(self, values: dict[str, float]):
        self.values = values

    def step_scores(self, problems, steps):
        return [[self.values["\n\n".join(s)]] * len(s) for s in steps]


def _prof_batch(trainer, tokenizer, completions):
    prompt = tokenizer(["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"] * len(completions),
                       return_tensors="pt", add_special_tokens=False)
    comp = tokenizer(completions, return_tensors="pt", padding=True, add_special_tokens=False)
    comp_mask = comp["attention_mask"]
    return {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
            "completion_ids": comp["input_ids"].clone(), "completion_mask": comp_mask.clone(),
            "advantages": torch.zeros(len(completions)), "num_items_in_batch": comp_mask.sum()}


def _grads(trainer, model, batch):
    model.zero_grad()
    trainer._compute_loss(model, batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_prof_in_the_loop_drops_rollouts_from_the_loss(tmp_path):
    # 4 rollouts of one prompt: 2 correct (process values 1.0 and 0.5), 2 incorrect (0.0 and 0.5).
    completions = ["1+2=3\n\n\\boxed{3}", "1+2=4\n\n\\boxed{3}", "1+2=4\n\n\\boxed{4}", "1+2=3\n\n\\boxed{5}"]
    values = {completions[0]: 1.0, completions[1]: 0.5, completions[2]: 0.0, completions[3]: 0.5}
    prm = _ListPRM(values)
    trainer, model = _tiny_trainer(tmp_path, reward=_varied_reward)
    trainer.prof_filter = grpo.ProfInLoop(prm)
    trainer.reward_func_names = [grpo.REWARD_NAME]
    trainer.current_gradient_accumulation_steps = 1
    tokenizer = trainer.processing_class
    batch = _prof_batch(trainer, tokenizer, completions)
    rewards = {grpo.REWARD_NAME: [1.0, 1.0, 0.0, 0.0]}
    trainer._prof_step(batch, ["Compute 1+2."] * 4, completions, rewards)
    # 2/2, k = 2: the correct one with the lower value (1) and the incorrect one with the higher (3) go
    assert batch["completion_mask"][1].sum() == 0 and batch["completion_mask"][3].sum() == 0
    assert batch["completion_mask"][0].sum() > 0 and batch["completion_mask"][2].sum() > 0
    kept = torch.tensor([1.0, 0.0])
    expected = (kept - kept.mean()) / (kept.std() + 1e-4)
    torch.testing.assert_close(batch["advantages"], torch.tensor([expected[0], 0.0, expected[1], 0.0]))
    assert batch["num_items_in_batch"] == batch["completion_mask"].sum()
    assert trainer._metrics["train"]["prof/dropped_correct"][-1] == 1.0

    # The dropped completions' tokens do not matter: replacing them leaves every gradient unchanged.
    model.train()
    with_dropped = _grads(trainer, model, batch)
    altered = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    altered["completion_ids"][1] = torch.randint(10, 40, altered["completion_ids"][1].shape)
    altered["completion_ids"][3] = torch.randint(10, 40, altered["completion_ids"][3].shape)
    without = _grads(trainer, model, altered)
    assert with_dropped.keys() == without.keys() and with_dropped
    for name in with_dropped:
        torch.testing.assert_close(with_dropped[name], without[name], rtol=0, atol=0)
    # ... whereas in a batch where row 1 is kept, changing its tokens changes the gradient.
    kept_row = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    kept_row["completion_mask"][1] = kept_row["completion_mask"][0][: kept_row["completion_mask"].shape[1]]
    kept_row["advantages"][1] = 1.0
    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in kept_row.items()}
    changed["completion_ids"][1] = altered["completion_ids"][1]
    a, b = _grads(trainer, model, kept_row), _grads(trainer, model, changed)
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_prof_needs_the_accuracy_reward(tmp_path):
    with pytest.raises(ValueError, match="PROF needs"):
        raw = small_params_dict()
        params = config.from_dict(raw)
        tokenizer = models.build_char_tokenizer()
        model = models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 128, seed=0)
        dataset = Dataset.from_dict({"prompt": [messages("Compute 1+2.", params.prompt)] * 4, "answer": ["3"] * 4})
        RLVRGRPOTrainer(model=model, reward_funcs=[_varied_reward], args=train.grpo_config(params, str(tmp_path)),
                        train_dataset=dataset, processing_class=tokenizer, prof_filter=grpo.ProfInLoop(_ListPRM({})))
