"""`python -m flows STAGE [--params FILE]`: run one pipeline stage as a Prefect flow."""

from __future__ import annotations

import argparse
import sys

from flows import configure_environment, info_logging


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    from flows.stages import FLOWS

    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(FLOWS))
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    info_logging()
    FLOWS[args.stage](params_file=args.params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
