"""One shard's step without any transport: what a push_pull costs the server in CPU and wall time.

Runs the service's push_pull core in process (the code both transports call) on the
compare_peer workload: 4096 uniform ids pushed with per-id gradient rows plus a 65-float dense
head, then the next batch's 4088 unique rows and the head pulled, into a 1,000,000 x 64 LazyAdam
table on the numba backend. Each NUMBA_NUM_THREADS setting runs in its own process (numba fixes
its pool at start), the settings interleaved over rounds; reported per step: wall time, CPU time
of the process (all threads), and the ratio CPU / wall.

    .venv/bin/python bench/bench_step.py                  # threads 1 and 2, 3 rounds (~1 min)
    .venv/bin/python bench/bench_step.py --rows 20000 --steps 50 --rounds 1   # smoke
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import run_json  # noqa: E402

CHILD = r'''
import json, os, sys, time
import numpy as np
from sparseps import frames
from sparseps.proto import sparseps_pb2 as pb
from sparseps.server import backends
from sparseps.server.wire import gradients_of
from sparseps.server.service import ParameterServerService
from sparseps.server.state import Shard

rows, steps = int(sys.argv[1]), int(sys.argv[2])
shard = Shard(backends.create("numba", None), 0, 1)
svc = ParameterServerService(shard)
shard.create_optimizer("opt", json.dumps({"class_name": "LazyAdam", "config": {"learning_rate": 1e-3}}),
                       {"mode": "async"})
shard.create_variable("emb", [rows, 64], "float32", "opt", "mod", 0, "", np.zeros((rows, 64), np.float32))
shard.create_variable("head", [65], "float32", "opt", "whole", 0, "", np.zeros(65, np.float32))
rng = np.random.default_rng(0)
pool = [rng.integers(0, rows, 4096) for _ in range(16)]
uniq = [np.unique(p) for p in pool]
grads = [(rng.standard_normal((4096, 64)) * 1e-3).astype(np.float32) for _ in range(4)]
head = np.zeros(65, np.float32)


def step(i):
    req, att = pb.PushPullRequest(), []
    g = req.push.gradients.add(variable="emb")
    frames.describe(pool[i % 16], g.ids, att)
    frames.describe(grads[i % 4], g.values, att)
    frames.describe(head, req.push.gradients.add(variable="head").values, att)
    req.push.optimizers.append("opt")
    frames.describe(uniq[(i + 1) % 16], req.pulls.add(variable="emb").ids, att)
    frames.describe(np.arange(65), req.pulls.add(variable="head").ids, att)
    it = iter(np.copy(a) for a in att)   # fresh buffers, as a received frame's are
    grads_ = gradients_of(req.push, it)
    with svc.serving():
        svc.push_pull(req, grads_, [next(it), next(it)])


for i in range(30):
    step(i)
c0, t0 = time.process_time(), time.perf_counter()
for i in range(steps):
    step(i)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print("JSON" + json.dumps({"wall_ms": wall / steps * 1e3, "cpu_ms": cpu / steps * 1e3}))
'''


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="1,2", help="NUMBA_NUM_THREADS values, comma-separated")
    a = p.parse_args()
    threads = [int(x) for x in a.threads.split(",")]
    res = {t: [] for t in threads}
    for r in range(a.rounds):
        for t in threads:
            env = dict(os.environ, NUMBA_NUM_THREADS=str(t), OMP_WAIT_POLICY="PASSIVE")
            res[t].append(run_json([sys.executable, "-c", CHILD, str(a.rows), str(a.steps)], "bench_step child",
                                   timeout=600, env=env))
            print(f"round {r + 1}, NUMBA_NUM_THREADS={t}: {res[t][-1]}", file=sys.stderr, flush=True)
    print(f"# bench_step — {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load "
          f"{open('/proc/loadavg').read().split()[0]}, `{' '.join(sys.argv)}`\n")
    print("| NUMBA_NUM_THREADS | wall ms/step | CPU ms/step | CPU / wall |")
    print("|---|---|---|---|")
    for t in threads:
        w = [x["wall_ms"] for x in res[t]]
        c = [x["cpu_ms"] for x in res[t]]
        print(f"| {t} | {np.median(w):.3f} [{min(w):.3f}–{max(w):.3f}] | {np.median(c):.3f} "
              f"[{min(c):.3f}–{max(c):.3f}] | {np.median(c) / np.median(w):.2f} |")


if __name__ == "__main__":
    main()
