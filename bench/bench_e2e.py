"""End-to-end push throughput and latency of sparseps over loopback, beside raw transport ceilings.

Everything below is measured in ONE run, interleaved round by round, so the ratios compare
figures taken under the same machine load:

* sparseps: a real `sparseps-server` process (numba backend, LazyAdam, 1,000,000 x 64 float32
  table), pushes of 4096 x 64 rows (uniform and finite-Zipf ids), 1 and 4 client threads, closed
  loop, over BOTH transports of the same server in the same rounds (their order alternates from
  round to round): "data plane" (the shipped default: `sparseps.connect(addr)`, raw frames on the
  server's data port; the client threads share one `sparseps.Client`) and "gRPC"
  (`sparseps.connect(addr, data_plane=False)`, a second shared Client). Reported: pushes/s, unique
  rows/s, MB/s of request bytes (the frame for the data plane, the serialized PushRequest for
  gRPC), server and client CPU per push.
* raw TCP echo (bench/echo_server.py --raw-tcp), the data plane's ceiling: the same framing
  (client/frames.py) doing nothing, fed the SAME frame bytes a data-plane push sends (a PushRequest
  whose tensors are `frames.describe`d, then header + meta + payload, sent with
  `frames.send_frame`); one connection per client thread, closed loop.
* gRPC echo (bench/echo_server.py), the gRPC ceiling: the same transport set-up as sparseps-server
  doing nothing, fed the SAME serialized PushRequest bytes: unary (1 and 4 threads) and
  client-streaming (1 and 4 streams).
* ratios per round (same thread count, also in the JSON under "ratios"): data-plane push/s ÷ raw
  TCP echo msgs/s (the headline), gRPC push/s ÷ gRPC echo unary (and ÷ streaming), data-plane
  push/s ÷ gRPC push/s, raw TCP echo ÷ gRPC echo unary.
* light-load latency (paced, default 100 requests/s in total, rotating over 8 kinds): sparseps push
  of 256 rows (64 KiB) and pull of 256 rows (64 KiB back), each over the data plane and over gRPC;
  raw TCP echo of the same 64 KiB push frame and a raw 64 KiB fetch; gRPC echo unary with the same
  64 KiB push bytes and gRPC echo Fetch of 64 KiB.
* the server's RSS per byte held (table + LazyAdam slots m and v).

    .venv/bin/python bench/bench_e2e.py                         # the full run (~3 min)
    .venv/bin/python bench/bench_e2e.py --rows 20000 --dur 0.5 --rounds 1 --lat-seconds 2   # smoke
    .venv/bin/python bench/bench_e2e.py --facts-only            # only the "facts" A/Bs (see --facts)

The echo clients below (RawEchoConn, EchoClient, stream_run) also serve e2e_facts.py; the
plumbing (servers, the timing loop, workloads, result files) is harness.py's.
"""
import argparse
import os
import socket
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (REPO, EchoServer, add_table_args, busiest_other, closed_loop, fmt_mr,  # noqa: E402
                     grad_pool, id_pool, int_list, loadavg, machine_info, pct, proc_cpu, proc_mem,
                     result_path, save_json, save_text, setup_table, start_sparseps, utc_stamp)


# ---------------------------------------------------------------------------------------------
# echo clients: the raw TCP ceiling (the data plane's framing) and the gRPC ceiling
# ---------------------------------------------------------------------------------------------
class RawEchoConn:
    """One TCP connection to `echo_server.py --raw-tcp` (the data plane's framing, nothing else)."""

    def __init__(self, address: str):
        from sparseps import frames
        self.frames = frames
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)
        self._head = bytearray(frames.HEADER.size)
        self._meta = bytearray(64)
        self._buf = np.empty(0, np.uint8)

    def _answer(self, method: int) -> int:
        f = self.frames
        if not f.recv_exact(self.sock, memoryview(self._head)):
            raise ConnectionError("raw echo closed the connection")
        got, status, meta_len, payload_len = f.parse_header(self._head)
        if got != method or status or meta_len > len(self._meta):
            raise ConnectionError(f"unexpected raw echo answer (method {got}, status {status}, meta {meta_len} B)")
        if meta_len:
            f.recv_exact(self.sock, memoryview(self._meta)[:meta_len])
        if payload_len:
            if len(self._buf) < payload_len:
                self._buf = np.empty(payload_len, np.uint8)
            f.recv_exact(self.sock, memoryview(self._buf)[:payload_len])
        return payload_len

    def push(self, frame) -> None:
        """Send a push frame (meta, arrays) exactly as the data-plane client does; read the ack."""
        meta, arrays = frame
        self.frames.send_frame(self.sock, self.frames.PUSH, 0, meta, arrays)
        self._answer(self.frames.PUSH)

    def fetch(self, n: int) -> int:
        """A pull-shaped call: 8 bytes of meta out, n payload bytes back."""
        self.frames.send_frame(self.sock, self.frames.PULL, 0, n.to_bytes(8, "little"))
        return self._answer(self.frames.PULL)

    def close(self):
        self.sock.close()


class EchoClient:
    def __init__(self, address, max_message_mb=256):
        import grpc
        limit = max_message_mb << 20
        self.channel = grpc.insecure_channel(address, [("grpc.max_receive_message_length", limit),
                                                       ("grpc.max_send_message_length", limit)])
        self.unary = self.channel.unary_unary("/echo.Echo/Unary")
        self.stream = self.channel.stream_unary("/echo.Echo/Stream")
        self.fetch = self.channel.unary_unary("/echo.Echo/Fetch")
        grpc.channel_ready_future(self.channel).result(timeout=30)

    def close(self):
        self.channel.close()



# ---------------------------------------------------------------------------------------------
# load generators
# ---------------------------------------------------------------------------------------------
def stream_run(echo: EchoClient, payloads, streams: int, dur: float, warmup: float, pid=None) -> dict:
    """Client-streaming: `streams` concurrent streams each send payloads for `dur` seconds, then
    wait for the single ack; the rate is messages / (time from start to the last ack)."""
    def one(deadline, counts, i):
        k = [0]

        def gen():
            j = 0
            while time.perf_counter() < deadline:
                yield payloads[j % len(payloads)]
                j += 1
            k[0] = j
        n = int.from_bytes(echo.stream(gen()), "little")
        assert n == k[0], (n, k[0])
        counts[i] = n

    # warm-up stream(s), not timed
    counts = [0] * streams
    ws = [threading.Thread(target=one, args=(time.perf_counter() + warmup, counts, i)) for i in range(streams)]
    for t in ws:
        t.start()
    for t in ws:
        t.join()
    counts = [0] * streams
    cpu0 = proc_cpu(pid) if pid else 0.0
    c0 = time.process_time()
    t0 = time.perf_counter()
    ts = [threading.Thread(target=one, args=(t0 + dur, counts, i)) for i in range(streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    el = time.perf_counter() - t0
    cpu1 = proc_cpu(pid) if pid else 0.0
    c1 = time.process_time()
    msgs = sum(counts)
    nbytes = sum(len(payloads[j % len(payloads)]) for c in counts for j in range(c))
    return {"seconds": el, "msgs": msgs, "msgs_s": msgs / el, "rows_s": None, "MB_s": nbytes / el / 1e6,
            "server_cpu_us_per_msg": (cpu1 - cpu0) / msgs * 1e6 if msgs else None,
            "client_cpu_us_per_msg": (c1 - c0) / msgs * 1e6 if msgs else None}


def push_bytes(ids, rows, name="emb") -> bytes:
    """The serialized PushRequest sparseps sends for this batch (what the echo server is fed)."""
    from sparseps.proto import sparseps_pb2 as pb
    from sparseps.tensors import to_tensor
    req = pb.PushRequest(gradients=[pb.Gradient(variable=name, ids=to_tensor(ids), values=to_tensor(rows))],
                         client_id="0123456789abcdef0123456789abcdef", sequence=123456, optimizers=["opt"])
    return req.SerializeToString()


def push_frame(ids, rows, name="emb") -> tuple:
    """(meta, arrays) of the data-plane frame sparseps sends for this batch: the PushRequest with its
    tensors `describe`d (bytes aside), as Client.push builds it for a data-plane shard."""
    from sparseps import frames
    from sparseps.proto import sparseps_pb2 as pb
    arrays = []
    req = pb.PushRequest(client_id="0123456789abcdef0123456789abcdef", sequence=123456)
    g = req.gradients.add(variable=name)
    frames.describe(ids, g.ids, arrays)
    frames.describe(rows, g.values, arrays)
    req.optimizers.append("opt")
    return req.SerializeToString(), arrays


def frame_bytes(frame) -> bytes:
    """The bytes on the wire of a (meta, arrays) push frame: header + meta + payload."""
    from sparseps import frames
    meta, arrays = frame
    return (frames.header(frames.PUSH, 0, len(meta), sum(a.nbytes for a in arrays)) + meta
            + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))


# ---------------------------------------------------------------------------------------------
# the main benchmark
# ---------------------------------------------------------------------------------------------
def run_e2e(a) -> dict:
    import sparseps
    from sparseps.server.main import MALLOC_ENV
    res = {"machine": machine_info(), "params": vars(a), "rounds": []}
    pools = {d: id_pool(d, a.rows, a.batch) for d in ("uniform", "zipf")}
    uniq = {d: [len(np.unique(x)) for x in p] for d, p in pools.items()}
    res["unique_per_batch"] = {d: float(np.mean(u)) for d, u in uniq.items()}
    grads = grad_pool(a.batch, a.dim)
    echo_payloads = [push_bytes(pools["uniform"][i], grads[i % len(grads)]) for i in range(4)]
    raw_frames = [push_frame(pools["uniform"][i], grads[i % len(grads)]) for i in range(4)]
    res["push_request_bytes"] = len(echo_payloads[0])
    res["push_frame_bytes"] = len(frame_bytes(raw_frames[0]))

    servers = start_sparseps(1, a.backend)
    srv = servers[0]
    # variants of the same server (environment A/B), run in the same rounds: uniform pushes only
    variants = {}
    for spec in filter(None, a.server_variants.split(",")):
        label, _, kv = spec.partition(":")
        env = dict(x.split("=", 1) for x in kv.split("+"))
        servers += start_sparseps(1, a.backend, env=env)
        variants[label] = {"env": env, "server": servers[-1]}
    res["server_variants"] = {k: v["env"] for k, v in variants.items()}
    echo = raw = None
    raw_conns = []
    try:
        echo = EchoServer()
        raw = EchoServer("--raw-tcp")
        senv = {k: v for k, v in EchoServer.environ(srv).items() if k in MALLOC_ENV}
        res["malloc_env_sparseps"] = senv
        res["malloc_env_echo"] = {k: v for k, v in echo.environ().items() if k in MALLOC_ENV}
        res["malloc_env_raw_echo"] = {k: v for k, v in raw.environ().items() if k in MALLOC_ENV}
        client = sparseps.connect(srv.address)                          # the shipped default: data plane
        client_grpc = sparseps.connect(srv.address, data_plane=False)   # everything on gRPC
        if client.data_plane[0] is None:
            raise RuntimeError("the default client did not get the data plane (see the warning above): "
                               "its rows would measure gRPC")
        if client_grpc.data_plane != [None]:
            raise RuntimeError(f"data_plane=False still uses the data plane: {client_grpc.data_plane}")
        res["data_plane"] = client.data_plane[0]
        import numba
        res["numba_threads_default"] = numba.config.NUMBA_NUM_THREADS
        res["server_info"] = {"backend": client.server_info[0].backend, "version": client.server_info[0].version}
        mem0 = proc_mem(srv.pid)
        t = time.perf_counter()
        setup_table(client, a.rows, a.dim)
        res["create_table_s"] = time.perf_counter() - t
        mem1 = proc_mem(srv.pid)
        # warm-up: creates the slots, compiles / loads the numba kernels
        t = time.perf_counter()
        for i in range(8):
            client.push({"emb": (pools["uniform"][i], grads[i % len(grads)])})
        res["first_pushes_s"] = time.perf_counter() - t
        mem2 = proc_mem(srv.pid)
        for i in range(8):
            client_grpc.push({"emb": (pools["uniform"][i], grads[i % len(grads)])})
        try:   # the frame the client itself builds for a push, to check the echo is fed the same size
            att = {0: []}
            reqs = client._push_requests({"emb": (pools["uniform"][0], grads[0])}, None, "", att)[0]
            res["push_frame_bytes_client"] = len(frame_bytes((reqs[0].SerializeToString(), att[0])))
        except Exception as e:  # a private method: report, do not fail the benchmark
            res["push_frame_bytes_client"] = repr(e)
        ec = EchoClient(echo.address)
        raw_conns = [RawEchoConn(raw.address) for _ in range(max(a.threads) + 1)]   # the last: latency
        for v in variants.values():
            v["client"] = sparseps.connect(v["server"].address)
            if v["client"].data_plane[0] is None:
                raise RuntimeError(f"variant {v['env']}: the client did not get the data plane")
            setup_table(v["client"], a.rows, a.dim)
            for i in range(8):
                v["client"].push({"emb": (pools["uniform"][i], grads[i % len(grads)])})
        transports = {"dp": (client, res["push_frame_bytes"]), "grpc": (client_grpc, res["push_request_bytes"])}

        def sp_call(dist, tid, cl=client, nbytes=res["push_frame_bytes"]):
            state = [tid * 5]

            def call():
                i = state[0] = state[0] + 1
                ids = pools[dist][i % 16]
                cl.push({"emb": (ids, grads[i % len(grads)])})
                return 1, uniq[dist][i % 16], nbytes
            return call

        def echo_call(tid):
            state = [tid]

            def call():
                i = state[0] = state[0] + 1
                p = echo_payloads[i % len(echo_payloads)]
                ec.unary(p)
                return 1, 0, len(p)
            return call

        def raw_call(tid):   # each thread its own connection
            state, conn = [tid], raw_conns[tid]

            def call():
                i = state[0] = state[0] + 1
                conn.push(raw_frames[i % len(raw_frames)])
                return 1, 0, res["push_frame_bytes"]
            return call

        own = tuple(s.pid for s in servers) + (echo.pid, raw.pid)
        for r in range(a.rounds):
            rd = {"loadavg": loadavg(), "busiest_other": busiest_other(own)}
            order = ("dp", "grpc") if r % 2 == 0 else ("grpc", "dp")
            rd["transport_order"] = list(order)
            for th in a.threads:
                for dist in ("uniform", "zipf"):
                    for tr in order:
                        cl, nbytes = transports[tr]
                        rd[f"sparseps_{tr}_{dist}_{th}"] = closed_loop(
                            [sp_call(dist, i, cl, nbytes) for i in range(th)], a.dur, a.warmup, pids=(srv.pid,))
                for label, v in variants.items():
                    rd[f"sparseps-{label}_uniform_{th}"] = closed_loop(
                        [sp_call("uniform", i, v["client"]) for i in range(th)], a.dur, a.warmup, pids=(v["server"].pid,))
                rd[f"raw_echo_{th}"] = closed_loop([raw_call(i) for i in range(th)], a.dur, a.warmup, pids=(raw.pid,))
                rd[f"echo_unary_{th}"] = closed_loop([echo_call(i) for i in range(th)], a.dur, a.warmup,
                                                     pids=(echo.pid,))
                rd[f"echo_stream_{th}"] = stream_run(ec, echo_payloads, th, a.dur, a.warmup, echo.pid)
            res["rounds"].append(rd)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
        res["ratios"] = [round_ratios(rd, a.threads, variants) for rd in res["rounds"]]
        mem3 = proc_mem(srv.pid)
        held = sum(v["bytes"] for s in client.status()["shards"] for v in s["variables"])
        res["memory"] = {"before_table": mem0, "after_create": mem1, "after_first_pushes": mem2,
                         "after_benchmark": mem3, "bytes_held": held,
                         "table_bytes": a.rows * a.dim * 4}

        # ---- light-load latency: kinds rotate, `lat_rate` requests/s in total ----
        lat_ids = [np.sort(x[:a.lat_rows]) for x in pools["uniform"]]
        lat_grad = grads[0][:a.lat_rows]
        lat_payload = push_bytes(lat_ids[0], lat_grad)
        lat_frame = push_frame(lat_ids[0], lat_grad)
        pull_bytes = a.lat_rows * a.dim * 4
        fetch_req = pull_bytes.to_bytes(8, "little")
        lat_raw = raw_conns[-1]
        kinds = {
            "sparseps_push_dp": lambda i: client.push({"emb": (lat_ids[i % 16], lat_grad)}),
            "sparseps_push_grpc": lambda i: client_grpc.push({"emb": (lat_ids[i % 16], lat_grad)}),
            "sparseps_pull_dp": lambda i: client.pull("emb", lat_ids[i % 16]),
            "sparseps_pull_grpc": lambda i: client_grpc.pull("emb", lat_ids[i % 16]),
            "raw_echo_push": lambda i: lat_raw.push(lat_frame),
            "raw_echo_fetch": lambda i: lat_raw.fetch(pull_bytes),
            "echo_unary": lambda i: ec.unary(lat_payload),
            "echo_fetch": lambda i: ec.fetch(fetch_req),
        }
        for k, fn in kinds.items():   # warm each path
            for i in range(20):
                fn(i)
        lat = {k: [] for k in kinds}
        names = list(kinds)
        n = int(a.lat_seconds * a.lat_rate)
        period = 1.0 / a.lat_rate
        lat_pids = {"sparseps": srv.pid, "echo": echo.pid, "raw_echo": raw.pid}
        lat_cpu0 = {k: proc_cpu(p) for k, p in lat_pids.items()}
        t_next = time.perf_counter()
        for i in range(n):
            t_next += period
            k = names[i % len(names)]
            t0 = time.perf_counter()
            kinds[k](i)
            lat[k].append((time.perf_counter() - t0) * 1e6)
            delay = t_next - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        lat_cpu1 = {k: proc_cpu(p) for k, p in lat_pids.items()}
        n_of = {"sparseps": sum(len(v) for k, v in lat.items() if k.startswith("sparseps_")),
                "echo": len(lat["echo_unary"]) + len(lat["echo_fetch"]),
                "raw_echo": len(lat["raw_echo_push"]) + len(lat["raw_echo_fetch"])}
        res["latency"] = {"request_bytes_push": len(lat_payload), "frame_bytes_push": len(frame_bytes(lat_frame)),
                          "pull_response_bytes": pull_bytes,
                          "server_cpu_us_per_request": {k: (lat_cpu1[k] - lat_cpu0[k]) / n_of[k] * 1e6 if n_of[k] else None
                                                        for k in lat_pids},
                          "rate_total": a.lat_rate, "per_kind": {k: {"n": len(v), "p50": pct(v, 50), "p90": pct(v, 90),
                                                                     "p99": pct(v, 99), "max": max(v) if v else None}
                                                                 for k, v in lat.items()}}
        ec.close()
        client.close()
        client_grpc.close()
        for label, v in variants.items():
            res.setdefault("memory_variants", {})[label] = proc_mem(v["server"].pid)
            v["client"].close()
    finally:
        for c in raw_conns:
            c.close()
        for s in servers:
            s.stop()
        for e in (echo, raw):
            if e is not None:
                e.stop()
    res["loadavg_end"] = loadavg()
    return res


def round_ratios(rd: dict, threads, variants) -> dict:
    """The per-round ratios (same thread count): keys name numerator_over_denominator."""
    out = {}
    for th in threads:
        for dist in ("uniform", "zipf"):
            dp, grpc = rd[f"sparseps_dp_{dist}_{th}"]["msgs_s"], rd[f"sparseps_grpc_{dist}_{th}"]["msgs_s"]
            out[f"dp_over_raw_echo_{dist}_{th}"] = dp / rd[f"raw_echo_{th}"]["msgs_s"]
            out[f"grpc_over_echo_unary_{dist}_{th}"] = grpc / rd[f"echo_unary_{th}"]["msgs_s"]
            out[f"grpc_over_echo_stream_{dist}_{th}"] = grpc / rd[f"echo_stream_{th}"]["msgs_s"]
            out[f"dp_over_grpc_{dist}_{th}"] = dp / grpc
        out[f"raw_echo_over_echo_unary_{th}"] = rd[f"raw_echo_{th}"]["msgs_s"] / rd[f"echo_unary_{th}"]["msgs_s"]
        for k in variants:
            out[f"{k}_over_dp_uniform_{th}"] = (rd[f"sparseps-{k}_uniform_{th}"]["msgs_s"]
                                                / rd[f"sparseps_dp_uniform_{th}"]["msgs_s"])
    return out


def report_e2e(res) -> str:
    a = res["params"]
    R = res["rounds"]
    Q = res["ratios"]
    lines = [f"# bench_e2e — {res['machine']['date_utc']} UTC, `{res['machine']['command']}`", "",
             f"table {a['rows']:,} x {a['dim']} float32, LazyAdam, backend {res['server_info']['backend']}; "
             f"push = {a['batch']} ids -> {res['push_frame_bytes']:,} frame bytes on the data plane "
             f"(the client's own frame: {res.get('push_frame_bytes_client')}), {res['push_request_bytes']:,} "
             f"request bytes over gRPC; unique ids per batch: "
             f"uniform {res['unique_per_batch']['uniform']:.0f}, zipf {res['unique_per_batch']['zipf']:.0f}; "
             f"{len(R)} rounds x {a['dur']} s windows, interleaved (transport order per round: "
             + ", ".join("/".join(r["transport_order"]) for r in R) + "); load avg per round: "
             + ", ".join(str(r["loadavg"][0]) for r in R), "",
             "| what | threads | pushes or msgs/s | unique rows/s | MB/s | server CPU µs/msg | client CPU µs/msg |",
             "|---|---|---|---|---|---|---|"]
    variants = res.get("server_variants", {})
    for th in a["threads"]:
        for key, label in ((f"sparseps_dp_uniform_{th}", "sparseps push (data plane), uniform"),
                           (f"sparseps_grpc_uniform_{th}", "sparseps push (gRPC), uniform"),
                           (f"sparseps_dp_zipf_{th}", "sparseps push (data plane), zipf"),
                           (f"sparseps_grpc_zipf_{th}", "sparseps push (gRPC), zipf"),
                           *((f"sparseps-{k}_uniform_{th}", f"sparseps push (data plane), uniform, server env {' '.join(f'{x}={y}' for x, y in e.items())}")
                             for k, e in variants.items()),
                           (f"raw_echo_{th}", "raw TCP echo (same frame bytes)"),
                           (f"echo_unary_{th}", "gRPC echo unary (same bytes)"),
                           (f"echo_stream_{th}", "gRPC echo client-streaming (same bytes)")):
            if key not in R[0]:
                continue
            rows = [r[key] for r in R]
            ur = fmt_mr([x["rows_s"] for x in rows], 1e-6) + " M" if key.startswith("sparseps") else "–"
            lines.append(f"| {label} | {th} | {fmt_mr([x['msgs_s'] for x in rows], 1, 0)} | {ur} | "
                         f"{fmt_mr([x['MB_s'] for x in rows], 1, 0)} | "
                         f"{fmt_mr([x['server_cpu_us_per_msg'] for x in rows], 1, 0)} | "
                         f"{fmt_mr([x['client_cpu_us_per_msg'] for x in rows], 1, 0)} |")
    lines += ["", "Ratios, per round (median [min–max] over rounds; JSON: \"ratios\"):", "",
              "| ratio | threads | uniform | zipf |", "|---|---|---|---|"]
    for th in a["threads"]:
        for key, label in (("dp_over_raw_echo", "**sparseps data-plane push/s ÷ raw TCP echo msgs/s**"),
                           ("grpc_over_echo_unary", "sparseps gRPC push/s ÷ gRPC echo unary msgs/s"),
                           ("grpc_over_echo_stream", "sparseps gRPC push/s ÷ gRPC echo streaming msgs/s"),
                           ("dp_over_grpc", "sparseps data-plane push/s ÷ sparseps gRPC push/s")):
            cells = [fmt_mr([q[f"{key}_{dist}_{th}"] for q in Q], 1, 2) for dist in ("uniform", "zipf")]
            lines.append(f"| {label} | {th} | {cells[0]} | {cells[1]} |")
        lines.append(f"| raw TCP echo msgs/s ÷ gRPC echo unary msgs/s (no ids) | {th} | "
                     + fmt_mr([q[f"raw_echo_over_echo_unary_{th}"] for q in Q], 1, 2) + " | – |")
        for k, e in variants.items():
            lines.append(f"| sparseps data-plane push/s, server env {' '.join(f'{x}={y}' for x, y in e.items())} ÷ "
                         f"default env (NUMBA_NUM_THREADS={res.get('numba_threads_default', '?')}, OMP_WAIT_POLICY "
                         f"unset) | {th} | " + fmt_mr([q[f"{k}_over_dp_uniform_{th}"] for q in Q]) + " | – |")
    if "latency" in res:
        L = res["latency"]
        pk = L["per_kind"]
        lines += ["", f"Latency at light load ({L['rate_total']} requests/s in total, {len(pk)} kinds rotating; push "
                      f"{L['frame_bytes_push']:,} frame bytes (data plane) / {L['request_bytes_push']:,} request bytes "
                      f"(gRPC), pull response {L['pull_response_bytes']:,} B), µs:", "",
                  "| kind | n | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
        for k, v in pk.items():
            lines.append(f"| {k} | {v['n']} | {v['p50']:.0f} | {v['p90']:.0f} | {v['p99']:.0f} | {v['max']:.0f} |")
        lines += ["", "p50 / p99 ratios: " + "; ".join(
            f"{x} / {y} = {pk[x]['p50'] / pk[y]['p50']:.2f} / {pk[x]['p99'] / pk[y]['p99']:.2f}"
            for x, y in (("sparseps_push_dp", "raw_echo_push"), ("sparseps_pull_dp", "raw_echo_fetch"),
                         ("sparseps_push_grpc", "echo_unary"), ("sparseps_pull_grpc", "echo_fetch"),
                         ("sparseps_push_dp", "sparseps_push_grpc"), ("sparseps_pull_dp", "sparseps_pull_grpc")))]
        c = L["server_cpu_us_per_request"]
        lines += ["", f"server CPU per 64 KiB request at light load (push/pull mix; 10 ms clock ticks): sparseps "
                      f"(both transports) {c['sparseps']:.0f} µs, raw TCP echo {c['raw_echo']:.0f} µs, "
                      f"gRPC echo {c['echo']:.0f} µs"]
    if "memory" in res:
        m = res["memory"]
        base = m["before_table"]["VmRSS"]
        lines += ["", f"Server memory: bytes held (table + m + v) = {m['bytes_held'] / 1e6:.0f} MB; RSS before the table "
                      f"{base / 1e6:.0f} MB, after create {m['after_create']['VmRSS'] / 1e6:.0f} MB, after the first "
                      f"pushes {m['after_first_pushes']['VmRSS'] / 1e6:.0f} MB, after the benchmark "
                      f"{m['after_benchmark']['VmRSS'] / 1e6:.0f} MB (peak {m['after_benchmark']['VmHWM'] / 1e6:.0f} MB). "
                      f"(RSS after − RSS before) / bytes held = "
                      f"{(m['after_benchmark']['VmRSS'] - base) / m['bytes_held']:.3f}; peak RSS / bytes held = "
                      f"{m['after_benchmark']['VmHWM'] / m['bytes_held']:.3f}"]
    lines += ["", f"malloc env of sparseps-server: {res.get('malloc_env_sparseps')}; of the gRPC echo: "
                  f"{res.get('malloc_env_echo')}; of the raw TCP echo: {res.get('malloc_env_raw_echo')}"]
    return "\n".join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_table_args(p)
    p.add_argument("--backend", default="numba")
    p.add_argument("--threads", default="1,4", help="client threads / streams, comma-separated")
    p.add_argument("--dur", type=float, default=3.0, help="seconds per measurement window")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lat-rows", type=int, default=256, help="rows per latency request (256 x 64 x 4 B = 64 KiB)")
    p.add_argument("--lat-rate", type=float, default=100.0, help="latency requests per second, all kinds together")
    p.add_argument("--lat-seconds", type=float, default=24.0, help="8 kinds x 300 at the default rate")
    p.add_argument("--server-variants", default="nt1:NUMBA_NUM_THREADS=1",
                   help="extra sparseps servers with extra environment, A/B'd in the same rounds (uniform pushes): "
                        "label:VAR=value+VAR2=value,...; '' for none")
    p.add_argument("--facts", action="store_true", help="also the facts A/Bs (gRPC 1 MiB unary/stream, malloc, TF)")
    p.add_argument("--facts-only", action="store_true")
    p.add_argument("--facts-msg-bytes", type=int, default=1 << 20)
    p.add_argument("--facts-client-n", type=int, default=300, help="requests per client-probe run")
    p.add_argument("--tf-python", default=os.path.join(REPO, ".venv", "bin", "python"))
    p.add_argument("--tf-rows", type=int, default=1_000_000)
    p.add_argument("--out", default=None, help="JSON output path (default bench/results/e2e_<time>.json)")
    a = p.parse_args()
    a.threads = int_list(a.threads)
    stamp = utc_stamp()
    texts = []
    if not a.facts_only:
        res = run_e2e(a)
        texts += [report_e2e(res), save_json(res, a.out or result_path("e2e", stamp))]
    if a.facts or a.facts_only:
        import e2e_facts   # here, not at the top: it imports this module's echo clients
        facts = e2e_facts.run_facts(a)
        texts += [e2e_facts.report_facts(facts), save_json(facts, result_path("facts", stamp))]
    save_text("\n\n".join(texts), result_path("facts" if a.facts_only else "e2e", stamp, "md"))


if __name__ == "__main__":
    main()
