"""Prefect's temporary API server for one stage process, tied to that process's life.

Without PREFECT_API_URL, Prefect starts a temporary server (uvicorn in a child process) when a flow
first needs the API, and stops it from an exit hook. A SIGKILL runs no exit hook: the server lived on
as an orphan, holding a port and the database in .prefect/. `start()` starts that server before the
flow does, with two differences:

- the kernel kills it when the stage process dies, however it dies (Linux PR_SET_PDEATHSIG). The
  signal is SIGKILL: its only client is gone, and SQLite has already made every commit durable;
- it refuses cross-origin writes like the `rlvr services up` server (flows/security.py).

The server takes the slot Prefect's own clients look up (SubprocessASGIServer's instance for port
None), so every Prefect client in the process uses it, and Prefect's exit hook stops it as before.
The start cost is Prefect's own (the same command and environment).

Not covered: platforms other than Linux (no PR_SET_PDEATHSIG: the server starts as Prefect would
start it, and a SIGKILL can still orphan it). The parent-death signal follows the thread that started
the child, so only a start from the main thread is tied; from any other thread it is not.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

from flows.security import prefect_security

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int, prctl: Callable[[int, int], int]) -> None:
    """preexec_fn: runs in the forked child before exec. `prctl` is resolved in the parent, because
    loading a library between fork and exec can deadlock."""
    if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


class TiedServer(SubprocessASGIServer):
    """Prefect's SubprocessASGIServer with a different spawn: the one method Prefect's `start()`
    calls to launch the process (also when it retries on another port)."""

    def _run_uvicorn_command(self) -> subprocess.Popen:
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                   "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, **prefect_security(self.address),
               # what marks Prefect's temporary server: no UI, only the services meant for it
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               # settings made in this process (profile, environment) win, as in Prefect's own spawn
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        tie = None
        if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
            tie = partial(_die_with_parent, os.getpid(), ctypes.CDLL(None, use_errno=True).prctl)
        return subprocess.Popen(command, env=env, preexec_fn=tie)


def start() -> str | None:
    """Start the temporary server for this process (call it from the main thread, before any flow
    runs, and only without PREFECT_API_URL); returns its API URL, or None where Prefect's settings
    forbid a temporary server (Prefect then reports the missing API URL itself)."""
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    server = TiedServer()
    server.start()
    return server.api_url
