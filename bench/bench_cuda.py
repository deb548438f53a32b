"""The cuda backend on a GPU (issue 15 item 4), every figure in one run, raw results as JSON.

* copy: the device's measured copy bandwidth (device-to-device, bytes read + written / time);
* apply: tfa LazyAdam's sparse apply through `CudaBackend.kernel("lazy_adam")` -- host dedupe,
  one pinned transfer, the fused kernel -- of B Zipf ids (B = 4,096 and 65,536) into R x D float32
  tables (10M x 64 and 100M x 128 by default), timed to completion (synchronised), and the kernel
  alone (CUDA events). Bytes the apply must move per unique row: var, m, v read and written plus
  the summed gradient read = 7 D x 4 bytes, plus its 8-byte id; reported as a fraction of the
  copy bandwidth (goal >= 0.5). A table whose value and slots do not fit the device is refused
  by the backend (RESOURCE_EXHAUSTED), and recorded as such;
* the same apply on the TensorFlow backend on /GPU:0 (a subprocess, where TensorFlow exists);
* end to end: push_pull steps/s of a cuda shard against a numba (CPU) shard on the same machine,
  4 worker threads, B ids per step into a 10M x 64 LazyAdam table (--e2e-rows).

    python3 bench/bench_cuda.py --out bench/results/gpu/cuda.json            # the full run (GPU)
    NUMBA_ENABLE_CUDASIM=1 python3 bench/bench_cuda.py --smoke              # the script, simulated
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def zipf_ids(rng, n_rows: int, size: int, s: float = 1.05) -> np.ndarray:
    """Zipf ranks (p_k ~ k^-s, k < n_rows), spread over the table by an odd multiplier mod 2^k."""
    ranks = rng.zipf(s, size * 4) - 1
    ranks = ranks[ranks < n_rows][:size]
    while len(ranks) < size:
        ranks = np.concatenate([ranks, rng.integers(0, n_rows, size - len(ranks))])
    return ((ranks.astype(np.uint64) * np.uint64(0x9E3779B1)) % np.uint64(n_rows)).astype(np.int64)


def copy_bandwidth(cuda, nbytes: int, reps: int) -> dict:
    a = cuda.device_array(nbytes // 4, np.float32)
    b = cuda.device_array(nbytes // 4, np.float32)
    b.copy_to_device(a)
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_to_device(a)
    cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    return {"bytes": nbytes, "seconds": dt, "bytes_per_s": 2 * nbytes / dt}


def bench_apply(bk, cuda, rows, dim, batches, reps, copy_bps):
    from sparseps.errors import ResourceExhausted
    out = []
    try:
        bk.admit(f"a {rows} x {dim} float32 table with m and v", 3 * rows * dim * 4, rows)
        var, m, v = (bk.zeros((rows, dim), np.float32) for _ in range(3))
    except ResourceExhausted as e:
        return [{"rows": rows, "dim": dim, "refused": str(e)}]
    fused = bk.kernel("lazy_adam")
    rng = np.random.default_rng(7)
    c = [np.float32(x) for x in (1e-3, 0.9, 0.999, 0.1, 0.001, 1e-7)]
    for batch in batches:
        pool = [(zipf_ids(rng, rows, batch), rng.standard_normal((batch, dim)).astype(np.float32)) for _ in range(4)]
        fused(var, m, v, *pool[0], *c)   # compile / warm
        cuda.synchronize()
        times, uniq = [], []
        for i in range(reps):
            ids, g = pool[i % len(pool)]
            t0 = time.perf_counter()
            uniq.append(fused(var, m, v, ids, g, *c))
            cuda.synchronize()
            times.append(time.perf_counter() - t0)
        k = float(np.mean(uniq))
        moved = k * (7 * dim * 4 + 8)
        med = float(np.median(times))
        out.append({"rows": rows, "dim": dim, "batch": batch, "unique_rows": k, "apply_seconds_median": med,
                    "apply_seconds": times, "bytes_moved": moved, "bytes_per_s": moved / med,
                    "fraction_of_copy_bandwidth": (moved / med) / copy_bps if copy_bps else None})
    del var, m, v
    return out


def bench_tf_apply(rows, dim, batches, reps):
    """The same apply on TensorFlowBackend('/GPU:0'), in a subprocess (its own CUDA context)."""
    code = f"""
import json, time, numpy as np, sys
sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})
from bench_cuda import zipf_ids
from sparseps.server.backends.tf_backend import TensorFlowBackend
bk = TensorFlowBackend('/GPU:0')
var, m, v = (bk.zeros(({rows}, {dim}), np.float32) for _ in range(3))
fused = bk.kernel('lazy_adam')
c = bk.coefficients({{k: np.float32(x) for k, x in zip('abcdef', (1e-3, 0.9, 0.999, 0.1, 0.001, 1e-7))}})
c = [c[k] for k in 'abcdef']
rng = np.random.default_rng(7)
out = []
for batch in {list(batches)}:
    pool = [(zipf_ids(rng, {rows}, batch), rng.standard_normal((batch, {dim})).astype(np.float32)) for _ in range(4)]
    fused(var, m, v, *pool[0], *c); var.numpy()[:1]
    times = []
    for i in range({reps}):
        ids, g = pool[i % 4]
        t0 = time.perf_counter(); k = fused(var, m, v, ids, g, *c); _ = bk.gather(var, ids[:1]).numpy()
        times.append(time.perf_counter() - t0)
    out.append({{"batch": batch, "unique_rows": int(k), "apply_seconds_median": float(np.median(times)),
                "apply_seconds": times, "device": bk.device, "physical_device": bk.physical_device}})
print(json.dumps(out))
"""
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if r.returncode:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def e2e(backend, rows, dim, batch, workers, seconds):
    """push_pull steps/s of one shard, `workers` threads with their own clients."""
    import sparseps
    from sparseps.local import LocalServer
    srv = LocalServer("--backend", backend)
    try:
        admin = sparseps.connect(srv.address)
        admin.create_optimizer("opt", {"class_name": "LazyAdam", "config": {}})
        admin.create_variable("emb", shape=(rows, dim), dtype="float32", optimizer="opt")
        steps, stop = [0] * workers, threading.Event()

        def run(w):
            c = sparseps.connect(srv.address)
            rng = np.random.default_rng(w)
            pool = [(zipf_ids(rng, rows, batch), rng.standard_normal((batch, dim)).astype(np.float32))
                    for _ in range(4)]
            i = 0
            while not stop.is_set():
                ids, g = pool[i % 4]
                c.push_pull({"emb": (ids, g)}, {"emb": pool[(i + 1) % 4][0]})
                steps[w] += 1
                i += 1
            c.close()

        threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        time.sleep(min(2.0, seconds / 4))   # warm-up (kernel compilation on the first pushes)
        s0, t0 = sum(steps), time.perf_counter()
        time.sleep(seconds)
        s1, t1 = sum(steps), time.perf_counter()
        stop.set()
        for t in threads:
            t.join()
        info = admin.server_info[0]
        admin.close()
        return {"backend": info.backend, "device": info.device, "workers": workers, "batch": batch,
                "rows": rows, "dim": dim, "steps_per_s": (s1 - s0) / (t1 - t0)}
    finally:
        srv.stop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    p.add_argument("--tables", default="10000000x64,100000000x128")
    p.add_argument("--batches", default="4096,65536")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--copy-mb", type=int, default=2048)
    p.add_argument("--e2e-rows", type=int, default=10_000_000)
    p.add_argument("--e2e-seconds", type=float, default=10.0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: copy,apply,tf,e2e")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script, e.g. in the simulator)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tables, args.batches, args.reps, args.copy_mb = "2000x8", "64", 2, 1
        args.e2e_rows, args.e2e_seconds = 5000, 1.0
    skip = set(filter(None, args.skip.split(",")))
    from numba import cuda

    from sparseps.server.backends.cuda_backend import CudaBackend
    bk = CudaBackend()
    from sparseps.server.backends.cuda_kernels import SIMULATOR
    res = {"device": bk.device, "device_name": bk.device_name, "simulator": SIMULATOR,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    batches = [int(b) for b in args.batches.split(",")]
    tables = [tuple(int(x) for x in t.split("x")) for t in args.tables.split(",")]
    copy_bps = None
    if "copy" not in skip:
        res["copy"] = copy_bandwidth(cuda, args.copy_mb << 20, 3 if args.smoke else 20)
        copy_bps = res["copy"]["bytes_per_s"]
    if "apply" not in skip:
        res["apply_cuda"] = [r for rows, dim in tables
                             for r in bench_apply(bk, cuda, rows, dim, batches, args.reps, copy_bps)]
    del bk
    if "tf" not in skip:
        rows, dim = tables[0]
        res["apply_tensorflow"] = bench_tf_apply(rows, dim, batches, args.reps)
    if "e2e" not in skip:
        res["e2e"] = [e2e(b, args.e2e_rows, 64, batches[0], 4, args.e2e_seconds) for b in ("cuda", "numba")]
        if all("steps_per_s" in r for r in res["e2e"]):
            res["e2e_ratio_cuda_over_numba"] = res["e2e"][0]["steps_per_s"] / res["e2e"][1]["steps_per_s"]
    text = json.dumps(res, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
