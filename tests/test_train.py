"""The train stage on the built-in task: orderings, metrics, and resuming after the process is killed."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from rlvr import config, models
from stages import filter as filter_stage
from stages import prepare, rollout, score, train, warmup
from tests.conftest import ROOT, small_params_dict

pytestmark = pytest.mark.slow


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


@pytest.mark.parametrize("order", ["gain_rl", "length", "random", "uniform"])
def test_every_order_trains_and_writes_curves(workdir, monkeypatch, order):
    monkeypatch.chdir(workdir)
    params = config.from_dict(_params(order=order, max_steps=2))
    metrics = train.main(params)
    assert metrics["steps"] == 2 and metrics["resumed_from_step"] == 0
    assert 0.0 <= metrics["final_reward"] <= 1.0
    curve = pd.read_csv(workdir / "metrics/train_curve.csv")
    assert curve["step"].tolist() == [1, 2]
    assert ("gain_rl/mu" in curve.columns) == (order == "gain_rl")
    loaded, _ = models.load_policy(workdir / "models/policy")
    assert loaded.config.model_type == "qwen2"


def test_zero_steps_passes_the_warmup_model_through(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    metrics = train.main(config.from_dict(_params(max_steps=0)))
    assert metrics["steps"] == 0
    a, _ = models.load_policy(workdir / "models/policy")
    b, _ = models.load_policy(workdir / "models/warmup")
    assert all((x == y).all() for x, y in zip(a.parameters(), b.parameters()))


def test_killed_run_resumes_from_its_last_checkpoint_with_gain_rl_state(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    raw = _params(order="gain_rl", max_steps=8, save_steps=2)
    (workdir / "resume.yaml").write_text(yaml.safe_dump(raw))
    script = ("from rlvr import config\nfrom stages import train\n"
              "if __name__ == '__main__':\n    train.main(config.load('resume.yaml'))\n")
    (workdir / "run_train.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "run_train.py"], cwd=workdir, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = workdir / "models/checkpoints/checkpoint-2/gain_rl_state.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert first.exists(), "the run was expected to save checkpoint-2 before it was killed"
    checkpoints = sorted(p.name for p in (workdir / "models/checkpoints").glob("checkpoint-*"))
    assert "checkpoint-8" not in checkpoints, "the run finished before it could be killed"
    last = max(int(name.split("-")[1]) for name in checkpoints)
    saved_mu = json.loads((workdir / f"models/checkpoints/checkpoint-{last}/gain_rl_state.json").read_text())["mu"]

    metrics = train.main(config.load(workdir / "resume.yaml"))
    assert metrics["resumed_from_step"] == last and metrics["steps"] == 8
    curve = pd.read_csv(workdir / "metrics/train_curve.csv").set_index("step")
    assert curve.index.tolist() == list(range(1, 9))  # the log history survives the resume
    # mu after the first resumed step = restored mu + that step's delta (it would be mu0 + delta otherwise)
    resumed = curve.loc[last + 1]
    assert resumed["gain_rl/mu"] == pytest.approx(saved_mu + resumed["gain_rl/delta"])
    assert saved_mu == pytest.approx(curve.loc[last, "gain_rl/mu"])
