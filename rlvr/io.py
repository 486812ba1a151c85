"""Atomic file output and small I/O helpers shared by every stage.

Every artifact the pipeline writes goes through these functions: the content is written to a
temporary file in the destination folder and renamed over the target, so a crash (or a killed
stage) never leaves half a file and never destroys the output of an earlier successful run.
A folder output (a saved model) is built in a sibling temporary folder and swapped in at the end.

A SIGKILL runs no cleanup, so a killed writer leaves its temporary file or folder behind. Their
names carry the writer's process id (`.<name>.<pid>.<random>.tmp`, `.old` for a folder being
replaced), and the next write of the same path removes those whose process no longer runs, so a
rerun of a killed stage cleans up after it while a concurrent writer's file is left alone. Process
ids are only meaningful on one machine: writers on several hosts sharing a folder are not covered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


# `.<name>.<pid>.<random>.<tmp|old>`; tempfile's random part has no dots, so the last three
# dot-separated fields are always pid, random part and kind, whatever dots `name` has.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]+\.(?:tmp|old)$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def orphans(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Temporary files and folders in `folder` (for target `name`, or any) whose writer no longer runs."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and (name is None or match["name"] == name) and not _running(int(match["pid"])):
            found.append(entry)
    return sorted(found)


def remove_orphans(folder: str | os.PathLike, name: str | None = None) -> int:
    """Delete what `orphans` finds; return how many entries went."""
    gone = orphans(folder, name)
    for entry in gone:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return len(gone)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give under the process umask (0644 / 0755 typically).
    mkstemp and mkdtemp create 0600 / 0700, which would hide a team's shared outputs from the team."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`.

    On an exception the temporary file is removed and `path` is left as it was. Temporary files of
    `path` left by killed writers are removed first. The file gets `mode` (default: what the umask
    allows, as open() would give); secrets pass 0o600. The temporary file is 0600 until then, so a
    secret is never readable by others, not even half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_mode() if mode is None else mode)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on success it replaces `path`.

    The old folder (if any) is moved aside first and deleted only after the new one is in place,
    so at every moment a complete folder exists: the old or the new one under `path`, or, between
    the two renames, the old one in the `.old` sibling. Leftovers of killed writers go first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 would hide the folder from the team
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write `text` atomically; `mode` as in atomic_path (0o600 for a secret)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: str | os.PathLike, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a parquet file written by an earlier stage and check that `required` columns exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (did the stage that writes it run? try `dvc repro`)")
    frame = pd.read_parquet(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: str | os.PathLike) -> str:
    """The md5 DVC records in dvc.lock for `path`: plain md5 for a file, a `.dir` hash for a folder.

    A folder's hash is the md5 of the JSON list of its files (sorted by POSIX relative path, each
    `{"md5": ..., "relpath": ...}`), the same construction DVC 3 uses, so the digests we log to
    MLflow can be matched against dvc.lock (a test checks that they are equal).
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not found")
    entries = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        entries.append({"md5": file_md5(file), "relpath": file.relative_to(path).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    payload = json.dumps(entries, sort_keys=True).encode()
    return hashlib.md5(payload).hexdigest() + ".dir"
