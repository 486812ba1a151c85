"""`rlvr doctor`: each check on a case it must pass and one it must flag, and the exit code."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from flows import doctor, services
from tests.conftest import ROOT, free_port


def test_python_outside_requires_python_is_missing_with_the_fix():
    assert doctor.check_python((3, 11, 7)).status == "ok"
    old = doctor.check_python((3, 10, 14))
    assert old.failed and "3.10.14, the project needs >=3.11,<3.13" in old.detail and "setup.sh" in old.fix
    assert doctor.check_python((3, 13, 0)).failed


def test_packages_missing_or_off_their_pin_are_named(tmp_path):
    constraints = tmp_path / "cpu.txt"
    constraints.write_text(f"# pins\nPyYAML=={metadata.version('pyyaml')}\nnumpy==0.0.1\n")
    checks = {c.name: c for c in doctor.check_packages(["pyyaml>=6", "numpy>=1.26", "no-such-package-rlvr[x]>=1"],
                                                        constraints)}
    assert checks["package pyyaml"].status == "ok" and "(pinned)" in checks["package pyyaml"].detail
    assert checks["package numpy"].status == "warn" and "pins 0.0.1" in checks["package numpy"].detail
    missing = checks["package no-such-package-rlvr"]
    assert missing.failed and "no-such-package-rlvr[x]>=1" in missing.fix
    assert doctor.exit_code(list(checks.values())) == 1
    assert doctor.exit_code([checks["package pyyaml"], checks["package numpy"]]) == 0  # a warning is not fatal


def test_a_local_version_label_matches_its_pin(tmp_path):
    """torch's CPU wheel is 2.13.0+cpu where requirements/cpu.txt pins 2.13.0."""
    constraints = tmp_path / "cpu.txt"
    constraints.write_text("pyyaml==" + metadata.version("pyyaml") + "+local\n")
    assert doctor.check_packages(["pyyaml"], constraints)[0].status == "ok"


def test_ports_free_ours_or_taken_by_another_program(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ours = free_port()
    command = [sys.executable, "-m", "http.server", str(ours), "--bind", "127.0.0.1"]
    pid, start, log = services._spawn(tmp_path, "mlflow", command, {})
    services._write_state(tmp_path, {"mlflow": services.Service(
        name="mlflow", pid=pid, port=ours, url=f"http://127.0.0.1:{ours}", health=f"http://127.0.0.1:{ours}/",
        log=log, command=command, start=start)})
    try:
        deadline = time.monotonic() + 60
        while not doctor._listening(ours) and time.monotonic() < deadline:
            time.sleep(0.1)
        free = free_port()
        checks = doctor.check_ports(tmp_path, {"prefect": taken.getsockname()[1], "mlflow": ours, "other": free})
        assert [c.status for c in checks] == ["warn", "ok", "ok"]
        assert "in use by another program" in checks[0].detail and "--prefect-port" in checks[0].fix
        assert f"our mlflow (pid {pid})" in checks[1].detail
        assert "is free" in checks[2].detail
    finally:
        taken.close()
        services.down(tmp_path, grace_s=5)


def _dvc_repo(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    return path


def _dvc(repo: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)


@pytest.mark.slow  # dvc init and config: seconds
def test_remote_none_reachable_or_not_there_yet(tmp_path):
    assert "not a DVC project" in doctor.check_remote(tmp_path).detail
    repo = _dvc_repo(tmp_path / "repo")
    assert doctor.check_remote(repo).detail.startswith("no default remote")
    (tmp_path / "store").mkdir()
    _dvc(repo, "remote", "add", "-d", "team", str(tmp_path / "store"))
    check = doctor.check_remote(repo)
    assert check.status == "ok" and "team" in check.detail and "reachable" in check.detail
    _dvc(repo, "remote", "modify", "team", "url", str(tmp_path / "not-there"))
    check = doctor.check_remote(repo)
    assert check.status == "warn" and "does not exist yet" in check.detail


@pytest.mark.slow  # imports torch and the package metadata: seconds
def test_doctor_prints_one_line_per_check_and_exits_zero_on_this_machine(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.cli", "doctor", "--prefect-port", str(free_port()),
                          "--mlflow-port", str(free_port())], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    names = [line.split()[1] for line in lines if line.split() and line.split()[0] in ("ok", "warn", "MISSING")]
    assert names[:2] == ["python", "git"] and {"postgresql", "cuda", "vllm"} <= set(names)
    assert "nothing the pipeline needs is missing" in lines[-1]
