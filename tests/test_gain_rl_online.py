"""GAIN-RL online inside GRPO: params as fractions of N, K per step over all processes, the mu step
of a real (tiny) trainer with mu clipped and the end step recorded."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig

from rlvr import config, gain_rl, models
from rlvr.config import ConfigError
from rlvr.generation import messages
from rlvr.grpo import GAIN_RL_MASK, GainRLSchedule, RewardFunction, RLVRGRPOTrainer
from stages import train
from tests.conftest import small_params_dict

PROBLEMS = ["Compute 1+2.", "Compute 5-3.", "Compute 2+2.", "Compute 9-1."]


def test_schedule_turns_fractions_of_n_into_rank_positions():
    # N = 200: sigma 0.1 -> 20 positions, n 0.005 -> 1, delta bounds 0.01 / 0.02 -> 2 / 4; mu0 is a position
    schedule = GainRLSchedule(list(range(200)), sigma=0.1, mu0=7.0, n=0.005, alpha=2.0, beta=0.5,
                              delta_min=0.01, delta_max=0.02, seed=0, at_end="uniform")
    assert schedule.sampler.sigma == pytest.approx(20.0) and schedule.sampler.mu == 7.0
    assert schedule.sampler.at_end == "uniform"
    assert schedule.update_kwargs == pytest.approx(dict(n=1.0, alpha=2.0, beta=0.5, delta_min=2.0, delta_max=4.0))
    # 1 tanh(2 (0.9 - 0.5)) + 1 tanh(2 * 0.1) = 0.664037 + 0.197375 = 0.861412 < delta_min 2: moves 2
    assert schedule.update(0.9, 0.1) == pytest.approx(2.0) and schedule.sampler.mu == pytest.approx(9.0)
    assert schedule.end_step is None


def test_stage_builds_the_schedule_from_params():
    raw = small_params_dict()
    raw["train"]["gain_rl"].update(sigma=0.25, n=0.5, delta_min=0.0, delta_max=1.0, mu0=3.0, at_end="uniform")
    params = config.from_dict(raw)
    schedule = train.gain_rl_schedule(params, [9, 4, 7, 1])  # N = 4
    assert schedule.ranking == [9, 4, 7, 1] and schedule.sampler.n_items == 4
    assert schedule.sampler.sigma == 1.0 and schedule.sampler.mu == 3.0 and schedule.sampler.at_end == "uniform"
    assert schedule.update_kwargs["n"] == 2.0 and schedule.update_kwargs["delta_max"] == 4.0
    # mu0 = 3 = N - 1: already at the end, reported as step 0
    assert schedule.end_step == 0
    assert set(schedule.draw(2)) <= {9, 4, 7, 1}


@pytest.fixture
def two_processes(monkeypatch):
    """What grpo_config and TRL's GRPOConfig see under `torchrun --nproc_per_node 2`, in one process."""
    monkeypatch.setattr(train, "world_size", lambda: 2)
    monkeypatch.setattr(GRPOConfig, "world_size", property(lambda self: 2))


def test_k_is_per_step_over_all_processes(small_params, tmp_path, two_processes):
    t = small_params.train  # K = 4 prompts x G = 4 generations
    cfg = train.grpo_config(small_params, str(tmp_path))
    assert cfg.per_device_train_batch_size == t.prompts_per_step * t.num_generations // 2 == 8
    # what RLVRGRPOTrainer draws per step (GAIN-RL's K, and the prompt plan's K)
    assert cfg.generation_batch_size // cfg.num_generations == t.prompts_per_step


def test_rollouts_that_do_not_split_over_the_processes_are_one_clear_error(tmp_path, monkeypatch):
    raw = small_params_dict()
    raw["train"].update(prompts_per_step=3, num_generations=3)
    monkeypatch.setattr(train, "world_size", lambda: 2)
    with pytest.raises(ConfigError) as caught:
        train.grpo_config(config.from_dict(raw), str(tmp_path))
    message = str(caught.value)
    assert message.startswith("train.prompts_per_step x train.num_generations = 3 x 3 = 9 rollouts per step "
                              "do not split over 2 processes")
    assert "\n" not in message
    assert train.per_device_rollouts(3, 3, 1) == 9 and train.per_device_rollouts(4, 8, 4) == 8


def _gain_rl_trainer(tmp_path, grader, gain_rl_params: dict, **config_changes):
    raw = small_params_dict()
    raw["train"].update(max_steps=1, prompts_per_step=2, num_generations=4, max_completion_length=8,
                        logging_steps=1, order="gain_rl")
    raw["train"]["gain_rl"].update(gain_rl_params)
    params = config.from_dict(raw)
    tokenizer = models.build_char_tokenizer()
    model = models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 128, seed=0)
    dataset = Dataset.from_dict({"prompt": [messages(p, params.prompt) for p in PROBLEMS], "problem": PROBLEMS,
                                 "answer": ["3", "2", "4", "8"], "id": ["a", "b", "c", "d"]})
    args = train.grpo_config(params, str(tmp_path))
    for key, value in config_changes.items():
        setattr(args, key, value)
    ranking = [2, 0, 3, 1]
    return RLVRGRPOTrainer(model=model, reward_funcs=[RewardFunction(grader)], args=args, train_dataset=dataset,
                           processing_class=tokenizer, order="gain_rl", ordering=ranking,
                           gain_rl_schedule=train.gain_rl_schedule(params, ranking))


@pytest.fixture(scope="module")
def grader():
    from rlvr.grading import Grader

    with Grader(workers=1, timeout_s=5) as pool:
        yield pool


def _step_output(tokenizer):
    """Two prompts x 4 rollouts, right-padded completions of different lengths (as TRL returns them)."""
    prompt = tokenizer(["<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"] * 8,
                       return_tensors="pt", add_special_tokens=False)
    completions = ["1+2=3\n\n\\boxed{3}", "\\boxed{4}", "1+2=3", "\\boxed{3}"] * 2
    tokenizer.padding_side = "right"
    comp = tokenizer(completions, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
            "completion_ids": comp["input_ids"], "completion_mask": comp["attention_mask"]}


def _gain_rl_step(trainer, output, accuracy, hidden):
    """What one GRPO step does for GAIN-RL: acc after grading, ang and the mu update after the loss forward."""
    trainer._gain_rl_after_grading(output, accuracy)
    assert output[GAIN_RL_MASK].dtype == torch.bool and output[GAIN_RL_MASK].shape == hidden.shape[:2]
    trainer._gain_rl_update(hidden, output[GAIN_RL_MASK])


def test_a_gain_rl_step_moves_mu_by_the_spec_and_clips_it_at_the_end(tmp_path, grader):
    # N = 4. n = 0.25 N = 1 position, delta in [0, 1]: a step moves mu by at most 1.
    trainer = _gain_rl_trainer(tmp_path, grader, dict(sigma=0.5, n=0.25, delta_min=0.0, delta_max=0.25, mu0=0.0))
    output = _step_output(trainer.processing_class)
    accuracy = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, float("nan"), 1.0, 0.0])  # 5 of 7 gradable correct
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1).bool()
    hidden = gain_rl.mlp_inputs(trainer.model, ids, mask.long())
    ang = float(gain_rl.causal_angle(hidden, mask).mean())
    assert 0.0 < ang < 1.0
    want = min(max(math.tanh(2 * (5 / 7 - 0.5)) + math.tanh(2 * ang), 0.0), 1.0)

    _gain_rl_step(trainer, output, accuracy, hidden)
    sampler = trainer.gain_rl_schedule.sampler
    assert sampler.mu == pytest.approx(want, abs=1e-5)
    assert trainer.curation_metrics["gain_rl/acc"] == [pytest.approx(5 / 7)]
    assert trainer.curation_metrics["gain_rl/ang"] == [pytest.approx(ang, abs=1e-5)]
    assert "gain_rl/end_step" not in trainer.curation_metrics

    for _ in range(5):  # at most 1 position a step: the end (3) is reached and never passed
        _gain_rl_step(trainer, output, accuracy, hidden)
        assert sampler.mu <= 3.0
    assert sampler.mu == 3.0 and trainer.gain_rl_schedule.end_step is not None
    end = trainer.gain_rl_schedule.end_step
    assert trainer.curation_metrics["gain_rl/end_step"] == [end]  # logged once, at that step
    assert trainer.curation_metrics["gain_rl/mu"][end - 1:] == [3.0] * (6 - end + 1)


def test_gain_rl_inputs_are_k_distinct_prompts_in_groups(tmp_path, grader):
    trainer = _gain_rl_trainer(tmp_path, grader, dict(sigma=1.0, n=0.25, delta_min=0.0, delta_max=0.25))
    rows = trainer._gain_rl_inputs([{}] * 8)  # this process's 8 rollouts = K 2 x G 4
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == 2 and ids[:4] == [ids[0]] * 4 and ids[4:] == [ids[4]] * 4


def test_gain_rl_needs_one_generation_per_optimizer_step(tmp_path, grader):
    with pytest.raises(ValueError, match="act once per optimizer step"):
        _gain_rl_trainer(tmp_path, grader, {}, gradient_accumulation_steps=2)


def test_ang_comes_from_the_loss_forward_with_no_pass_of_its_own(tmp_path, grader, monkeypatch):
    """Two real GRPO steps: no separate forward runs for ang (mlp_inputs is never called), and the ang
    each step logs equals a separate pass over the same rollouts with the same (pre-update) weights."""
    trainer = _gain_rl_trainer(tmp_path, grader, dict(sigma=0.5, n=0.25, delta_min=0.0, delta_max=0.25),
                               max_steps=2)
    separate_pass = gain_rl.mlp_inputs
    monkeypatch.setattr(gain_rl, "mlp_inputs", lambda *a, **k: pytest.fail("GAIN-RL ran a forward of its own"))
    expected = []
    real_compute_loss = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = inputs[GAIN_RL_MASK]
        hidden = separate_pass(trainer.model, ids, mask.long())
        expected.append(float(gain_rl.causal_angle(hidden, mask).mean()))
        return real_compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)
    logged = []
    monkeypatch.setattr(trainer, "_record", lambda name, value: logged.append((name, float(value))))
    trainer.train()
    angs = [value for name, value in logged if name == "gain_rl/ang"]
    assert len(expected) == 2 and angs == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < a < 1.0 for a in angs)
    assert [name for name, _ in logged].count("gain_rl/mu") == 2
    assert trainer.gain_rl_schedule.sampler.updates == 2
