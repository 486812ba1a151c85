"""Prefect flows: every DVC stage (flows/stages.py), scheduled retraining (flows/retrain.py), the
`rlvr` command line (flows/cli.py) and the local services it manages (flows/services.py).

Importing this package changes nothing. Entry points (`python -m flows`, `rlvr`) call
`configure_environment()` before they import Prefect, so that our own loggers reach the Prefect UI, no
analytics are sent and Prefect's state (the temporary server's database) lives under the project,
next to mlruns/. Values already in the environment win.
"""

import os
from pathlib import Path

LOGGERS = "rlvr,stages,flows"


def configure_environment() -> None:
    """Environment defaults for Prefect and MLflow; call before Prefect is imported."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", LOGGERS)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Prefect allows its temporary server 20 s to start; creating a fresh database on a busy 2-core
    # machine has taken longer, which failed the stage before it did any work.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def info_logging() -> None:
    """Prefect attaches its API handler to the extra loggers but leaves their level at the root's
    WARNING; INFO is where the stages report counts and timings."""
    import logging

    for name in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", LOGGERS).split(","):
        logging.getLogger(name.strip()).setLevel(logging.INFO)
