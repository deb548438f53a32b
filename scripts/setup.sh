#!/usr/bin/env bash
# Set up everything sparseps needs on this machine: a virtual environment with the package
# (editable) and its development extras, and -- with --test, when run as root -- the Debian
# packages the test suite drives for real (Prometheus, the Docker engine, debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# numba compiles the shard's kernels on first use: about a minute on two cores. Do it once here,
# into numba's on-disk cache, so every server the demo or the tests start is up in a second.
.venv/bin/python -m sparseps.server --compile-kernels
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
  # tf-keras (Keras 2 on TF 2.21) for the TF-checkpoint round trip; --no-deps: its own pin would
  # pull the full `tensorflow` package next to tensorflow-cpu
  .venv/bin/python -m pip install -q --no-deps tf-keras==2.21.0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for pkg in $(grep -v '^#' apt-test.txt); do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
  fi
fi
