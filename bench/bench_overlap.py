"""Overlap (issue 7): a trainer step with prefetch + asynchronous pushes vs. the plain synchronous loop.

    python bench/bench_overlap.py                        # Keras (sparseps.keras) and numpy trainers
    python bench/bench_overlap.py --model keras --steps 150 --reps 3 --json out.json
    python bench/bench_overlap.py --address h1:50051,h2:50051   # an existing cluster

Model: the demo's matrix factorisation (users 100,000 x 32, items 20,000 x 32, item bias 20,000 x 1,
LazyAdam, logistic loss) on the demo's synthetic Zipf click log, B=4096 clicks per step.

Loops compared, on the same server and tables, in rotating order within every repetition:
  sync          pull the batch's unique rows, compute, push, wait for the push (max_in_flight=0)
  overlap       Prefetcher pulls batch k+1 while step k computes; pushes go out from a background
                thread, at most --max-in-flight of them queued or on the wire
Reported per loop: steps/s (median, min-max over repetitions) and the speedup overlap/sync of
each repetition (median, min-max). Warm-up steps (tracing, numba compilation) are not timed.
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import sparseps
from sparseps import demo
from sparseps.local import LocalServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import proc_cpu  # noqa: E402


def _args(ns, max_in_flight, prefetch):
    a = argparse.Namespace(**vars(ns))
    a.max_in_flight, a.no_prefetch = max_in_flight, not prefetch
    return a


def _server_cpu(pids):
    """CPU seconds used so far by the local server processes (Linux /proc), or None."""
    try:
        return sum(proc_cpu(pid) for pid in pids)
    except (OSError, ValueError, IndexError):
        return None


def _time_loop(trainer, batches, server_pids):
    """(steps/s, trainer CPU ms per step, server CPU ms per step or None)."""
    n = [0]

    def on_step(loss):
        n[0] += 1
    s0, c0, t0 = _server_cpu(server_pids), time.process_time(), time.perf_counter()
    trainer.train(iter(batches), on_step)        # train() flushes the pushes in flight before returning
    wall, cpu, s1 = time.perf_counter() - t0, time.process_time() - c0, _server_cpu(server_pids)
    return n[0] / wall, 1e3 * cpu / n[0], None if s0 is None or s1 is None else 1e3 * (s1 - s0) / n[0]


def _add_latency(client, seconds):
    """Emulate a network round trip: every RPC of `client` waits `seconds` first (sleeping, no CPU)."""
    import grpc

    from sparseps.proto import sparseps_pb2_grpc as pb_grpc

    class Delay(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            time.sleep(seconds)
            return continuation(details, request)

        def intercept_stream_unary(self, continuation, details, request_iterator):
            time.sleep(seconds)
            return continuation(details, request_iterator)
    client._stubs = [pb_grpc.ParameterServerStub(grpc.intercept_channel(ch, Delay())) for ch in client._channels]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="cluster to use (default: start a local numba server)")
    p.add_argument("--model", choices=["keras", "numpy", "both"], default="both")
    p.add_argument("--steps", type=int, default=120, help="timed steps per loop and repetition")
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--max-in-flight", type=int, default=2)
    p.add_argument("--variants", action="store_true", help="also time async pushes alone and prefetch alone")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for the trainer process (seconds; Python's default 0.005)")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="emulate a network: each RPC of the trainer first sleeps this long (default 0: loopback)")
    p.add_argument("--json", default=None, help="write the results here")
    ns = p.parse_args(argv)
    ns.learning_rate, ns.seed, ns.name = 0.02, 0, "bench_overlap"
    if ns.switch_interval:
        sys.setswitchinterval(ns.switch_interval)

    server = None
    if ns.address is None:
        backend = "numba" if importlib.util.find_spec("numba") else "numpy"
        server = LocalServer("--backend", backend)
        ns.address = server.address
    try:
        client = sparseps.connect(ns.address)
        names = demo.setup(client, ns)
        if ns.latency_ms:
            _add_latency(client, ns.latency_ms / 1e3)
        server_pids = [server.pid] if server is not None else []
        n_batches = ns.warmup + ns.steps
        uid, iid, y, _ = demo.synthetic_clicks(ns.users, ns.items, ns.dim, n_batches * ns.batch, seed=1)
        batches = [(uid[k * ns.batch:(k + 1) * ns.batch], iid[k * ns.batch:(k + 1) * ns.batch],
                    y[k * ns.batch:(k + 1) * ns.batch]) for k in range(n_batches)]
        models = ["numpy", "keras"] if ns.model == "both" else [ns.model]
        results = {"host": platform.node(), "cpus": os.cpu_count(), "address": ns.address,
                   "loadavg_before": os.getloadavg(),
                   "config": {k: v for k, v in vars(ns).items() if k not in ("json",)}, "models": {}}
        for model in models:
            cls = demo.KerasTrainer if model == "keras" else demo.NumpyTrainer
            loops = {"sync": cls(client, names, _args(ns, 0, False)),
                     "overlap": cls(client, names, _args(ns, ns.max_in_flight, True))}
            if ns.variants:
                loops["async_push_only"] = cls(client, names, _args(ns, ns.max_in_flight, False))
                loops["prefetch_only"] = cls(client, names, _args(ns, 0, True))
            for tr in loops.values():                       # warm-up: tracing, kernel compilation
                tr.train(iter(batches[:ns.warmup]), lambda loss: None)
            rates = {k: [] for k in loops}
            cpu = {k: [] for k in loops}
            speedups = []
            for r in range(ns.reps):
                rep = {}
                order = ["sync", "overlap"] if r % 2 == 0 else ["overlap", "sync"]
                order += [k for k in loops if k not in order]
                for k in order:
                    rep[k], c_ms, s_ms = _time_loop(loops[k], batches[ns.warmup:], server_pids)
                    rates[k].append(rep[k])
                    cpu[k].append((c_ms, s_ms))
                speedups.append(rep["overlap"] / rep["sync"])
                print(f"{model:6s} rep {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rep.items()) +
                      f" steps/s; speedup {speedups[-1]:.2f}x", flush=True)
            for tr in loops.values():
                tr.close()
            summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v,
                           "trainer_cpu_ms_per_step": statistics.median(c for c, _ in cpu[k]),
                           "server_cpu_ms_per_step": (statistics.median(s for _, s in cpu[k])
                                                      if all(s is not None for _, s in cpu[k]) else None)}
                       for k, v in rates.items()}
            summary["speedup"] = {"median": statistics.median(speedups), "min": min(speedups),
                                  "max": max(speedups), "all": speedups}
            results["models"][model] = summary
            s = summary
            print(f"{model}: sync {s['sync']['median']:.1f} [{s['sync']['min']:.1f}-{s['sync']['max']:.1f}] steps/s, "
                  f"overlap {s['overlap']['median']:.1f} [{s['overlap']['min']:.1f}-{s['overlap']['max']:.1f}] "
                  f"steps/s, speedup {s['speedup']['median']:.2f}x "
                  f"[{s['speedup']['min']:.2f}-{s['speedup']['max']:.2f}]", flush=True)
            for k in loops:
                srv = s[k]["server_cpu_ms_per_step"]
                print(f"  {k}: CPU per step: trainer {s[k]['trainer_cpu_ms_per_step']:.1f} ms"
                      + (f", server {srv:.1f} ms" if srv is not None else ""), flush=True)
        client.close()
        results["loadavg_after"] = os.getloadavg()
        before, after = results["loadavg_before"][0], results["loadavg_after"][0]
        print(f"load average (1 min) before {before:.1f}, after {after:.1f} on {os.cpu_count()} CPUs", flush=True)
        if ns.json:
            with open(ns.json, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
