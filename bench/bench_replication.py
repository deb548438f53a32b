"""Replication benchmark: what a replicated shard costs, and how long a failover takes.

1. Push throughput and p50/p99 push latency of one shard at replication factor 1, 2 and 3
   (`--min-insync-replicas` equal to the factor: every push waits for every replica), each as a
   ratio to an unreplicated shard with the same write-ahead log, in one run. Workers are threads,
   each with its own etcd:// client, pushing LazyAdam gradients of `--batch` uniform ids x `--dim`.
2. Failover time over `--kills` kills: one worker pushes through an etcd:// client while the
   leader of a 3-replica shard (K=2) is killed -9; the time from the kill to the first push
   acknowledged after it (by the new leader); the killed replica is restarted on its data dir and
   back in sync before the next kill.
3. Serving-replica lag under the 2-worker push_pull workload (two workers push_pull the table
   through the leader of a 2-replica shard with one serving replica): a probe pushes +1 to a
   counter every 20 ms; a reader polls the serving replica; the lag of a push is from its
   acknowledgement to the first read of the serving replica that includes it.

Every process is on this machine: with 2 cores, 3 replicas and the workers share them, so the
factor-3 ratio here is a floor, not what separate hosts would see.

    .venv/bin/python bench/bench_replication.py                       # ~3 min
    .venv/bin/python bench/bench_replication.py --dur 2 --kills 3     # smoke
    .venv/bin/python bench/bench_replication.py --only serving
"""
import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS, machine_info, pct  # noqa: E402


def _replicas(etcd, cluster, n, k, root, lease):
    from sparseps.local import LocalServer, free_ports
    servers = {}
    for i in range(n):
        port, = free_ports(1)
        servers[i] = LocalServer("--backend", "numba", "--coordinator", str(etcd), "--cluster", cluster,
                                 "--shard-index", "0", "--num-shards", "1", "--data-dir", os.path.join(root, f"r{i}"),
                                 "--min-insync-replicas", str(k), "--lease-seconds", str(lease), port=port)
    return servers


def _wait_in_sync(etcd, cluster, n, timeout=60.0):
    from sparseps.server.coordination import cluster_view
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = cluster_view(f"{etcd}/{cluster}").get(0)
        if s and s["leader"] and s["isr"] and len(s["isr"]["members"]) == n and s["isr"]["leader"] == s["leader"]["id"]:
            return s
        time.sleep(0.05)
    raise RuntimeError(f"cluster {cluster}: {n} replicas not in sync after {timeout} s")


def _push_load(address, args):
    """(pushes/s, push latencies in seconds) of args.workers threads for args.dur seconds."""
    import sparseps
    with sparseps.connect(address, retry_deadline=60) as c:
        c.create_optimizer("opt", "LazyAdam", learning_rate=1e-3)
        c.create_variable("emb", initial_value=np.zeros((args.rows, args.dim), np.float32), optimizer="opt")
    clients = [sparseps.connect(address, retry_deadline=60) for _ in range(args.workers)]
    lat = [[] for _ in clients]
    start = threading.Barrier(len(clients) + 1)
    t_end = [0.0]

    def work(w):
        rng = np.random.default_rng(w)
        ids = [rng.integers(0, args.rows, args.batch) for _ in range(8)]
        grads = [rng.standard_normal((args.batch, args.dim)).astype(np.float32) for _ in range(4)]
        for i in range(20):   # warm up
            clients[w].push({"emb": (ids[i % 8], grads[i % 4])})
        start.wait()
        i = 0
        while time.monotonic() < t_end[0]:
            t = time.perf_counter()
            clients[w].push({"emb": (ids[i % 8], grads[i % 4])})
            lat[w].append(time.perf_counter() - t)
            i += 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(len(clients))]
    for t in threads:
        t.start()
    t_end[0] = time.monotonic() + 3600
    start.wait()
    t_end[0] = time.monotonic() + args.dur
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    all_lat = [x for ls in lat for x in ls]
    return len(all_lat) / args.dur, all_lat


def throughput(etcd, args, root) -> dict:
    from sparseps.local import LocalServer
    out = {}
    srv = LocalServer("--backend", "numba", "--data-dir", os.path.join(root, "plain"))
    try:
        rate, lat = _push_load(srv.address, args)
    finally:
        srv.stop()
    out["unreplicated"] = {"pushes_per_s": rate, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3}
    for factor in (1, 2, 3):
        cluster = f"tp{factor}"
        servers = _replicas(etcd, cluster, factor, factor, os.path.join(root, cluster), args.lease)
        try:
            _wait_in_sync(etcd, cluster, factor)
            rate, lat = _push_load(f"{etcd}/{cluster}", args)
        finally:
            for s in servers.values():
                s.stop()
        out[f"factor{factor}"] = {"pushes_per_s": rate, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                                  "ratio": rate / out["unreplicated"]["pushes_per_s"]}
        print(f"factor {factor}: {out[f'factor{factor}']}", flush=True)
    return out


def failover(etcd, args, root) -> dict:
    import sparseps
    from sparseps.local import LocalServer
    cluster = "failover"
    servers = _replicas(etcd, cluster, 3, 2, os.path.join(root, cluster), args.lease)
    acks, stop = [], threading.Event()
    # The pusher pauses around each kill (go, busy), so the first acknowledgement after a kill is
    # of a push sent after it: an answer the old leader sent just before dying, noted by the
    # pusher's thread a moment later, is not taken for the new leader's.
    go, busy = threading.Event(), threading.Lock()
    go.set()
    times = []
    try:
        _wait_in_sync(etcd, cluster, 3)
        address = f"{etcd}/{cluster}"
        with sparseps.connect(address, retry_deadline=60) as c:
            c.create_optimizer("opt", "SGD", learning_rate=1.0)
            c.create_variable("w", initial_value=np.zeros((1, 1), np.float32), optimizer="opt")

        def push():
            with sparseps.connect(address, timeout=2, retry_deadline=120) as c:
                while not stop.is_set():
                    go.wait()
                    with busy:
                        c.push({"w": (np.array([0]), -np.ones((1, 1), np.float32))})
                        acks.append(time.monotonic())

        pusher = threading.Thread(target=push)
        pusher.start()
        for i in range(args.kills):
            view = _wait_in_sync(etcd, cluster, 3)
            time.sleep(0.5)
            name, victim = next((n, s) for n, s in servers.items() if s.pid == view["leader"]["pid"])
            go.clear()
            with busy:
                killed = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
            go.set()
            victim.proc.wait()
            while not acks or acks[-1] <= killed:
                time.sleep(0.005)
                if time.monotonic() - killed > 60:
                    raise RuntimeError("no push acknowledged 60 s after the kill")
            first = next(t for t in acks if t > killed)
            times.append(first - killed)
            print(f"kill {i + 1}: first acknowledged push {times[-1]:.3f} s after the kill", flush=True)
            victim.stop()
            servers[name] = LocalServer("--backend", "numba", "--coordinator", str(etcd), "--cluster", cluster,
                                        "--shard-index", "0", "--num-shards", "1", "--data-dir",
                                        os.path.join(root, cluster, f"r{name}"), "--min-insync-replicas", "2",
                                        "--lease-seconds", str(args.lease), port=victim.port)
        stop.set()
        pusher.join(120)
    finally:
        stop.set()
        for s in servers.values():
            s.stop()
    return {"kills": len(times), "lease_s": args.lease, "p50_s": pct(times, 50), "p99_s": pct(times, 99),
            "max_s": max(times), "all_s": times}


def serving_lag(etcd, args, root) -> dict:
    import sparseps
    from sparseps.local import LocalServer, free_ports
    cluster = "serving"
    servers = _replicas(etcd, cluster, 2, 2, os.path.join(root, cluster), args.lease)
    port, = free_ports(1)
    servers["s"] = LocalServer("--backend", "numba", "--coordinator", str(etcd), "--cluster", cluster,
                               "--shard-index", "0", "--num-shards", "1", "--data-dir", os.path.join(root, "serving-r"),
                               "--role", "serving", port=port)
    stop = threading.Event()
    acked, seen = {}, {}
    try:
        _wait_in_sync(etcd, cluster, 2)
        address = f"{etcd}/{cluster}"
        with sparseps.connect(address, retry_deadline=60) as c:
            c.create_optimizer("opt", "LazyAdam", learning_rate=1e-3)
            c.create_variable("emb", initial_value=np.zeros((args.rows, args.dim), np.float32), optimizer="opt")
            c.create_optimizer("sgd", "SGD", learning_rate=1.0)
            c.create_variable("probe", initial_value=np.zeros((1, 1), np.float32), optimizer="sgd")

        def worker(w):
            rng = np.random.default_rng(w)
            with sparseps.connect(address, retry_deadline=60) as c:
                while not stop.is_set():
                    ids = rng.integers(0, args.rows, args.batch)
                    c.push_pull({"emb": (ids, rng.standard_normal((args.batch, args.dim)).astype(np.float32))},
                                {"emb": rng.integers(0, args.rows, args.batch)})

        def probe():
            with sparseps.connect(address, retry_deadline=60) as c:
                n = 0
                while not stop.is_set():
                    c.push({"probe": (np.array([0]), -np.ones((1, 1), np.float32))})
                    n += 1
                    acked[n] = time.monotonic()
                    time.sleep(0.02)

        def reader():
            with sparseps.connect(servers["s"].address, retry_deadline=60) as c:
                while not stop.is_set():
                    try:
                        v = int(c.pull("probe", np.array([0]))[0, 0])
                    except sparseps.NotFound:   # the serving replica has not reached its creation yet
                        time.sleep(0.01)
                        continue
                    now = time.monotonic()
                    for k in range(max(seen, default=0) + 1, v + 1):
                        seen[k] = now
                    time.sleep(0.002)

        threads = [threading.Thread(target=t, args=a) for t, a in ((worker, (0,)), (worker, (1,)), (probe, ()),
                                                                   (reader, ()))]
        for t in threads:
            t.start()
        time.sleep(args.dur * 2)
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        for s in servers.values():
            s.stop()
    lags = [seen[k] - acked[k] for k in acked if k in seen]
    return {"pushes": len(acked), "seen": len(lags), "p50_ms": pct(lags, 50) * 1e3, "p99_ms": pct(lags, 99) * 1e3,
            "max_ms": max(lags) * 1e3 if lags else float("nan")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dur", type=float, default=5.0, help="seconds of pushing per configuration")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--lease", type=int, default=2)
    p.add_argument("--only", choices=["throughput", "failover", "serving"], default=None)
    args = p.parse_args()
    from sparseps.local import LocalEtcd
    etcd = LocalEtcd()
    root = tempfile.mkdtemp(prefix="bench-repl-")
    result = {"args": vars(args), "machine": machine_info(), "command": " ".join(sys.argv)}
    try:
        for part, fn in (("throughput", throughput), ("failover", failover), ("serving", serving_lag)):
            if args.only in (None, part):
                result[part] = fn(etcd, args, root)
    finally:
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"# replication {stamp}", "", f"`{result['command']}`", ""]
    if "throughput" in result:
        lines += ["| shard | pushes/s | ÷ unreplicated | p50 ms | p99 ms |", "|---|---|---|---|---|"]
        for name, r in result["throughput"].items():
            lines.append(f"| {name} | {r['pushes_per_s']:.0f} | {r.get('ratio', 1.0):.2f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} |")
    if "failover" in result:
        f = result["failover"]
        lines += ["", f"failover (kill -9 of the leader -> first acknowledged push), {f['kills']} kills, lease "
                      f"{f['lease_s']} s: p50 {f['p50_s']:.2f} s, p99 {f['p99_s']:.2f} s, max {f['max_s']:.2f} s"]
    if "serving" in result:
        v = result["serving"]
        lines += ["", f"serving-replica lag under 2 push_pull workers ({v['seen']} probe pushes): p50 {v['p50_ms']:.1f} ms, "
                      f"p99 {v['p99_ms']:.1f} ms, max {v['max_ms']:.1f} ms"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, f"replication_{stamp}.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(RESULTS, f"replication_{stamp}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    print(text)


if __name__ == "__main__":
    main()
