"""Sparse apply rates (LazyAdam; Adagrad, Ftrl, RMSprop) vs. the random-row gather rate of ``np.take``,
same process, interleaved.

    python bench/bench_apply.py                       # 1M x 64 float32, B=4096,65536, uniform+zipf
    python bench/bench_apply.py --reps 5 --json out.json

For every (distribution, batch size) a pool of ``--pool`` id batches is generated up front; each
repetition then times, in rotating order, one pass over the pool with

  (a) ``np.take(table, ids, axis=0, out=buf)``            -> gather rows/s
  (b) each backend's ``apply(ids, grads)`` LazyAdam step  -> apply rows/s (ids per second; unique
      rows per second are reported too)

and records (b)/(a) for that repetition. Reported: medians, and the ratio's median [min, max].
Backends come from :func:`make_apply` (``fused``: numba kernels of server/backends/fused.py;
``numpy``: np.unique + np.add.at + fancy indexing; ``tensorflow``: the server's TF backend, its fused LazyAdam tf.function,
on the GPU when one is visible; SPARSEPS_BENCH_TF_DEVICE=/CPU:0 picks a device). The Keras legacy
kernels of the other optimizers are methods of their own, fused (numba) only: ``adagrad``, ``ftrl``,
``rmsprop_momentum`` and ``rmsprop`` (momentum 0: every step also multiplies the whole rms slot by
rho, as the reference does, so its rate falls with the table size):

    python bench/bench_apply.py --backend fused,adagrad,ftrl,ftrl_pow,rmsprop_momentum,rmsprop
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harness import ZipfIds, id_pool, proc_mem  # noqa: E402
_FUSED = "sparseps.server.backends.fused"


def load_fused():
    """``sparseps.server.backends.fused``, or the file itself when the package is not installed.

    The file is registered under the canonical module name: numba's on-disk cache records the
    module name, so cached kernels are only reusable if every process uses the same one.
    """
    try:
        return importlib.import_module(_FUSED)
    except ImportError:
        spec = importlib.util.spec_from_file_location(_FUSED, ROOT / "server" / "backends" / "fused.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_FUSED] = mod
        spec.loader.exec_module(mod)
        return mod


# ------------------------------------------------------------------------------------ state
class State:
    """The table and its LazyAdam slots, plus the (already bias-corrected) step scalars."""

    def __init__(self, rows, dim, dtype, seed):
        rng = np.random.default_rng(seed)
        dt = np.dtype(dtype).type
        # every page is written here, so RSS below is the resident size, not a promise
        self.var = rng.standard_normal((rows, dim), dtype=np.float32).astype(dtype, copy=False)
        self.m = np.empty_like(self.var)
        self.m.fill(0)
        self.v = np.empty_like(self.var)
        self.v.fill(dt(1e-4))
        b1, b2, t = dt(0.9), dt(0.999), 10
        self.beta1, self.beta2 = b1, b2
        self.one_minus_beta1, self.one_minus_beta2 = dt(1) - b1, dt(1) - b2
        self.epsilon = dt(1e-7)
        self.lr = dt(1e-3) * np.sqrt(dt(1) - b2 ** dt(t)) / (dt(1) - b1 ** dt(t))

    def scalars(self):
        return (self.lr, self.beta1, self.beta2, self.one_minus_beta1, self.one_minus_beta2,
                self.epsilon)


KERAS_KERNELS = ("adagrad", "ftrl", "ftrl_pow", "rmsprop_momentum", "rmsprop")


def keras_apply(name: str, state: State):
    """One sparse step of a Keras legacy optimizer's fused kernel; its slots are the state's v
    (accumulator / rms, positive) and m (linear / momentum)."""
    fused = load_fused()
    dt = state.var.dtype.type
    var, acc, other = state.var, state.v, state.m
    lr, eps, rho = dt(0.01), dt(1e-7), dt(0.9)
    if name == "adagrad":
        return lambda ids, grads: fused.adagrad(var, acc, ids, grads, lr, eps)
    if name == "ftrl":   # l1 0.01, l2 0.01, learning_rate_power -0.5 (the sqrt path)
        return lambda ids, grads: fused.ftrl(var, acc, other, ids, grads, lr, dt(0.01), dt(0.02), None, dt(0.5), True)
    if name == "ftrl_pow":   # learning_rate_power -0.25: TF 2.15's pow (server/eigen_pow.py) per element
        return lambda ids, grads: fused.ftrl(var, acc, other, ids, grads, lr, dt(0.01), dt(0.02), None, dt(0.25), False)
    if name == "rmsprop_momentum":
        return lambda ids, grads: fused.rmsprop(var, acc, None, other, ids, grads, lr, rho, dt(1) - rho, dt(0.9), eps)

    def apply(ids, grads):   # momentum 0: the whole rms decays first (server: the numpy backend's op)
        np.multiply(acc, rho, out=acc)
        return fused.rmsprop(var, acc, None, None, ids, grads, lr, rho, dt(1) - rho, dt(0), eps)
    return apply


def make_apply(backend: str, state: State):
    """Return ``apply(ids, grads) -> number of unique rows`` doing one LazyAdam sparse step on
    ``state`` (in place), or one step of a Keras legacy kernel (KERAS_KERNELS). Plug the real
    server backends in here."""
    if backend in KERAS_KERNELS:
        return keras_apply(backend, state)
    if backend == "fused":
        fused = load_fused()
        sc = state.scalars()

        def apply(ids, grads):
            return fused.lazy_adam(state.var, state.m, state.v, ids, grads, *sc)

        return apply

    if backend == "numpy":
        lr, b1, b2, omb1, omb2, eps = state.scalars()
        var, m, v = state.var, state.m, state.v

        def apply(ids, grads):
            uniq, inv = np.unique(ids, return_inverse=True)
            g = np.zeros((uniq.size, grads.shape[1]), grads.dtype)
            np.add.at(g, inv.ravel(), grads)  # input order per row: same bits as fused
            m_t = b1 * m[uniq] + omb1 * g
            v_t = b2 * v[uniq] + omb2 * (g * g)
            m[uniq] = m_t
            v[uniq] = v_t
            var[uniq] = var[uniq] - (lr * m_t) / (np.sqrt(v_t) + eps)
            return uniq.size

        return apply

    if backend == "tensorflow":  # the server's TF backend (GPU when visible): its fused LazyAdam step
        try:
            from sparseps.server.backends.tf_backend import TensorFlowBackend
        except ImportError:
            sys.path.insert(0, str(ROOT))
            from server.backends.tf_backend import TensorFlowBackend
        bk = TensorFlowBackend(os.environ.get("SPARSEPS_BENCH_TF_DEVICE") or None)
        var, m, v = bk.from_numpy(state.var), bk.from_numpy(state.m), bk.from_numpy(state.v)
        c = bk.coefficients(dict(zip("abcdef", state.scalars())))
        sc = [c[k] for k in "abcdef"]
        kernel = bk.kernel("lazy_adam")

        def apply(ids, grads):
            n = int(kernel(var, m, v, ids, grads, *sc))
            bk.to_numpy(var, ids[:1])  # a 1-row read waits for the step on the device (GPU: async)
            return n

        return apply
    raise ValueError(f"unknown backend {backend!r}")


# ------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--batches", default="4096,65536", help="comma-separated batch sizes")
    ap.add_argument("--dists", default="uniform,zipf", help="comma-separated: uniform, zipf")
    ap.add_argument("--zipf-s", type=float, default=1.05)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pool", type=int, default=16, help="id batches per (dist, batch)")
    ap.add_argument("--backend", default="fused,numpy",
                    help="comma-separated backends (LazyAdam): fused, numpy, tensorflow; and the "
                         "fused kernels of " + ", ".join(KERAS_KERNELS))
    ap.add_argument("--threads", type=int, default=0, help="numba threads (0: numba's default)")
    ap.add_argument("--omp-wait", default="passive", choices=["passive", "bounded", "active", "env"],
                    help="how numba's omp worker threads wait between parallel regions (set before "
                         "numba loads libgomp). passive: OMP_WAIT_POLICY=PASSIVE (sleep at once; a "
                         "futex wake-up per call; robust on a shared CPU; default); bounded: "
                         "GOMP_SPINCOUNT=20000; active: spin forever (fastest on idle cores, steals "
                         "a core from everything else); env: leave the environment alone (libgomp "
                         "default, 300k spins: on an oversubscribed CPU every fork-join then waits "
                         "for a descheduled spinner)")
    ap.add_argument("--flush-mb", type=int, default=64,
                    help="read this many MiB (> the last-level cache) before every timed pass, so "
                         "no method starts with rows another method just pulled into cache (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    batches = [int(b) for b in args.batches.split(",") if b]
    dists = [d for d in args.dists.split(",") if d]
    backends = [b for b in args.backend.split(",") if b]
    dtype = np.dtype(args.dtype)

    if args.omp_wait == "bounded":
        os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    elif args.omp_wait in ("passive", "active"):
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait.upper()
    # -- compile (or load from numba's on-disk cache) outside any timing
    import numba

    t0 = time.perf_counter()
    fused = load_fused()
    import_s = time.perf_counter() - t0
    if args.threads:
        numba.set_num_threads(args.threads)
    first_call = fused.warmup((dtype,))
    first_call_s = sum(first_call.values())
    threads = numba.get_num_threads()
    layer = numba.threading_layer()

    # -- table + slots, resident
    rss0 = proc_mem("self")["VmRSS"]
    state = State(args.rows, args.dim, dtype, args.seed)
    rss1 = proc_mem("self")["VmRSS"]
    table_bytes = state.var.nbytes
    slots_bytes = state.m.nbytes + state.v.nbytes

    rng = np.random.default_rng(args.seed + 1)
    zipf = ZipfIds(args.rows, args.zipf_s, rng=rng) if "zipf" in dists else None
    cases = []
    for dist in dists:
        for b in batches:
            pool = id_pool(dist, args.rows, b, args.pool, rng=rng, zipf=zipf)
            grads = (rng.standard_normal((b, args.dim), dtype=np.float32) * 0.01).astype(dtype)
            uniq = float(np.mean([np.unique(ids).size for ids in pool]))
            cases.append(dict(dist=dist, batch=b, pool=pool, grads=grads, mean_unique=uniq,
                              buf=np.empty((b, args.dim), dtype)))

    methods = {"take": None}
    for be in backends:
        methods[be] = make_apply(be, state)

    flush = np.ones(args.flush_mb * 2**20 // 8, np.int64) if args.flush_mb > 0 else None

    def run_pass(name, case):
        pool, grads = case["pool"], case["grads"]
        nuniq = 0
        if flush is not None:
            flush.sum()  # evict the LLC (reads only: no dirty lines left behind)
        if name == "take":
            buf, table = case["buf"], state.var
            c, t = time.process_time(), time.perf_counter()
            for ids in pool:
                np.take(table, ids, axis=0, out=buf)
            dt, dc = time.perf_counter() - t, time.process_time() - c
        else:
            apply = methods[name]
            c, t = time.process_time(), time.perf_counter()
            for ids in pool:
                nuniq += apply(ids, grads)
            dt, dc = time.perf_counter() - t, time.process_time() - c
        return dt, dc, nuniq

    # -- warm every (method, case) once with the real shapes, untimed
    for case in cases:
        for name in methods:
            run_pass(name, case)

    names = list(methods)
    raw = {(c["dist"], c["batch"], n): [] for c in cases for n in names}
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for ci, case in enumerate(cases):
            k = (rep + ci) % len(names)
            for name in names[k:] + names[:k]:  # rotate the order between repetitions
                dt, dc, nuniq = run_pass(name, case)
                n_ids = case["batch"] * len(case["pool"])
                raw[(case["dist"], case["batch"], name)].append(
                    dict(seconds=dt, cpu_seconds=dc, rows_per_s=n_ids / dt,
                         unique_rows_per_s=nuniq / dt, rows_per_cpu_s=n_ids / max(dc, 1e-9)))
    bench_s = time.perf_counter() - t_start
    load_end = os.getloadavg()

    # -- summarise
    results = []
    for case in cases:
        key = (case["dist"], case["batch"])
        take = [r["rows_per_s"] for r in raw[key + ("take",)]]
        take_cpu = [r["rows_per_cpu_s"] for r in raw[key + ("take",)]]
        row = dict(dist=case["dist"], batch=case["batch"], mean_unique=case["mean_unique"],
                   take_rows_per_s=statistics.median(take), take_runs=take, backends={})
        for be in backends:
            runs = raw[key + (be,)]
            rate = [r["rows_per_s"] for r in runs]
            ratio = [a / b for a, b in zip(rate, take)]
            row["backends"][be] = dict(
                rows_per_s=statistics.median(rate),
                unique_rows_per_s=statistics.median([r["unique_rows_per_s"] for r in runs]),
                ratio_median=statistics.median(ratio), ratio_min=min(ratio), ratio_max=max(ratio),
                rows_per_s_runs=rate, ratios=ratio,
                # process CPU time (all threads): what the apply costs, whatever else runs
                cpu_ratio_median=statistics.median(
                    [r["rows_per_cpu_s"] / t for r, t in zip(runs, take_cpu)]))
        results.append(row)

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        rows=args.rows, dim=args.dim, dtype=dtype.name, reps=args.reps, pool=args.pool,
        flush_mb=args.flush_mb,
        zipf_s=args.zipf_s, cpu=cpu, cpus=os.cpu_count(), numba=numba.__version__,
        numpy=np.__version__, numba_threads=threads, threading_layer=layer,
        omp_wait=args.omp_wait, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        gomp_spincount=os.environ.get("GOMP_SPINCOUNT"),
        fused_import_s=import_s, first_call_s=first_call_s, first_call_per_kernel_s=first_call,
        rss_bytes=rss1, rss_before_table_bytes=rss0, table_bytes=table_bytes,
        slots_bytes=slots_bytes, rss_per_table_byte=rss1 / table_bytes,
        rss_delta_per_table_byte=(rss1 - rss0) / table_bytes,
        loadavg_start=load_start, loadavg_end=load_end, bench_seconds=bench_s,
    )

    mrs = lambda x: f"{x / 1e6:.2f}"
    out = []
    out.append(f"Sparse apply ({', '.join(backends)}) vs np.take gather -- {args.rows:,} x {args.dim} {dtype.name}, "
               f"pool {args.pool} batches, {args.reps} reps (interleaved, rotating order, "
               f"{args.flush_mb} MiB cache flush before each timed pass)\n")
    out.append(f"- CPU: {cpu} ({os.cpu_count()} CPUs); numba {numba.__version__}, "
               f"threads used by numba: **{threads}** (layer `{layer}`, --omp-wait {args.omp_wait}: "
               f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
               f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}); numpy {np.__version__}")
    out.append(f"- first call of the fused kernels (compile, or numba cache load): "
               f"{first_call_s:.2f} s (module import {import_s:.2f} s); not in any timing")
    out.append(f"- RSS after table + m + v: {rss1 / 2**20:,.0f} MiB = "
               f"{rss1 / table_bytes:.2f} x table bytes "
               f"(allocation alone: {(rss1 - rss0) / table_bytes:.2f} x; table {table_bytes / 2**20:,.0f} MiB)")
    out.append(f"- load average start/end: {load_start[0]:.2f} / {load_end[0]:.2f} "
               f"(wall-clock rates are only meaningful on an otherwise idle machine)")
    out.append("- rows/s = ids per second; ratio = backend rate / np.take rate of the same repetition; "
               "'per CPU-s' = the same ratio on process CPU time (all threads)\n")
    hdr = "| dist | B | unique/batch | np.take Mrows/s |"
    sep = "|---|---:|---:|---:|"
    for be in backends:
        hdr += (f" {be} Mrows/s | {be} unique Mrows/s | {be}/take median [min, max] |"
                f" {be}/take per CPU-s |")
        sep += "---:|---:|---:|---:|"
    out += [hdr, sep]
    for r in results:
        line = (f"| {r['dist']} | {r['batch']} | {r['mean_unique']:,.0f} | "
                f"{mrs(r['take_rows_per_s'])} |")
        for be in backends:
            b = r["backends"][be]
            line += (f" {mrs(b['rows_per_s'])} | {mrs(b['unique_rows_per_s'])} | "
                     f"**{b['ratio_median']:.2f}** [{b['ratio_min']:.2f}, {b['ratio_max']:.2f}] | "
                     f"{b['cpu_ratio_median']:.2f} |")
        out.append(line)
    print("\n".join(out))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, results=results), f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
