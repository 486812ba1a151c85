"""rlvr.grpo: rewards, prompt plans, checkpoint markers, PROF's advantages, one real GRPO step."""

import json

import pytest
import torch
from datasets import Dataset

from rlvr import config, gain_rl, grpo, models
from rlvr.generation import messages
from rlvr.grading import Grader
from rlvr.grpo import RewardFunction, RLVRGRPOTrainer
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


def test_prompt_plan_walks_an_ordering_step_by_step_epoch_by_epoch():
    # K = 2: epoch [5, 3 | 9, 1 | 7] drops the tail 7, then starts again
    assert grpo.prompt_plan("length", [5, 3, 9, 1, 7], 5, prompts_per_step=2, steps=3, seed=0) == [5, 3, 9, 1, 5, 3]
    # a set smaller than K is cycled to fill a step
    assert grpo.prompt_plan("random", [4], 1, prompts_per_step=3, steps=2, seed=0) == [4, 4, 4, 4, 4, 4]
    assert grpo.prompt_plan("gain_rl", [], 3, prompts_per_step=2, steps=2, seed=0) == [0, 1, 0, 1]
    uniform = grpo.prompt_plan("uniform", [], 10, prompts_per_step=4, steps=6, seed=3)
    epochs = [uniform[0:8], uniform[8:16], uniform[16:24]]  # 10 // 4 = 2 steps per epoch
    assert all(len(set(e)) == 8 for e in epochs) and len({tuple(e) for e in epochs}) == 3
    assert uniform == grpo.prompt_plan("uniform", [], 10, prompts_per_step=4, steps=6, seed=3)
    assert uniform != grpo.prompt_plan("uniform", [], 10, prompts_per_step=4, steps=6, seed=4)
    with pytest.raises(ValueError, match="order must be one of"):
        grpo.prompt_plan("shuffled", [], 10, prompts_per_step=4, steps=1, seed=0)


def _fake_checkpoint(root, step, files=("model.safetensors", "optimizer.pt")):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x" * 100)
    return folder


def test_a_checkpoint_is_complete_only_with_its_marker_and_every_file_it_lists(tmp_path):
    folder = _fake_checkpoint(tmp_path, 4)
    assert not grpo.is_complete(folder)  # no marker: a kill came before the end of the write
    grpo.mark_complete(folder)
    assert grpo.is_complete(folder)
    assert json.loads((folder / grpo.COMPLETE).read_text())["files"] == {"model.safetensors": 100, "optimizer.pt": 100}
    (folder / "optimizer.pt").write_bytes(b"x" * 50)  # truncated after the marker
    assert not grpo.is_complete(folder)
    (folder / "optimizer.pt").unlink()  # a rotation killed halfway through deleting the folder
    assert not grpo.is_complete(folder)
    (folder / grpo.COMPLETE).write_text("{")  # unreadable marker
    assert not grpo.is_complete(folder)


def test_the_newest_complete_checkpoint_wins_and_incomplete_ones_go(tmp_path):
    for step in (2, 9, 10):
        grpo.mark_complete(_fake_checkpoint(tmp_path, step))
    _fake_checkpoint(tmp_path, 12)  # being written when the run was killed
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint folder: left alone
    assert grpo.last_complete_checkpoint(tmp_path).name == "checkpoint-10"  # by step, not by name
    assert grpo.discard_incomplete(tmp_path) == ["checkpoint-12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-2", "checkpoint-9", "checkpoint-x"]
    assert grpo.last_complete_checkpoint(tmp_path / "missing") is None
    assert grpo.checkpoint_step(tmp_path / "checkpoint-10") == 10


def _tiny_trainer(tmp_path, order="uniform", ordering=None, reward=None, **kwargs):
    raw = small_params_dict()
    raw["train"].update(max_steps=1, prompts_per_step=2, num_generations=4, max_completion_length=8,
                        learning_rate=1e-2, logging_steps=1, order=order)
    params = config.from_dict(raw)
    tokenizer = models.build_char_tokenizer()
    model = models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 128, seed=0)
    problems = ["Compute 1+2.", "Compute 5-3.", "Compute 2+2.", "Compute 9-1."]
    dataset = Dataset.from_dict({"prompt": [messages(p, params.prompt) for p in problems], "problem": problems,
                                 "answer": ["3", "2", "4", "8"], "id": ["a", "b", "c", "d"]})
    trainer = RLVRGRPOTrainer(model=model, reward_funcs=[reward], args=train.grpo_config(params, str(tmp_path)),
                              train_dataset=dataset, processing_class=tokenizer, order=order, ordering=ordering,
                              **kwargs)
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
    # transformers 5.24 (CPU set) mirrors it into activation_checkpointing; 5.17 (GPU set) has only gradient_checkpointing
    assert cfg.gradient_checkpointing is False and getattr(cfg, "activation_checkpointing", False) is False
    assert cfg.top_k == 0
    # exact resume: every step generates (no buffer across steps), TRL's sampler walks the prompt plan
    assert cfg.steps_per_generation == 1 and cfg.num_iterations == 1 and cfg.shuffle_dataset is False
    assert cfg.save_total_limit >= 2  # the newest complete checkpoint survives the rotation
    assert cfg.per_device_train_batch_size == small_params.train.prompts_per_step * small_params.train.num_generations
    assert cfg.bf16 is False or torch.cuda.is_available()


def test_resume_point_takes_the_newest_complete_checkpoint_of_the_same_unfinished_run(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert train.resume_point(ckpts, "a") is None
    grpo.mark_complete(_fake_checkpoint(ckpts, 10))
    _fake_checkpoint(ckpts, 20)  # a kill inside the write of checkpoint-20
    assert train.resume_point(ckpts, "a") == ckpts / "checkpoint-10"
    assert not (ckpts / "checkpoint-20").exists()  # removed, so it cannot block the next save
    train.mark_finished(ckpts)  # a finished run's checkpoints are not resumed, even with the same params
    assert train.resume_point(ckpts, "a") is None and not (ckpts / "checkpoint-10").exists()
    grpo.mark_complete(_fake_checkpoint(ckpts, 10))
    assert train.resume_point(ckpts, "b") is None  # other params or inputs
    assert not (ckpts / "checkpoint-10").exists()
    assert json.loads((ckpts / train.FINGERPRINT).read_text()) == {"fingerprint": "b"}
    _fake_checkpoint(ckpts, 4)  # only incomplete checkpoints: start over
    assert train.resume_point(ckpts, "b") is None and list(ckpts.iterdir()) == [ckpts / train.FINGERPRINT]
    grpo.mark_complete(_fake_checkpoint(ckpts, 6))
    (ckpts / train.FINGERPRINT).write_text("{")  # unreadable stamp: nothing can be trusted, start over
    assert train.resume_point(ckpts, "b") is None and not (ckpts / "checkpoint-6").exists()


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


def test_prof_in_the_loop_drops_rollouts_from_the_loss(tmp_path, grader):
    # 4 rollouts of one prompt: 2 correct (process values 1.0 and 0.5), 2 incorrect (0.0 and 0.5).
    completions = ["1+2=3\n\n\\boxed{3}", "1+2=4\n\n\\boxed{3}", "1+2=4\n\n\\boxed{4}", "1+2=3\n\n\\boxed{5}"]
    values = {completions[0]: 1.0, completions[1]: 0.5, completions[2]: 0.0, completions[3]: 0.5}
    prm = _ListPRM(values)
    trainer, model = _tiny_trainer(tmp_path, reward=RewardFunction(grader), prof_filter=grpo.ProfInLoop(prm))
    trainer.current_gradient_accumulation_steps = 1
    tokenizer = trainer.processing_class
    batch = _prof_batch(trainer, tokenizer, completions)
    rewards = torch.tensor([[1.0], [1.0], [0.0], [0.0]])  # one column: the accuracy reward
    trainer._prof_step(batch, ["Compute 1+2."] * 4, completions, rewards)
    # 2/2, k = 2: the correct one with the lower value (1) and the incorrect one with the higher (3) go
    assert batch["completion_mask"][1].sum() == 0 and batch["completion_mask"][3].sum() == 0
    assert batch["completion_mask"][0].sum() > 0 and batch["completion_mask"][2].sum() > 0
    kept = torch.tensor([1.0, 0.0])
    expected = (kept - kept.mean()) / (kept.std() + 1e-4)
    torch.testing.assert_close(batch["advantages"], torch.tensor([expected[0], 0.0, expected[1], 0.0]))
    assert batch["num_items_in_batch"] == batch["completion_mask"].sum()
    assert trainer.curation_metrics["prof/dropped_correct"] == [1.0]

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
    with pytest.raises(ValueError, match="PROF, the online orders and dynamic sampling need the .accuracy. reward"):
        _tiny_trainer(tmp_path, reward=_varied_reward, prof_filter=grpo.ProfInLoop(_ListPRM({})))


def test_the_trainer_refuses_a_config_that_shuffles(tmp_path, small_params):
    cfg = train.grpo_config(small_params, str(tmp_path))
    cfg.shuffle_dataset = True
    with pytest.raises(ValueError, match="shuffle_dataset=False"):
        RLVRGRPOTrainer(model=None, reward_funcs=[_varied_reward], args=cfg, train_dataset=None)


def test_gain_rl_samplers_that_differ_between_processes_are_found(monkeypatch):
    # A stand-in for gather_object with 2 processes: this process's state, then the other's.
    mine = gain_rl.GaussianSampler(n_items=10, sigma=2.0, mu0=0.0, seed=0)
    same = gain_rl.GaussianSampler(n_items=10, sigma=2.0, mu0=0.0, seed=0)
    monkeypatch.setattr(grpo, "gather_object", lambda objs: objs + [json.dumps(same.state_dict(), sort_keys=True)])
    assert grpo._same_on_every_process(mine.state_dict()) is None
    same.draw(3)  # same mu, but the other process drew once more: its RNG has moved on
    found = grpo._same_on_every_process(mine.state_dict())
    assert found is not None and [s["draws"] for s in found] == [0, 1]
