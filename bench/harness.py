"""The plumbing the bench/ scripts share: workloads, process accounting, servers and workers by
PID, the closed timing loop, summary statistics, result files and common flags.

Only the standard library and numpy are imported at module level: peer_pss.py loads this file in
the TF 2.15 venv, where sparseps and grpc are not installed (they are imported where needed).
"""
import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


# ---------------------------------------------------------------------------------------------
# workload: uniform ids, or finite Zipf s=1.05 with permuted ranks (perf_anchors.md)
# ---------------------------------------------------------------------------------------------
class ZipfIds:
    """Finite Zipf law over `n` ranks (p_k ~ k^-s, k = 1..n), ranks randomly permuted over the rows
    (the permutation drawn from `rng`, or from a generator seeded with `seed`)."""

    def __init__(self, n: int, s: float = 1.05, seed: int = 1234, rng=None):
        rng = rng if rng is not None else np.random.default_rng(seed)
        w = np.arange(1, n + 1, dtype=np.float64) ** -s
        self.cdf = np.cumsum(w)
        self.cdf /= self.cdf[-1]
        self.perm = rng.permutation(n).astype(np.int64)

    def sample(self, rng, size: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(size), side="right")
        return self.perm[np.minimum(ranks, len(self.perm) - 1)]


def id_pool(dist: str, n_rows: int, batch: int, pools: int = 16, seed: int = 7, rng=None, zipf=None) -> list:
    """`pools` pre-generated id batches (int64), so id generation stays outside timed loops."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    if dist == "uniform":
        return [rng.integers(0, n_rows, batch, dtype=np.int64) for _ in range(pools)]
    if dist == "zipf":
        z = zipf if zipf is not None else ZipfIds(n_rows)
        return [z.sample(rng, batch) for _ in range(pools)]
    raise ValueError(f"unknown distribution {dist!r}")


def grad_pool(batch: int, dim: int, pools: int = 4, seed: int = 11) -> list:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, dim)) * 1e-3).astype(np.float32) for _ in range(pools)]


# ---------------------------------------------------------------------------------------------
# process accounting (Linux /proc)
# ---------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid) -> float:
    """utime + stime of a process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_mem(pid) -> dict:
    """VmRSS and VmHWM of a process (pid or "self"), bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def loadavg() -> list:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def busiest_other(exclude=()) -> str:
    """The busiest process not ours right now (what else was running), via ps."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,comm", "--sort=-pcpu", "--no-headers"],
                             capture_output=True, text=True, timeout=5).stdout.splitlines()
    except Exception:
        return "?"
    for line in out:
        parts = line.split(None, 2)
        if len(parts) == 3 and int(parts[0]) not in exclude and int(parts[0]) != os.getpid():
            return f"{parts[2]} (pid {parts[0]}, {parts[1]} %)"
    return "-"


def machine_info() -> dict:
    import grpc
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "host": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "grpcio": grpc.__version__, "loadavg_start": loadavg(),
            "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                                 else sys.executable] + [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])}
    try:
        import numba
        info["numba"] = numba.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except Exception:
        pass
    return info


def set_client_mallopt():
    """The malloc settings sparseps-server uses (MALLOC_ENV), applied to this process at run time."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return (libc.mallopt(M_MMAP_THRESHOLD, 256 << 20), libc.mallopt(M_TRIM_THRESHOLD, 512 << 20),
            libc.mallopt(M_TOP_PAD, 64 << 20))


# ---------------------------------------------------------------------------------------------
# summary statistics: median [min–max] over rounds
# ---------------------------------------------------------------------------------------------
def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def med_range(values) -> tuple:
    v = [x for x in values if x == x]
    if not v:
        return (float("nan"),) * 3
    return statistics.median(v), min(v), max(v)


def fmt_mr(values, scale=1.0, digits=2) -> str:
    m, lo, hi = med_range([x * scale for x in values])
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


# ---------------------------------------------------------------------------------------------
# server processes, started and stopped by PID
# ---------------------------------------------------------------------------------------------
def stop_processes(procs, timeout: float = 10.0):
    """SIGTERM the children by their PIDs (all first, so they end together), then SIGKILL each one
    still there after `timeout` seconds."""
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def proc_environ(pid) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode() for k, v in items}


class EchoServer:
    """bench/echo_server.py as a child process; stop() ends it by its PID."""

    def __init__(self, *args, env=None, ready_timeout=30.0):
        self._dir = tempfile.mkdtemp(prefix="echo-")
        port_file = os.path.join(self._dir, "port")
        self._log = open(os.path.join(self._dir, "log"), "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "echo_server.py"), "--port", "0",
                                      "--port-file", port_file, *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env if env is not None else dict(os.environ))
        self.pid = self.proc.pid
        deadline = time.monotonic() + ready_timeout
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("echo server did not start: " + open(os.path.join(self._dir, "log")).read())
            time.sleep(0.05)
        self.address = "127.0.0.1:" + open(port_file).read()

    def environ(self) -> dict:
        return proc_environ(self.pid)

    def stop(self):
        stop_processes([self.proc])
        self._log.close()


def start_sparseps(num_shards=1, backend="numba", env=None):
    """One LocalServer, or a start_cluster of `num_shards` (each has .address, .pid, .stop())."""
    from sparseps.local import LocalServer, start_cluster
    if num_shards == 1:
        return [LocalServer("--backend", backend, env=env)]
    return start_cluster(num_shards, "--backend", backend, env=env)


def setup_table(client, rows, dim, lr=1e-3, seed=3, consistency=None):
    """The benchmark table: "emb" (rows x dim, RandomUniform ±0.05) with LazyAdam optimizer "opt"."""
    kw = {"consistency": consistency} if consistency else {}
    client.create_optimizer("opt", {"class_name": "LazyAdam", "config": {"learning_rate": lr}}, **kw)
    return client.create_variable("emb", shape=(rows, dim), optimizer="opt",
                                  initializer={"class_name": "RandomUniform",
                                               "config": {"minval": -0.05, "maxval": 0.05, "seed": seed}})


# ---------------------------------------------------------------------------------------------
# the closed timing loop
# ---------------------------------------------------------------------------------------------
def closed_loop(calls, dur: float, warmup: float, pids=()) -> dict:
    """Run calls[i]() in a loop on thread i; count completions inside [t0, t0 + dur].

    Each call returns (messages, unique rows, bytes). Also returns server CPU (per pid) and this
    process's CPU (the client) over the window.
    """
    stop = threading.Event()
    logs = [[] for _ in calls]
    errors = []

    def run(i):
        fn, log = calls[i], logs[i]
        try:
            while not stop.is_set():
                r = fn()
                log.append((time.perf_counter(), r))
        except Exception as e:  # report, do not hang
            errors.append(repr(e))
            stop.set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    time.sleep(warmup)
    t0 = time.perf_counter()
    cpu0 = {p: proc_cpu(p) for p in pids}
    c0 = time.process_time()
    time.sleep(dur)
    t1 = time.perf_counter()
    cpu1 = {p: proc_cpu(p) for p in pids}
    c1 = time.process_time()
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    msgs = rows = nbytes = 0
    for log in logs:
        for t, (m, r, b) in log:
            if t0 < t <= t1:
                msgs, rows, nbytes = msgs + m, rows + r, nbytes + b
    el = t1 - t0
    return {"seconds": el, "msgs": msgs, "msgs_s": msgs / el, "rows_s": rows / el, "MB_s": nbytes / el / 1e6,
            "server_cpu_s": {str(p): cpu1[p] - cpu0[p] for p in pids}, "client_cpu_s": c1 - c0,
            "server_cpu_us_per_msg": (sum(cpu1[p] - cpu0[p] for p in pids) / msgs * 1e6) if msgs else None,
            "client_cpu_us_per_msg": ((c1 - c0) / msgs * 1e6) if msgs else None}


# ---------------------------------------------------------------------------------------------
# child processes that answer one line `JSON{...}` on stdout
# ---------------------------------------------------------------------------------------------
def json_line(stdout: str):
    """The payload of the first `JSON{...}` line of a child's stdout, or None."""
    line = [x for x in stdout.splitlines() if x.startswith("JSON")]
    return json.loads(line[0][4:]) if line else None


def run_json(cmd, what: str, timeout: float = 300, env=None) -> dict:
    """Run a child to its end and return its `JSON{...}` line; RuntimeError with its stderr if none."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out = json_line(r.stdout)
    if out is None:
        raise RuntimeError(f"{what} failed (rc {r.returncode}): {r.stderr[-3000:]}")
    return out


# ---------------------------------------------------------------------------------------------
# result files: bench/results/<prefix>_<UTC time>.{json,md}
# ---------------------------------------------------------------------------------------------
def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")


def result_path(prefix: str, stamp: str, ext: str = "json") -> str:
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{prefix}_{stamp}.{ext}")


def save_json(res: dict, path: str) -> str:
    """Write the raw results; return the line the reports end with, `(raw: <path>)`."""
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return f"(raw: {os.path.relpath(path, REPO)})"


def save_text(text: str, path: str):
    print(text)
    with open(path, "w") as f:
        f.write(text + "\n")


def record(prefix: str, res: dict, report, out=None):
    """The JSON to `out` (default bench/results/<prefix>_<stamp>.json); report(res) and the raw
    path printed and saved as bench/results/<prefix>_<stamp>.md."""
    stamp = utc_stamp()
    raw = save_json(res, out or result_path(prefix, stamp))
    save_text(report(res) + "\n\n" + raw, result_path(prefix, stamp, "md"))


# ---------------------------------------------------------------------------------------------
# worker processes (bench_cluster.py, compare_peer.py): the embedding-bag model (perf_anchors.md
# section 4) in numpy, the training-shaped step loop, and run_workers that starts and pools them
# ---------------------------------------------------------------------------------------------
class EmbBag:
    """ids [bags, bag] -> rows of the table -> mean over the bag -> Dense(1) -> sigmoid cross-entropy.

    The dense head ("head", 65 floats: kernel then bias) lives on the server too, with the same
    LazyAdam optimizer (dense path), as the Keras model's Dense layer does on the PS."""

    def __init__(self, bag: int):
        self.bag = bag

    def grads(self, ids, uniq, inv, rows_u, head, labels):
        n = ids.size // self.bag
        dim = rows_u.shape[1]
        emb = rows_u[inv].reshape(n, self.bag, dim)
        h = emb.mean(axis=1, dtype=np.float32)                       # [n, dim]
        w, b = head[:dim], head[dim]
        logits = h @ w + b                                           # [n]
        p = 1.0 / (1.0 + np.exp(-logits))
        loss = float(np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))))
        dlogits = ((p - labels) / n).astype(np.float32)              # [n]
        g_head = np.empty(dim + 1, np.float32)
        g_head[:dim] = h.T @ dlogits
        g_head[dim] = dlogits.sum()
        dh = np.outer(dlogits, w).astype(np.float32) / np.float32(self.bag)   # [n, dim]
        d_rows = np.repeat(dh, self.bag, axis=0)                     # one row per id (duplicates summed by the server)
        return loss, d_rows, g_head


def worker_main(cfg: dict):
    if cfg.get("client_mallopt"):
        set_client_mallopt()
    import sparseps
    client = sparseps.connect(cfg["addresses"], data_plane=cfg.get("data_plane", True))
    pool = id_pool(cfg["dist"], cfg["rows"], cfg["batch"], seed=100 + cfg["index"])
    if cfg.get("keyed"):   # a dynamic table: the same ids as int64 keys (a fixed bijection over 64 bits)
        from sparseps.partition import splitmix64
        pool = [splitmix64(x.astype(np.uint64)).view(np.int64) for x in pool]
    uniqs = [np.unique(x, return_inverse=True) for x in pool]
    rng = np.random.default_rng(cfg["index"])
    grads = grad_pool(cfg["batch"], cfg["dim"], seed=200 + cfg["index"])
    labels = [rng.integers(0, 2, cfg["batch"] // cfg["bag"]).astype(np.float32) for _ in range(16)]
    model = EmbBag(cfg["bag"]) if cfg["model"] == "embbag" else None
    sync = cfg.get("sync")
    var = cfg.get("var", "emb")
    step_no = [0]

    push_pull = cfg.get("push_pull") and not sync
    prefetched = {}
    head_ids = np.arange(65)

    def step(i):
        ids = pool[i % 16]
        uniq, inv = uniqs[i % 16]
        t0 = time.perf_counter()
        if prefetched.get("i") == i:   # push_pull variant: read by the previous step's PushPull
            rows, head = prefetched["rows"], prefetched["head"]
        else:
            rows = client.pull(var, uniq, min_iterations=step_no[0] if sync else 0)
            head = client.pull("head") if model is not None else None
        t1 = time.perf_counter()
        if model is not None:
            _, d_rows, g_head = model.grads(ids, uniq, inv, rows, head, labels[i % 16])
            push = {var: (ids, d_rows), "head": g_head}
        else:
            push = {var: (ids, grads[i % len(grads)])}
        t2 = time.perf_counter()
        if sync:
            from sparseps.client import StaleGradient
            try:
                it = client.push(push, step=step_no[0])
            except StaleGradient as e:
                it = max(e.iterations.values()) if e.iterations else step_no[0]
            step_no[0] = it if isinstance(it, int) else max(it.values())
        elif push_pull:   # one round trip: this step's push, the next step's rows
            nxt = uniqs[(i + 1) % 16][0]
            _, got = client.push_pull(push, {var: nxt, "head": head_ids} if model is not None else {var: nxt})
            prefetched.update(i=i + 1, rows=got[var], head=got.get("head"))
        else:
            client.push(push)
        t3 = time.perf_counter()
        return len(uniq), t1 - t0, t3 - t2, t2 - t1

    if sync:
        step_no[0] = client.optimizer(cfg.get("opt", "opt")).iterations
    for i in range(cfg["warmup_steps"]):
        step(i)
    ready = time.time()
    late = ready > cfg["start_at"]
    while time.time() < cfg["start_at"]:
        time.sleep(0.0005)
    end = cfg["start_at"] + cfg["dur"]
    fixed = cfg.get("steps")   # sync mode: every worker pushes exactly this many steps (lockstep)
    c0 = time.process_time()
    pulls, pushes, computes = [], [], []
    steps = rows = 0
    i = cfg["index"] * 3
    while True:
        u, tp, tq, tc = step(i)
        i += 1
        if not fixed and time.time() > end:
            break
        steps += 1
        rows += u
        pulls.append(tp)
        pushes.append(tq)
        computes.append(tc)
        if fixed and steps >= fixed:
            break
    finished = time.time()
    c1 = time.process_time()
    client.close()
    print("JSON" + json.dumps({"index": cfg["index"], "steps": steps, "unique_rows": rows, "late": late,
                               "ready_margin_s": cfg["start_at"] - ready, "cpu_s": c1 - c0,
                               "elapsed_s": finished - cfg["start_at"],
                               "pull_s": pulls, "push_s": pushes, "compute_s": computes}), flush=True)


def run_workers(addresses, pids, n: int, args, model="none", sync=False, start_margin=None, steps=None,
                var="emb", opt="opt", keyed=False) -> dict:
    """Start n worker processes, run them for args.dur seconds (or `steps` steps each) from a common
    instant, aggregate."""
    margin = start_margin if start_margin is not None else args.start_margin + 0.75 * n
    start_at = time.time() + margin
    procs = []
    for k in range(n):
        cfg = {"addresses": addresses, "index": k, "dist": args.dist, "rows": args.rows, "dim": args.dim,
               "batch": args.batch, "bag": args.bag, "model": model, "start_at": start_at, "dur": args.dur,
               "warmup_steps": args.warmup_steps, "sync": sync, "client_mallopt": args.client_mallopt,
               "push_pull": getattr(args, "push_pull", False), "data_plane": getattr(args, "data_plane", True),
               "steps": steps, "var": var, "opt": opt, "keyed": keyed}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # server CPU over the window
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = [proc_cpu(p) for p in pids]
    if steps:
        for p in procs:
            p.wait(300)
    else:
        time.sleep(args.dur)
    cpu1 = [proc_cpu(p) for p in pids]
    outs = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        out = json_line(so)
        if p.returncode != 0 or out is None:
            raise RuntimeError(f"worker failed (rc {p.returncode}): {se[-3000:]}")
        outs.append(out)
    window = max(o["elapsed_s"] for o in outs) if steps else args.dur
    steps = sum(o["steps"] for o in outs)
    pulls = [x for o in outs for x in o["pull_s"]]
    pushes = [x for o in outs for x in o["push_s"]]
    computes = [x for o in outs for x in o["compute_s"]]
    return {"workers": n, "window_s": window, "steps_s": steps / window,
            "rows_s": sum(o["unique_rows"] for o in outs) / window,
            "late_workers": sum(o["late"] for o in outs), "min_ready_margin_s": min(o["ready_margin_s"] for o in outs),
            "pull_p50_us": pct(pulls, 50) * 1e6, "pull_p99_us": pct(pulls, 99) * 1e6,
            "push_p50_us": pct(pushes, 50) * 1e6, "push_p99_us": pct(pushes, 99) * 1e6,
            "compute_p50_us": pct(computes, 50) * 1e6,
            "server_cpu_us_per_step": [(c1 - c0) / steps * 1e6 if steps else None for c0, c1 in zip(cpu0, cpu1)],
            "server_cpu_util": [(c1 - c0) / window for c0, c1 in zip(cpu0, cpu1)],
            "worker_cpu_us_per_step": sum(o["cpu_s"] for o in outs) / steps * 1e6 if steps else None}


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------
def int_list(text: str) -> list:
    """"1,2,4" -> [1, 2, 4]"""
    return [int(x) for x in text.split(",")]


def add_table_args(p: argparse.ArgumentParser, rows: int = 1_000_000):
    """The table and batch every sparseps benchmark takes: --rows --dim --batch."""
    p.add_argument("--rows", type=int, default=rows)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)


def add_worker_args(p: argparse.ArgumentParser, dur: float, dur_help: str, rounds: int = 2):
    """The flags `run_workers` reads (besides --rows --dim --batch), and --out."""
    p.add_argument("--bag", type=int, default=8)
    p.add_argument("--dist", default="uniform", choices=["uniform", "zipf"])
    p.add_argument("--dur", type=float, default=dur, help=dur_help)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--start-margin", type=float, default=2.0, help="seconds for workers to start and warm up")
    p.add_argument("--out", default=None, help="JSON output path (default bench/results/<name>_<time>.json)")



if __name__ == "__main__":   # a worker process of run_workers: harness.py --worker JSON
    worker_main(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
