import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rlvr import config, models
from stages import prepare, rollout
from tests.conftest import ROOT, small_params_dict


def _raw(**rollout_overrides) -> dict:
    raw = small_params_dict()
    raw["rollout"].update(max_prompts=12, n_samples=4, chunk_size=5, max_new_tokens=16, batch_size=16)
    raw["rollout"].update(rollout_overrides)
    return raw


def _params(**rollout_overrides):
    return config.from_dict(_raw(**rollout_overrides))


def _chunks(cache) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted(cache.glob("*.parquet"))}


@pytest.fixture
def workspace(in_tmp, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
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


def test_chunk_key_covers_what_decides_the_samples_and_nothing_else():
    sampling = {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "batch_size": 16, "seed": 0}
    sampler = {"code": "abc", "torch": "2", "transformers": "5"}
    key = rollout.chunk_key("md5", sampling, sampler, ["p1", "p2"])
    assert key == rollout.chunk_key("md5", dict(reversed(sampling.items())), dict(sampler), ["p1", "p2"])
    variants = [rollout.chunk_key("other", sampling, sampler, ["p1", "p2"]),
                rollout.chunk_key("md5", sampling, sampler, ["p2", "p1"]),
                rollout.chunk_key("md5", sampling, {**sampler, "torch": "3"}, ["p1", "p2"])]
    variants += [rollout.chunk_key("md5", {**sampling, name: value}, sampler, ["p1", "p2"])
                 for name, value in (("n", 8), ("temperature", 0.7), ("top_p", 0.9), ("max_new_tokens", 8),
                                     ("batch_size", 8), ("seed", 1))]
    assert len({key, *variants}) == 1 + len(variants)


def test_cache_lives_under_the_project_root_dvc_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert rollout.cache_dir() == tmp_path.resolve() / "data/rollout_cache"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "workspace"))  # what DVC sets inside `dvc exp run --temp`
    assert rollout.cache_dir() == (tmp_path / "workspace").resolve() / "data/rollout_cache"


@pytest.mark.slow
def test_rollout_writes_graded_samples_and_reuses_its_cache(workspace):
    params = _params()
    cache = workspace / "data/rollout_cache"
    metrics = rollout.main(params)
    rolls = pd.read_parquet("data/rollouts/rollouts.parquet")
    rates = pd.read_parquet("data/rollouts/pass_rates.parquet")
    assert len(rolls) == 12 * 4 and metrics["samples"] == 48 and metrics["prompts"] == 12
    assert metrics["chunks"] == 3 and metrics["chunks_sampled"] == 3  # 12 prompts in chunks of 5
    assert set(rolls["reward"].unique()) <= {0.0, 1.0}
    assert (rolls.groupby("id")["sample"].apply(sorted).map(list) == [[0, 1, 2, 3]] * 12).all()
    prepared = pd.read_parquet("data/prepared/train.parquet").iloc[:12]
    assert rolls.drop_duplicates("id")[["id", "problem", "answer"]].reset_index(drop=True).equals(
        prepared[["id", "problem", "answer"]].reset_index(drop=True))
    assert rates["pass_rate"].between(0, 1).all()
    assert metrics["mean_pass_rate"] == pytest.approx(rates["pass_rate"].mean())
    first = _chunks(cache)
    assert len(first) == 3

    # a rerun reuses the chunks; one damaged from outside is resampled (same key, same seed)
    victim = sorted(first)[0]
    (cache / victim).write_bytes(b"not parquet")
    again = rollout.main(params)
    assert again["chunks_reused"] == 2 and again["chunks_sampled"] == 1 and again["chunks_invalid"] == 1
    assert _chunks(cache).keys() == first.keys()
    pd.testing.assert_frame_equal(_chunks(cache)[victim], first[victim])
    pd.testing.assert_frame_equal(pd.read_parquet("data/rollouts/rollouts.parquet"), rolls)


def test_vllm_backend_samples_every_chunk_with_one_engine_and_keeps_its_own_chunks(workspace, monkeypatch):
    """Stand-in engine (vLLM needs a GPU): one engine for every chunk, each chunk's requests carry the
    chunk's seed, the transformers weights are never loaded, and vLLM's chunks are cached under keys of
    their own (a transformers run afterwards does not reuse them)."""
    from rlvr import generation

    built, calls = [], []

    def fake_engine(source, seed, trust_remote_code, dtype):
        built.append(source)
        return "engine"

    def fake_sample(engine, prompts, settings):
        calls.append((engine, len(prompts), settings.seed))
        return [[f"\\boxed{{{i}}}"] * settings.n for i in range(len(prompts))]

    params = _params(backend="vllm")
    cache = workspace / "data/rollout_cache"
    monkeypatch.setattr(generation, "choose_backend", lambda requested, key: "vllm")
    monkeypatch.setattr(generation, "vllm_engine", fake_engine)
    monkeypatch.setattr(generation, "sample_vllm", fake_sample)
    with monkeypatch.context() as m:
        m.setattr(models, "load_policy", lambda *a, **k: pytest.fail("transformers weights loaded with vLLM"))
        metrics = rollout.main(params)
    assert built == ["models/warmup"] and [c[:2] for c in calls] == [("engine", 5), ("engine", 5), ("engine", 2)]
    assert len({seed for _, _, seed in calls}) == 3  # a seed per chunk, from its key
    assert metrics["chunks_sampled"] == 3 and len(_chunks(cache)) == 3
    monkeypatch.setattr(generation, "choose_backend", lambda requested, key: "transformers")
    again = rollout.main(_params(backend="transformers"))
    assert again["chunks_reused"] == 0 and again["chunks_sampled"] == 3 and len(_chunks(cache)) == 6


def test_a_vllm_backend_without_vllm_is_one_clear_error():
    from rlvr import generation

    if generation.vllm_available():
        pytest.skip("vLLM and a GPU are present here")
    with pytest.raises(config.ConfigError, match=r"rollout.backend = 'vllm' but vLLM is not installed"):
        generation.choose_backend("vllm", "rollout.backend")


def _copy_inputs(source, target):
    for name in ("models/warmup", "data/prepared"):
        shutil.copytree(source / name, target / name)


@pytest.mark.slow
def test_an_experiment_copy_reuses_the_workspace_cache(workspace, tmp_path_factory, monkeypatch):
    rollout.main(_params())
    cached = _chunks(workspace / "data/rollout_cache")
    rolls = pd.read_parquet("data/rollouts/rollouts.parquet")
    # what `dvc exp run --temp` does: the stage runs in a copy, with DVC_ROOT naming the workspace;
    # the experiment rolls out the first 10 prompts: the workspace's first two chunks of 5
    copy = tmp_path_factory.mktemp("exp-copy")
    _copy_inputs(workspace, copy)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    metrics = rollout.main(_params(max_prompts=10))
    assert metrics["chunks"] == 2 and metrics["chunks_reused"] == 2 and metrics["chunks_sampled"] == 0
    assert not (copy / "data/rollout_cache").exists()
    assert _chunks(workspace / "data/rollout_cache").keys() == cached.keys()
    pd.testing.assert_frame_equal(pd.read_parquet(copy / "data/rollouts/rollouts.parquet"), rolls.iloc[:40])


ROLL = ("import sys; from rlvr import config; from stages import rollout; from tests.test_rollout import _raw; "
        "rollout.main(config.from_dict(_raw(max_prompts=10)))")


@pytest.mark.slow
def test_two_runs_at_once_share_the_cache_without_corrupting_it(workspace, tmp_path_factory):
    # two experiments of one workspace: two processes, two working copies, one cache (DVC_ROOT)
    copy = tmp_path_factory.mktemp("exp-copy")
    _copy_inputs(workspace, copy)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(workspace)}
    procs = [subprocess.Popen([sys.executable, "-c", ROLL], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for cwd in (workspace, copy)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    shared = workspace / "data/rollout_cache"
    a = pd.read_parquet(workspace / "data/rollouts/rollouts.parquet")
    b = pd.read_parquet(copy / "data/rollouts/rollouts.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not [p for p in shared.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    # the chunks equal those of one run alone into an empty cache
    alone = workspace / "alone-cache"
    solo, _, metrics = rollout.run(config.from_dict(_raw(max_prompts=10)), cache=alone)
    assert metrics["chunks_sampled"] == 2
    assert _chunks(shared).keys() == _chunks(alone).keys()
    for name, chunk in _chunks(alone).items():
        pd.testing.assert_frame_equal(_chunks(shared)[name], chunk)
    pd.testing.assert_frame_equal(solo, a)


def test_rollout_errors_are_clear(in_tmp):
    params = _params()
    with pytest.raises(Exception, match="train.parquet"):
        rollout.run(params)
    with pytest.raises(config.ConfigError, match="rollout.n_samples"):
        _params(n_samples=0)
