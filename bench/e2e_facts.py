"""The "facts" A/Bs of bench_e2e.py (--facts, --facts-only): what the transport and the allocator
cost, measured apart from sparseps.

* gRPC with 1 MiB messages: echo unary vs client-streaming on one server, and two echo servers,
  one with sparseps-server's malloc environment (MALLOC_ENV) and one with glibc's defaults,
  interleaved: server CPU per request.
* the client side of the malloc A/B: client CPU per 1 MiB echo request and per sparseps push in a
  child process with glibc's defaults, after one 16 MiB array was freed, and with mallopt().
* TensorFlow (in a subprocess with --tf-python): a no-op tf.function call, and the sparse LazyAdam
  apply with and without jit_compile.

    .venv/bin/python bench/bench_e2e.py --facts-only
"""
import os
import sys

from bench_e2e import EchoClient, stream_run
from harness import HERE, EchoServer, closed_loop, fmt_mr, machine_info, run_json, setup_table, start_sparseps


TF_FACTS_CODE = r'''
import json, sys, time, os
import numpy as np
import tensorflow as tf
reps, rows, dim, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {"tf": tf.__version__}

@tf.function
def noop():
    return tf.constant(0)
noop()
t = []
for r in range(reps):
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        noop()
    t.append((time.perf_counter() - t0) / n * 1e6)
out["noop_tf_function_us"] = t

rng = np.random.default_rng(0)
var = tf.Variable(rng.uniform(-0.05, 0.05, (rows, dim)).astype(np.float32))
m = tf.Variable(tf.zeros((rows, dim)))
v = tf.Variable(tf.zeros((rows, dim)))
pool = [tf.constant(rng.integers(0, rows, batch, dtype=np.int64)) for _ in range(16)]
g = tf.constant((rng.standard_normal((batch, dim)) * 1e-3).astype(np.float32))
b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-7

def apply(ids, grad):
    uniq, idx = tf.unique(ids)
    gs = tf.math.unsorted_segment_sum(grad, idx, tf.shape(uniq)[0])
    mr = b1 * tf.gather(m, uniq) + (1 - b1) * gs
    vr = b2 * tf.gather(v, uniq) + (1 - b2) * gs * gs
    m.scatter_update(tf.IndexedSlices(mr, uniq))
    v.scatter_update(tf.IndexedSlices(vr, uniq))
    var.scatter_sub(tf.IndexedSlices(lr * mr / (tf.sqrt(vr) + eps), uniq))
    return tf.shape(uniq)[0]

fns = {"nojit": tf.function(apply), "jit": tf.function(apply, jit_compile=True)}
for f in fns.values():
    for ids in pool[:3]:
        f(ids, g)
res = {k: [] for k in fns}
uniq_mean = float(np.mean([len(np.unique(p.numpy())) for p in pool]))
for r in range(reps):
    for k, f in fns.items():          # interleaved A/B
        n = 100
        t0 = time.perf_counter()
        for i in range(n):
            f(pool[i % 16], g)
        res[k].append(n * uniq_mean / (time.perf_counter() - t0))
out["apply_rows_s"] = res
out["apply_unique_rows_per_batch"] = uniq_mean
print("JSON" + json.dumps(out))
'''


def tf_facts(python: str, reps: int, rows: int, dim: int, batch: int) -> dict:
    return run_json([python, "-c", TF_FACTS_CODE, str(reps), str(rows), str(dim), str(batch)], "tf facts",
                    timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


CLIENT_PROBE_CODE = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
if sys.argv[5] == "1":
    from harness import set_client_mallopt
    set_client_mallopt()
import numpy as np, sparseps
if sys.argv[5] == "2":   # free one 16 MiB array first: glibc then raises its dynamic mmap threshold to 16 MiB
    a = np.ones(4 << 20, np.float32)
    del a
from bench_e2e import EchoClient
from harness import grad_pool
echo_addr, sp_addr, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
ec = EchoClient(echo_addr)
c = sparseps.connect(sp_addr, data_plane=False)   # these facts are about gRPC pushes (as recorded)
payloads = [os.urandom(1 << 20) for _ in range(2)]
rng = np.random.default_rng(0)
ids = [rng.integers(0, 65536, 4096, dtype=np.int64) for _ in range(4)]
g = grad_pool(4096, 64, 2)
from sparseps.proto import sparseps_pb2 as pb
from sparseps.tensors import to_tensor


def as_client_builds(i):   # the message construction of Client.push (nested constructors copy the bytes)
    grad = pb.Gradient(variable="emb", ids=to_tensor(ids[i % 4]), values=to_tensor(g[i % 2]))
    req = pb.PushRequest(gradients=[grad], client_id="x" * 32, sequence=i, optimizers=["opt"])
    req.ByteSize()
    return req.SerializeToString()


def in_place(i):           # the same message built in place: one tobytes() and one copy per array
    req = pb.PushRequest(client_id="x" * 32, sequence=i, optimizers=["opt"])
    gr = req.gradients.add(variable="emb")
    for t, arr in ((gr.ids, ids[i % 4]), (gr.values, g[i % 2])):
        t.dtype = pb.INT64 if arr.dtype == np.int64 else pb.FLOAT32
        t.shape[:] = arr.shape
        t.data = arr.tobytes()
    return req.SerializeToString()


out = {}
for name, fn in (("echo_unary_1MiB", lambda i: ec.unary(payloads[i % 2])),
                 ("sparseps_push_4096x64", lambda i: c.push({"emb": (ids[i % 4], g[i % 2])})),
                 ("build_as_client_push+echo_unary", lambda i: ec.unary(as_client_builds(i))),
                 ("build_in_place+echo_unary", lambda i: ec.unary(in_place(i)))):
    for i in range(10):
        fn(i)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    out[name] = {"client_cpu_us": (time.process_time() - c0) / n * 1e6, "wall_us": (time.perf_counter() - t0) / n * 1e6}
print("JSON" + json.dumps(out))
'''


def facts_client(n: int, rounds: int) -> dict:
    """Client side of the malloc A/B: client CPU per 1 MiB echo request and per sparseps push, in a
    child process with glibc defaults vs one that applies MALLOC_ENV's values with mallopt()."""
    import sparseps
    echo = EchoServer()
    sp = start_sparseps(1, "numba")[0]
    out = {"n": n, "rounds": []}
    try:
        c = sparseps.connect(sp.address)
        setup_table(c, 65536, 64)
        c.close()
        for r in range(rounds):
            rd = {}
            for label, flag in (("default", "0"), ("default_after_16MiB_free", "2"), ("mallopt", "1")):
                rd[label] = run_json([sys.executable, "-c", CLIENT_PROBE_CODE, HERE, echo.address, sp.address,
                                      str(n), flag], "client probe")
            out["rounds"].append(rd)
    finally:
        sp.stop()
        echo.stop()
    return out


def facts_grpc(msg_bytes: int, dur: float, warmup: float, rounds: int, threads: int) -> dict:
    """1 MiB messages: echo unary vs client-streaming (same server), and the malloc-env A/B
    (two echo servers, one with the env, one without, interleaved): server CPU per request."""
    from sparseps.server.main import MALLOC_ENV
    payloads = [os.urandom(msg_bytes) for _ in range(2)]
    plain_env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    tuned = EchoServer()
    plain = EchoServer("--no-malloc-tuning", env=plain_env)
    out = {"msg_bytes": msg_bytes, "rounds": []}
    try:
        assert all(k in tuned.environ() for k in MALLOC_ENV), "tuned echo server lacks the malloc env"
        assert not any(k in plain.environ() for k in MALLOC_ENV), "plain echo server has the malloc env"
        ct, cp = EchoClient(tuned.address), EchoClient(plain.address)
        for r in range(rounds):
            rd = {}
            for label, srv, cl in (("tuned", tuned, ct), ("default", plain, cp)):
                for th in (1, threads):
                    calls = [lambda cl=cl, i=i: (cl.unary(payloads[i % 2]), (1, 0, msg_bytes))[1]
                             for i in range(th)]
                    rd[f"unary_{label}_{th}"] = closed_loop(calls, dur, warmup, pids=(srv.pid,))
            rd["stream_tuned_1"] = stream_run(ct, payloads, 1, dur, warmup, tuned.pid)
            rd["stream_default_1"] = stream_run(cp, payloads, 1, dur, warmup, plain.pid)
            out["rounds"].append(rd)
        ct.close()
        cp.close()
    finally:
        tuned.stop()
        plain.stop()
    return out




def run_facts(a) -> dict:
    """All three, with bench_e2e.py's flags (--dur --warmup --rounds --threads --facts-*, --tf-*)."""
    facts = {"machine": machine_info()}
    facts["grpc"] = facts_grpc(a.facts_msg_bytes, a.dur, a.warmup, a.rounds, max(a.threads))
    facts["client"] = facts_client(a.facts_client_n, a.rounds)
    facts["tf"] = tf_facts(a.tf_python, max(3, a.rounds * 2), a.tf_rows, a.dim, a.batch)
    return facts


def report_facts(f) -> str:
    lines = [f"# facts — {f['machine']['date_utc']} UTC, `{f['machine']['command']}`", ""]
    if "tf" in f:
        t = f["tf"]
        lines += [f"TF {t['tf']}: no-op tf.function call = {fmt_mr(t['noop_tf_function_us'], 1, 0)} µs; "
                  f"sparse LazyAdam apply (tf.unique+unsorted_segment_sum+gather+scatter, {t['apply_unique_rows_per_batch']:.0f} "
                  f"unique rows per batch): no jit {fmt_mr(t['apply_rows_s']['nojit'], 1e-6)} M rows/s, "
                  f"jit_compile=True {fmt_mr(t['apply_rows_s']['jit'], 1e-6)} M rows/s, ratio jit/no-jit per rep "
                  f"{fmt_mr([j / n for j, n in zip(t['apply_rows_s']['jit'], t['apply_rows_s']['nojit'])])}"]
    if "grpc" in f:
        g = f["grpc"]
        R = g["rounds"]
        th = max(int(k.rsplit("_", 1)[1]) for k in R[0] if k.startswith("unary_tuned_"))
        lines += ["", f"echo server, {g['msg_bytes']:,}-byte messages, {len(R)} rounds:", "",
                  "| server env | mode | msgs/s | MB/s | server CPU µs/msg |", "|---|---|---|---|---|"]
        for label in ("tuned", "default"):
            for key, mode in ((f"unary_{label}_1", "unary, 1 thread"), (f"unary_{label}_{th}", f"unary, {th} threads"),
                              (f"stream_{label}_1", "client-streaming, 1 stream")):
                rows = [r[key] for r in R]
                lines.append(f"| {'malloc env' if label == 'tuned' else 'glibc default'} | {mode} | "
                             f"{fmt_mr([x['msgs_s'] for x in rows], 1, 0)} | {fmt_mr([x['MB_s'] for x in rows], 1, 0)} | "
                             f"{fmt_mr([x['server_cpu_us_per_msg'] for x in rows], 1, 0)} |")
        lines += ["", "ratios per round: streaming/unary (1 thread, malloc env) = "
                  + fmt_mr([r["stream_tuned_1"]["MB_s"] / r["unary_tuned_1"]["MB_s"] for r in R])
                  + f"; server CPU per request default/env (unary {th} threads) = "
                  + fmt_mr([r[f"unary_default_{th}"]["server_cpu_us_per_msg"] / r[f"unary_tuned_{th}"]["server_cpu_us_per_msg"]
                            for r in R])
                  + "; (1 thread) = "
                  + fmt_mr([r["unary_default_1"]["server_cpu_us_per_msg"] / r["unary_tuned_1"]["server_cpu_us_per_msg"]
                            for r in R])]
    if "client" in f:
        C = f["client"]["rounds"]
        lines += ["", f"client side (child processes, 1 thread, {f['client']['n']} calls each, {len(C)} rounds), client CPU µs per call:",
                  "", "| call | glibc default, fresh process | glibc default after one 16 MiB array was freed (dynamic "
                  "mmap threshold raised) | mallopt (MALLOC_ENV values) | default / mallopt per round |", "|---|---|---|---|---|"]
        for k in C[0]["default"]:
            lines.append(f"| {k} | {fmt_mr([r['default'][k]['client_cpu_us'] for r in C], 1, 0)} | "
                         f"{fmt_mr([r['default_after_16MiB_free'][k]['client_cpu_us'] for r in C], 1, 0)} | "
                         f"{fmt_mr([r['mallopt'][k]['client_cpu_us'] for r in C], 1, 0)} | "
                         f"{fmt_mr([r['default'][k]['client_cpu_us'] / r['mallopt'][k]['client_cpu_us'] for r in C])} |")
    return "\n".join(lines)


