#!/usr/bin/env bash
# Two processes x 4 CPU devices on this machine (one 8-device global mesh),
# then one process with 8 devices: the same step function, the same numbers.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PORT=${PORT:-12355}
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
for i in 0 1; do
  "$PY" examples/multihost/train.py --coordinator=localhost:$PORT --num_processes=2 \
      --process_id=$i --cpu_devices=4 &
done
wait
"$PY" examples/multihost/train.py --single --cpu_devices=8
