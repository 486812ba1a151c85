#!/usr/bin/env bash
# Set up and run the default pipeline (built-in task and model) with DVC, then say where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
if [ ! -d .git ]; then
  git init -q   # DVC keeps its state next to a git repository; `dvc exp` also needs a commit
fi
[ -d .dvc ] || dvc init -q
dvc repro "$@"
cat <<MSG

Pipeline finished (dvc metrics show / dvc exp show for every number).
  Metrics:    metrics/*.json   (dvc metrics show; per-problem samples in data/evaluated/{policy,warmup}/)
  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlruns/mlflow.db --host 127.0.0.1 --port 5000
              then open http://127.0.0.1:5000
  Prefect UI: PREFECT_HOME=$PWD/.prefect .venv/bin/prefect server start --host 127.0.0.1 --port 4200
              then open http://127.0.0.1:4200 (flow runs: prepare, warmup, score, rollout, filter, train, evaluate)
MSG
.venv/bin/python -c "import json; from stages.evaluate import summary; print(summary(json.load(open('metrics/eval.json'))))"
