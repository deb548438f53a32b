#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up, check generated code, run the restricted-dispatch
# subset (scripts/same_numbers.sh), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"   # dockerd, debootstrap (Debian puts them in sbin)
bash scripts/setup.sh --test
.venv/bin/python tools/gen_proto.py --check
bash scripts/same_numbers.sh   # the CPU-independence subset with numpy/numba SIMD dispatch restricted
exec .venv/bin/python -m pytest "$@"
