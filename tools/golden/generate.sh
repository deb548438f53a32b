#!/usr/bin/env bash
# One command to (re)build every golden file in tests/golden/:
#   tools/golden/generate.sh            # make missing envs, run all generators, check
# Environment:
#   SKIP_TF1=1      do not try to build / use the TF 1.15 env (tf1contrib_* files are then kept
#                   as they are; contrib_lazyadam_v1_* still come from the compat.v1 re-statement)
#   SKIP_KERAS3=1   skip the Keras 3 (TF 2.21, project .venv) configs and trajectories
#   SKIP_TORCH=1    skip the torch 2.13 (project .venv) trajectories in tests/golden/torch/
# Runs the generators one after another (never in parallel).
set -eu
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
HERE=tools/golden

"$HERE/make_env.sh"

echo "== TF 2.15.1 / Keras 2.15 / tfa 0.23.0 trajectories"
.venv-golden/bin/python "$HERE/generate.py"

echo "== TF 2.15 function values (pow, beta powers, schedules): tests/golden/functions/tf215.npz"
.venv-golden/bin/python "$HERE/functions.py"

echo "== Keras 2.15 model parity golden (matrix factorisation + LazyAdam)"
.venv-golden/bin/python "$HERE/keras_mf.py"

if [ "${SKIP_TF1:-0}" != "1" ] && [ -x .venv-golden-tf1/bin/python ] \
   && .venv-golden-tf1/bin/python -c 'import tensorflow' >/dev/null 2>&1; then
  echo "== TF 1.15 tf.contrib.opt.LazyAdamOptimizer trajectories"
  .venv-golden-tf1/bin/python "$HERE/generate_tf1.py"
else
  echo "!! no TF 1.15 env: tf1contrib_lazyadam_* not regenerated"
fi

if [ "${SKIP_KERAS3:-0}" != "1" ] && [ -x .venv/bin/python ] \
   && .venv/bin/python -c 'import tensorflow, keras' >/dev/null 2>&1; then
  echo "== Keras 3 (project .venv) configs and trajectories"
  .venv/bin/python "$HERE/keras3_configs.py"
else
  echo "!! project .venv has no TensorFlow/Keras 3: keras3_* not regenerated"
fi

if [ "${SKIP_TORCH:-0}" != "1" ] && [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  echo "== torch 2.13 (project .venv) sparse optimizers -> tests/golden/torch/"
  (cd "$HERE" && ../../.venv/bin/python torch_golden.py)
else
  echo "!! project .venv has no torch: torch_* not regenerated"
fi

echo "== checking"
.venv-golden/bin/python "$HERE/check_golden.py"
