#!/usr/bin/env bash
# The one run a session with a GPU makes (issue 15): the golden suite on the cuda backend on the
# real device, the golden suite on the TensorFlow backend with --device /GPU:0 (where TensorFlow
# is installed), then bench/bench_cuda.py (copy bandwidth, LazyAdam apply on cuda and TF, push_pull
# steps/s of a cuda shard against a numba shard). Raw results go to bench/results/gpu_<UTC stamp>/
# (and to $OUT, which the device tool brings back: commit them from there).
#
# Prepare here, once (the device machine reaches no package index; its python3 has numba,
# numba-cuda, numpy, grpcio, protobuf, pytest, prometheus-client but not grpcio-health-checking
# or grpcio-reflection):
#     bash bench/gpu_check.sh --fetch-wheels          # cp312 wheels into .whl/ (git-ignored)
# Then one device `run`, carry [".whl"], timeout_s 600:
#     bash bench/gpu_check.sh
# Budget: ~1 min start, golden cuda ~2 min, TF ~2 min (if present), bench ~4 min.
set -uo pipefail
cd "$(dirname "$0")/.."
GRPC=1.85.3
PROTOBUF=7.36.2

if [ "${1:-}" = "--fetch-wheels" ]; then
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  plats=""
  for n in 2_28 2_27 2_17 2014 1; do
    case $n in 2014|1) plats="$plats --platform manylinux${n}_x86_64";; *) plats="$plats --platform manylinux_${n}_x86_64";; esac
  done
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plats -d .whl \
    "grpcio==$GRPC" "grpcio-health-checking==$GRPC" "grpcio-reflection==$GRPC" "protobuf==$PROTOBUF"
  exit $?
fi

PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=bench/results/gpu_$STAMP
mkdir -p "$RES"
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$RES/summary.txt"; }

# the package without pip's build step: sparseps = client/, sparseps.server = server/, sparseps.proto = proto/
SITE=/tmp/sparseps-site
rm -rf "$SITE" && mkdir -p "$SITE/sparseps"
cp -r client/. "$SITE/sparseps/"
ln -s "$PWD/server" "$SITE/sparseps/server"
ln -s "$PWD/proto" "$SITE/sparseps/proto"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/wheels-site .whl/*.whl
  export PYTHONPATH=/tmp/wheels-site
fi
# GPU_CHECK_SIMULATOR=1 BENCH_ARGS=--smoke: a dry run of this script on a machine without a GPU
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" NUMBA_ENABLE_CUDASIM=${GPU_CHECK_SIMULATOR:-0} PYTHONUNBUFFERED=1

log "machine"
{ nvidia-smi; $PY -c "import numba, numpy, grpc, google.protobuf as pb; from numba import cuda; \
print('numba', numba.__version__, 'numpy', numpy.__version__, 'grpc', grpc.__version__, 'protobuf', pb.__version__); \
print('cuda available', cuda.is_available()); cuda.detect()"; } > "$RES/machine.txt" 2>&1
tail -3 "$RES/machine.txt" | tee -a "$RES/summary.txt"

log "PTX of every kernel for this device (FMA count must be 0)"
cc=$($PY -c "from numba import cuda; print('%d.%d' % cuda.get_current_device().compute_capability)" 2>/dev/null || echo 9.0)
timeout 120 $PY tools/cuda_ptx_check.py --cc "$cc" > "$RES/ptx_check.txt" 2>&1; echo "exit $?" >> "$RES/ptx_check.txt"
tail -2 "$RES/ptx_check.txt" | tee -a "$RES/summary.txt"

log "golden suite + backend tests on the cuda backend (real device)"
timeout 200 $PY -m pytest tests/test_conformance.py tests/test_cuda_backend.py -k "on_cuda or test_cuda_backend" \
  -q -p no:cacheprovider -x > "$RES/golden_cuda.txt" 2>&1
echo "exit $?" >> "$RES/golden_cuda.txt"
tail -3 "$RES/golden_cuda.txt" | tee -a "$RES/summary.txt"

log "golden suite on the TensorFlow backend, --device /GPU:0"
if $PY -c "import tensorflow as tf; assert tf.config.list_physical_devices('GPU')" > /dev/null 2>&1; then
  SPARSEPS_DEVICE=/GPU:0 SPARSEPS_TEST_BACKENDS=tensorflow timeout 150 $PY -m pytest tests/test_conformance.py \
    -k "test_matches_reference and not grpc and not three_shards and not on_cuda" -q -p no:cacheprovider \
    > "$RES/golden_tf_gpu.txt" 2>&1
  echo "exit $?" >> "$RES/golden_tf_gpu.txt"
else
  echo "not run: TensorFlow with a GPU is not installed here (its wheels exceed what a run can carry)" \
    > "$RES/golden_tf_gpu.txt"
fi
tail -2 "$RES/golden_tf_gpu.txt" | tee -a "$RES/summary.txt"

log "benchmarks (issue 15 item 4)"
# shellcheck disable=SC2086
timeout 280 $PY bench/bench_cuda.py --out "$RES/bench_cuda.json" ${BENCH_ARGS:-} > "$RES/bench_cuda.log" 2>&1
echo "exit $?" >> "$RES/bench_cuda.log"
tail -2 "$RES/bench_cuda.log" | tee -a "$RES/summary.txt"
log "done"

if [ -n "${OUT:-}" ]; then   # the device tool brings $OUT back (8 files at most)
  mkdir -p "$OUT/gpu_$STAMP" && cp "$RES"/* "$OUT/gpu_$STAMP/"
fi
