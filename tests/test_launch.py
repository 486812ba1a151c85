"""flows/launch.py: the command line each launch layout gives, and what a failing rank does to the stage.

The supervision tests run real `torchrun` and `accelerate launch` jobs of 2 CPU processes, with a
few-line script as the program instead of a stage (each takes seconds); one slow test runs a real
stage (`score`) as a 2-process job through the worker entry point.
"""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
import time

import pandas as pd
import pytest
import yaml

from flows import launch
from rlvr import config, models
from rlvr.errors import RlvrError
from tests.conftest import ROOT, small_params_dict

PY = "python"
DDP = str(ROOT / "configs/accelerate/ddp.yaml")


def _params(**launch_values) -> config.Params:
    raw = small_params_dict()
    raw["launch"].update(launch_values)
    return config.from_dict(raw)


# ------------------------------------------------------------------------------------------------
# Command lines


def test_one_process_is_the_default_and_runs_in_process():
    params = config.load(ROOT / "params.yaml")
    assert params.launch.world_size == 1 and not params.launch.distributed
    assert launch.describe(params, "train") == "python -m flows train --params params.yaml   (in-process)"


def test_torchrun_on_one_machine_is_standalone_with_every_rank_tee_d():
    cmd = launch.command(_params(processes=2), "train", "params.yaml", "/tmp/m.json", python=PY)
    assert cmd == [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--standalone",
                   "--tee", "3", "-m", "flows", "train", "--params", "params.yaml", "--worker-result", "/tmp/m.json"]


def test_torchrun_on_several_machines_names_machine_0_and_this_machine(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    params = _params(processes=8, machines=2, main_address="node-a", main_port=29500)
    cmd = launch.command(params, "evaluate", "p.yaml", "r.json", machine_rank=1, python=PY)
    assert shlex.join(cmd) == ("python -m torch.distributed.run --nnodes 2 --nproc_per_node 8 --node_rank 1 "
                               "--master_addr node-a --master_port 29500 --tee 3 "
                               "-m flows evaluate --params p.yaml --worker-result r.json")


def test_main_address_null_comes_from_master_addr_or_is_a_clear_error(monkeypatch):
    params = _params(processes=4, machines=2, main_address=None, main_port=29500)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    assert "--master_addr 10.0.0.7" in shlex.join(launch.command(params, "train", "p", "r", python=PY))
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(launch.LaunchError, match=r"launch\.main_address is null and \$MASTER_ADDR is not set"):
        launch.command(params, "train", "p", "r", python=PY)


def test_accelerate_counts_every_process_and_passes_precision_and_port():
    params = _params(processes=8, accelerate_config="configs/accelerate/zero3.yaml", mixed_precision="bf16")
    cmd = launch.command(params, "train", "params.yaml", "r.json", python=PY, port=41000)
    assert shlex.join(cmd) == (
        "python -m accelerate.commands.launch --config_file configs/accelerate/zero3.yaml --num_processes 8 "
        "--num_machines 1 --machine_rank 0 --main_process_port 41000 --mixed_precision bf16 --tee 3 "
        "-m flows train --params params.yaml --worker-result r.json")
    several = _params(processes=8, machines=4, main_address="head", main_port=29500,
                      accelerate_config="configs/accelerate/fsdp2.yaml")
    text = shlex.join(launch.command(several, "train", "p", "r", machine_rank=3, python=PY, port=41000))
    # 32 processes in all; the fixed port wins over a free one; auto precision is left to the config file
    assert "--num_processes 32 --num_machines 4 --machine_rank 3 --main_process_ip head --main_process_port 29500 " \
           "--tee 3" in text and "--mixed_precision" not in text


def test_commands_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="'filter' is not launched"):
        launch.command(_params(processes=2), "filter", "p", "r")
    with pytest.raises(launch.LaunchError, match=r"machine rank 2 is outside \[0, launch\.machines = 2\)"):
        launch.command(_params(machines=2, main_address="h", main_port=1), "train", "p", "r", machine_rank=2)
    with pytest.raises(launch.LaunchError, match="machine 0 runs the pipeline"):
        launch.join(_params(machines=2, main_address="h", main_port=1), "train", "p", machine_rank=0)


def test_run_job_names_a_missing_accelerate_config(in_tmp):
    with pytest.raises(launch.LaunchError, match=r"launch\.accelerate_config = 'nope\.yaml': no such file"):
        launch.run_job(_params(processes=2, accelerate_config="nope.yaml"), "train", "params.yaml")


def test_describe_shows_the_placeholders_run_job_fills_in():
    text = launch.describe(_params(processes=8, accelerate_config="configs/accelerate/ddp.yaml"), "rollout")
    assert text.startswith("python -m flows rollout --params params.yaml   -> starts: python -m accelerate")
    assert "--main_process_port FREE_PORT" in text and text.endswith("--worker-result METRICS_FILE")


# ------------------------------------------------------------------------------------------------
# Output parsing


TORCHRUN_SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 25050)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_21:51:49
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 25051)
  error_file: <N/A>
"""


def test_root_cause_is_the_first_observed_failure_not_the_ranks_torchrun_stopped():
    assert launch.root_cause(TORCHRUN_SUMMARY.splitlines()) == launch.RootCause(rank=1, local_rank=1, exit_code=1)
    assert launch.root_cause(["Traceback", "ValueError: x"]) is None


def test_failure_takes_the_root_cause_ranks_last_line(tmp_path):
    output = launch.Output()
    # torchrun tails stdout and stderr in separate threads: "loaded 40 rows" (stdout, printed first) may
    # arrive after the traceback (stderr)
    for line in ["[default0]:working", "[default1]:Traceback (most recent call last):",
                 "[default1]:ValueError: bad row 7", "[default1]:", "[default1]:loaded 40 rows",
                 "[default0]:still working", *TORCHRUN_SUMMARY.splitlines()]:
        output.add(line)
    error = launch.failure("train", output, 1, _params(processes=2).launch, 0, tmp_path / "x.log")
    assert type(error) is launch.RankFailed
    assert str(error) == f"train: rank 1 of 2 failed (exit code 1): ValueError: bad row 7; every rank's output is " \
                         f"in {tmp_path / 'x.log'}"
    for lines, expected in ((["x = 1", "KeyboardInterrupt"], "KeyboardInterrupt"),
                            ([launch.EXPECTED_MARK + "bad", "ErrorHandler ready"], launch.EXPECTED_MARK + "bad"),
                            (["torch.OutOfMemoryError: CUDA out of memory", "done"], "torch.OutOfMemoryError: CUDA "
                                                                                      "out of memory"),
                            (["no exception here", "last words"], "last words")):
        rank = launch.Output()
        for line in lines:
            rank.add(f"[default3]:{line}")
        assert rank.error_line(3) == expected
    lone = launch.Output()
    lone.add("torchrun: error: unrecognized arguments: --bogus")
    assert "the launcher failed (exit status 2): torchrun: error: unrecognized" in str(
        launch.failure("train", lone, 2, _params(processes=2).launch, 0, tmp_path / "x.log"))


# ------------------------------------------------------------------------------------------------
# Real jobs of 2 CPU processes with a stand-in program


STAND_IN = textwrap.dedent(f"""\
    import os, sys, time
    rank, mode = int(os.environ["RANK"]), sys.argv[1]
    print(f"rank {{rank}} of {{os.environ['WORLD_SIZE']}} starts", flush=True)
    if mode == "sleep":
        open(os.path.join(sys.argv[2], f"{{rank}}.pid"), "w").write(str(os.getpid()))
        print("ready", flush=True)
        time.sleep(120)
    if rank == 1 and mode == "bug":
        raise ValueError("rank one broke on row 7")
    if rank == 1 and mode == "expected":
        print({launch.EXPECTED_MARK!r} + "params.yaml: train.prompts_per_step = 3: use a multiple of 2", flush=True)
        sys.exit(1)
    if rank == 0:
        time.sleep(1.0)  # rank 1 fails first, so torchrun's root cause is rank 1
    print(f"rank {{rank}} done", flush=True)
    """)


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "stand_in.py"
    path.write_text(STAND_IN)
    return path


def _job(params: config.Params, stand_in, *args: str, tmp_path, on_rank0=None):
    cmd = launch.launcher(params.launch, python=sys.executable, port=launch.free_port()) + [str(stand_in), *args]
    env = {**launch.child_env(None), "OMP_NUM_THREADS": "1"}
    seen: list[str] = []
    returncode, output = launch.supervise(cmd, env, tmp_path / "job.log", on_rank0 or seen.append)
    return returncode, output, seen


LAUNCHERS = [pytest.param({}, id="torchrun"), pytest.param({"accelerate_config": DDP}, id="accelerate")]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAUNCHERS)
def test_a_job_that_succeeds_streams_rank_0_only(layout, stand_in, tmp_path):
    returncode, output, seen = _job(_params(processes=2, **layout), stand_in, "ok", tmp_path=tmp_path)
    assert returncode == 0
    assert seen == ["rank 0 of 2 starts", "rank 0 done"]
    assert list(output.ranks[1]) == ["rank 1 of 2 starts", "rank 1 done"]
    log_text = (tmp_path / "job.log").read_text()
    assert "[default1]:rank 1 done" in log_text and log_text.startswith("$ ")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAUNCHERS)
def test_a_failing_rank_fails_the_stage_with_its_last_error_line(layout, stand_in, tmp_path):
    params = _params(processes=2, **layout)
    returncode, output, seen = _job(params, stand_in, "bug", tmp_path=tmp_path)
    assert returncode != 0
    assert "ValueError: rank one broke on row 7" not in seen  # rank 1's lines stay off the flow log
    error = launch.failure("rollout", output, returncode, params.launch, 0, tmp_path / "job.log")
    assert type(error) is launch.RankFailed and not isinstance(error, RlvrError)
    assert str(error).startswith("rollout: rank 1 of 2 failed (exit code 1): ValueError: rank one broke on row 7;")


@pytest.mark.slow
def test_an_expected_error_on_a_rank_stays_one_expected_line(stand_in, tmp_path):
    params = _params(processes=2)
    returncode, output, _ = _job(params, stand_in, "expected", tmp_path=tmp_path)
    error = launch.failure("train", output, returncode, params.launch, 0, tmp_path / "job.log")
    assert isinstance(error, launch.ExpectedRankFailed) and isinstance(error, RlvrError)
    assert str(error) == ("train: rank 1 of 2 failed (exit code 1): params.yaml: train.prompts_per_step = 3: "
                          "use a multiple of 2")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read() if os.path.exists(f"/proc/{pid}/stat") else ""
    return " Z " not in stat  # a zombie is gone for our purpose


@pytest.mark.slow
def test_an_interrupted_stage_stops_every_rank(stand_in, tmp_path):
    def interrupt_when_ready(text: str) -> None:
        if text == "ready":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _job(_params(processes=2), stand_in, "sleep", str(tmp_path), tmp_path=tmp_path,
             on_rank0=interrupt_when_ready)
    deadline = time.monotonic() + 10
    while not all((tmp_path / f"{r}.pid").exists() for r in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int((tmp_path / f"{r}.pid").read_text()) for r in (0, 1)]
    assert not any(_alive(pid) for pid in pids), "a rank outlived the stage that was interrupted"


# ------------------------------------------------------------------------------------------------
# A real stage as a 2-process job


@pytest.mark.slow
def test_score_runs_as_a_two_process_job_and_returns_rank_0s_metrics(in_tmp, monkeypatch):
    from stages import prepare

    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    raw = small_params_dict()
    raw["prepare"]["train"] = [{"name": "arith", "builtin": True, "size": 40}]
    raw["launch"].update(processes=2)
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    params = config.load("params.yaml")
    prepare.main(params)
    tokenizer = models.build_char_tokenizer()
    models.save_model(models.build_tiny_qwen2(tokenizer, 32, 2, 4, 2, 64, 256, seed=0), tokenizer, "models/warmup")

    metrics = launch.run_job(params, "score", "params.yaml")
    assert metrics["prompts"] == 40 and metrics["invalid"] == 0
    angles = pd.read_parquet("data/curated/angles.parquet")
    assert len(angles) == 40 and sorted(angles["rank"]) == list(range(40))
    log_text = (in_tmp / "logs/score.launch.log").read_text()
    assert "--nproc_per_node 2" in log_text.splitlines()[0]

    # a rank that stops on an expected error fails the stage with that error, as one line
    (in_tmp / "models/warmup/config.json").unlink()
    with pytest.raises(launch.ExpectedRankFailed, match=r"^score: rank \d of 2 failed \(exit code 1\): "
                                                        r".*models/warmup: not a model folder \(no config\.json\)$"):
        launch.run_job(params, "score", "params.yaml")


# ------------------------------------------------------------------------------------------------
# The flow's choice (flows/stages.py run_stage), with MLflow and Prefect stood in for


@pytest.mark.parametrize(("stage", "processes", "launched"), [
    ("train", 1, False), ("train", 2, True), ("score", 2, True), ("rollout", 2, True), ("evaluate", 2, True),
    ("filter", 2, False), ("prepare", 2, False)])
def test_the_stage_flow_launches_a_job_only_for_launched_stages_with_several_processes(
        stage, processes, launched, tmp_path, monkeypatch):
    import contextlib
    import types

    from flows import stages as flow_stages

    path = tmp_path / "params.yaml"
    raw = small_params_dict()
    raw["launch"].update(processes=processes)
    path.write_text(yaml.safe_dump(raw))
    calls = []
    run = types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))
    monkeypatch.setattr(flow_stages, "task", lambda fn, name=None: fn)
    monkeypatch.setattr(flow_stages.sweep, "label_flow_run", lambda flow_run_id: None)
    monkeypatch.setattr(flow_stages.sweep, "sweep", lambda params: [])
    monkeypatch.setattr(flow_stages.sweep, "flow_run_tags", lambda: {})
    monkeypatch.setattr(flow_stages.sweep, "link_mlflow_run", lambda stage, run, params: None)
    monkeypatch.setattr(flow_stages.tracking, "stage_run", lambda *a, **k: contextlib.nullcontext(run))
    monkeypatch.setattr(flow_stages.tracking, "log_metrics", lambda metrics: calls.append(("logged", metrics)))
    monkeypatch.setattr(flow_stages, "log_plots", lambda stage: None)
    monkeypatch.setattr(flow_stages, "create_table_artifact", lambda **k: None)
    monkeypatch.setattr(flow_stages.launch, "run_job",
                        lambda params, name, params_file, run_id: calls.append(("job", name, params_file, run_id))
                        or {"from": "job"})
    metrics = flow_stages.run_stage(stage, lambda params: calls.append(("main", stage)) or {"from": "main"}, str(path))
    if launched:
        assert calls == [("job", stage, str(path), "run-1"), ("logged", {"from": "job"})] and metrics == {"from": "job"}
    else:
        assert calls == [("main", stage), ("logged", {"from": "main"})] and metrics == {"from": "main"}


# ------------------------------------------------------------------------------------------------
# The params the launch and the engines read


def test_check_paths_names_a_missing_accelerate_config():
    config.check_paths(_params(processes=2, accelerate_config="configs/accelerate/ddp.yaml"), ROOT)
    with pytest.raises(config.ConfigError, match=r"^launch\.accelerate_config = 'configs/accelerate/none\.yaml': "
                                                 r"no such file"):
        config.check_paths(_params(accelerate_config="configs/accelerate/none.yaml"), ROOT)


def test_dtype_and_mixed_precision_auto_follow_the_device(monkeypatch):
    import torch

    for bf16, dtype, precision in ((False, torch.float32, "no"), (True, torch.bfloat16, "bf16")):
        monkeypatch.setattr(models, "bf16_available", lambda: bf16)
        assert models.torch_dtype("auto") == dtype and models.mixed_precision("auto") == precision
    assert models.torch_dtype("fp32") == torch.float32 and models.torch_dtype("bf16") == torch.bfloat16
    assert models.mixed_precision("no") == "no" and models.mixed_precision("fp16") == "fp16"


def test_grpo_config_takes_precision_and_the_vllm_server_from_params(tmp_path):
    from stages import train

    raw = small_params_dict()
    raw["train"].update(vllm_mode="server", vllm_server_host="10.1.2.3", vllm_server_port=8123)
    raw["launch"].update(mixed_precision="no")
    cfg = train.grpo_config(config.from_dict(raw), str(tmp_path))
    assert (cfg.vllm_mode, cfg.vllm_server_host, cfg.vllm_server_port) == ("server", "10.1.2.3", 8123)
    assert cfg.bf16 is False and cfg.fp16 is False


def test_rank_0_logs_into_the_flow_s_mlflow_run_and_the_flow_has_the_last_word(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from flows import stages as flow_stages

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    # the flow's run (tracking.stage_run), opened in another process: none is active in the worker
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    monkeypatch.setenv(launch.RUN_ID_ENV, run_id)
    params = _params(processes=2)
    with flow_stages.stage_run_of_job(params, rank=1):
        assert mlflow.active_run() is None  # other ranks log nothing
    with flow_stages.stage_run_of_job(params, rank=0):
        assert mlflow.active_run().info.run_id == run_id
        mlflow.log_metric("loss", 0.5, step=3)  # what MlflowStepMetrics does during training
    assert mlflow.active_run() is None
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5)]
    client.log_metric(run_id, "steps", 4)  # then the flow logs the job's metrics and ends the run
    client.set_terminated(run_id, "FAILED")
    assert client.get_run(run_id).info.status == "FAILED"
