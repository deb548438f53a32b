"""What sparseps.torch costs per training step, measured in one run.

Workload: a 1,000,000 x 64 float32 table, batches of 4096 uniform ids (32 bags of 128), the
embedding-bag model "rows -> mean over the bag -> (h**2).sum()" (no dense part, so every
variant does the same work), torch.optim.SparseAdam numbers (TorchSparseAdam on the server).
Variants, each in the same run, interleaved over rounds, one numba shard on this machine:

  core      the core client: pull the batch's unique rows, the same torch forward/backward on them
            (a dense leaf of the unique rows), push (ids, rows)
  core_pp   the core client's push_pull: push this step and pull the next batch's rows, one round trip
  torch     sparseps.torch: Embedding lookup, autograd backward, SparseAdam.step()
  torch_pf  the same with emb.prefetch(next ids): the step's push_pull brings the next batch's rows
  torch_pf1 the same with emb.prefetch(next ids, staleness=1): read on a background thread meanwhile
  local     one process, no server: nn.Embedding(1M, 64, sparse=True) + torch.optim.SparseAdam
  workers2  two processes running the sparseps.torch step against the one shard (steps/s of both)

Ratios: torch / core and torch_pf / core_pp (what the glue costs; goal <= 1.2 x the core client);
steps/s of 1 and 2 sparseps.torch workers / steps/s of local (goal >= 1.0 at 1 worker).

    .venv/bin/python bench/bench_torch.py                  # 2 rounds x 20 steps (~2 min)
    .venv/bin/python bench/bench_torch.py --rows 100000 --steps 5 --rounds 1   # smoke
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import machine_info, record, start_sparseps  # noqa: E402

BAG, DIM, BATCH = 128, 64, 4096
VARIANTS = ("core", "core_pp", "torch", "torch_pf", "torch_pf1", "local")


def batches(rows, n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, rows, BATCH) for _ in range(n)]


def run_core(client, name, pool, steps, push_pull):
    """The same model and autograd on the pulled unique rows, pushed with the core client (what
    sparseps.torch does without its module and optimizer glue)."""
    import torch
    import torch.nn.functional as F
    times, nxt = [], None
    for k in range(steps):
        ids = torch.from_numpy(pool[k % len(pool)])
        t0 = time.perf_counter()
        uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
        keys = uniq.numpy()
        rows = torch.from_numpy(nxt if nxt is not None else client.pull(name, keys)).requires_grad_(True)
        h = F.embedding(inv.view(-1, BAG), rows).mean(1)
        (h ** 2).sum().backward()
        g = rows.grad.numpy()
        if push_pull:
            nkeys = np.unique(pool[(k + 1) % len(pool)])
            _, out = client.push_pull({name: (keys, g)}, {name: nkeys})
            nxt = out[name].copy()
        else:
            client.push({name: (keys, g)})
        times.append(time.perf_counter() - t0)
    return times


def torch_step_loop(emb, opt, pool, steps, prefetch=None):
    """prefetch: None, 0 (the next rows with the step's push_pull) or 1 (read on a background thread
    during the step, one own step stale at most)."""
    import torch
    times = []
    for k in range(steps):
        ids = torch.from_numpy(pool[k % len(pool)])
        t0 = time.perf_counter()
        opt.zero_grad()
        if prefetch == 1:
            h = emb(ids.view(-1, BAG))
            emb.prefetch(torch.from_numpy(pool[(k + 1) % len(pool)]), staleness=1)
            h = h.mean(1)
        else:
            h = emb(ids.view(-1, BAG)).mean(1)
        (h ** 2).sum().backward()
        if prefetch == 0:
            emb.prefetch(torch.from_numpy(pool[(k + 1) % len(pool)]))
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


WORKER = r'''
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[4])
import sparseps, sparseps.torch as spt
from bench_torch import batches, torch_step_loop
torch.set_num_threads(1)
client = sparseps.connect(sys.argv[1])
emb = spt.Embedding(int(sys.argv[2]), 64, client=client, name="emb_torch")
opt = spt.SparseAdam(emb.parameters(), lr=1e-3)
pool = batches(int(sys.argv[2]), 8, int(sys.argv[5]))
torch_step_loop(emb, opt, pool, 2)
t0 = time.time()
while time.time() < float(sys.argv[6]):
    time.sleep(0.001)
times = torch_step_loop(emb, opt, pool, int(sys.argv[3]))
print(json.dumps({"times": times, "start": t0}))
'''


def run_workers(address, rows, steps, n):
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(rows), str(steps),
                               os.path.dirname(os.path.abspath(__file__)), str(100 + i), str(start)],
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    outs = [json.loads(p.communicate(timeout=900)[0].strip().splitlines()[-1]) for p in procs]
    wall = max(start + sum(o["times"]) for o in outs) - start
    return {"steps": n * steps, "wall_s": wall, "steps_per_s": n * steps / wall,
            "per_step_ms": [statistics.median(o["times"]) * 1e3 for o in outs]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    import sparseps
    import sparseps.torch as spt
    torch.set_num_threads(1)
    res = {"machine": machine_info(), "args": vars(args), "torch": torch.__version__, "rounds": []}
    servers = start_sparseps(1, "numba")
    try:
        client = sparseps.connect(servers[0].address)
        cfg = {"class_name": "TorchSparseAdam", "config": {"lr": 1e-3}}
        init = {"class_name": "RandomNormal", "config": {"stddev": 0.05, "seed": 1}}
        client.create_optimizer("core_opt", cfg)
        client.create_variable("emb_core", shape=(args.rows, DIM), initializer=init, optimizer="core_opt")
        emb = spt.Embedding(args.rows, DIM, client=client, name="emb_torch", initializer=init)
        opt = spt.SparseAdam(emb.parameters(), lr=1e-3)
        local = torch.nn.Embedding(args.rows, DIM, sparse=True)
        local_opt = torch.optim.SparseAdam(local.parameters(), lr=1e-3)
        pool = batches(args.rows, 8, 0)
        for f in (lambda s: run_core(client, "emb_core", pool, s, False), lambda s: torch_step_loop(emb, opt, pool, s),
                  lambda s: torch_step_loop(local, local_opt, pool, s)):
            f(2)   # warm up
        for r in range(args.rounds):
            rnd = {}
            rnd["core"] = run_core(client, "emb_core", pool, args.steps, False)
            rnd["core_pp"] = run_core(client, "emb_core", pool, args.steps, True)
            rnd["torch"] = torch_step_loop(emb, opt, pool, args.steps)
            rnd["torch_pf"] = torch_step_loop(emb, opt, pool, args.steps, prefetch=0)
            rnd["torch_pf1"] = torch_step_loop(emb, opt, pool, args.steps, prefetch=1)
            rnd["local"] = torch_step_loop(local, local_opt, pool, args.steps)
            rnd["workers2"] = run_workers(servers[0].address, args.rows, args.steps, 2)
            res["rounds"].append(rnd)
            print(f"round {r}: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in rnd.items()
                                             if isinstance(v, list)) +
                  f", 2 workers {rnd['workers2']['steps_per_s']:.2f} steps/s", flush=True)
        client.close()
    finally:
        for s in servers:
            s.stop()

    def per_round(fn):
        """fn(medians of one round) for every round: median [min, max] over the rounds."""
        vals = sorted(fn({k: statistics.median(v) for k, v in rnd.items() if isinstance(v, list)}, rnd)
                      for rnd in res["rounds"])
        return [statistics.median(vals), vals[0], vals[-1]]
    res["summary"] = {
        **{f"{k}_ms": per_round(lambda m, r, k=k: m[k] * 1e3) for k in VARIANTS},
        "torch_over_core": per_round(lambda m, r: m["torch"] / m["core"]),
        "torch_prefetch_over_core_push_pull": per_round(lambda m, r: m["torch_pf"] / m["core_pp"]),
        "one_worker_vs_local": per_round(lambda m, r: m["local"] / m["torch"]),
        "two_workers_steps_per_s": per_round(lambda m, r: r["workers2"]["steps_per_s"]),
        "two_workers_vs_local": per_round(lambda m, r: r["workers2"]["steps_per_s"] * m["local"])}

    def report(res):
        m, x = res["machine"], res["summary"]

        def mr(v, fmt="{:.2f}"):
            return f"{fmt.format(v[0])} [{fmt.format(v[1])}, {fmt.format(v[2])}]"
        return "\n".join([
            f"# sparseps.torch step cost ({m['date_utc']} UTC, {m.get('cpu', '?')}, {m['cpus']} CPUs, "
            f"torch {res['torch']}, load average at start {m['loadavg_start'][0]:.1f})",
            "", f"`{m['command']}`: {res['args']['rows']:,} x {DIM} float32, {BATCH} ids per step "
                f"({BATCH // BAG} bags of {BAG}), SparseAdam numbers, one numba shard; per round the median of "
                f"{res['args']['steps']} steps; median [min, max] over {res['args']['rounds']} rounds, ratios taken "
                "per round",
            "", "| variant | ms per step |", "|---|---|",
            f"| core client: pull + push | {mr(x['core_ms'], '{:.1f}')} |",
            f"| core client: push_pull (next batch's rows in the same round trip) | {mr(x['core_pp_ms'], '{:.1f}')} |",
            f"| sparseps.torch: Embedding + SparseAdam.step() | {mr(x['torch_ms'], '{:.1f}')} |",
            f"| sparseps.torch with prefetch(next ids): the step's push_pull reads the next rows | "
            f"{mr(x['torch_pf_ms'], '{:.1f}')} |",
            f"| sparseps.torch with prefetch(next ids, staleness=1): read on a background thread | "
            f"{mr(x['torch_pf1_ms'], '{:.1f}')} |",
            f"| local: nn.Embedding(sparse=True) + torch.optim.SparseAdam | {mr(x['local_ms'], '{:.1f}')} |",
            "", f"- sparseps.torch / core pull+push: **{mr(x['torch_over_core'])}x** (goal <= 1.2x); "
                f"with prefetch / core push_pull: {mr(x['torch_prefetch_over_core_push_pull'])}x",
            f"- 1 sparseps.torch worker vs local: **{mr(x['one_worker_vs_local'])}x** the steps/s (goal >= 1.0)",
            f"- 2 sparseps.torch workers: {mr(x['two_workers_steps_per_s'], '{:.1f}')} steps/s together, "
            f"**{mr(x['two_workers_vs_local'])}x** local's steps/s"])
    record("torch", res, report, args.out)


if __name__ == "__main__":
    main()
