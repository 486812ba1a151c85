#!/usr/bin/env bash
# The fast tests (-m "not slow") again, in .venv-gpulibs: a CPU environment with the GPU set's versions of
# transformers, TRL, accelerate, Prefect, MLflow and the rest (requirements/gpu-libs-cpu.txt, derived from
# requirements/gpu.txt by scripts/gpu_libs_constraints.py), CPU torch, no vLLM, no DeepSpeed.
# So the library versions a GPU machine runs are exercised on every change. .ci/run calls it after the
# main suite (it starts `--install-only` in the background first, so the install overlaps the main suite);
# other arguments go to pytest. Idempotent: reinstalls only when pyproject.toml or the constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-gpulibs
constraints=requirements/gpu-libs-cpu.txt
python_bin=${PYTHON:-python3.11}
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.installed-$(cat pyproject.toml "$constraints" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  start=$(date +%s)
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".[dev]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
  echo "test_gpu_versions: installed $venv in $(( $(date +%s) - start )) s"
fi
if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
names = ("torch", "transformers", "trl", "accelerate", "prefect", "mlflow", "huggingface_hub", "numpy", "fastapi")
print("test_gpu_versions: " + ", ".join(f"{n} {version(n)}" for n in names))
EOF
exec "$venv/bin/python" -m pytest -m "not slow" "$@"
