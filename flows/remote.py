"""The team's DVC remote: configured in one place (DVC's own .dvc/config), pushed to after a promotion.

`rlvr remote add URL` runs `dvc remote add --default --force NAME URL`: the remote lands in .dvc/config,
which is committed, so every clone pushes to and pulls from the same place. Credentials never go there:
DVC reads them from the environment or from .dvc/config.local (`dvc remote modify --local`), which git
ignores. After `rlvr retrain` promotes a model it runs `dvc push`, so the champion's model and every
stage output it came from are on the remote; on a fresh clone `dvc pull` then makes `dvc repro` a no-op.

URL: a folder (the test uses one), or s3://, gs://, ssh://, azure://, ... which need the matching DVC
extra (`pip install 'dvc[s3]'` and so on); `add` says when it is missing.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import util
from pathlib import Path

from flows import services

EXTRAS = {"s3": "dvc_s3", "gs": "dvc_gs", "gcs": "dvc_gs", "ssh": "dvc_ssh", "azure": "dvc_azure",
          "hdfs": "dvc_hdfs", "webdav": "dvc_webdav", "oss": "dvc_oss", "gdrive": "dvc_gdrive"}


class RemoteError(RuntimeError):
    pass


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.run([str(dvc) if dvc.exists() else "dvc", *args], cwd=root, capture_output=True, text=True,
                          env=services.dvc_env())


def missing_extra(url: str) -> str | None:
    """The pip requirement a URL's scheme needs when its DVC plugin is not installed, else None."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    module = EXTRAS.get(scheme)
    if module is None or util.find_spec(module) is not None:
        return None
    return f"dvc[{'gs' if scheme == 'gcs' else scheme}]"


def add(root: Path, url: str, name: str = "team") -> str:
    """Make `url` the project's default DVC remote (replacing one of the same name); returns the remote name."""
    if "://" not in url:
        url = str((root / url).resolve())  # a folder: absolute, so `dvc exp run` copies find it too
    result = _dvc(root, "remote", "add", "--default", "--force", name, url)
    if result.returncode != 0:
        raise RemoteError(f"dvc remote add failed: {(result.stderr or result.stdout).strip()[-1000:]}")
    return name


def default(root: Path) -> str | None:
    """The default remote's name, or None when none is configured."""
    result = _dvc(root, "remote", "default")
    name = result.stdout.strip()
    return name if result.returncode == 0 and name else None


def push(root: Path) -> str:
    """`dvc push` of every output in dvc.lock to the default remote; returns DVC's summary line.
    Raises RemoteError with DVC's message when the push fails."""
    result = _dvc(root, "push")
    if result.returncode != 0:
        raise RemoteError(f"dvc push failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else "pushed"
