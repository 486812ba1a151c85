import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from rlvr import config, models
from stages import prepare, rollout
from tests.conftest import ROOT, small_params_dict


def _params(**rollout_overrides):
    raw = small_params_dict()
    raw["rollout"].update(max_prompts=12, n_samples=4, chunk_size=5, max_new_tokens=16, batch_size=16)
    raw["rollout"].update(rollout_overrides)
    return config.from_dict(raw)


@pytest.fixture
def workspace(in_tmp):
    params = _params()
    prepare.main(params)
    tokenizer = models.build_char_tokenizer()
    models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 256, seed=0), tokenizer, "models/warmup")
    return in_tmp


def test_pass_rates_hand_worked():
    rollouts = pd.DataFrame({"id": ["a"] * 4 + ["b"] * 2, "sample": [0, 1, 2, 3, 0, 1],
                             "reward": [1.0, 0.0, 1.0, 1.0, np.nan, np.nan]})
    rates = rollout.pass_rates(rollouts)
    assert rates["id"].tolist() == ["a", "b"]
    assert rates["n_samples"].tolist() == [4, 2] and rates["n_correct"].tolist() == [3, 0]
    assert rates["pass_rate"].iat[0] == 0.75 and np.isnan(rates["pass_rate"].iat[1])


@pytest.mark.slow
def test_rollout_writes_graded_samples_and_reuses_its_cache(workspace):
    params = _params()
    metrics = rollout.main(params)
    rolls = pd.read_parquet("data/rollouts/rollouts.parquet")
    rates = pd.read_parquet("data/rollouts/pass_rates.parquet")
    assert len(rolls) == 12 * 4 and metrics["samples"] == 48 and metrics["prompts"] == 12
    assert metrics["chunks"] == 3 and metrics["chunks_reused"] == 0  # 12 prompts in chunks of 5
    assert set(rolls["reward"].unique()) <= {0.0, 1.0}
    assert (rolls.groupby("id")["sample"].apply(sorted).map(list) == [[0, 1, 2, 3]] * 12).all()
    assert rates["pass_rate"].between(0, 1).all()
    assert metrics["mean_pass_rate"] == pytest.approx(rates["pass_rate"].mean())
    assert len(list((workspace / rollout.CACHE).glob("*.parquet"))) == 3

    again = rollout.main(params)  # nothing changed: every chunk comes from the cache
    assert again["chunks_reused"] == 3
    pd.testing.assert_frame_equal(pd.read_parquet("data/rollouts/rollouts.parquet"), rolls)

    changed = rollout.main(_params(temperature=0.7))  # a sampling change is a different key
    assert changed["chunks_reused"] == 0
    assert len(list((workspace / rollout.CACHE).glob("*.parquet"))) == 3  # the unused chunks were removed


@pytest.mark.slow
def test_a_killed_rollout_resumes_from_its_finished_chunks(workspace):
    params = _params(max_prompts=30, chunk_size=5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys; from rlvr import config; from stages import rollout; from tests.conftest import small_params_dict;"
            "raw = small_params_dict(); raw['rollout'].update(max_prompts=30, n_samples=4, chunk_size=5, "
            "max_new_tokens=16, batch_size=16); rollout.main(config.from_dict(raw))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=workspace, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = workspace / rollout.CACHE
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*.parquet"))) < 2:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    finished = len(list(cache.glob("*.parquet")))
    assert 2 <= finished < 6, "kill the run after some but not all chunks"
    assert not (workspace / "data/rollouts/rollouts.parquet").exists()
    metrics = rollout.main(params)
    assert metrics["chunks_reused"] == finished  # chunk files appear whole (temp file + rename) or not at all
    assert metrics["chunks"] == 6 and metrics["samples"] == 120
    assert not list(cache.glob(".*.tmp"))


def test_rollout_errors_are_clear(in_tmp):
    params = _params()
    with pytest.raises(Exception, match="train.parquet"):
        rollout.run(params)
    with pytest.raises(config.ConfigError, match="rollout.n_samples"):
        _params(n_samples=0)
