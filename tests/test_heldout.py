"""rlvr.heldout: when points are taken, what they hold, that training does not notice, and the curve file."""

import copy
import io
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset

from rlvr import config, heldout, models
from rlvr.config import ConfigError
from rlvr.generation import SamplingSettings, messages, render
from rlvr.grpo import RewardFunction, RLVRGRPOTrainer
from stages import prepare, score, train, warmup
from tests.conftest import real_params_dict, small_params_dict


# ---- pure parts -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("eval_steps", "max_steps", "points"), [
    (25, 150, [0, 25, 50, 75, 100, 125, 150]),  # the default: the last step is a multiple
    (25, 60, [0, 25, 50, 60]),                  # the last step is not: it gets a point too
    (10, 4, [0, 4]),                            # fewer steps than eval_steps: the start and the end
    (1, 3, [0, 1, 2, 3]),
    (0, 5, []),                                 # off
])
def test_points_come_at_zero_every_eval_steps_and_at_the_last_step(eval_steps, max_steps, points):
    assert [s for s in range(max_steps + 1) if heldout.eval_due(s, eval_steps, max_steps)] == points


def test_summary_is_unbiased_pass_at_1_and_greedy_accuracy_over_parseable_problems():
    nan = float("nan")
    scores = np.array([[1, 1, 0, 0],       # c = 2 of n = 4: pass@1 = 2/4
                       [0, 0, 0, 0],       # 0
                       [1, 1, 1, 1],       # 1
                       [nan, nan, nan, nan]])  # unparseable gold: left out
    greedy = np.array([1.0, 0.0, 0.0, nan])
    summary = heldout.summarize(scores, greedy, seed=0)
    assert summary["pass_at_1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert summary["greedy_accuracy"] == pytest.approx(1 / 3)
    assert 0.0 <= summary["pass_at_1_ci_low"] < summary["pass_at_1"] < summary["pass_at_1_ci_high"] <= 1.0
    # every problem at c = 3 of 4: pass@1 = 0.75 exactly, and a CI of one point
    same = heldout.summarize(np.array([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=float), np.array([1.0, 1.0]), seed=0)
    assert (same["pass_at_1"], same["pass_at_1_ci_low"], same["pass_at_1_ci_high"]) == (0.75, 0.75, 0.75)
    assert same["greedy_accuracy"] == 1.0
    with pytest.raises(RuntimeError, match="no problem has a gold answer the grader can parse"):
        heldout.summarize(np.full((2, 3), nan), np.full(2, nan), seed=0)


def _entry(step, pass_at_1, **extra):
    return {"step": step, "epoch": step / 4, **{f"heldout/{c}": pass_at_1 for c in heldout.CURVE_COLUMNS[1:]},
            **extra}


def test_curve_file_has_one_row_per_point_in_step_order():
    history = [_entry(0, 0.1), {"step": 1, "loss": 0.3, "reward": 0.5}, _entry(2, 0.2), {"step": 2, "reward": 0.6},
               _entry(4, 0.4), {"step": 4, "train_runtime": 9.0}]
    rows = heldout.curve_rows(history)
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert [r["pass_at_1"] for r in rows] == [0.1, 0.2, 0.4]
    assert [heldout.is_point(e) for e in history] == [True, False, True, False, True, False]
    frame = pd.read_csv(io.StringIO(heldout.curve_csv(rows)))
    assert tuple(frame.columns) == heldout.CURVE_COLUMNS
    assert frame["step"].tolist() == [0, 2, 4] and frame["greedy_accuracy"].tolist() == [0.1, 0.2, 0.4]
    assert heldout.curve_csv([]) == ",".join(heldout.CURVE_COLUMNS) + "\n"  # off: the header only


# ---- params -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("eval_set", "nope", "train.eval_set = 'nope': use the name of a prepare.eval source: one of "
                         "['arith', 'gsm8k', 'math500']"),
    ("eval_steps", -1, "train.eval_steps = -1: use 0 (no held-out curve) or a number of steps between evaluations"),
    ("eval_n_samples", 0, "train.eval_n_samples = 0: use a value >= 1"),
    ("eval_max_new_tokens", 0, "train.eval_max_new_tokens = 0: use a value >= 1"),
    ("eval_max_new_tokens", 2048, "train.eval_max_new_tokens = 2048: must be below model.builtin.max_positions "
                                  "(2048), which also holds the prompt"),
])
def test_bad_heldout_params_are_one_line_naming_key_value_and_fix(key, value, message):
    raw = real_params_dict()
    raw["train"][key] = value
    with pytest.raises(ConfigError) as error:
        config.from_dict(raw)
    assert str(error.value) == message and "\n" not in str(error.value)


def test_heldout_params_are_required():
    raw = small_params_dict()
    del raw["train"]["eval_set"]
    with pytest.raises(ConfigError, match=r"^train\.eval_set is missing: add it"):
        config.from_dict(raw)


# ---- the callback on a tiny GRPO run ----------------------------------------------------------------

class ParityGrader:
    """A deterministic stand-in for the Grader (the same object grades rewards and the held-out set):
    1.0 for a completion of even length, else 0.0; None for the gold "none" (unparseable). A random
    tiny model never writes a right answer, so the real grader would give 0 everywhere: nothing would
    train and every pass@1 would be 0, whatever was sampled."""

    def grade(self, completions, golds):
        return [None if g == "none" else float(len(c) % 2 == 0) for c, g in zip(completions, golds)]


GRADER = ParityGrader()
PROBLEMS = ["Compute 1+2.", "Compute 5-3.", "Compute 2+2.", "Compute 9-1."]
EVAL = pd.DataFrame({"problem": ["Compute 3+4.", "Compute 8-2.", "Compute 6+1.", "Compute 2+9.", "Compute 7-7."],
                     "answer": ["7", "6", "7", "11", "none"]})


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the machine is shared, and every run compared here uses the same setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(**overrides) -> config.Params:
    raw = small_params_dict()
    raw["train"].update(order="uniform", max_steps=3, prompts_per_step=2, num_generations=4, max_completion_length=8,
                        learning_rate=1e-2, logging_steps=1, save_steps=50, eval_steps=1, eval_n_samples=3,
                        eval_max_new_tokens=6)
    raw["train"].update(overrides)
    return config.from_dict(raw)


def _tiny_model(weights_of=None):
    """The tiny model every run here starts from, or a separate model with the weights of `weights_of`.

    Not copy.deepcopy of a trainer's model: TRL sets an instance `forward` on it that a deep copy
    keeps, so the copy would still run the trainer's weights."""
    model = models.build_tiny_qwen2(models.build_char_tokenizer(), 32, 2, 4, 2, 64, 128, seed=0)
    if weights_of is not None:
        model.load_state_dict(weights_of.state_dict())
    return model


def _trainer(output_dir, params: config.Params, evaluate: bool = True):
    tokenizer = models.build_char_tokenizer()
    model = _tiny_model()
    dataset = Dataset.from_dict({"prompt": [messages(p, params.prompt) for p in PROBLEMS], "problem": PROBLEMS,
                                 "answer": ["3", "2", "4", "8"], "id": ["a", "b", "c", "d"]})
    trainer = RLVRGRPOTrainer(model=model, reward_funcs=[RewardFunction(GRADER)],
                              args=train.grpo_config(params, str(output_dir)), train_dataset=dataset,
                              processing_class=tokenizer)
    callback = train.heldout_eval(params, trainer, EVAL, GRADER) if evaluate else None
    if callback is not None:
        trainer.add_callback(callback)
    return trainer, callback


def _points(trainer) -> dict[int, dict]:
    return {r["step"]: r for r in heldout.curve_rows(trainer.state.log_history)}


def _direct(params, model, tokenizer) -> dict:
    """The same evaluation by hand: the helpers, the settings train.heldout_eval builds, no callback."""
    t = params.train
    prompts = [render(tokenizer, p, params.prompt) for p in EVAL["problem"]]
    settings = SamplingSettings(n=t.eval_n_samples, temperature=t.temperature, top_p=t.top_p,
                                max_new_tokens=t.eval_max_new_tokens, seed=t.seed)
    scores, greedy = heldout.sample_and_grade(model, tokenizer, prompts, EVAL["answer"].tolist(), GRADER, settings,
                                              batch_size=t.prompts_per_step * t.num_generations)
    assert scores.shape == (5, 3) and np.isnan(scores[4]).all()  # n = 3; the "none" gold is unparseable
    return heldout.summarize(scores, greedy, seed=t.seed)


def _without_seconds(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != "seconds"}


def _training_entries(trainer) -> list[dict]:
    """The training log without held-out points and without wall-clock timings."""
    timing = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    return [{k: v for k, v in e.items() if k not in timing} for e in trainer.state.log_history if not heldout.is_point(e)]


def test_points_at_the_expected_steps_equal_a_direct_evaluation_and_leave_training_unchanged(tmp_path):
    # logging every 2 steps, evaluating every 2 steps and at the last (3): points at a logging step and
    # at a step whose training metrics wait for a later log
    params = _params(max_steps=3, eval_steps=2, logging_steps=2)
    initial = _tiny_model()  # before the trainer: building a model seeds torch, and the trainer seeds it after
    trainer, callback = _trainer(tmp_path / "on", params)
    trainer.train()
    points = _points(trainer)
    assert sorted(points) == [0, 2, 3]
    assert _without_seconds(points[0]) == {"step": 0, **_direct(params, initial, trainer.processing_class)}
    final = _tiny_model(weights_of=trainer.model)
    assert _without_seconds(points[3]) == {"step": 3, **_direct(params, final, trainer.processing_class)}
    assert 0 < points[0]["pass_at_1"] < 1 and points[0]["seconds"] > 0  # the stand-in grader gives spread
    assert callback.seconds == pytest.approx(sum(p["seconds"] for p in points.values()), rel=0.05)

    # the same run without evaluations: the same parameters, bit for bit, and the same training log
    plain, _ = _trainer(tmp_path / "off", params, evaluate=False)
    plain.train()
    moved = [n for n, p in plain.model.named_parameters() if not torch.equal(p, dict(initial.named_parameters())[n])]
    assert moved, "the run without evaluations did not train"
    different = [n for n, p in plain.model.named_parameters()
                 if not torch.equal(p, dict(trainer.model.named_parameters())[n])]
    assert not different, f"evaluating changed training: {different}"
    assert _training_entries(trainer) == _training_entries(plain)
    # the training log at step 2 (an evaluation step too), then the run's summary with step 3's metrics
    # (step 3 is an evaluation step, not a logging step: its metrics waited through the point)
    assert [e["step"] for e in _training_entries(plain)] == [2, 3] and "reward" in _training_entries(plain)[1]


def test_an_evaluation_restores_every_rng_and_the_model_mode(tmp_path):
    trainer, callback = _trainer(tmp_path, _params())
    trainer.model.train()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    callback.evaluate()
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert all(np.array_equal(a, b) for a, b in zip(before[2], after[2]))
    assert trainer.model.training
    trainer.model.eval()
    callback.evaluate()
    assert not trainer.model.training


def test_a_point_leaves_pending_training_and_curation_metrics_for_the_training_log(tmp_path):
    trainer, callback = _trainer(tmp_path, _params())
    trainer.model.train()
    trainer._record("prof/kept_frac", 0.5)  # as PROF records a step's value, awaiting the next training log
    trainer._metrics["train"]["reward"].append(0.25)  # as TRL records a step's reward
    callback.evaluate()
    point = trainer.state.log_history[-1]
    assert heldout.is_point(point) and "prof/kept_frac" not in point and "reward" not in point
    trainer.log({})
    assert trainer.state.log_history[-1]["prof/kept_frac"] == 0.5 and trainer.state.log_history[-1]["reward"] == 0.25


def test_a_resumed_run_keeps_the_points_before_its_checkpoint(tmp_path):
    params = _params(max_steps=4, eval_steps=2, save_steps=2)
    first, _ = _trainer(tmp_path / "first", params)
    first.train()
    reference = _points(first)
    assert sorted(reference) == [0, 2, 4]

    resumed, callback = _trainer(tmp_path / "first", params)  # a new process would build the same trainer
    resumed.train(resume_from_checkpoint=tmp_path / "first" / "checkpoint-2")
    points = _points(resumed)
    assert sorted(points) == [0, 2, 4]
    assert points[0] == reference[0] and points[2] == reference[2]  # from the checkpoint, seconds included
    assert _without_seconds(points[4]) == _without_seconds(reference[4])  # the exact resume reaches the same policy
    assert callback.seconds == points[4]["seconds"]  # step 4 only was evaluated again
    saved = json.loads((tmp_path / "first" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in saved if heldout.is_point(e)] == [0, 2]


# ---- the stage ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_train_stage_writes_the_heldout_curve_and_its_cost(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = small_params_dict()
    raw["train"].update(order="uniform", prompts="all", max_steps=3, eval_steps=2, eval_n_samples=2,
                        eval_max_new_tokens=8)
    params = config.from_dict(raw)
    prepare.main(params)
    warmup.main(params)
    score.main(params)
    metrics = train.main(params)
    curve = pd.read_csv("metrics/heldout_curve.csv")
    assert tuple(curve.columns) == heldout.CURVE_COLUMNS and curve["step"].tolist() == [0, 2, 3]
    assert curve["pass_at_1"].between(0, 1).all() and (curve["seconds"] > 0).all()
    assert pd.read_csv("metrics/train_curve.csv")["step"].tolist() == [1, 2, 3]  # no held-out rows in it
    written = json.loads(open("metrics/train.json").read())
    assert written["heldout_seconds"] == pytest.approx(curve["seconds"].sum(), abs=0.05)
    assert written["heldout_cost_frac"] == pytest.approx(written["heldout_seconds"] / written["train_seconds"],
                                                         abs=1e-3)
    assert metrics["heldout_cost_frac"] == written["heldout_cost_frac"]

    off = config.from_dict({**raw, "train": {**raw["train"], "eval_steps": 0}})
    train.main(off)
    assert open("metrics/heldout_curve.csv").read() == ",".join(heldout.CURVE_COLUMNS) + "\n"
    assert "heldout_seconds" not in json.loads(open("metrics/train.json").read())
