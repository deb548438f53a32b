#!/usr/bin/env bash
# Run every benchmark of bench/ once, in sequence, with one command:
#
#     bench/run_all.sh                      # all parts (~9 min on the 2-core dev box)
#     PARTS="e2e peer" bench/run_all.sh     # a subset of: apply step e2e facts cluster peer wal profile
#     SMOKE=1 bench/run_all.sh              # tiny settings: checks that everything runs (~3 min)
#
# Each part writes bench/results/<part>_<UTC time>.{json,md}; this script also appends what it
# ran, the load average before each part and the busiest other process to bench/results/run_log.txt.
# Each part is sized to take < 3 minutes. The parts run one after the other, never concurrently.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEER_PY=${PEER_PY:-.venv-golden/bin/python}
PARTS=${PARTS:-"apply step e2e facts cluster peer wal profile"}
mkdir -p bench/results
LOG=bench/results/run_log.txt

note() {
    local load other
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    other=$(command ps -eo pid,pcpu,comm --sort=-pcpu --no-headers | head -1 | tr -s ' ')
    echo "$(date -u '+%Y-%m-%d %H:%M:%S') UTC | load $load | busiest: $other | $*" | tee -a "$LOG"
}

run() {   # run <part> <command...>
    local part=$1; shift
    note "start $part: $*"
    local t0=$SECONDS
    "$@"
    note "end $part ($((SECONDS - t0)) s)"
}

if [[ -n "${SMOKE:-}" ]]; then
    E2E=(--rows 20000 --dur 0.5 --rounds 1 --lat-seconds 2)
    FACTS=(--dur 0.5 --rounds 1 --tf-rows 20000 --facts-client-n 50)
    CL=(--rows 20000 --dur 1 --rounds 1 --workers 1,2)
    PEER=(--rows 20000 --dur 1 --rounds 1 --peer-steps 20 --peer-reps 2)
    PEER_WORKERS=${PEER_WORKERS:-1}
    APPLY=(--rows 20000 --reps 1 --batches 4096)
    STEP=(--rows 20000 --steps 50 --rounds 1)
    WAL=(--seconds 1 --rounds 1 --rows 20000)
    PROF=(--rows 20000 --reps 20 --dur 2)
else
    E2E=()
    FACTS=()
    CL=()
    PEER=()
    APPLY=(--reps 5)
    STEP=()
    WAL=(--seconds 4 --rounds 2)
    PROF=()
fi

for part in $PARTS; do
    case $part in
        apply)
            if [[ -f bench/bench_apply.py ]]; then
                stamp=$(date -u +%Y%m%dT%H%M%S)
                run apply "$PY" bench/bench_apply.py "${APPLY[@]}" --json "bench/results/apply_$stamp.json" \
                    | tee "bench/results/apply_$stamp.md"
            else
                note "skip apply: bench/bench_apply.py not found"
            fi ;;
        e2e) run e2e "$PY" bench/bench_e2e.py "${E2E[@]}" ;;
        facts) run facts "$PY" bench/bench_e2e.py --facts-only "${FACTS[@]}" ;;
        cluster) run cluster "$PY" bench/bench_cluster.py "${CL[@]}" ;;
        step)
            stamp=$(date -u +%Y%m%dT%H%M%S)
            run step "$PY" bench/bench_step.py "${STEP[@]}" | tee "bench/results/step_$stamp.md" ;;
        wal)
            stamp=$(date -u +%Y%m%dT%H%M%S)
            run wal "$PY" bench/bench_wal.py "${WAL[@]}" | tee "bench/results/wal_$stamp.md" ;;
        profile) run profile "$PY" bench/profile_step.py "${PROF[@]}" ;;
        peer)   # one run per worker count keeps each run under ~3 minutes
            for w in ${PEER_WORKERS:-1 2}; do
                run "peer-w$w" "$PY" bench/compare_peer.py --peer-python "$PEER_PY" --workers "$w" "${PEER[@]}"
            done ;;
        *) echo "unknown part $part (apply step e2e facts cluster peer wal profile)" >&2; exit 2 ;;
    esac
done
