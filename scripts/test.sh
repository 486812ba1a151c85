#!/usr/bin/env bash
# Set up and run the test suite (extra arguments go to pytest, e.g. -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
