"""Expected errors reach the user as one line; tracebacks go to logs/<command>.log (or RLVR_DEBUG=1).

Subprocess tests run `python -m flows STAGE` and `rlvr run` (as `python -m flows.cli run`) the way
DVC and a user do, in a temporary project folder, and read what lands on stderr and in the log.
Bad params fail before Prefect starts (fast); the slow tests raise inside the Prefect flow, where
Prefect's own console logging must not print the traceback either.
"""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flows.__main__ as entry
from rlvr import config, data, models
from rlvr.errors import RlvrError, one_line, report
from stages.prepare import ContaminationError
from tests.conftest import ROOT, real_params_dict, small_params_dict


def test_expected_errors_share_one_base_and_bugs_do_not():
    for error in (config.ConfigError, data.DataError, models.ModelLoadError, ContaminationError):
        assert issubclass(error, RlvrError), error
    for error in (KeyError, TypeError, FileNotFoundError):
        assert not issubclass(error, RlvrError)


def test_report_writes_the_traceback_and_returns_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        raise config.ConfigError("params.yaml: seed = -1: use an integer\n  in [0, 2**32)")
    except config.ConfigError as error:
        line = report("prepare", error)
    assert line == ("rlvr prepare: params.yaml: seed = -1: use an integer in [0, 2**32) "
                    "(traceback in logs/prepare.log; RLVR_DEBUG=1 shows it here)")
    log = (tmp_path / "logs/prepare.log").read_text()
    assert "Traceback (most recent call last)" in log and "rlvr.config.ConfigError: params.yaml: seed" in log
    assert one_line(RlvrError("")) == "RlvrError"


def _record(name: str, message: str, error: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, exc_info)


def test_console_filter_drops_expected_errors_and_their_echoes_only():
    quiet = entry.ExpectedErrorFilter()
    assert quiet.filter(_record("prefect.flow_runs", "Finished in state Failed('KeyError: x')"))
    assert not quiet.filter(_record("prefect.task_runs", "Task run failed", models.ModelLoadError("m: gone")))
    assert not quiet.filter(_record("prefect.flow_runs", "Finished in state Failed('... ModelLoadError: m: gone')"))
    assert quiet.filter(_record("prefect.flow_runs", "Beginning flow run 'x' for flow 'warmup'"))
    assert quiet.filter(_record("stages.warmup", "our own log line mentioning ModelLoadError: kept"))
    assert quiet.filter(_record("prefect.flow_runs", "Encountered exception", KeyError("bug")))


def test_main_prints_one_line_for_bad_params_and_lets_bugs_through(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RLVR_DEBUG", raising=False)
    raw = real_params_dict()
    raw["train"]["loss_type"] = "dapoo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert entry.main(["train"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rlvr train: params.yaml: train.loss_type = 'dapoo': use one of ['grpo'")
    assert err.count("\n") == 1
    monkeypatch.setattr(config, "check", lambda *args: {}["unexpected"])
    with pytest.raises(KeyError):
        entry.main(["check"])


# ------------------------------------------------------------------------------------------------
# Subprocesses

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "DVC_", "RLVR_"))}
    env["PYTHONPATH"] = str(ROOT)
    # two cores shared with other work: Prefect's temporary server can take longer than its 20 s default
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=600)


def _write_params(folder: Path, raw: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


BAD_PARAMS = [
    ("prepare", "evaluate", "batch_size", 0, "evaluate.batch_size = 0: use a value >= 1"),
    ("evaluate", "grading", "timeout_s", 0.0, "grading.timeout_s = 0.0: use a value > 0"),
    ("warmup", "warmup", "max_length", 0, "warmup.max_length = 0: use a value >= 1"),
    ("train", "train", "lr_scheduler", "cosin", "train.lr_scheduler = 'cosin': use one of ['linear'"),
]


@pytest.mark.parametrize(("stage", "section", "key", "value", "expected"), BAD_PARAMS)
def test_stage_with_bad_params_prints_one_line_and_logs_the_traceback(tmp_path, stage, section, key, value,
                                                                       expected):
    raw = real_params_dict()
    raw[section][key] = value
    _write_params(tmp_path, raw)
    result = _run(["-m", "flows", stage], tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rlvr {stage}: params.yaml: {expected}")
    assert lines[0].endswith(f"(traceback in logs/{stage}.log; RLVR_DEBUG=1 shows it here)")
    assert "Traceback" not in result.stderr and result.stdout == ""
    log = (tmp_path / f"logs/{stage}.log").read_text()
    assert "Traceback (most recent call last)" in log and f"ConfigError: params.yaml: {expected}" in log


def test_debug_switch_shows_the_traceback(tmp_path):
    raw = real_params_dict()
    raw["prof"]["remove"] = 6
    raw["rollout"]["n_samples"] = 4
    _write_params(tmp_path, raw)
    result = _run(["-m", "flows", "filter"], tmp_path, RLVR_DEBUG="1")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError: params.yaml: prof.remove = 6: must be below rollout.n_samples (4)" in result.stderr


def test_check_names_a_missing_input_path(tmp_path):
    raw = real_params_dict()
    raw["prepare"]["eval"][1]["path"] = "data/sources/missing.jsonl"
    _write_params(tmp_path, raw)
    result = _run(["-m", "flows", "check"], tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("rlvr check: params.yaml: prepare.eval[1].path = 'data/sources/missing.jsonl': "
                                    "no such file under ")
    ok = _run(["-m", "flows", "check"], ROOT)  # the real project passes, and writes nothing
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "rlvr check: params.yaml is valid and every input path it names exists\n"


def test_rlvr_run_checks_params_before_dvc_deletes_anything(tmp_path):
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    raw = real_params_dict()
    raw["train"]["gain_rl"]["alpha"] = -5
    _write_params(tmp_path, raw)
    outputs = {"data/prepared/train.parquet": b"last good train set", "models/warmup/config.json": b"{}",
               "metrics/eval.json": b'{"arith": {"pass_at_1": 0.5}}'}
    for name, content in outputs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    result = _run(["-m", "flows.cli", "run"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "rlvr run: params.yaml: train.gain_rl.alpha = -5.0: use a value > 0 (traceback in logs/run.log; "
        "RLVR_DEBUG=1 shows it here)"]
    for name, content in outputs.items():
        assert (tmp_path / name).read_bytes() == content
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert after == sorted(before + ["logs", "logs/run.log"])  # no .dvc, no lock, nothing removed


def test_pipeline_script_checks_before_dvc_repro():
    lines = [line.strip() for line in (ROOT / "scripts/pipeline.sh").read_text().splitlines()]
    assert lines.index("python -m flows check") < lines.index('dvc repro "$@"')


# Errors raised inside the Prefect flow: Prefect logs them itself, with a traceback, on its console.

def _flow_project(tmp_path: Path, raw: dict) -> Path:
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # the stage's MLflow run reads its inputs there
    (tmp_path / "models").mkdir()
    _write_params(tmp_path, raw)
    return tmp_path


def _assert_one_line(result: subprocess.CompletedProcess, stage: str, expected: str, log: Path, error: str) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    mentions = [line for line in result.stderr.splitlines() if error in line or expected in line]
    assert len(mentions) == 1, result.stderr[-3000:]
    assert mentions[0].startswith(f"rlvr {stage}: {expected}"), mentions
    assert mentions[0].endswith(f"(traceback in logs/{stage}.log; RLVR_DEBUG=1 shows it here)")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and f"{error}: {expected}" in text


@pytest.mark.slow
def test_missing_model_inside_the_flow_is_one_line(tmp_path):
    raw = small_params_dict()
    raw["model"]["name"] = "models/foo"
    raw["warmup"]["enabled"] = False
    project = _flow_project(tmp_path, raw)
    result = _run(["-m", "flows", "warmup"], project)
    _assert_one_line(result, "warmup", "models/foo: model folder does not exist", project / "logs/warmup.log",
                     "ModelLoadError")
    assert not (project / "models/warmup").exists()


@pytest.mark.slow
def test_bad_data_inside_the_flow_is_one_line(tmp_path):
    raw = small_params_dict()
    (tmp_path / "data").mkdir()
    (tmp_path / "data/bad.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
    raw["prepare"]["eval"][1]["path"] = "data/bad.jsonl"
    project = _flow_project(tmp_path, raw)
    result = _run(["-m", "flows", "prepare"], project)
    _assert_one_line(result, "prepare", "data/bad.jsonl: line 2: malformed JSON", project / "logs/prepare.log",
                     "DataError")
    assert not (project / "data/prepared").exists()
