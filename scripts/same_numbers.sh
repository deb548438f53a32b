#!/usr/bin/env bash
# The same numbers on any CPU: the reference's function table (tests/test_same_numbers.py) and a
# conformance subset -- every optimizer family, float32 -- with the CPU dispatch restricted: numpy's
# SIMD kernels off (baseline x86-64-v2 only), numba compiling for a generic x86-64, on one numba
# thread and on four. A result that depends on AVX2/AVX-512 dispatch then fails on any machine,
# whatever its CPU. scripts/test.sh runs this before the whole suite; it needs the set-up .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR"
export NUMBA_CPU_NAME=generic
export SPARSEPS_TEST_BACKENDS=numba,numpy
CASES="lazyadam lazyadam_clipnorm lazyadam_global_clipnorm lazyadam_cosinerestarts lazyadam_expdecay
       adam adam_amsgrad adam_clipvalue kerasnew_adam_wd radam radam_warmup lookahead_radam sgd_nesterov
       sgd_momentum adagrad_decay ftrl_power ftrl_shrinkage rmsprop_momentum_centered keras3_adam_wd
       keras3_rmsprop_centered keras3_adagrad contrib_lazyadam_v1 tf1contrib_lazyadam"
TORCH="torch_sparseadam_dups torch_adagrad_dups torch_sgd_dups"
ids() {
  for b in "$@"; do
    for c in $CASES; do echo "tests/test_conformance.py::test_matches_reference[$b-${c}_f32]"; done
    for c in $TORCH; do echo "tests/test_torch_conformance.py::test_matches_torch[$b-${c}_f32]"; done
  done
}
# numba caches code per CPU name: compile the generic kernels once, before any server starts
.venv/bin/python -m sparseps.server --compile-kernels
echo "== restricted dispatch, 1 numba thread"
NUMBA_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_same_numbers.py \
  tests/test_fused_kernels.py tests/test_torch_optimizers.py $(ids numba numpy)
echo "== restricted dispatch, 4 numba threads"
NUMBA_NUM_THREADS=4 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py $(ids numba)
