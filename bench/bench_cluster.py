"""Cluster benchmark: 1, 2 and 4 worker PROCESSES against 1 and 2 shards (`start_cluster`).

Every worker runs a training-shaped loop on the shared 1,000,000 x 64 LazyAdam table:

    step: ids = next batch (4096 ids, uniform by default)
          rows = pull(unique(ids))            -> pull latency
          push({"emb": (ids, grad rows)})     -> push latency (duplicates summed by the server)

(The workers are harness.py's `run_workers`; its `model="embbag"` adds the embedding-bag model's
forward/backward in numpy between the pull and the push: that is the worker compare_peer.py runs
against TensorFlow ParameterServerStrategy.)

All workers start on the same wall-clock instant and run for `--dur` seconds; steps are counted
when they complete inside the window. Configurations are interleaved round by round: both
clusters stay up for the whole run. Reported per configuration: aggregate unique rows/s and
steps/s, pull and push latency p50/p99 (all workers pooled), server CPU per step per shard and
worker CPU per step. Also, when the server supports it, the cost of sync mode per step
(`consistency={"mode": "sync", "replicas_to_aggregate": N}`), else "sync mode: not available".

    .venv/bin/python bench/bench_cluster.py                          # full run (~2.5 min)
    .venv/bin/python bench/bench_cluster.py --rows 20000 --dur 1 --rounds 1 --workers 1,2   # smoke
"""
import argparse
import os
import sys
import threading

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (add_table_args, add_worker_args, busiest_other, fmt_mr, id_pool, int_list,  # noqa: E402
                     loadavg, machine_info, proc_mem, record, run_workers, setup_table, start_sparseps)


def probe_sync(client, timeout=5.0) -> str:
    """'available' if a sync optimizer aggregates (does not apply a lone replica's push at once)."""
    import sparseps
    try:
        client.create_optimizer("probe_sync", {"class_name": "SGD", "config": {"learning_rate": 0.1}},
                                consistency={"mode": "sync", "replicas_to_aggregate": 2, "total_num_replicas": 2})
        client.create_variable("probe_sync_v", initial_value=np.zeros((8, 4), np.float32), optimizer="probe_sync")
    except sparseps.errors.Error as e:
        return f"not available (create_optimizer with sync consistency failed: {e})"
    result = {}

    def push():
        try:
            result["it"] = client.push({"probe_sync_v": (np.array([1]), np.ones((1, 4), np.float32))}, step=0)
        except Exception as e:
            result["err"] = repr(e)
    t = threading.Thread(target=push, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():   # blocks until the other replica arrives: sync works; release it from a second
        other = sparseps.connect(client.addresses)   # client (a repeat through the same one is the same replica)
        other.push({"probe_sync_v": (np.array([2]), np.ones((1, 4), np.float32))}, step=0)
        other.close()
        t.join(timeout)
        return "available"
    if "err" in result:
        return f"not available (push failed: {result['err']})"
    it = client.optimizer("probe_sync").iterations
    if it == 0:
        return "available"
    return "not available (a lone replica's push was applied at once: iterations 1 after 1 push of 2 replicas)"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_args(p)
    p.add_argument("--shards", default="1,2")
    p.add_argument("--workers", default="1,2,4")
    add_worker_args(p, dur=3.0, dur_help="seconds per configuration window")
    p.add_argument("--client-mallopt", action="store_true",
                   help="workers apply the server's malloc settings to themselves (mallopt) at start")
    p.add_argument("--transport", default="data", choices=["data", "grpc"],
                   help="data: the shipped client (pulls and pushes on the data plane); grpc: data_plane=False")
    p.add_argument("--push-pull", action="store_true",
                   help="workers use client.push_pull (this step's push, the next step's rows, one round trip)")
    p.add_argument("--no-sync", action="store_true", help="skip the sync-mode measurement")
    p.add_argument("--sync-steps", type=int, default=40, help="sync vs async: steps per worker (lockstep)")
    a = p.parse_args()
    a.data_plane = a.transport == "data"
    import sparseps
    shards, workers = int_list(a.shards), int_list(a.workers)
    res = {"machine": machine_info(), "params": vars(a), "rounds": []}
    clusters = {}
    try:
        for s in shards:
            servers = start_sparseps(s, "numba")
            clusters[s] = servers
            c = sparseps.connect([x.address for x in servers])
            mem0 = [proc_mem(x.pid)["VmRSS"] for x in servers]
            setup_table(c, a.rows, a.dim)
            # warm the numba kernels of every shard
            pool = id_pool("uniform", a.rows, a.batch)
            for i in range(4):
                c.push({"emb": (pool[i], np.zeros((a.batch, a.dim), np.float32))})
            res.setdefault("memory", {})[str(s)] = {
                "rss_before_table": mem0, "rss_after_warmup": [proc_mem(x.pid)["VmRSS"] for x in servers],
                "bytes_held": [v["bytes"] for sh in c.status()["shards"] for v in sh["variables"]]}
            c.close()
        for r in range(a.rounds):
            rd = {"loadavg": loadavg(), "busiest_other": busiest_other([x.pid for v in clusters.values() for x in v])}
            for s in shards:
                servers = clusters[s]
                for n in workers:
                    rd[f"s{s}_w{n}"] = run_workers([x.address for x in servers], [x.pid for x in servers], n, a)
                    print(f"round {r + 1}: shards {s} workers {n}: {rd[f's{s}_w{n}']['rows_s'] / 1e6:.3f} M rows/s",
                          file=sys.stderr, flush=True)
            res["rounds"].append(rd)
        # ---- sync mode ----
        if a.no_sync:
            res["sync"] = {"status": "not measured (--no-sync)"}
        else:
            servers = clusters[shards[0]]
            c = sparseps.connect([x.address for x in servers])
            status = probe_sync(c)
            res["sync"] = {"status": status}
            print("sync mode:", status, file=sys.stderr, flush=True)
            c.close()
            if status == "available":
                res["sync"]["runs"] = run_sync(a, workers, servers)
    finally:
        for v in clusters.values():
            for x in v:
                x.stop()
    res["loadavg_end"] = loadavg()
    record("cluster", res, report, a.out)


def run_sync(a, workers, servers) -> dict:
    """Per worker count n (> 1) on the first cluster: the async loop on "emb" and the sync loop on a
    table of its own ("emb_sync<n>", optimizer "opt_sync<n>": replicas_to_aggregate = total = n),
    back to back, the same fixed number of steps per worker: ms per step and the sync/async ratio."""
    import sparseps
    out = {}
    addresses, pids = [x.address for x in servers], [x.pid for x in servers]
    c = sparseps.connect(addresses)
    for n in [w for w in workers if w > 1] or workers:
        c.create_optimizer(f"opt_sync{n}", {"class_name": "LazyAdam", "config": {"learning_rate": 1e-3}},
                           consistency={"mode": "sync", "replicas_to_aggregate": n, "total_num_replicas": n,
                                        "average": True})
        c.create_variable(f"emb_sync{n}", shape=(a.rows, a.dim), optimizer=f"opt_sync{n}",
                          initializer={"class_name": "RandomUniform",
                                       "config": {"minval": -0.05, "maxval": 0.05, "seed": 3}})
        out[f"async_w{n}"] = run_workers(addresses, pids, n, a, steps=a.sync_steps)
        out[f"sync_w{n}"] = run_workers(addresses, pids, n, a, sync=True, steps=a.sync_steps,
                                        var=f"emb_sync{n}", opt=f"opt_sync{n}")
        print(f"sync {n} workers: {out[f'sync_w{n}']['steps_s']:.0f} vs async {out[f'async_w{n}']['steps_s']:.0f} "
              "pushes/s", file=sys.stderr, flush=True)
    c.close()
    return out


def report(res) -> str:
    a = res["params"]
    R = res["rounds"]
    shards, workers = int_list(a["shards"]), int_list(a["workers"])
    lines = [f"# bench_cluster — {res['machine']['date_utc']} UTC, `{res['machine']['command']}`", "",
             f"table {a['rows']:,} x {a['dim']} LazyAdam (numba), {a['batch']} {a['dist']} ids per step, step = "
             f"{'push_pull(ids, rows; next unique ids)' if a.get('push_pull') else 'pull(unique ids) + push(ids, rows)'}"
             f"{' + embedding-bag fwd/bwd' if a.get('model') == 'embbag' else ''}, client transport "
             f"{a.get('transport', 'grpc')}; "
             f"{len(R)} rounds x {a['dur']} s windows, interleaved; load avg per round: "
             + ", ".join(str(r["loadavg"][0]) for r in R), "",
             "| shards | workers | unique rows/s | steps/s | pull p50 / p99 µs | push p50 / p99 µs | "
             "server CPU µs/step (per shard) | server CPU util (per shard) | worker CPU µs/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in shards:
        for n in workers:
            xs = [r[f"s{s}_w{n}"] for r in R]
            scpu = " / ".join(fmt_mr([x["server_cpu_us_per_step"][k] for x in xs], 1, 0) for k in range(s))
            sutil = " / ".join(fmt_mr([x["server_cpu_util"][k] for x in xs], 1, 2) for k in range(s))
            late = sum(x["late_workers"] for x in xs)
            lines.append(f"| {s} | {n} | {fmt_mr([x['rows_s'] for x in xs], 1e-6, 3)} M | "
                         f"{fmt_mr([x['steps_s'] for x in xs], 1, 0)} | "
                         f"{fmt_mr([x['pull_p50_us'] for x in xs], 1, 0)} / {fmt_mr([x['pull_p99_us'] for x in xs], 1, 0)} | "
                         f"{fmt_mr([x['push_p50_us'] for x in xs], 1, 0)} / {fmt_mr([x['push_p99_us'] for x in xs], 1, 0)} | "
                         f"{scpu} | {sutil} | {fmt_mr([x['worker_cpu_us_per_step'] for x in xs], 1, 0)}"
                         f"{' (late start: ' + str(late) + ')' if late else ''} |")
    if len(shards) > 1:
        lines += ["", "Ratios per round (median [min–max]): 2 shards / 1 shard, same workers: "
                  + "; ".join(f"{n} w: " + fmt_mr([r[f"s{shards[1]}_w{n}"]["rows_s"] / r[f"s{shards[0]}_w{n}"]["rows_s"]
                                                   for r in R]) for n in workers)]
    lines += ["", "Workers n / 1 worker, same shards: " + "; ".join(
        f"{s} shard(s), {n} w: " + fmt_mr([r[f"s{s}_w{n}"]["rows_s"] / r[f"s{s}_w{workers[0]}"]["rows_s"] for r in R])
        for s in shards for n in workers[1:])]
    sy = res.get("sync", {})
    lines += ["", f"sync mode: {sy.get('status', 'not measured')}"]
    if sy.get("runs"):
        lines += ["", f"Each worker runs {a.get('sync_steps')} steps (pull at min_iterations = its step, push with "
                  "step=; sync: replicas_to_aggregate = total_num_replicas = workers, average=True), on the 1-shard "
                  "server; the sync table is its own variable with its own optimizer; async rows are the same loop on the async table, run just before.", "",
                  "| workers | mode | worker pushes/s (all workers) | ms per worker step | unique rows/s pushed | "
                  "pull p50/p99 µs | push p50/p99 µs | server CPU µs/push |",
                  "|---|---|---|---|---|---|---|---|"]
        for k, v in sy["runs"].items():
            mode, n = k.split("_w")
            per = int(n) / v["steps_s"] * 1e3 if v["steps_s"] else float("nan")
            lines.append(f"| {n} | {mode} | {v['steps_s']:.0f} | {per:.2f} | {v['rows_s'] / 1e6:.3f} M | "
                         f"{v['pull_p50_us']:.0f} / {v['pull_p99_us']:.0f} | "
                         f"{v['push_p50_us']:.0f} / {v['push_p99_us']:.0f} | {v['server_cpu_us_per_step'][0]:.0f} |")
        for n in sorted({k.split("_w")[1] for k in sy["runs"]}):
            s_, a_ = sy["runs"].get(f"sync_w{n}"), sy["runs"].get(f"async_w{n}")
            if s_ and a_ and s_["steps_s"]:
                lines.append(f"\n{n} workers: sync costs {(int(n) / s_['steps_s'] - int(n) / a_['steps_s']) * 1e3:.2f} ms "
                             f"per worker step more than async (sync/async step rate = {s_['steps_s'] / a_['steps_s']:.2f})")
    else:
        lines += ["", "| workers | mode | steps/s |", "|---|---|---|", "| – | sync | not available |"]
    mem = res.get("memory", {})
    for s, m in mem.items():
        lines.append(f"\nmemory, {s} shard(s): RSS before the table {[round(x / 1e6) for x in m['rss_before_table']]} MB, "
                     f"after warm-up {[round(x / 1e6) for x in m['rss_after_warmup']]} MB, bytes held "
                     f"{[round(x / 1e6) for x in m['bytes_held']]} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
