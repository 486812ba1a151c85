"""The curation methods inside RLVRGRPOTrainer: dynamic sampling's rounds on a scripted group table,
the online samplers' draws and updates, and the per-prompt accuracy history."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from rlvr import config, curation, grpo, models
from rlvr.curation import online_difficulty
from rlvr.generation import messages
from rlvr.grading import Grader
from rlvr.grpo import RewardFunction, RLVRGRPOTrainer
from stages import train
from tests.conftest import small_params_dict

PROBLEMS = ["Compute 1+2.", "Compute 5-3.", "Compute 2+2.", "Compute 9-1.", "Compute 3+3.", "Compute 7-2."]
K, G = 2, 4


class ScriptedReward(RewardFunction):
    """The accuracy reward, with the grades of each call given in advance (one list per round)."""

    def __init__(self, grader, script):
        super().__init__(grader)
        self.script, self.calls = [list(s) for s in script], 0

    def __call__(self, prompts, completions, answer, **kwargs):
        self.latest_texts = [c[-1]["content"] for c in completions]
        self.latest = self.script[self.calls]
        assert len(self.latest) == len(completions)
        self.calls += 1
        return self.latest


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=1, timeout_s=5) as pool:
        yield pool


def _trainer(tmp_path, reward, order="uniform", **kwargs):
    raw = small_params_dict()
    raw["train"].update(max_steps=1, prompts_per_step=K, num_generations=G, max_completion_length=6,
                        learning_rate=1e-2, logging_steps=1, order=order)
    params = config.from_dict(raw)
    tokenizer = models.build_char_tokenizer()
    model = models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 128, seed=0)
    dataset = Dataset.from_dict({"prompt": [messages(p, params.prompt) for p in PROBLEMS], "problem": PROBLEMS,
                                 "answer": ["3", "2", "4", "8", "6", "5"], "id": list("abcdef")})
    trainer = RLVRGRPOTrainer(model=model, reward_funcs=[reward], args=train.grpo_config(params, str(tmp_path)),
                              train_dataset=dataset, processing_class=tokenizer, order=order, **kwargs)
    trainer.model.train()
    return trainer


def _record_rounds(trainer, monkeypatch):
    """Every generation round's inputs and output, in order."""
    rounds = []
    scored = RLVRGRPOTrainer._scored

    def recording(self, inputs):
        output = scored(self, inputs)
        rounds.append(([row[grpo.ROW] for row in inputs], {k: v.clone() if torch.is_tensor(v) else v
                                                           for k, v in output.items()}))
        return output

    monkeypatch.setattr(RLVRGRPOTrainer, "_scored", recording)
    return rounds


def _tokens(ids, mask):
    return [t for t, m in zip(ids.tolist(), mask.tolist(), strict=True) if m]


def _first_inputs(trainer):
    """The step's rollouts as TRL's sampler lays them out: each of the plan's K rows G times."""
    return [dict(trainer.train_dataset[i]) for i in range(K) for _ in range(G)]


def test_dynamic_sampling_keeps_informative_groups_across_rounds(tmp_path, grader, monkeypatch):
    # round 0: group 0 all correct (dropped), group 1 mixed (kept); round 1: group 0 all wrong (dropped),
    # group 1 mixed (kept): the step has its K = 2 informative groups after one extra round.
    script = [[1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 1]]
    trainer = _trainer(tmp_path, ScriptedReward(grader, script),
                       dynamic_sampling_settings=config.DynamicSampling(max_extra_rounds=3))
    rounds = _record_rounds(trainer, monkeypatch)
    output = trainer._generate_and_score_completions(_first_inputs(trainer))
    assert len(rounds) == 2  # round 0 and one extra round, no more
    picks = [(0, i) for i in range(4, 8)] + [(1, i) for i in range(4, 8)]
    for row, (r, i) in enumerate(picks):
        source = rounds[r][1]
        assert _tokens(output["prompt_ids"][row], output["prompt_mask"][row]) == _tokens(
            source["prompt_ids"][i], source["prompt_mask"][i])
        assert _tokens(output["completion_ids"][row], output["completion_mask"][row]) == _tokens(
            source["completion_ids"][i], source["completion_mask"][i])
        assert output["advantages"][row] == source["advantages"][i]
    assert int(output["num_items_in_batch"]) == int(output["completion_mask"].sum())
    metrics = {k: v[0] for k, v in trainer.curation_metrics.items()}
    assert metrics == {"dynamic_sampling/dropped_frac": 0.5, "dynamic_sampling/extra_rounds": 1.0,
                       "dynamic_sampling/extra_groups": 2.0, "dynamic_sampling/short": 0.0,
                       "dynamic_sampling/surplus": 0.0}
    # the history counts every generated group of the step, the dropped ones too
    rows = [rounds[0][0][0], rounds[0][0][4], rounds[1][0][0], rounds[1][0][4]]
    expected = {}
    for row, (c, n) in zip(rows, [(4, 4), (1, 4), (0, 4), (2, 4)], strict=True):
        old = expected.get(row, (0, 0))
        expected[row] = (old[0] + c, old[1] + n)
    assert {r: (c, n) for _, r, c, n in trainer.prompt_accuracy} == expected
    assert {s for s, _, _, _ in trainer.prompt_accuracy} == {1}


def test_dynamic_sampling_short_of_groups_fills_with_groups_that_carry_no_loss(tmp_path, grader, monkeypatch):
    script = [[1, 1, 1, 1, 0, 1, 1, 1]]  # one informative group; no extra round allowed
    trainer = _trainer(tmp_path, ScriptedReward(grader, script),
                       dynamic_sampling_settings=config.DynamicSampling(max_extra_rounds=0))
    rounds = _record_rounds(trainer, monkeypatch)
    output = trainer._generate_and_score_completions(_first_inputs(trainer))
    assert len(rounds) == 1
    source = rounds[0][1]
    # informative group (rows 4..7) first, then the all-correct group as filler
    assert torch.equal(output["advantages"][:4], source["advantages"][4:])
    assert torch.equal(output["advantages"][4:], torch.zeros(4))
    assert output["completion_mask"][4:].sum() == 0 and output["completion_mask"][:4].sum() > 0
    assert int(output["num_items_in_batch"]) == int(source["completion_mask"][4:].sum())
    metrics = {k: v[0] for k, v in trainer.curation_metrics.items()}
    assert metrics["dynamic_sampling/short"] == 1.0 and metrics["dynamic_sampling/extra_rounds"] == 0.0
    assert metrics["dynamic_sampling/dropped_frac"] == 0.5


def test_merge_rollouts_repads_prompts_left_and_completions_right():
    a = {"prompt_ids": torch.tensor([[9, 1, 2]]), "prompt_mask": torch.tensor([[0, 1, 1]]),
         "completion_ids": torch.tensor([[5, 9]]), "completion_mask": torch.tensor([[1, 0]]),
         "advantages": torch.tensor([0.5]), "num_items_in_batch": torch.tensor(1)}
    b = {"prompt_ids": torch.tensor([[3]]), "prompt_mask": torch.tensor([[1]]),
         "completion_ids": torch.tensor([[6, 7, 8]]), "completion_mask": torch.tensor([[1, 1, 1]]),
         "advantages": torch.tensor([-1.0]), "num_items_in_batch": torch.tensor(3)}
    merged = grpo.merge_rollouts([a, b], [(1, 0), (0, 0)], pad_token_id=9)
    assert merged["prompt_ids"].tolist() == [[9, 9, 3], [9, 1, 2]]
    assert merged["prompt_mask"].tolist() == [[0, 0, 1], [0, 1, 1]]
    assert merged["completion_ids"].tolist() == [[6, 7, 8], [5, 9, 9]]
    assert merged["completion_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert merged["advantages"].tolist() == [-1.0, 0.5] and int(merged["num_items_in_batch"]) == 4
    with pytest.raises(RuntimeError, match="pixel_values"):
        grpo.merge_rollouts([{**a, "pixel_values": torch.zeros(1, 3)}], [(0, 0)], pad_token_id=9)


def _online_sampler(order, n_rows, values, prior=()):
    context = curation.Context(n_rows=n_rows, prompts_per_step=K, group_size=G, steps=1, seed=0,
                               labels=tuple("xxyyzz")[:n_rows] if order == "dump" else (), prior_pass_rate=prior)
    return curation.build_sampler(order, values, context)


def test_online_difficulty_draws_the_step_and_moves_with_its_grades(tmp_path, grader, monkeypatch):
    # prior: rows 0 and 1 at pass rate 1.0 (outside the band), the others unknown (in the pool)
    settings = {"low": 0.1, "high": 0.9, "prior_samples": 4, "explore": 0.0}
    sampler = _online_sampler("online_difficulty", 6, settings, prior=(1.0, 1.0) + (float("nan"),) * 4)
    twin = _online_sampler("online_difficulty", 6, settings, prior=(1.0, 1.0) + (float("nan"),) * 4)
    trainer = _trainer(tmp_path, ScriptedReward(grader, [[0, 0, 0, 0, 1, 1, 1, 1]]), order="online_difficulty",
                       sampler=sampler)
    rounds = _record_rounds(trainer, monkeypatch)
    trainer._generate_and_score_completions(_first_inputs(trainer))
    drawn = twin.draw(K)  # the same seed draws the same rows
    assert rounds[0][0] == [drawn[0]] * G + [drawn[1]] * G and not {0, 1} & set(drawn)
    # the first drawn row was all wrong (pass rate 0: leaves), the second all right (1.0: leaves)
    assert sampler.pass_rate()[drawn].tolist() == [0.0, 1.0]
    metrics = {k: v[0] for k, v in trainer.curation_metrics.items()}
    assert metrics[f"{online_difficulty.NAME}/pool_size"] == 2.0 and metrics[f"{online_difficulty.NAME}/left"] == 2.0


def test_dump_updates_with_the_steps_absolute_advantages(tmp_path, grader, monkeypatch):
    sampler = _online_sampler("dump", 6, {"by": "source", "bucket_edges": [], "window": 300, "temperature": 0.1})
    trainer = _trainer(tmp_path, ScriptedReward(grader, [[1, 0, 1, 0, 1, 1, 1, 1]]), order="dump", sampler=sampler)
    rounds = _record_rounds(trainer, monkeypatch)
    trainer._generate_and_score_completions(_first_inputs(trainer))
    rows, output = rounds[0]
    labels = "xxyyzz"
    adv = output["advantages"].abs().tolist()
    expected = {}
    for i, row in enumerate(rows):
        expected.setdefault(labels[row], []).append(adv[i])
    windows = {sampler.names[j]: w for j, w in enumerate(sampler.windows) if w}
    assert windows.keys() == expected.keys()
    assert all(windows[name] == pytest.approx(values) for name, values in expected.items())
    assert sampler.counts.sum() == K * G


def test_curation_state_round_trips_through_a_checkpoint(tmp_path, grader):
    settings = {"low": 0.1, "high": 0.9, "prior_samples": 0, "explore": 0.5}
    trainer = _trainer(tmp_path, ScriptedReward(grader, [[0, 1] * 4]), order="online_difficulty",
                       sampler=_online_sampler("online_difficulty", 6, settings),
                       dynamic_sampling_settings=config.DynamicSampling(max_extra_rounds=1))
    trainer._generate_and_score_completions(_first_inputs(trainer))
    state = trainer.curation_state_dict()
    other = _trainer(tmp_path, ScriptedReward(grader, []), order="online_difficulty",
                     sampler=_online_sampler("online_difficulty", 6, settings),
                     dynamic_sampling_settings=config.DynamicSampling(max_extra_rounds=1))
    other.load_curation_state_dict(state)
    assert other.curation_state_dict() == state and other.sampler.draw(K) == trainer.sampler.draw(K)
    assert np.array_equal(other.sampler.graded, trainer.sampler.graded)
    plain = _trainer(tmp_path, ScriptedReward(grader, []))
    with pytest.raises(ValueError, match="another train.order"):
        plain.load_curation_state_dict(state)
