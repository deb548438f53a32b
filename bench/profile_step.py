"""Where the CPU of a push_pull step goes when workers and one shard share this machine.

Two measurements, for the question "what limits steps/s with 2 workers on 2 cores":

1. **floor**: in process, the numba LazyAdam kernel on 4096 uniform rows of a 1M x 64 table,
   against a kernel that only *reads* one float of each of the row's 12 cache lines (var, m, v)
   and against the same update on 4096 *contiguous* rows. The gap between the first two is what
   any code could still win; the third shows the math itself is cheap.
2. **perf** (needs `perf`, root or perf_event_paranoid <= 1): one shard and N compare_peer
   workers (embedding-bag model, `client.push_pull`) for a window, sampled system-wide with
   /proc/stat and `perf record -p SHARD`: the share of the cores used by the shard, by everything
   else (the workers) and idle, and the shard's CPU by component (numba kernels, the Linux kernel -- TCP and wake-ups --,
   the Python interpreter, numpy, libc).

    .venv/bin/python bench/profile_step.py                    # both (~40 s)
    .venv/bin/python bench/profile_step.py --parts floor      # no perf needed
"""
import argparse
import collections
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

from harness import (loadavg, proc_cpu, result_path, run_json, run_workers, save_json, setup_table,  # noqa: E402
                     start_sparseps, utc_stamp)

FLOOR = r'''
import json, sys, time
import numba, numpy as np
from sparseps.server.backends import fused
numba.set_num_threads(1)
N, D, B, R = int(sys.argv[1]), 64, 4096, int(sys.argv[2])
rng = np.random.default_rng(0)
var = rng.standard_normal((N, D)).astype(np.float32)
m = np.zeros((N, D), np.float32) + 0
v = np.zeros((N, D), np.float32) + 0
pool = [rng.integers(0, N, B) for _ in range(64)]
g = (rng.standard_normal((B, D)) * 1e-3).astype(np.float32)

@numba.njit(nogil=True)
def touch(var, m, v, ids):   # one load per cache line of the row's var, m and v: the DRAM floor
    s = np.float32(0)
    for u in range(ids.shape[0]):
        r = ids[u]
        for j in range(0, var.shape[1], 16):
            s += var[r, j] + m[r, j] + v[r, j]
    return s

seq = np.arange(B)
args = (1e-3, 0.9, 0.999, 0.1, 0.001, 1e-7)
touch(var, m, v, pool[0]); fused.lazy_adam(var, m, v, pool[0], g, *args); fused.lazy_adam(var, m, v, seq, g, *args)
out = {"kernel_ms": [], "touch_ms": [], "contiguous_ms": []}
for rep in range(3):
    t0 = time.perf_counter()
    for i in range(R):
        fused.lazy_adam(var, m, v, pool[i % 64], g, *args)
    t1 = time.perf_counter()
    for i in range(R):
        touch(var, m, v, pool[i % 64])
    t2 = time.perf_counter()
    for i in range(R):
        fused.lazy_adam(var, m, v, seq, g, *args)
    t3 = time.perf_counter()
    out["kernel_ms"].append((t1 - t0) / R * 1e3)
    out["touch_ms"].append((t2 - t1) / R * 1e3)
    out["contiguous_ms"].append((t3 - t2) / R * 1e3)
print("JSON" + json.dumps(out))
'''


def floor(a) -> dict:
    r = run_json([sys.executable, "-c", FLOOR, str(a.rows), str(a.reps)], "floor", timeout=600,
                 env=dict(os.environ, NUMBA_NUM_THREADS="1"))
    return {k: float(np.median(v)) for k, v in r.items()}


def _cpu_times():
    """(all jiffies, idle + iowait jiffies) of the machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]), v[3] + v[4]


def _perf_report(data: str, sort: str) -> list:
    cmd = ["perf", "report", "-i", data, "--no-children", "--sort", sort, "--stdio", "-g", "none"]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        s = line.strip()
        if s and s[0].isdigit() and "%" in s.split()[0]:
            pct, rest = s.split(None, 1)
            rows.append((float(pct.rstrip("%")), rest.strip()))
    return rows


def perf_run(a) -> dict:
    import sparseps
    srv = start_sparseps(1, "numba")[0]
    tmp = tempfile.mkdtemp(prefix="sparseps-perf-")
    data = os.path.join(tmp, "perf.data")
    try:
        c = sparseps.connect(srv.address)
        setup_table(c, a.rows, 64)
        c.create_variable("head", initial_value=np.zeros(65, np.float32), optimizer="opt")
        c.close()
        cfg = argparse.Namespace(dist="uniform", rows=a.rows, dim=64, batch=4096, bag=8, dur=a.dur,
                                 warmup_steps=5, start_margin=2.0, client_mallopt=False, push_pull=True,
                                 data_plane=True)
        margin = 2.0 + 0.75 * a.workers
        # sample the middle of the window, after the workers' warm-up (slot creation etc.)
        window = max(1.0, a.dur - 1.0)
        rec = subprocess.Popen(["bash", "-c", f"sleep {margin + 0.5}; exec perf record -p {srv.pid} -F 999 -g "
                                              f"-o {data} -- sleep {window}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        box = {}

        def sample_box():   # /proc/stat over the same window: busy and idle shares of all cores
            time.sleep(margin + 0.5)
            t0, c0, s0 = _cpu_times(), proc_cpu(srv.pid), time.monotonic()
            time.sleep(window)
            t1, c1, s1 = _cpu_times(), proc_cpu(srv.pid), time.monotonic()
            idle = (t1[1] - t0[1]) / max(1e-9, t1[0] - t0[0])
            box.update(idle=idle * 100, server=(c1 - c0) / (s1 - s0) / os.cpu_count() * 100)
        import threading
        th = threading.Thread(target=sample_box)
        th.start()
        res = run_workers([srv.address], [srv.pid], a.workers, cfg, model="embbag", start_margin=margin)
        rec.wait(60)
        th.join()
        split = {"server": box["server"], "idle": box["idle"], "other": 100 - box["server"] - box["idle"]}
        dso = _perf_report(data, "dso")
        total = sum(p for p, _ in dso) or 1.0
        groups = collections.OrderedDict((k, 0.0) for k in ("numba kernels", "linux kernel", "python", "numpy",
                                                             "libc", "protobuf", "other"))
        for pct, name in dso:
            key = ("numba kernels" if name.startswith("[JIT]") else "linux kernel" if "kernel" in name
                   else "python" if "libpython" in name else "numpy" if "_multiarray" in name
                   else "libc" if name.startswith("libc") else "protobuf" if "_message" in name else "other")
            groups[key] += pct / total * 100
        syms = _perf_report(data, "sym")
        return {"run": {k: res[k] for k in ("steps_s", "rows_s", "server_cpu_us_per_step", "worker_cpu_us_per_step",
                                             "compute_p50_us", "push_p50_us")},
                "cores_pct_of_2": {k: round(v, 1) for k, v in split.items()},
                "server_cpu_by_component_pct": {k: round(v, 1) for k, v in groups.items()},
                "server_top_symbols": [(round(p, 2), s) for p, s in syms[:15]]}
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="floor,perf")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dur", type=float, default=5.0)
    a = p.parse_args()
    parts = a.parts.split(",")
    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join(["bench/profile_step.py"] + sys.argv[1:]), "loadavg": loadavg()}
    if "floor" in parts:
        res["floor"] = floor(a)
        f = res["floor"]
        print(f"floor: LazyAdam kernel {f['kernel_ms']:.3f} ms per 4096 random rows; reading their 12 lines "
              f"only {f['touch_ms']:.3f} ms ({f['touch_ms'] / f['kernel_ms']:.0%} of the kernel); the same update "
              f"on 4096 contiguous rows {f['contiguous_ms']:.3f} ms", flush=True)
    if "perf" in parts:
        if shutil.which("perf") is None:
            res["perf"] = "not measured: no perf on this machine"
        else:
            res["perf"] = perf_run(a)
            q = res["perf"]
            print(f"perf, {a.workers} workers push_pull: {q['run']['steps_s']:.0f} steps/s; share of the 2 cores: "
                  f"{q['cores_pct_of_2']}; shard CPU by component: {q['server_cpu_by_component_pct']}", flush=True)
            for pct, sym in q["server_top_symbols"]:
                print(f"   {pct:6.2f}%  {sym}")
    res["loadavg_end"] = loadavg()
    print(save_json(res, result_path("profile", utc_stamp())))


if __name__ == "__main__":
    main()
