"""`python -m flows STAGE [--params FILE]`: run one pipeline stage as a Prefect flow.

`python -m flows check` validates the params file and checks that the input paths it names exist
(source files, local model and PRM folders) without running anything: `rlvr run` and
scripts/pipeline.sh call it before `dvc repro`.

An expected error (`rlvr.errors.RlvrError`: bad params, bad data, a missing or corrupt model) is
one line on stderr, `rlvr STAGE: <message> (traceback in logs/STAGE.log; ...)`, and exit status 1.
Params are validated before Prefect starts; an expected error raised inside the flow is kept off
Prefect's console (its traceback and the failed-state lines that repeat it) while the Prefect UI
still records it. RLVR_DEBUG=1 shows everything, tracebacks included. Any other exception is a bug
and keeps its full traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from flows import configure_environment, info_logging
from rlvr import config
from rlvr.errors import RlvrError, debug_enabled, report

CHECK = "check"


class ExpectedErrorFilter(logging.Filter):
    """Drops, from a console handler, records that carry an expected error and Prefect's later
    records that repeat it ("Finished in state Failed('... ModelLoadError: ...')")."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RlvrError):
            self.seen.add(f"{type(error).__name__}: ")
            return False
        if record.name.startswith("prefect") and self.seen:
            message = record.getMessage()
            return not any(name in message for name in self.seen)
        return True


def _console_handlers() -> list[logging.Handler]:
    """Every handler that writes to a terminal stream (Prefect's console handlers included)."""
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    return [handler for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


@contextlib.contextmanager
def quiet_expected_errors() -> Iterator[ExpectedErrorFilter]:
    quiet = ExpectedErrorFilter()
    handlers = _console_handlers()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield quiet
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def run(stage: str, params_file: str, parser: argparse.ArgumentParser, worker_result: str | None = None) -> int:
    if worker_result is not None:  # one rank of a launched stage (flows/launch.py): no Prefect, no new MLflow run
        from flows.stages import MAINS, run_worker

        if stage not in MAINS:
            parser.error(f"unknown stage {stage!r}; choose from {', '.join(MAINS)}")
        return run_worker(stage, params_file, Path(worker_result))
    if stage == CHECK:
        config.check(params_file)
        print(f"rlvr check: {params_file} is valid and every input path it names exists")
        return 0
    config.load(params_file)  # bad params: one line before Prefect starts
    from flows.stages import FLOWS

    if stage not in FLOWS:
        parser.error(f"unknown stage {stage!r}; choose from {', '.join([*FLOWS, CHECK])}")
    info_logging()
    if debug_enabled():
        FLOWS[stage](params_file=params_file)
    else:
        with quiet_expected_errors():
            FLOWS[stage](params_file=params_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.splitlines()[0])
    parser.add_argument("stage", help=f"a stage of dvc.yaml (`dvc stage list`), or {CHECK}: validate params "
                                      "and input paths only")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    # set by flows/launch.py for each rank of a multi-process stage: where rank 0 writes the metrics
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return run(args.stage, args.params, parser, args.worker_result)
    except RlvrError as error:
        if debug_enabled():
            raise
        print(report(args.stage, error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
