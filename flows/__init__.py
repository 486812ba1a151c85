"""Prefect flows: every DVC stage (flows/stages.py) and scheduled retraining (flows/retrain.py).

Importing this package sets environment defaults before Prefect is imported, so that our own loggers
reach the Prefect UI and no analytics are sent; values already in the environment win. Prefect's
state (the temporary server's database) lives under the project, next to mlruns/.
"""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve() / ".prefect"))
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rlvr,stages,flows")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def info_logging() -> None:
    """Prefect attaches its API handler to the extra loggers but leaves their level at the root's
    WARNING; INFO is where the stages report counts and timings."""
    import logging

    for name in os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"].split(","):
        logging.getLogger(name.strip()).setLevel(logging.INFO)
