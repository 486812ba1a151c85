"""The train stage on the built-in task, through TRL: orderings, metrics, the blend reward and PROF.

Kills and resumes: tests/test_train_kill.py.
"""

import json
import os
import shutil

import pandas as pd
import pytest
import torch

from rlvr import config, models
from stages import filter as filter_stage
from stages import one_shot as one_shot_stage
from stages import prepare, rollout, score, train, warmup
from tests.conftest import small_params_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine a GRPO step of the tiny model measured 0.6 s with
    one thread and 4 to 7 s with two, which mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """prepare, warmup, score, rollout and filter once, for every test in this module."""
    path = tmp_path_factory.mktemp("train")
    old = os.getcwd()
    os.chdir(path)
    try:
        params = config.from_dict(small_params_dict())
        prepare.main(params)
        warmup.main(params)
        score.main(params)
        rollout.main(params)
        filter_stage.main(params)
    finally:
        os.chdir(old)
    return path


def _params(**train_overrides) -> dict:
    raw = small_params_dict()
    raw["train"].update(train_overrides)
    return raw


@pytest.mark.parametrize("order", ["gain_rl", "length", "random", "uniform", "online_difficulty", "dump"])
def test_every_order_trains_and_writes_curves(workdir, monkeypatch, order):
    monkeypatch.chdir(workdir)
    params = config.from_dict(_params(order=order, max_steps=2))
    metrics = train.main(params)
    assert metrics["steps"] == 2 and metrics["resumed_from_step"] == 0
    assert 0.0 <= metrics["final_reward"] <= 1.0
    curve = pd.read_csv(workdir / "metrics/train_curve.csv")
    assert curve["step"].tolist() == [1, 2]
    # the column is always there (the mu plot needs it); it holds values only for a gain_rl run
    assert curve["gain_rl/mu"].notna().all() == (order == "gain_rl") and curve["gain_rl/mu"].notna().any() == (
        order == "gain_rl")
    if order == "gain_rl":  # N = 24 band prompts; 2 steps of at most delta_max x N cannot reach N - 1 = 23
        written = json.loads((workdir / "metrics/train.json").read_text())
        assert written["gain_rl_end_step"] is None  # written as null, not left out
        assert 0.0 <= written["final_mu"] <= 2 * params.train.gain_rl.delta_max * 24 < 23
    if order in ("online_difficulty", "dump"):  # their sampler's numbers are logged every step
        column = "online_difficulty/pool_size" if order == "online_difficulty" else "dump/p/pass_rate_lt_0.2"
        assert column in curve.columns and curve[column].notna().all()
    history = pd.read_parquet(workdir / train.PROMPT_ACCURACY)
    assert history.groupby("step")["n_graded"].sum().to_dict() == {1: 16, 2: 16}  # K 4 x G 4 rollouts a step
    assert ((history["accuracy"] >= 0) & (history["accuracy"] <= 1)).all()
    loaded, _ = models.load_policy(workdir / "models/policy")
    assert loaded.config.model_type == "qwen2"


def test_one_shot_selects_from_a_runs_history_and_trains_on_it_with_dynamic_sampling(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    train.main(config.from_dict(_params(order="uniform", max_steps=8)))  # 32 draws of 24 prompts: 8 seen twice
    history = pd.read_parquet(train.PROMPT_ACCURACY)
    assert sorted(history["step"].unique()) == list(range(1, 9))
    (workdir / "data/one_shot").mkdir(parents=True, exist_ok=True)
    shutil.copy(train.PROMPT_ACCURACY, one_shot_stage.HISTORY)
    params = config.from_dict(_params(order="uniform", prompts="one_shot", filters=["dynamic_sampling"], max_steps=2))
    metrics = one_shot_stage.main(params)
    # by hand: the population variance of each prompt's accuracy over the steps it was drawn (2 or more)
    seen = history.groupby("id")["accuracy"]
    variance = seen.var(ddof=0)[seen.count() >= 2]
    top = sorted(variance.items(), key=lambda item: (-item[1], item[0]))[0]
    selected = pd.read_parquet(one_shot_stage.OUTPUT)
    assert selected["id"].tolist() == [top[0]] and selected["variance"].iloc[0] == pytest.approx(top[1])
    assert metrics["eligible_prompts"] == len(variance) and metrics["selected"] == 1
    train.main(params)
    trained = pd.read_parquet(train.PROMPT_ACCURACY)
    assert set(trained["id"]) == {top[0]}  # every step drew the one prompt (and every extra round)
    curve = pd.read_csv(workdir / "metrics/train_curve.csv")
    assert (curve["dynamic_sampling/extra_rounds"] <= 3).all() and (curve["dynamic_sampling/extra_rounds"] >= 0).all()
    graded = trained.groupby("step")["n_graded"].sum()
    # round 0 and each extra round roll out K 4 x G 4; the curve logs the extra rounds of each step
    assert graded.tolist() == [16 * (1 + r) for r in curve.set_index("step")["dynamic_sampling/extra_rounds"]]


def test_zero_steps_passes_the_warmup_model_through(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    metrics = train.main(config.from_dict(_params(max_steps=0)))
    assert metrics["steps"] == 0
    a, _ = models.load_policy(workdir / "models/policy")
    b, _ = models.load_policy(workdir / "models/warmup")
    assert all((x == y).all() for x, y in zip(a.parameters(), b.parameters()))


class LengthPRM:
    """Test PRM: a deterministic step score with spread (the tiny model's 24-token completions never
    hold a right step, so the built-in checker would score every rollout 0 and nothing would train)."""

    def step_scores(self, problems, steps):
        return [[(len(step) % 5) / 4 for step in response] for response in steps]


def _changed(workdir) -> list[str]:
    trained, _ = models.load_policy(workdir / "models/policy")
    warm, _ = models.load_policy(workdir / "models/warmup")
    before = dict(warm.named_parameters())
    return [n for n, p in trained.named_parameters() if not torch.equal(p, before[n])]


def test_blend_reward_reaches_the_loss_through_trl(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(train.prof, "load_prm", lambda settings, progress=False: LengthPRM())
    metrics = train.main(config.from_dict(_params(order="uniform", reward="blend", max_steps=2)))
    assert metrics["steps"] == 2
    curve = pd.read_csv(workdir / "metrics/train_curve.csv").set_index("step")
    accuracy, value = curve["rewards/accuracy/mean"], curve["rewards/process_value/mean"]
    assert ((value > 0) & (value < 1)).all() and (curve["rewards/process_value/std"] > 0).all()
    # TRL's logged reward is the weighted sum: accuracy + blend_weight (0.8) x process value
    assert curve["reward"].tolist() == pytest.approx((accuracy + 0.8 * value).tolist(), rel=1e-5)
    # the grader gives the tiny model 0 everywhere, so every parameter that moved, moved for the process value
    assert (accuracy == 0).all() and _changed(workdir)


def test_prof_in_the_loop_filters_every_group_through_trl(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(train.prof, "load_prm", lambda settings, progress=False: LengthPRM())
    # PROF with the blend reward: every rollout is incorrect (the grader), so PROF keeps the 2 of each group
    # of 4 with the lowest process value, and the process value is what makes their advantages differ.
    metrics = train.main(config.from_dict(_params(order="uniform", prof=True, reward="blend", max_steps=2)))
    assert metrics["steps"] == 2
    curve = pd.read_csv(workdir / "metrics/train_curve.csv").set_index("step")
    rollouts = 4 * 4  # prompts_per_step x num_generations
    assert (curve["prof/kept_frac"] == 0.5).all()  # prof.remove null = n // 2
    assert (curve["prof/kept_incorrect"] == rollouts / 2).all() and (curve["prof/dropped_incorrect"] == rollouts / 2).all()
    assert (curve["prof/kept_correct"] == 0).all() and (curve["prof/dropped_correct"] == 0).all()
    assert (curve["prof/nan_values"] == 0).all()
    assert _changed(workdir)
