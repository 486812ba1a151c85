"""The project's expected errors, and how an entry point reports one.

`RlvrError` is the base of every error a user can cause and fix: bad params (`config.ConfigError`),
bad data (`data.DataError`, `prepare.ContaminationError`), a missing or corrupt model or tokenizer
(`models.ModelLoadError`). Its message names the file, key or path and says what to do. The entry
points (`python -m flows STAGE`, `rlvr`) print such an error as one line and write the traceback to
a log file; any other exception is a bug and keeps its full traceback on the terminal.

What is not covered: choosing which exceptions are expected is done where they are raised (by
deriving from `RlvrError`), never by matching messages here.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

# RLVR_DEBUG=1: expected errors show their full traceback on the terminal as well.
DEBUG_ENV = "RLVR_DEBUG"
LOG_DIR = Path("logs")


class RlvrError(Exception):
    """An error the user can fix; its message is the whole story (file, key or path, and the fix)."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """The error's message on one line (a message that spans lines is joined with spaces)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def log_file(command: str, root: Path | None = None) -> Path:
    """Where `command`'s tracebacks go: logs/<command>.log under the project (the working directory)."""
    return (root or Path.cwd()) / LOG_DIR / f"{command}.log"


def write_traceback(path: Path, command: str, error: BaseException) -> None:
    """Append a dated entry with the command line and the full traceback to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    entry = (f"--- {stamp} rlvr {command}: {' '.join(sys.argv)}\n"
             + "".join(traceback.format_exception(error)))
    with path.open("a", encoding="utf-8") as handle:
        handle.write(entry)


def report(command: str, error: BaseException, root: Path | None = None) -> str:
    """Log the traceback and return the line for stderr: `rlvr <command>: <message> (traceback: <log>)`."""
    path = log_file(command, root)
    try:
        write_traceback(path, command, error)
        where = f"traceback in {os.path.relpath(path)}"
    except OSError as log_error:  # a read-only project must not hide the real error
        where = f"traceback not written to {path}: {log_error.strerror}"
    return f"rlvr {command}: {one_line(error)} ({where}; {DEBUG_ENV}=1 shows it here)"
