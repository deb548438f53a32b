"""Dynamic (hash-keyed) tables against fixed tables, in one process, interleaved.

    python bench/bench_dynamic.py                          # 10M keys x 32, B=4096 Zipf, LazyAdam
    python bench/bench_dynamic.py --keys 1000000 --dim 64 --json out.json
    python bench/bench_dynamic.py --rss 1000000,10000000   # + RSS per live row, one process each
    python bench/bench_dynamic.py --keys 0 --e2e --workers 2 # end-to-end push_pull steps/s, 2 workers

What is timed (the shard's own push/pull path, no transport: `Shard.push` / `Shard.pull`):
  apply: one LazyAdam step of a batch of B Zipf-distributed ids (duplicates included) into a
         fixed table of N rows, and the same step into a dynamic table holding N keys, whose
         pushed keys are a random int64 relabelling of those ids (so every key has its row);
  pull:  the rows of the next batch from both;
  evict: rows removed per second by an age eviction of half of a table of `--evict-keys` rows.
Each repetition times both in rotating order; reported: the median of each and of the per-rep
ratio dynamic / fixed, [min, max].

e2e:   one numba shard holds a fixed 1M x dim table and a dynamic one; `--workers` worker
       processes (bench/harness.py) run push_pull steps of 4096 Zipf ids on one, then the other
       (the dynamic one keyed by splitmix64(id), its rows created during warm-up), round by round;
       reported: steps/s of each and the per-round ratio dynamic / fixed.

RSS: a fresh process creates a dynamic table of `dim` float32 with LazyAdam (value + m + v), fills
it with K distinct keys by pushes of 1M keys, and reports (RSS after - RSS before) / K against
the goal 1.3 x (value + slots bytes) + 32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

LAZY = json.dumps({"class_name": "LazyAdam", "config": {"learning_rate": 1e-3}})


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def zipf_ids(rng, n_rows, batch, a=1.1):
    ids = rng.zipf(a, batch).astype(np.int64) - 1
    return ids % n_rows


def shard(backend="numba"):
    from sparseps.server.backends import create
    from sparseps.server.state import Shard
    s = Shard(create(backend))
    s.create_optimizer("opt", LAZY)
    return s


def fill_dynamic(s, name, keys, dim, chunk=1 << 20):
    for i in range(0, len(keys), chunk):
        k = keys[i:i + chunk]
        s.push([(name, k, np.zeros((len(k), dim), np.float32))])


def rss_child(n_keys: int, dim: int) -> dict:
    s = shard()
    s.create_variable("d", (0, dim), "float32", "opt", "hash", dynamic=True)
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(-2 ** 63, 2 ** 63 - 1, int(n_keys * 1.01), dtype=np.int64))[:n_keys]
    rng.shuffle(keys)
    before = rss_bytes()
    fill_dynamic(s, "d", keys, dim)
    after = rss_bytes()
    var = s.variables["d"]
    row = dim * 4 * 3
    return {"keys": n_keys, "dim": dim, "live": var.table.live, "rss_bytes": after - before,
            "bytes_per_key": (after - before) / n_keys, "value_plus_slots": row, "goal": 1.3 * row + 32,
            "index_bytes": var.table.index.nbytes, "capacity_rows": var.table.capacity_rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=10_000_000, help="rows of the fixed table = keys of the dynamic one")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--pool", type=int, default=64, help="batches per repetition")
    p.add_argument("--evict-keys", type=int, default=1_000_000)
    p.add_argument("--rss", default="", help="comma-separated key counts for the RSS measurement")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--e2e", action="store_true", help="also the end-to-end push_pull comparison")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--e2e-rows", type=int, default=1_000_000)
    p.add_argument("--dur", type=float, default=5.0, help="e2e: seconds per measurement")
    p.add_argument("--rounds", type=int, default=3, help="e2e: rounds (fixed and dynamic each)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.dim)))
        return
    out = {"keys": args.keys, "dim": args.dim, "batch": args.batch, "reps": args.reps}
    if args.keys:
        out.update(apply_and_pull(args))
        out["evict"] = evict_rate(args)
    if args.e2e:
        out["e2e"] = e2e(args)
    if args.rss:
        out["rss"] = []
        for k in (int(x) for x in args.rss.split(",")):
            res = subprocess.run([sys.executable, __file__, "--rss-child", str(k), "--dim", str(args.dim)],
                                 capture_output=True, text=True, check=True)
            out["rss"].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def apply_and_pull(args):
    rng = np.random.default_rng(0)
    n, dim = args.keys, args.dim
    s = shard()
    s.create_variable("f", (n, dim), "float32", "opt", "mod", initial_value=np.zeros((n, dim), np.float32))
    s.create_variable("d", (0, dim), "float32", "opt", "hash", dynamic=True)
    relabel = np.unique(rng.integers(-2 ** 63, 2 ** 63 - 1, int(n * 1.01), dtype=np.int64))[:n]
    rng.shuffle(relabel)
    fill_dynamic(s, "d", relabel, dim)
    s.push([("f", np.arange(n, dtype=np.int64), np.zeros((n, dim), np.float32))])   # slots of the fixed table
    batches = [zipf_ids(rng, n, args.batch) for _ in range(args.pool)]
    grads = [rng.standard_normal((args.batch, dim)).astype(np.float32) for _ in range(args.pool)]
    keys = [relabel[b] for b in batches]
    res = {"apply_fixed": [], "apply_dynamic": [], "pull_fixed": [], "pull_dynamic": []}
    for rep in range(args.reps):
        order = [("fixed", "f", batches), ("dynamic", "d", keys)]
        if rep % 2:
            order.reverse()
        for kind, name, ids in order:
            t = time.perf_counter()
            for b, g in zip(ids, grads):
                s.push([(name, b, g)])
            res[f"apply_{kind}"].append(len(ids) * args.batch / (time.perf_counter() - t))
            t = time.perf_counter()
            for b in ids:
                s.pull(name, b)
            res[f"pull_{kind}"].append(len(ids) * args.batch / (time.perf_counter() - t))
    out = {}
    for what in ("apply", "pull"):
        ratios = [d / f for d, f in zip(res[f"{what}_dynamic"], res[f"{what}_fixed"])]
        out[what] = {"fixed_ids_per_s": statistics.median(res[f"{what}_fixed"]),
                     "dynamic_ids_per_s": statistics.median(res[f"{what}_dynamic"]),
                     "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def e2e(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sparseps
    from harness import run_workers, setup_table, start_sparseps
    servers = start_sparseps(1)
    try:
        client = sparseps.connect(servers[0].address)
        setup_table(client, args.e2e_rows, args.dim)
        client.create_variable("demb", dim=args.dim, dynamic=True, optimizer="opt",
                               initializer={"class_name": "RandomUniform",
                                            "config": {"minval": -0.05, "maxval": 0.05, "seed": 3}})
        wargs = argparse.Namespace(dist="zipf", rows=args.e2e_rows, dim=args.dim, batch=args.batch, bag=8,
                                   dur=args.dur, warmup_steps=20, client_mallopt=False, push_pull=True,
                                   data_plane=True, start_margin=2.0)
        pids = [s.pid for s in servers]
        rounds = []
        for r in range(args.rounds):
            order = [("fixed", "emb", False), ("dynamic", "demb", True)]
            if r % 2:
                order.reverse()
            got = {kind: run_workers(servers[0].address, pids, args.workers, wargs, var=var, keyed=keyed)["steps_s"]
                   for kind, var, keyed in order}
            got["ratio"] = got["dynamic"] / got["fixed"]
            rounds.append(got)
        ratios = [r["ratio"] for r in rounds]
        return {"workers": args.workers, "rows": args.e2e_rows, "rounds": rounds,
                "live_rows_dynamic": client.variable("demb").size(),
                "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    finally:
        for s in servers:
            s.stop()


def evict_rate(args):
    s = shard()
    n = args.evict_keys
    s.create_variable("d", (0, args.dim), "float32", "opt", "hash", dynamic=True,
                      table_json=json.dumps({"eviction": {"max_age_steps": 1}}))
    keys = np.random.default_rng(2).integers(-2 ** 63, 2 ** 63 - 1, n, dtype=np.int64)
    fill_dynamic(s, "d", keys[: n // 2], args.dim, chunk=n // 2)     # step 1: these get old
    fill_dynamic(s, "d", keys[n // 2:], args.dim, chunk=n)           # step 2
    var = s.variables["d"]
    before = var.table.live
    t = time.perf_counter()
    aged = s.aged("d")
    s.evict_keys("d", aged["d"])
    dt = time.perf_counter() - t
    return {"rows": before, "evicted": before - var.table.live, "rows_per_s": (before - var.table.live) / dt}


if __name__ == "__main__":
    main()
