"""`rlvr services up --vllm`: the vLLM server of `train.vllm_mode: server`, started, recorded and stopped.

vLLM cannot run here, so the command is checked against TRL's own `trl vllm-serve` parser and command
builder, and the start / status / down logic runs on a stand-in server that answers /health like vLLM's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import services
from rlvr import config, models, tracking
from tests.conftest import ROOT, free_port, small_params_dict

# Answers GET /health with 200, as vLLM's OpenAI server (and so TRL's VLLMClient.check_server) expects.
STAND_IN = ("import http.server, sys\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200 if self.path == '/health' else 404); self.end_headers()\n"
            "    def log_message(self, *args): pass\n"
            "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


def server_params(port: int = 8000, **train) -> config.Params:
    data = small_params_dict()
    data["train"].update({"use_vllm": True, "vllm_mode": "server", "vllm_server_host": "127.0.0.1",
                          "vllm_server_port": port, **train})
    return config.from_dict(data)


def hub_params(port: int = 8000, name: str = "Qwen/Qwen2.5-Math-7B") -> config.Params:
    """A recipe-like setup: a hub model, no warm-up training (models/warmup passes model.name through)."""
    data = small_params_dict()
    data["model"]["name"] = name
    data["warmup"]["enabled"] = False
    data["train"].update(use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=port)
    return config.from_dict(data)


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


# --- the command: exactly what `trl vllm-serve` runs -------------------------------------------------------

def test_the_command_is_the_one_trl_vllm_serve_runs():
    from trl.scripts.vllm_serve import build_command, make_parser

    params = hub_params(port=8123)
    command = services.vllm_command(params, "Qwen/Qwen2.5-Math-7B", tensor_parallel=1, data_parallel=2)
    # what a TRL user types, parsed by TRL's own `trl vllm-serve` parser
    args, extra = make_parser(prog="trl vllm-serve").parse_args_and_config(
        ["--model", "Qwen/Qwen2.5-Math-7B", "--host", "127.0.0.1", "--port", "8123", "--dtype", "float32",
         "--data_parallel_size", "2"], return_remaining_strings=True)
    assert command == build_command(args, extra)
    serve = command.index("serve")
    assert command[serve - 2:serve + 2] == ["-m", "vllm.entrypoints.cli.main", "serve", "Qwen/Qwen2.5-Math-7B"]
    flags = dict(zip(command[serve + 2::2], command[serve + 3::2]))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123" and flags["--data-parallel-size"] == "2"
    assert flags["--dtype"] == "float32"  # model.dtype auto on a CPU-only machine
    assert "--weight-transfer-config" in command  # what GRPO's weight sync needs from the server


@pytest.mark.parametrize(("dtype", "expected"), [("bf16", "bfloat16"), ("fp32", "float32")])
def test_the_server_loads_the_model_in_model_dtype(dtype, expected):
    data = small_params_dict()
    data["model"]["dtype"] = dtype
    data["train"].update(use_vllm=True, vllm_mode="server")
    command = services.vllm_command(config.from_dict(data), "m")
    assert command[command.index("--dtype") + 1] == expected


# --- the model: the one the train stage starts from ------------------------------------------------------------

def test_with_a_trained_warmup_the_server_serves_models_warmup(tmp_path):
    params = server_params()
    assert params.warmup.enabled
    with pytest.raises(services.ServiceError, match=r"models/warmup, which holds no model yet.*dvc repro warmup"):
        services.served_model(tmp_path, params)
    folder = _model_folder(tmp_path / "models" / "warmup")
    assert services.served_model(tmp_path, params) == str(folder.resolve())


def test_with_a_pass_through_warmup_the_server_serves_model_name(tmp_path):
    # warmup.enabled: false writes models/warmup/model_ref.json naming model.name; the server loads model.name
    params = hub_params()
    models.write_model_ref(tmp_path / "models" / "warmup", "Qwen/Qwen2.5-Math-7B")
    assert services.served_model(tmp_path, params) == "Qwen/Qwen2.5-Math-7B"
    local = _model_folder(tmp_path / "base")
    data = small_params_dict()
    data["model"]["name"] = "base"
    data["warmup"]["enabled"] = False
    assert services.served_model(tmp_path, config.from_dict(data)) == str(local.resolve())


# --- one line for every mistake, before anything starts --------------------------------------------------------

@pytest.mark.parametrize(("train", "gpus", "tp", "message"), [
    ({"vllm_mode": "colocate"}, None, 1, "train.use_vllm: true, train.vllm_mode: colocate; set train.use_vllm: true "
                                         "and train.vllm_mode: server"),
    ({"use_vllm": False}, None, 1, "train.use_vllm: false"),
    ({"vllm_server_host": "10.0.0.5"}, None, 1, "train.vllm_server_host is '10.0.0.5'.*bound to 127.0.0.1 only"),
    ({}, "0,1,2", 2, "names 3 GPUs, not a multiple of --vllm-tensor-parallel 2"),
    ({}, None, 0, "at least 1"),
])
def test_plan_refuses_what_cannot_work(tmp_path, train, gpus, tp, message):
    with pytest.raises(services.ServiceError, match=message):
        services.plan_vllm(tmp_path, server_params(**train), gpus, tp)


def test_without_vllm_installed_it_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "_vllm_installed", lambda: False)
    with pytest.raises(services.ServiceError) as error:
        services.plan_vllm(tmp_path, hub_params(), "0,1", 1)
    assert str(error.value) == ("`rlvr services up --vllm` needs vLLM, which is not installed here: install the GPU "
                                "set, pip install -c requirements/gpu.txt -e '.[gpu,dev]'")


def test_plan_sets_the_gpus_and_data_parallel(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "_vllm_installed", lambda: True)
    model, command, env = services.plan_vllm(tmp_path, hub_params(), "4, 5,6,7", 2)
    assert model == "Qwen/Qwen2.5-Math-7B"
    assert env == {"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert command[command.index("--data-parallel-size") + 1] == "2"
    assert command[command.index("--tensor-parallel-size") + 1] == "2"


@pytest.mark.skipif(services._vllm_installed(), reason="vLLM is installed here: the missing-vLLM error cannot happen")
def test_cli_up_vllm_without_vllm_is_one_line_and_starts_nothing(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["train"].update(use_vllm=True, vllm_mode="server")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "services", "up", "--vllm", "--prefect-port",
                          str(free_port()), "--mlflow-port", str(free_port())],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["rlvr: `rlvr services up --vllm` needs vLLM, which is not installed "
                                               "here: install the GPU set, pip install -c requirements/gpu.txt "
                                               "-e '.[gpu,dev]'"], out.stderr
    assert not (tmp_path / services.STATE).exists() and not (tmp_path / "logs").exists()


# --- start, status, down: a stand-in server --------------------------------------------------------------------

def test_start_records_the_server_status_shows_it_and_down_stops_it(tmp_path, monkeypatch):
    port = free_port()
    params = hub_params(port=port)
    monkeypatch.setattr(services, "_vllm_installed", lambda: True)
    stand_in = [sys.executable, "-c", STAND_IN, str(port)]
    seen = {}

    def fake_command(params_, model, tensor_parallel, data_parallel):
        seen.update(model=model, tp=tensor_parallel, dp=data_parallel)
        return stand_in

    monkeypatch.setattr(services, "vllm_command", fake_command)
    service = services.start_vllm(tmp_path, params, gpus="6,7", timeout_s=60)
    try:
        assert seen == {"model": "Qwen/Qwen2.5-Math-7B", "tp": 1, "dp": 2}
        record = json.loads((tmp_path / services.STATE).read_text())["vllm"]
        assert record["pid"] == service.pid and record["start"] == tracking.process_start(service.pid)
        assert record["command"] == stand_in and record["model"] == "Qwen/Qwen2.5-Math-7B"
        assert record["url"] == f"http://127.0.0.1:{port}" and record["health"].endswith("/health")
        assert (Path(f"/proc/{service.pid}/environ").read_bytes().split(b"\0")
                .count(b"CUDA_VISIBLE_DEVICES=6,7")) == 1
        report = services.status(tmp_path)["vllm"]
        assert report["healthy"] and report["is_server"] and report["model"] == "Qwen/Qwen2.5-Math-7B"
        # asked again: the running server is reused; another model on the same port is refused
        assert services.start_vllm(tmp_path, params, gpus="6,7").pid == service.pid
        with pytest.raises(services.ServiceError, match="already runs for Qwen/Qwen2.5-Math-7B"):
            services.start_vllm(tmp_path, hub_params(port=port, name="Qwen/Qwen2.5-Math-1.5B"))
        for name in ("dvc.yaml", "params.yaml"):  # `rlvr` runs from a project root
            (tmp_path / name).write_text((ROOT / name).read_text())
        out = subprocess.run([sys.executable, "-m", "flows.cli", "services", "status"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        line = next(x for x in out.stdout.splitlines() if x.startswith("vllm"))
        assert "healthy" in line and "model Qwen/Qwen2.5-Math-7B" in line, out.stdout
    finally:
        outcome = services.down(tmp_path, grace_s=10)
    assert outcome["vllm"] == f"stopped (pid {service.pid})"
    assert tracking.process_start(service.pid) is None and services.read_state(tmp_path) == {}


def test_a_server_that_dies_during_start_up_is_reported_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "_vllm_installed", lambda: True)
    monkeypatch.setattr(services, "vllm_command", lambda *a: [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(services.ServiceError, match=r"exited during start-up; see .*logs/vllm.log"):
        services.start_vllm(tmp_path, hub_params(port=free_port()), timeout_s=60)
    assert "vllm" in services.read_state(tmp_path)  # recorded before the wait
    assert services.down(tmp_path)["vllm"].startswith("was not running")
    assert services.read_state(tmp_path) == {}


def test_for_the_vllm_server_recipe_it_serves_the_recipes_model_in_bf16(monkeypatch):
    """`rlvr services up --vllm --recipe NAME` before `rlvr recipe NAME --exp` (params.yaml unchanged): the
    server gets the recipe's hub model (its warm-up passes it through to train), dtype and port."""
    from flows import cli

    monkeypatch.setattr(services, "_vllm_installed", lambda: True)
    params = cli._services_params(ROOT, "qwen2.5-math-7b-zero3-vllm-server")
    model, command, env = services.plan_vllm(ROOT, params, "6,7")
    assert model == "Qwen/Qwen2.5-Math-7B" == params.model.name and not params.warmup.enabled
    flags = {flag: command[command.index(flag) + 1] for flag in ("--host", "--port", "--dtype", "--data-parallel-size")}
    assert flags == {"--host": "127.0.0.1", "--port": "8000", "--dtype": "bfloat16", "--data-parallel-size": "2"}
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7"
