#!/usr/bin/env bash
# The main job: set up the venv, start a local 2-shard cluster (`sparseps cluster up`), train the
# demo model with 2 workers against it (`sparseps demo --address ... --workers 2`), stop the cluster.
# Exits 0 when the demo trained and the cluster stopped cleanly.
#
#   bash scripts/demo.sh                    # the defaults
#   bash scripts/demo.sh --steps 60         # extra arguments go to `sparseps demo`
#   SPARSEPS_DEMO_SHARDS=3 SPARSEPS_DEMO_WORKERS=4 bash scripts/demo.sh
#   SPARSEPS_DEMO_REPLICAS=3 bash scripts/demo.sh   # replicated shards: etcd + 3 replicas per shard,
#                                                   # trained through etcd://, `sparseps status` after
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SPARSEPS_DEMO_SHARDS:-2}
WORKERS=${SPARSEPS_DEMO_WORKERS:-2}
REPLICAS=${SPARSEPS_DEMO_REPLICAS:-0}

bash scripts/setup.sh

log=$(mktemp -t sparseps-cluster.XXXXXX)
.venv/bin/sparseps cluster up --shards "$SHARDS" --replicas "$REPLICAS" >"$log" 2>&1 &
cluster_pid=$!

stop_cluster() {
  # the cluster command stops every shard by its PID when it gets SIGTERM
  if kill -0 "$cluster_pid" 2>/dev/null; then
    kill -TERM "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
  fi
}
trap stop_cluster EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 240); do
  grep -q '^ready: ' "$log" && break
  if ! kill -0 "$cluster_pid" 2>/dev/null; then
    cat "$log" >&2
    echo "demo.sh: the cluster did not start" >&2
    exit 1
  fi
  sleep 0.5
done
if ! grep -q '^ready: ' "$log"; then
  cat "$log" >&2
  echo "demo.sh: the cluster was not ready after 120 s" >&2
  exit 1
fi
cat "$log"
address=$(sed -n 's/^ready: [0-9]* shards at //p' "$log")

.venv/bin/sparseps demo --address "$address" --workers "$WORKERS" "$@"
if [ "$REPLICAS" -gt 0 ]; then
  .venv/bin/sparseps status "$address" --replicas-only   # every replica's role, epoch and lag
fi

# stop the cluster and check that it went down cleanly
kill -TERM "$cluster_pid"
rc=0
wait "$cluster_pid" || rc=$?
trap - EXIT
tail -n 2 "$log"
rm -f "$log"
if [ "$rc" -ne 0 ]; then
  echo "demo.sh: the cluster exited with $rc" >&2
  exit "$rc"
fi
echo "demo.sh: done"
