"""Run a stage as a multi-process job: the command line, and the supervision of the child job.

With `launch.processes x launch.machines = 1` (the default) nothing here runs: the stage runs in its
flow's own process, as it always has. With more, the stage's flow (flows/stages.py) runs `run_job`,
which starts one child, either

  python -m torch.distributed.run --nproc_per_node P ... -m flows STAGE --params F --worker-result R
  python -m accelerate.commands.launch --config_file C --num_processes P*M ... -m flows STAGE ...

(`torchrun` and `accelerate launch` are these modules), waits for it, and:

- streams rank 0's output into the flow run's log (the `flows.launch` logger, which Prefect sends to
  the UI) and every rank's output into logs/<stage>.launch.log;
- fails the stage if any rank fails, with the failing rank and its last error line: the rank torchrun
  names as the root cause ("first observed failure"), and the last exception line that rank printed
  (its last line if it printed none; `Output.error_line`). A rank that
  stopped on an expected error (bad params, a missing model) prints it as one marked line, and the
  stage fails with that error as an expected one (one line on the terminal);
- returns the metrics rank 0 wrote to R, which the flow logs to MLflow as for an in-process stage.

Each rank runs `python -m flows STAGE --worker-result R` (flows/stages.py `run_worker`): the stage's
`main(params)`, with rank 0 logging into the flow's MLflow run (its id is in RUN_ID_ENV).

Both launchers run with `--tee 3`, which prefixes every line of local rank i with `[default<i>]:`;
that prefix is how lines are told apart. accelerate's `--num_processes` counts every process on every
machine, torchrun's `--nproc_per_node` those of one machine. On one machine torchrun runs
`--standalone` (a free rendezvous port); accelerate gets a free port picked here, unless
`launch.main_port` is set. On several machines the pipeline runs on machine 0, and every other machine
joins each launched stage with `python -m flows.launch node STAGE --machine-rank R` (the Slurm script
in configs/recipes/slurm/ does this).

The child dies with the stage: it runs in its own process group, which a Ctrl-C or SIGTERM of the
stage stops (SIGTERM, then SIGKILL after KILL_GRACE_S), and on Linux the kernel sends it SIGTERM
when the stage's process dies of SIGKILL (PR_SET_PDEATHSIG), which torchrun passes to its ranks.

What is not covered: an elastic or fault-tolerant restart (--max_restarts stays 0); which ranks do what
inside a stage (flows/stages.py runs the same `main` in every rank).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rlvr.config import Launch, Params
from rlvr.errors import LOG_DIR, RlvrError

log = logging.getLogger(__name__)

# The stages whose flow can start a multi-process job; the others always run in-process.
STAGES = ("score", "rollout", "train", "evaluate")
RUN_ID_ENV = "RLVR_STAGE_RUN_ID"  # the stage's MLflow run, which rank 0 logs into
# A rank that stops on an expected error prints it as its last line, after this mark.
EXPECTED_MARK = "rlvr-expected-error: "
MAIN_ADDRESS_ENV = "MASTER_ADDR"
TORCHRUN = ("-m", "torch.distributed.run")
ACCELERATE = ("-m", "accelerate.commands.launch")
TEE_ALL = ("--tee", "3")  # stdout and stderr of every local rank, prefixed "[default<local rank>]:"
LINES_KEPT = 50  # per rank, for the error line
KILL_GRACE_S = 30.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_RANK_PREFIX = re.compile(r"^\[default(\d+)\]:(.*)$")
# The last line of a Python traceback: "ValueError: ...", "torch.OutOfMemoryError: ...", "KeyboardInterrupt".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*)?(Error|Exception|Interrupt|Exit|Failure)\b")
_ROOT_CAUSE = "Root Cause (first observed failure):"
_ROOT_CAUSE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")
_ROOT_CAUSE_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


class LaunchError(RlvrError):
    """The job cannot be started as configured (no address for machine 0, a missing config file)."""


class RankFailed(RuntimeError):
    """A rank of the job failed; the message names it and its last error line."""


class ExpectedRankFailed(RankFailed, RlvrError):
    """A rank stopped on an expected error (bad params, a missing model): reported as one line."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main_address(launch: Launch) -> str:
    """Machine 0's host: launch.main_address, else $MASTER_ADDR (several machines only)."""
    address = launch.main_address or os.environ.get(MAIN_ADDRESS_ENV)
    if not address:
        raise LaunchError(f"launch.machines = {launch.machines} but launch.main_address is null and "
                          f"${MAIN_ADDRESS_ENV} is not set: set one to machine 0's host name or address")
    return address


def launcher(launch: Launch, machine_rank: int = 0, python: str = sys.executable,
             port: int | str | None = None, address: str | None = None) -> list[str]:
    """The launcher's part of the command line, up to the program it runs.

    `port`: the rendezvous port for accelerate on one machine when launch.main_port is null (the
    caller picks a free one); ignored otherwise. `address`: machine 0's host instead of `main_address`.
    """
    if not 0 <= machine_rank < launch.machines:
        raise LaunchError(f"machine rank {machine_rank} is outside [0, launch.machines = {launch.machines})")
    several = launch.machines > 1
    if launch.accelerate_config is None:
        cmd = [python, *TORCHRUN, "--nnodes", str(launch.machines), "--nproc_per_node", str(launch.processes)]
        if several:
            cmd += ["--node_rank", str(machine_rank), "--master_addr", address or main_address(launch),
                    "--master_port", str(launch.main_port)]
        else:
            cmd += ["--standalone"]
        return [*cmd, *TEE_ALL]
    cmd = [python, *ACCELERATE, "--config_file", launch.accelerate_config,
           "--num_processes", str(launch.world_size), "--num_machines", str(launch.machines),
           "--machine_rank", str(machine_rank)]
    if several:
        cmd += ["--main_process_ip", address or main_address(launch)]
    chosen = launch.main_port if launch.main_port is not None else port
    if chosen is not None:
        cmd += ["--main_process_port", str(chosen)]
    if launch.mixed_precision != "auto":
        cmd += ["--mixed_precision", launch.mixed_precision]
    return [*cmd, *TEE_ALL]


def worker(stage: str, params_file: str, result: str | os.PathLike) -> list[str]:
    """What every rank runs: the stage's main (flows/__main__.py, `--worker-result`)."""
    return ["-m", "flows", stage, "--params", str(params_file), "--worker-result", str(result)]


def command(params: Params, stage: str, params_file: str, result: str | os.PathLike, machine_rank: int = 0,
            python: str = sys.executable, port: int | str | None = None, address: str | None = None) -> list[str]:
    """The exact command line that runs `stage` as params.launch says (only when launch.distributed)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not launched as a job; launched stages: {', '.join(STAGES)}")
    return launcher(params.launch, machine_rank, python, port, address) + worker(stage, params_file, result)


def describe(params: Params, stage: str, params_file: str = "params.yaml") -> str:
    """How `stage` runs under these params, as a shell line a person reads (`rlvr recipe --dry-run`)."""
    if stage not in STAGES or not params.launch.distributed:
        return f"python -m flows {stage} --params {params_file}   (in-process)"
    # what run_job fills in at launch: a free port (accelerate on one machine), machine 0's address when
    # it comes from $MASTER_ADDR, and a temporary file
    address = "$MASTER_ADDR" if params.launch.main_address is None else None
    cmd = command(params, stage, params_file, "METRICS_FILE", python="python", port="FREE_PORT", address=address)
    return f"python -m flows {stage} --params {params_file}   -> starts: {shlex.join(cmd)}"


# ------------------------------------------------------------------------------------------------
# Supervision


@dataclass(frozen=True)
class RootCause:
    rank: int
    local_rank: int
    exit_code: int | None


def root_cause(lines: Iterable[str]) -> RootCause | None:
    """The rank torchrun names under "Root Cause (first observed failure)", if it printed one."""
    found, rank, local, code = False, None, None, None
    for line in lines:
        if _ROOT_CAUSE in line:
            found, rank, local, code = True, None, None, None
            continue
        if not found:
            continue
        if rank is None and (m := _ROOT_CAUSE_RANK.match(line)):
            rank, local = int(m.group(1)), int(m.group(2))
        elif rank is not None and code is None and (m := _ROOT_CAUSE_EXIT.match(line)):
            code = int(m.group(1))
    return RootCause(rank, local, code) if found and rank is not None else None


class Output:
    """The job's output, line by line: the last lines of every local rank and of the launcher itself."""

    def __init__(self) -> None:
        self.ranks: dict[int, collections.deque[str]] = collections.defaultdict(
            partial(collections.deque, maxlen=LINES_KEPT))
        self.launcher: list[str] = []

    def add(self, line: str) -> tuple[int | None, str]:
        """Record one line; returns (local rank or None for the launcher's own line, the text)."""
        match = _RANK_PREFIX.match(line)
        if match is None:
            self.launcher.append(line)
            return None, line
        local, text = int(match.group(1)), match.group(2)
        self.ranks[local].append(text)
        return local, text

    def last_line(self, local_rank: int | None) -> str:
        lines = self.ranks.get(local_rank, ()) if local_rank is not None else self.launcher
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def error_line(self, local_rank: int) -> str:
        """The rank's error: its expected-error line, else its last exception line ("ValueError: ..."),
        else its last line. torchrun tails a rank's stdout and stderr in two threads, so a line the rank
        printed before its traceback can arrive after it: the last line alone is not the error."""
        lines = [line.strip() for line in self.ranks.get(local_rank, ()) if line.strip()]
        for wanted in (lambda line: line.startswith(EXPECTED_MARK), _EXCEPTION_LINE.match):
            found = next((line for line in reversed(lines) if wanted(line)), None)
            if found:
                return found
        return lines[-1] if lines else ""


def failure(stage: str, output: Output, returncode: int, launch: Launch, machine_rank: int,
            log_path: Path) -> RankFailed:
    """The exception that fails the stage: the root-cause rank and its last line (or the launcher's)."""
    cause = root_cause(output.launcher)
    where = f"every rank's output is in {log_path}"
    if cause is None:  # the launcher failed before or without a rank failing
        line = output.last_line(None) or f"exit status {returncode}"
        return RankFailed(f"{stage}: the launcher failed (exit status {returncode}): {line}; {where}")
    line = output.error_line(cause.local_rank) if machine_rank * launch.processes <= cause.rank < (
        machine_rank + 1) * launch.processes else ""
    code = f"exit code {cause.exit_code}" if cause.exit_code is not None else "no exit code"
    head = f"{stage}: rank {cause.rank} of {launch.world_size} failed ({code})"
    if line.startswith(EXPECTED_MARK):
        return ExpectedRankFailed(f"{head}: {line[len(EXPECTED_MARK):]}")
    return RankFailed(f"{head}: {line or 'it printed nothing'}; {where}")


def _die_with_parent(parent: int, prctl: Callable[[int, int], int]) -> None:
    """preexec_fn: SIGTERM to the child when the stage's process dies (torchrun passes it on to the ranks).
    `prctl` is resolved in the parent: loading a library between fork and exec can deadlock."""
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after KILL_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def supervise(cmd: list[str], env: dict[str, str], log_path: Path, on_rank0: Callable[[str], None],
              rank0_local: bool = True) -> tuple[int, Output]:
    """Run `cmd`, write every line to `log_path`, pass local rank 0's lines to `on_rank0` (when this machine
    holds global rank 0), and return the exit status with the output seen."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tie = None
    if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
        tie = partial(_die_with_parent, os.getpid(), ctypes.CDLL(None, use_errno=True).prctl)
    output = Output()
    with log_path.open("w", encoding="utf-8") as sink:
        sink.write(f"$ {shlex.join(cmd)}\n")
        process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", bufsize=1, start_new_session=True, preexec_fn=tie)
        try:
            for raw in process.stdout:
                line = raw.rstrip("\n")
                sink.write(line + "\n")
                sink.flush()
                local, text = output.add(line)
                if local == 0 and rank0_local:
                    on_rank0(text)
            process.wait()
        except BaseException:  # Ctrl-C, Prefect's SIGTERM: stop the job, then let the interrupt go on
            _stop(process)
            raise
        finally:
            process.stdout.close()
    return process.returncode, output


def child_env(run_id: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if run_id:
        env[RUN_ID_ENV] = run_id
    return env


def log_path(stage: str, machine_rank: int = 0) -> Path:
    suffix = f".machine{machine_rank}" if machine_rank else ""
    return LOG_DIR / f"{stage}{suffix}.launch.log"


def run_job(params: Params, stage: str, params_file: str, run_id: str | None = None) -> dict:
    """Run `stage` as the job params.launch describes (from machine 0) and return rank 0's metrics."""
    launch = params.launch
    if launch.accelerate_config is not None and not Path(launch.accelerate_config).is_file():
        raise LaunchError(f"launch.accelerate_config = {launch.accelerate_config!r}: no such file under "
                          f"{Path.cwd()}; name one of configs/accelerate/*.yaml or your own accelerate config")
    port = free_port() if launch.accelerate_config and launch.main_port is None else None
    with tempfile.TemporaryDirectory(prefix=f"rlvr-{stage}-") as tmp:
        result = Path(tmp) / "metrics.json"
        cmd = command(params, stage, params_file, result, port=port)
        path = log_path(stage)
        log.info("%s: %d processes (%d per machine x %d machines): %s", stage, launch.world_size,
                 launch.processes, launch.machines, shlex.join(cmd))
        returncode, output = supervise(cmd, child_env(run_id), path, lambda text: log.info("%s", text))
        if returncode != 0:
            raise failure(stage, output, returncode, launch, 0, path)
        if not result.is_file():
            raise RankFailed(f"{stage}: the job exited 0 but rank 0 wrote no metrics to {result}; see {path}")
        return json.loads(result.read_text())


def join(params: Params, stage: str, params_file: str, machine_rank: int) -> int:
    """Machines 1..M-1: run this machine's ranks of `stage` (machine 0 runs the pipeline)."""
    if machine_rank == 0:
        raise LaunchError("machine 0 runs the pipeline (`dvc repro` / `rlvr run`); join the others with "
                          "--machine-rank 1 .. launch.machines - 1")
    with tempfile.TemporaryDirectory(prefix=f"rlvr-{stage}-") as tmp:
        cmd = command(params, stage, params_file, Path(tmp) / "metrics.json", machine_rank=machine_rank)
        path = log_path(stage, machine_rank)
        returncode, output = supervise(cmd, child_env(None), path, lambda text: None, rank0_local=False)
    if returncode != 0:
        raise failure(stage, output, returncode, params.launch, machine_rank, path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.launch node STAGE --machine-rank R`: join machine R's ranks to a launched stage."""
    from flows import configure_environment
    from rlvr import config
    from rlvr.errors import report

    configure_environment()
    parser = argparse.ArgumentParser(prog="python -m flows.launch", description=main.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    node = sub.add_parser("node", help="run this machine's ranks of a stage that machine 0 launches")
    node.add_argument("stage", choices=STAGES)
    node.add_argument("--machine-rank", type=int, required=True)
    node.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return join(config.load(args.params), args.stage, args.params, args.machine_rank)
    except RlvrError as error:
        print(report(f"launch-{args.stage}", error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
