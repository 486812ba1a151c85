#!/usr/bin/env bash
# Create .venv and install the project with the pinned CPU dependency set (requirements/cpu.txt).
# Idempotent: reinstalls only when pyproject.toml or the constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3.11}
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml requirements/cpu.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c requirements/cpu.txt -e ".[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
