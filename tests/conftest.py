"""Shared fixtures: the project root, and small params derived from the real params.yaml."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import yaml

from rlvr import config

ROOT = Path(__file__).resolve().parents[1]


def real_params_dict() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def small_params_dict() -> dict:
    """The default params, shrunk so that each stage takes seconds on a CPU."""
    data = copy.deepcopy(real_params_dict())
    prep = data["prepare"]
    prep["train"] = [{"name": "arith", "builtin": True, "size": 300}]
    prep["eval"] = [
        {"name": "arith", "builtin": True, "size": 24},
        {"name": "gsm8k", "path": str(ROOT / "data/sources/benchmarks/gsm8k/test.jsonl"), "preset": "gsm8k",
         "limit": 40},
    ]
    data["warmup"].update(max_steps=20, batch_size=16, logging_steps=5)
    data["train"].update(order="gain_rl", max_steps=4, prompts_per_step=4, num_generations=4,
                         max_completion_length=24, save_steps=2, logging_steps=1)
    # the 20-step warm-up model solves almost nothing: a band that excludes pass rate 0 would be empty
    data["filter"].update(pass_rate_min=0.0, pass_rate_max=1.0)
    data["rollout"].update(max_prompts=24, n_samples=4, chunk_size=10, max_new_tokens=24, batch_size=32)
    data["evaluate"].update(benchmarks=["arith", "gsm8k"], n_samples=4, ks=[1, 2, 4], subset_size=6,
                            max_new_tokens=24, n_bootstrap=200)
    return data


@pytest.fixture
def small_params() -> config.Params:
    return config.from_dict(small_params_dict())


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test with the working directory in a fresh temporary folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
