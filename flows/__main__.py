"""`python -m flows STAGE [--params FILE]`: run one pipeline stage as a Prefect flow.

Environment defaults are set here, before Prefect is imported, so that our own loggers reach the
Prefect UI and no analytics are sent; values already in the environment win.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Prefect's state (the temporary server's database) lives under the project, next to mlruns/.
os.environ.setdefault("PREFECT_HOME", str(Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve() / ".prefect"))
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rlvr,stages")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main(argv: list[str] | None = None) -> int:
    from flows.stages import FLOWS

    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(FLOWS))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    # Prefect attaches its API handler to the extra loggers but leaves their level at the root's
    # WARNING; INFO is where the stages report counts and timings.
    for name in os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"].split(","):
        logging.getLogger(name.strip()).setLevel(logging.INFO)
    FLOWS[args.stage](params_file=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
