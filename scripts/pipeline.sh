#!/usr/bin/env bash
# Set up and run the default pipeline (built-in task and model) with DVC, then say where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# MLflow's telemetry thread can race the client's HTTP calls (flows/services.py, QUIET_MLFLOW)
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
if [ ! -d .git ]; then
  git init -q   # DVC keeps its state next to a git repository; `dvc exp` also needs a commit
fi
[ -d .dvc ] || dvc init -q
# Every stage's params and the input paths they name, before DVC deletes any stage output.
python -m flows check
dvc repro "$@"
cat <<MSG

Pipeline finished (dvc metrics show / dvc exp show for every number).
  Metrics:  metrics/*.json   (per-problem samples in data/evaluated/{policy,warmup}/; plots: dvc plots show)
  UIs:      .venv/bin/rlvr services up   starts Prefect (http://127.0.0.1:4200) and MLflow
            (http://127.0.0.1:5000) over this project's runs; .venv/bin/rlvr services down stops them.
  Next:     .venv/bin/rlvr retrain (register + promote), .venv/bin/rlvr schedule, .venv/bin/rlvr lineage
MSG
.venv/bin/python -c "import json; from stages.evaluate import summary; print(summary(json.load(open('metrics/eval.json'))))"
