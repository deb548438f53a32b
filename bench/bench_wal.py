"""Throughput cost of each write-ahead-log durability policy (issue 6).

    .venv/bin/python bench/bench_wal.py --seconds 8 --threads 4
    .venv/bin/python bench/bench_wal.py --seconds 1 --rounds 1 --rows 20000   # smoke

For each setting (no --data-dir, --wal-sync none, group, fsync) a fresh sparseps-server gets
LazyAdam pushes of B ids x 64 float32 into a 100,000 x 64 table from T client threads for S
seconds; pushes/s and the ratio to the no-log server are printed as a Markdown table. The
settings run back to back in one process, interleaved over --rounds, so ratios share conditions.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

import sparseps
from sparseps.local import LocalServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_table_args  # noqa: E402

SETTINGS = [("no log (no --data-dir)", []), ("--wal-sync none", ["none"]), ("--wal-sync group (default)", ["group"]),
            ("--wal-sync fsync", ["fsync"])]


def run_one(extra, seconds, threads, batch, rows, dim, data_plane=True):
    tmp = tempfile.mkdtemp(prefix="sparseps-walbench-")
    args = ["--data-dir", tmp, "--wal-sync", extra[0]] if extra else []
    srv = LocalServer(*args)
    try:
        c = sparseps.connect(srv.address)
        c.create_optimizer("o", "LazyAdam", learning_rate=1e-3)
        c.create_variable("emb", shape=(rows, dim), optimizer="o")
        rng = np.random.default_rng(0)
        pool = [(rng.integers(0, rows, batch), rng.normal(size=(batch, dim)).astype(np.float32)) for _ in range(8)]
        for ids, g in pool[:2]:
            c.push({"emb": (ids, g)})
        counts = [0] * threads
        stop = time.monotonic() + seconds

        def work(k):
            cl = sparseps.connect(srv.address, data_plane=data_plane)
            i = k
            while time.monotonic() < stop:
                ids, g = pool[i % len(pool)]
                cl.push({"emb": (ids, g)})
                counts[k] += 1
                i += 1
        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / (time.monotonic() - t0)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--threads", type=int, default=4)
    add_table_args(ap, rows=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--transports", default="data,grpc",
                    help="client transports, comma-separated: data (the data plane: pushes logged as received, "
                         "record kind F) and/or grpc (data_plane=False: pushes logged as serialized requests)")
    a = ap.parse_args()
    transports = a.transports.split(",")
    results = {(t, name): [] for t in transports for name, _ in SETTINGS}
    for _ in range(a.rounds):
        for t in transports:
            for name, extra in SETTINGS:
                results[t, name].append(run_one(extra, a.seconds, a.threads, a.batch, a.rows, a.dim, t == "data"))
    mb = a.batch * (a.dim * 4 + 8) / 1e6
    print(f"| transport | policy | pushes/s (median of {a.rounds}) | MB/s logged | ratio to no log |")
    print("|---|---|---|---|---|")
    for t in transports:
        base = statistics.median(results[t, SETTINGS[0][0]])
        for name, _ in SETTINGS:
            r = results[t, name]
            med = statistics.median(r)
            print(f"| {t} | {name} | {med:.0f} [{min(r):.0f}-{max(r):.0f}] | {med * mb:.0f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
