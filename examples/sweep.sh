#!/usr/bin/env bash
# A local hyperparameter sweep: one dss_train.py run per combination, each logged to MLflow.
#
#   mlflow server --host 127.0.0.1 --port 5000 &            # or any tracking server
#   MLFLOW_TRACKING_URI=http://127.0.0.1:5000 bash examples/sweep.sh ./output
#   mlflow ui                                                # or open the server's page: compare the runs
#
# Settings through the environment: EXPERIMENT (MLflow experiment name), LEARNING_RATES and
# LABEL_SMOOTHINGS (space-separated grids), EXTRA_ARGS (more dss_train.py flags for every run),
# MODELS (where each run's model dir goes), PYTHON (the interpreter).
set -euo pipefail
data_dir=${1:-./output}
python=${PYTHON:-python}
experiment=${EXPERIMENT:-dss-sweep}
for learning_rate in ${LEARNING_RATES:-0.0003 0.001 0.003}; do
  for label_smoothing in ${LABEL_SMOOTHINGS:-0.0 0.1}; do
    # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
    "$python" dss_train.py --data-dir "$data_dir" \
        --model-dir "${MODELS:-models/sweep}/lr${learning_rate}-ls${label_smoothing}" \
        --learning-rate "$learning_rate" --label-smoothing "$label_smoothing" \
        --mlflow-experiment "$experiment" ${EXTRA_ARGS:-}
  done
done
