import math
import subprocess
import sys

import pytest

from rlvr import config, registry
from flows.cli import build_parser
from tests.conftest import real_params_dict


def test_decide_promotes_only_a_real_improvement():
    assert registry.decide(0.40, None, 0.01).promote  # no champion yet
    assert registry.decide(0.42, 0.40, 0.01).promote
    assert registry.decide(0.41, 0.40, 0.01).promote  # exactly the minimum gain counts
    assert not registry.decide(0.405, 0.40, 0.01).promote
    assert registry.decide(0.40, 0.40, 0.0).promote  # equal with no minimum gain: promoted
    assert not registry.decide(0.30, 0.40, 0.0).promote
    assert not registry.decide(math.nan, 0.40, 0.01).promote
    assert "not promoted" in registry.decide(0.39, 0.40, 0.01).reason


def test_retrain_params_are_validated():
    raw = real_params_dict()
    raw["retrain"]["benchmark"] = "aime24"
    with pytest.raises(config.ConfigError, match="retrain.benchmark"):
        config.from_dict(raw)
    raw = real_params_dict()
    raw["retrain"]["metric"] = "pass_at_16"
    with pytest.raises(config.ConfigError, match="retrain.metric"):
        config.from_dict(raw)
    raw = real_params_dict()
    raw["retrain"]["cron"] = "every night"
    with pytest.raises(config.ConfigError, match="five cron fields"):
        config.from_dict(raw)


def test_cli_help_lists_every_operation():
    text = build_parser().format_help()
    for command in ("services", "run", "retrain", "schedule", "lineage"):
        assert command in text
    out = subprocess.run([sys.executable, "-m", "flows.cli", "services", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "up" in out.stdout and "down" in out.stdout


def test_cli_refuses_to_run_outside_a_project(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.cli", "services", "status"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "project root" in out.stderr
