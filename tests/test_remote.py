"""The team's DVC remote: `rlvr remote add`, the push after a promotion, and a fresh clone that pulls.

The slow test uses a tiny DVC project in tmp_path (one stage) and a local folder as the remote, not the
pipeline: what matters is DVC's config, the push, and that `dvc pull` + `dvc repro` on a fresh clone
recompute nothing. It prints the clone's pull + repro time (`-s` shows it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib import util
from pathlib import Path

import pytest
import yaml

from flows import remote
from flows.retrain import push_champion
from tests.conftest import ROOT

GIT = ["git", "-c", "user.name=rlvr-test", "-c", "user.email=rlvr-test@example.invalid"]


def test_a_cloud_url_names_the_dvc_extra_it_needs_when_missing():
    assert remote.missing_extra("/srv/dvc-store") is None
    assert remote.missing_extra("s3://bucket/rlvr") == (None if util.find_spec("dvc_s3") else "dvc[s3]")
    assert remote.missing_extra("gcs://bucket/rlvr") == (None if util.find_spec("dvc_gs") else "dvc[gs]")
    assert remote.missing_extra("ssh://host/srv/dvc") == (None if util.find_spec("dvc_ssh") else "dvc[ssh]")


def _run(cwd: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def _dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


def _tiny_project(path: Path) -> Path:
    path.mkdir()
    _run(path, *GIT, "init", "-q")
    _dvc(path, "init", "-q")
    (path / "src.txt").write_text("a policy, in small\n")
    (path / "params.yaml").write_text("shout: true\n")
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": "mkdir -p models && tr a-z A-Z < src.txt > models/policy.txt", "deps": ["src.txt"],
        "params": ["shout"], "outs": ["models"]}}}))
    _dvc(path, "repro", "-q")
    _run(path, *GIT, "add", "-A")
    _run(path, *GIT, "commit", "-qm", "tiny project")
    return path


@pytest.mark.slow  # a dozen git and dvc commands: seconds each
def test_remote_add_push_after_promotion_and_a_fresh_clone_pulls_and_recomputes_nothing(tmp_path, monkeypatch):
    project = _tiny_project(tmp_path / "project")
    monkeypatch.chdir(project)
    assert push_champion.fn().startswith("no default DVC remote: nothing pushed")

    out = _run(project, sys.executable, "-m", "flows.cli", "remote", "add", "../store")
    assert "default DVC remote: team" in out
    store = tmp_path / "store"
    assert f"url = {store}" in (project / ".dvc" / "config").read_text()  # one place, absolute
    assert remote.default(project) == "team"
    store.mkdir()
    pushed = push_champion.fn()
    assert pushed.startswith("pushed to team:") and "2 files pushed" in pushed, pushed  # the folder and its file
    assert len([p for p in store.rglob("*") if p.is_file()]) == 2
    _run(project, *GIT, "add", ".dvc/config")
    _run(project, *GIT, "commit", "-qm", "team remote")

    clone = tmp_path / "clone"
    _run(tmp_path, *GIT, "clone", "-q", str(project), str(clone))
    assert not (clone / "models").exists()
    started = time.monotonic()
    _dvc(clone, "pull")
    repro = _dvc(clone, "repro")
    seconds = time.monotonic() - started
    print(f"\nfresh clone: dvc pull + dvc repro in {seconds:.1f} s")
    assert (clone / "models" / "policy.txt").read_text() == "A POLICY, IN SMALL\n"
    assert "didn't change, skipping" in repro and "Running stage" not in repro
    assert "up to date" in _dvc(clone, "status")


@pytest.mark.slow
def test_a_failed_push_is_one_clear_error(tmp_path, monkeypatch):
    project = _tiny_project(tmp_path / "project")
    (tmp_path / "store").write_text("a file where the remote's folder should be\n")
    remote.add(project, str(tmp_path / "store"))
    with pytest.raises(remote.RemoteError, match="dvc push failed"):
        remote.push(project)
