"""sparseps vs TensorFlow ParameterServerStrategy, the same sparse training workload, in one run.

Both sides train the embedding-bag model of perf_anchors.md section 4 (ids [512 x 8] = 4096 ids
per step into a 1,000,000 x 64 table, mean over the bag, Dense(1), sigmoid cross-entropy) with
LazyAdam, with one server (1 sparseps shard / 1 PS task) and the same number of worker processes:

* sparseps (this venv): bench_cluster.py's worker processes (harness.run_workers) with the
  embedding-bag model: per step pull the unique rows and the dense head, forward/backward in
  numpy, push (ids, per-id gradient rows) plus the head's dense gradient as one step (the server
  sums duplicate ids, as LazyAdam does).
* peer: bench/peer_pss.py run with /work/main/.venv-golden/bin/python (TF 2.15.1 + tfa 0.23 LazyAdam).

Per round and worker count, sparseps then the peer, back to back; the ratio of unique rows/s is
computed per round. Goal: sparseps >= 3x the peer.

    .venv/bin/python bench/compare_peer.py                                   # full (~2.5 min)
    .venv/bin/python bench/compare_peer.py --rows 20000 --dur 1 --rounds 1 --workers 1 --peer-steps 20   # smoke
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

from harness import (HERE, REPO, add_table_args, add_worker_args, busiest_other, fmt_mr,  # noqa: E402
                     int_list, loadavg, machine_info, proc_mem, record, run_json, run_workers, setup_table,
                     start_sparseps)


def run_peer(a, n: int) -> dict:
    cmd = [a.peer_python, os.path.join(HERE, "peer_pss.py"), "--workers", str(n), "--rows", str(a.rows),
           "--dim", str(a.dim), "--bags", str(a.batch // a.bag), "--bag", str(a.bag), "--dist", a.dist,
           "--steps", str(a.peer_steps), "--reps", str(a.peer_reps), "--warmup", str(a.peer_warmup)]
    t = time.perf_counter()
    out = run_json(cmd, "peer")
    out["wall_s"] = time.perf_counter() - t
    out["rows_s"] = float(np.median([x["rows_s"] for x in out["reps"]]))
    out["steps_s"] = float(np.median([x["steps_s"] for x in out["reps"]]))
    out["command"] = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_args(p)
    p.add_argument("--workers", default="1,2")
    add_worker_args(p, dur=4.0, dur_help="sparseps window, seconds")
    p.add_argument("--variants", default="grpc,grpc+pushpull,default,pushpull",
                   help="sparseps variants, comma-separated, each a '+'-joined set of: default (client and "
                        "server as shipped: pull then push, over the data plane), pushpull (the workers use "
                        "client.push_pull: this step's push and the next step's rows in one round trip), grpc "
                        "(the client keeps pulls and pushes on gRPC: data_plane=False), mallopt (the workers "
                        "apply the server's MALLOC_ENV values to themselves with mallopt at start; the shipped "
                        "client does this at connect), nt1 (a second server started with NUMBA_NUM_THREADS=1), "
                        "allpar (a second server started with SPARSEPS_PARALLEL_KERNELS=always: parallel kernels "
                        "even when requests queue)")
    p.add_argument("--peer-python", default=os.path.join(REPO, ".venv-golden", "bin", "python"))
    p.add_argument("--peer-steps", type=int, default=200)
    p.add_argument("--peer-reps", type=int, default=3)
    p.add_argument("--peer-warmup", type=int, default=20)
    a = p.parse_args()
    a.model = "embbag"
    import sparseps
    workers = int_list(a.workers)
    variants = a.variants.split(",")
    res = {"machine": machine_info(), "params": vars(a), "rounds": []}
    # a variant is a '+'-joined set of words; nt1 = the server started with NUMBA_NUM_THREADS=1
    envs = {"": None, "nt1": {"NUMBA_NUM_THREADS": "1"}, "allpar": {"SPARSEPS_PARALLEL_KERNELS": "always"}}
    servers, by_env = [], {}

    def server_tag(v):
        return next((w for w in v.split("+") if w in envs), "")
    try:
        for v in variants:
            tag = server_tag(v)
            if tag in by_env:
                continue
            srv = start_sparseps(1, "numba", env=envs[tag])[0]
            servers.append(srv)
            by_env[tag] = srv
            c = sparseps.connect(srv.address)
            setup_table(c, a.rows, a.dim)
            c.create_variable("head", initial_value=np.zeros(a.dim + 1, np.float32), optimizer="opt")
            c.close()
        pids = [x.pid for x in servers]
        for r in range(a.rounds):
            rd = {"loadavg": loadavg(), "busiest_other": busiest_other(pids)}
            for n in workers:
                for v in variants:
                    words = v.split("+")
                    a.client_mallopt = "mallopt" in words
                    a.push_pull = "pushpull" in words
                    a.data_plane = "grpc" not in words
                    srv = by_env[server_tag(v)]
                    key = f"sparseps_w{n}" if v == "default" else f"sparseps_{v}_w{n}"
                    rd[key] = run_workers([srv.address], [srv.pid], n, a, model="embbag")
                    print(f"round {r + 1}: sparseps ({v}) {n} workers: {rd[key]['rows_s'] / 1e6:.3f} M rows/s",
                          file=sys.stderr, flush=True)
                rd[f"peer_w{n}"] = run_peer(a, n)
                print(f"round {r + 1}: peer {n} workers: {rd[f'peer_w{n}']['rows_s'] / 1e6:.3f} M rows/s",
                      file=sys.stderr, flush=True)
            res["rounds"].append(rd)
        res["sparseps_server_rss"] = [proc_mem(x)["VmHWM"] for x in pids]
    finally:
        for x in servers:
            x.stop()
    res["loadavg_end"] = loadavg()
    record("peer", res, report, a.out)


def report(res) -> str:
    a = res["params"]
    R = res["rounds"]
    workers = int_list(a["workers"])
    p0 = R[0][f"peer_w{workers[0]}"]
    lines = [f"# compare_peer — {res['machine']['date_utc']} UTC, `{res['machine']['command']}`", "",
             f"embedding-bag model, {a['batch']} {a['dist']} ids per step ({a['batch'] // a['bag']} bags x {a['bag']}), "
             f"{a['rows']:,} x {a['dim']} table, LazyAdam, 1 server; sparseps window {a['dur']} s, peer "
             f"{a['peer_reps']} x {a['peer_steps']} steps after {a['peer_warmup']} warm-up (TF {p0['tf']}, tfa {p0['tfa']}); "
             f"{len(R)} rounds; load avg per round: " + ", ".join(str(r["loadavg"][0]) for r in R)
             + ". sparseps variants ('+' joins them): default = client and server as shipped (pull, then push, "
             "on the data plane); pushpull = client.push_pull (this step's push and the next step's rows in one "
             "round trip); grpc = the client keeps pulls and pushes on gRPC (data_plane=False); mallopt = the "
             "worker applies sparseps-server's MALLOC_ENV values to itself at start; nt1 = a second server "
             "started with NUMBA_NUM_THREADS=1 (serial numba kernels).",
             "", "| workers | sparseps variant | sparseps unique rows/s | sparseps steps/s | sparseps pull / push p50 µs | "
             "compute p50 µs | worker CPU µs/step | server CPU µs/step | peer unique rows/s | peer steps/s | "
             "**ratio sparseps / peer** |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    variants = a.get("variants", "default").split(",")
    for n in workers:
        for v in variants:
            key = f"sparseps_w{n}" if v == "default" else f"sparseps_{v}_w{n}"
            s = [r[key] for r in R]
            q = [r[f"peer_w{n}"] for r in R]
            lines.append(f"| {n} | {v} | {fmt_mr([x['rows_s'] for x in s], 1e-6, 3)} M | {fmt_mr([x['steps_s'] for x in s], 1, 0)} | "
                         f"{fmt_mr([x['pull_p50_us'] for x in s], 1, 0)} / {fmt_mr([x['push_p50_us'] for x in s], 1, 0)} | "
                         f"{fmt_mr([x['compute_p50_us'] for x in s], 1, 0)} | "
                         f"{fmt_mr([x['worker_cpu_us_per_step'] for x in s], 1, 0)} | "
                         f"{fmt_mr([x['server_cpu_us_per_step'][0] for x in s], 1, 0)} | "
                         f"{fmt_mr([x['rows_s'] for x in q], 1e-6, 3)} M | {fmt_mr([x['steps_s'] for x in q], 1, 0)} | "
                         f"**{fmt_mr([r[key]['rows_s'] / r[f'peer_w{n}']['rows_s'] for r in R])}** |")
    lines += ["", "peer detail per round: " + "; ".join(
        f"{n} w: setup {r[f'peer_w{n}']['setup_s']:.1f} s, reps "
        + "/".join(f"{x['steps_s']:.0f}" for x in r[f"peer_w{n}"]["reps"]) + " steps/s, PS peak RSS "
        f"{r[f'peer_w{n}']['ps_peak_rss'] / 1e9:.2f} GB" for r in R for n in workers)]
    lines += [f"peer command: `{p0['command']}`"]
    if "sparseps_server_rss" in res:
        lines += [f"sparseps server peak RSS: {[round(x / 1e9, 2) for x in res['sparseps_server_rss']]} GB"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
