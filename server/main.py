"""`sparseps-server`: start one shard. Every flag can also be set as SPARSEPS_<FLAG> in the environment.

    sparseps-server --port 50051                       # one shard, backend chosen by device
    sparseps-server --shard-index 1 --cluster h0:50051,h1:50051
    sparseps-server --coordinator etcd://127.0.0.1:2379 --cluster prod --shard-index 0 --num-shards 2 \
        --data-dir /var/lib/sparseps --min-insync-replicas 2     # one replica of shard 0 (docs/replication.md)
"""
import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent import futures

# glibc malloc settings that keep gRPC's large receive buffers in the heap instead of freshly
# mmapping (and page-faulting) them for every request: measured to halve the server's CPU per
# 1 MiB push. glibc reads them at process start, so main() re-executes itself once with them.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(512 << 20),
              "MALLOC_TOP_PAD_": str(64 << 20)}

log = logging.getLogger("sparseps.server")


def _env(name, default):
    return os.environ.get("SPARSEPS_" + name.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparseps-server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(_env("port", 50051)), help="gRPC port (0 = pick a free one)")
    p.add_argument("--backend", default=_env("backend", "auto"), choices=["auto", "numba", "numpy", "tensorflow", "cuda"],
                   help="auto: cuda when numba sees a CUDA device, else tensorflow on a GPU machine, numba on CPU")
    p.add_argument("--device", default=_env("device", None),
                   help="TensorFlow device, e.g. /GPU:0; for --backend cuda the device index (cuda:N or N)")
    p.add_argument("--device-memory-budget-mb", type=int, default=int(_env("device_memory_budget_mb", 0)),
                   help="--backend cuda: device memory the tables and slots may hold; a variable that would "
                        "pass it is refused with RESOURCE_EXHAUSTED (default 0 = what the device has free at "
                        "start, less 1 GiB)")
    p.add_argument("--max-message-mb", type=int, default=int(_env("max_message_mb", 256)),
                   help="largest request or response in MiB (default 256)")
    p.add_argument("--shard-index", type=int, default=int(_env("shard_index", 0)))
    p.add_argument("--num-shards", type=int, default=int(_env("num_shards", 0)),
                   help="cluster size (default: the length of --cluster, else 1)")
    p.add_argument("--cluster", default=_env("cluster", ""),
                   help="comma-separated addresses of all shards; with --coordinator: the cluster's name")
    p.add_argument("--coordinator", default=_env("coordinator", None), metavar="etcd://HOST:PORT",
                   help="replicate this shard: join shard --shard-index of cluster --cluster as one of its replicas, "
                        "with membership and leadership in etcd (needs --data-dir; docs/replication.md)")
    p.add_argument("--min-insync-replicas", type=int, default=int(_env("min_insync_replicas", 1)),
                   help="with --coordinator: a push is acknowledged only once this many replicas (the leader "
                        "included) have it durable; with fewer in sync pushes are refused (default 1)")
    p.add_argument("--role", default=_env("role", "replica"), choices=["replica", "serving"],
                   help="with --coordinator: replica (may lead, counts toward --min-insync-replicas) or serving "
                        "(read-only, follows the log asynchronously)")
    p.add_argument("--advertise-host", default=_env("advertise_host", None),
                   help="with --coordinator: the host other replicas and clients dial for this one (default: "
                        "--host, or this machine's hostname when --host is 0.0.0.0 or ::), e.g. a pod IP")
    p.add_argument("--lease-seconds", type=int, default=int(_env("lease_seconds", 2)),
                   help="with --coordinator: the etcd lease; a leader that stops renewing it for this long is "
                        "replaced (default 2)")
    p.add_argument("--replica-lag-max-ms", type=float, default=float(_env("replica_lag_max_ms", 1000)),
                   help="with --coordinator: a follower that has not caught up for this long leaves the in-sync "
                        "set (default 1000)")
    p.add_argument("--allow-nonfinite", action="store_true", default=_env("allow_nonfinite", "") == "1",
                   help="accept NaN/Inf in gradients (rejected by default)")
    p.add_argument("--threads", type=int, default=int(_env("threads", 64)),
                   help="gRPC worker threads (default 64); all but a quarter of them may wait for other workers "
                        "at once (pulls for a step, bounded-staleness pulls, sync votes)")
    p.add_argument("--data-port", type=int, default=int(_env("data_port", 0)),
                   help="port of the data plane (Pull/Push/PushPull as raw frames, several times cheaper than "
                        "gRPC for large rows; same TLS and tokens): 0 = pick a free one (default), -1 = off")
    p.add_argument("--metrics-port", type=int, default=int(_env("metrics_port", 0)),
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = off)")
    p.add_argument("--metrics-host", default=_env("metrics_host", None),
                   help="address for the metrics endpoint (default: --host)")
    p.add_argument("--tls-cert", default=_env("tls_cert", None), help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", default=_env("tls_key", None), help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=_env("tls_ca", None),
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--tokens-file", default=_env("tokens_file", None),
                   help="bearer tokens and their roles (read, train, admin), `TOKEN ROLE` per line or JSON; "
                        "every call but health checks then needs `authorization: Bearer TOKEN`")
    p.add_argument("--memory-budget-mb", type=int, default=int(_env("memory_budget_mb", 1024)),
                   help="bytes of requests in progress at once; more is shed with RESOURCE_EXHAUSTED "
                        "(default 1024, 0 = no budget)")
    p.add_argument("--data-dir", default=_env("data_dir", None),
                   help="checkpoints and the write-ahead log live here; a server started on a data "
                        "directory that holds state resumes from it")
    p.add_argument("--restore", default=_env("restore", None),
                   help="'latest' (of --data-dir) or checkpoint directories, comma-separated (one per old "
                        "shard: a different number of shards re-partitions the rows)")
    p.add_argument("--wal-sync", default=_env("wal_sync", "group"), choices=["fsync", "group", "none"],
                   help="durability of acknowledged pushes: fsync each, group commit (default), none")
    p.add_argument("--wal-group-ms", type=float, default=float(_env("wal_group_ms", 2.0)),
                   help="group commit interval in milliseconds (default 2)")
    p.add_argument("--checkpoint-every-steps", type=int, default=int(_env("checkpoint_every_steps", 0)))
    p.add_argument("--checkpoint-every-seconds", type=float, default=float(_env("checkpoint_every_seconds", 0)))
    p.add_argument("--keep-checkpoints", type=int, default=int(_env("keep_checkpoints", 3)))
    p.add_argument("--port-file", default=_env("port_file", None), help="write the bound port here once serving")
    p.add_argument("--no-malloc-tuning", action="store_true", help="do not re-exec with glibc malloc settings")
    p.add_argument("--log-level", default=_env("log_level", "INFO"))
    p.add_argument("--compile-kernels", action="store_true",
                   help="compile the numba kernels into numba's on-disk cache and exit (setup and the "
                        "image build run it, so shards start in about a second instead of a minute)")
    return p


def open_pipeline(shard, args):
    """The push pipeline; with --data-dir: restore the latest checkpoint, replay the log after it."""
    from . import checkpoint, sync
    from .pushes import PeriodicCheckpoints, PeriodicEviction, PushPipeline
    from .wal import WriteAheadLog

    if not args.data_dir:
        if args.restore and args.restore != "latest":
            checkpoint.restore(shard, args.restore.split(","))
        pipeline = PushPipeline(shard)
        sync.attach(pipeline, args)   # sync / bounded consistency (server/sync.py)
        pipeline.periodic = None
        pipeline.evictor = PeriodicEviction(pipeline)
        return pipeline
    os.makedirs(args.data_dir, exist_ok=True)
    wal = WriteAheadLog(os.path.join(args.data_dir, "wal"), args.wal_sync, args.wal_group_ms)
    pipeline = PushPipeline(shard, wal)
    sync.attach(pipeline, args)   # before replay: the log holds sync-mode prepares and decisions
    pipeline.checkpoints = checkpoint.Checkpoints(shard, args.data_dir, args.keep_checkpoints,
                                                  pipeline.checkpoint_extra, pipeline.checkpoint_saved)
    paths = None
    if args.restore and args.restore != "latest":
        paths = args.restore.split(",")
    elif pipeline.checkpoints.latest():
        paths = [pipeline.checkpoints.latest()]
    extra = {}
    if paths:
        extra = checkpoint.restore(shard, paths)
        pipeline.load_dedupe_state(extra.get("dedupe", {}))
        pipeline.sync.load_state(extra.get("sync", {}))
        log.info("restored %s", ",".join(paths))
    after = extra.get("wal_lsn", 0)
    if not paths and wal.segments():
        after = 0   # no checkpoint yet: the log holds everything since the start
    replayed = pipeline.replay(after) if (paths is None or extra) else 0
    if paths and not extra:
        # Restored from another cluster's checkpoints: this shard's old log does not apply.
        for _, seg in wal.segments():
            os.remove(seg)
    wal.open()
    if replayed:
        log.info("replayed %d pushes from the write-ahead log", replayed)
    pipeline.sync.start()   # the coordinator finishes any sync step it decided before a restart
    pipeline.periodic = PeriodicCheckpoints(pipeline, args.checkpoint_every_steps, args.checkpoint_every_seconds)
    pipeline.evictor = PeriodicEviction(pipeline)
    return pipeline


def security(args, shard=None):
    """(server credentials or None, [interceptors]) from the TLS, token and budget flags."""
    import grpc

    from .auth import AuthInterceptor, TokenFileError, load_tokens
    from .limits import LimitsInterceptor, MemoryBudget

    def read(path, what):
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise SystemExit(f"cannot read {what} {path}: {e.strerror or e}") from None

    credentials = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("TLS needs both --tls-cert and --tls-key (--tls-ca adds client certificates)")
        ca = read(args.tls_ca, "--tls-ca") if args.tls_ca else None
        try:
            credentials = grpc.ssl_server_credentials(
                [(read(args.tls_key, "--tls-key"), read(args.tls_cert, "--tls-cert"))],
                root_certificates=ca, require_client_auth=ca is not None)
        except Exception as e:
            raise SystemExit(f"bad TLS certificate or key: {e}") from None
    interceptors = []
    if args.tokens_file:
        try:
            tokens = load_tokens(args.tokens_file)
        except TokenFileError as e:
            raise SystemExit(str(e)) from None
        if credentials is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("bearer tokens without TLS travel in clear text; add --tls-cert/--tls-key")
        interceptors.append(AuthInterceptor(tokens))
        log.info("tokens file %s: %d token(s)", args.tokens_file, len(tokens))
    budget = MemoryBudget(args.memory_budget_mb << 20) if args.memory_budget_mb > 0 else None
    interceptors.append(LimitsInterceptor(budget, shard))
    return credentials, interceptors


def memory_budget(interceptors):
    """The MemoryBudget that the gRPC interceptor, the data plane and the metrics share (or None)."""
    from .limits import LimitsInterceptor
    return next((i.budget for i in interceptors if isinstance(i, LimitsInterceptor)), None)


def start_data_plane(args, service, interceptors):
    from .auth import AuthInterceptor
    from .dataplane import DataPlane, server_tls_context
    tls = server_tls_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    auth = next((i for i in interceptors if isinstance(i, AuthInterceptor)), None)
    budget = memory_budget(interceptors)
    try:
        plane = DataPlane(service, args.host, args.data_port, tls=tls, auth=auth, budget=budget,
                          max_message=args.max_message_mb << 20)
    except OSError as e:
        raise SystemExit(f"could not bind the data plane on {args.host}:{args.data_port}: {e.strerror or e}") from None
    return plane.start()


def serve(args, ready: threading.Event | None = None):
    """Start serving; returns (grpc server, bound port, shard)."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from sparseps.proto import sparseps_pb2 as pb
    from sparseps.proto import sparseps_pb2_grpc as pb_grpc

    from . import backends
    from .service import ParameterServerService
    from .state import Shard

    gate = None
    if args.coordinator:   # --cluster names the cluster; the shards find each other in etcd
        from .replication import Gate
        args.cluster_name, args.cluster, gate = args.cluster, "", Gate()
        if not args.cluster_name or not args.num_shards:
            raise SystemExit("--coordinator needs --cluster NAME and --num-shards N")
    cluster = [a for a in args.cluster.split(",") if a] if args.cluster else []
    num_shards = args.num_shards or len(cluster) or 1
    if not 0 <= args.shard_index < num_shards:
        raise SystemExit(f"--shard-index {args.shard_index} is not in 0..{num_shards - 1}")
    if cluster and len(cluster) != num_shards:
        raise SystemExit(f"--cluster lists {len(cluster)} addresses but --num-shards is {num_shards}")
    t0 = time.perf_counter()
    bk = backends.create(args.backend, args.device, args.device_memory_budget_mb << 20 or None)
    if time.perf_counter() - t0 > 5:
        log.info("backend %s ready in %.0f s (numba kernels compiled: a first start on this machine; "
                 "`sparseps-server --compile-kernels` does it ahead)", bk.name, time.perf_counter() - t0)
    limit = args.max_message_mb << 20
    # a pull's answer must fit in one message (float32 elements; float64 answers are checked when built)
    shard = Shard(bk, args.shard_index, num_shards, allow_nonfinite=args.allow_nonfinite,
                  max_pull_elements=max(1, (limit - 65536) // 4))
    credentials, interceptors = security(args, shard)
    if gate is not None:
        interceptors.append(gate)
    if args.port == args.data_port and args.port > 0:
        raise SystemExit(f"--data-port {args.data_port} is also the gRPC --port")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.threads), interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0)])
    server.interceptors = interceptors
    budget = memory_budget(interceptors)
    metrics = None
    if args.metrics_port:
        from .metrics import ServerMetrics
        metrics = ServerMetrics(shard, budget=budget)   # before the pipeline: a replay's applies are measured too
    pipeline = open_pipeline(shard, args)
    pipeline.metrics = metrics
    replica = None
    if args.coordinator:
        from . import replication
        replica = gate.replica = replication.attach(args, pipeline)
        if metrics is not None:
            replication.register_metrics(replica, metrics)
        server.add_generic_rpc_handlers((replica.handler(),))
    service = ParameterServerService(shard, cluster, metrics=metrics, pushes=pipeline, threads=args.threads)
    service.max_message = limit
    service.replica = replica
    service.budget = budget
    pb_grpc.add_ParameterServerServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name, health.SERVICE_NAME,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if credentials is not None:
        port = server.add_secure_port(f"{args.host}:{args.port}", credentials)
    else:
        port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        raise SystemExit(f"could not bind {args.host}:{args.port}")
    server.start()
    server.data_plane = None
    if args.data_port >= 0:
        server.data_plane = start_data_plane(args, service, interceptors)
        service.data_port = server.data_plane.port
        service.data_tls = server.data_plane.tls is not None
    for name in ("", "sparseps.v1.ParameterServer"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.health = health_servicer
    server.pipeline = pipeline
    server.metrics = metrics
    server.replica = replica
    if replica is not None:
        host = args.advertise_host or (socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host)
        replica.start(f"{host}:{port}", server.data_plane.port if server.data_plane is not None else 0)
    if metrics is not None:
        mhost = args.metrics_host or args.host
        log.info("metrics at http://%s:%d/metrics", mhost, metrics.serve(mhost, args.metrics_port))
    log.info("sparseps-server shard %d/%d listening on %s:%d (data plane %s) backend=%s device=%s",
             args.shard_index, num_shards, args.host, port,
             server.data_plane.port if server.data_plane is not None else "off", bk.name, bk.device)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    return server, port, shard


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.compile_kernels:
        from .backends import compile_kernels
        print(f"sparseps-server: numba kernels compiled or loaded from cache in {compile_kernels():.1f} s")
        return 0
    if not args.no_malloc_tuning and any(k not in os.environ for k in MALLOC_ENV):
        env = dict(os.environ, **MALLOC_ENV)
        os.execve(sys.executable, [sys.executable, "-m", "sparseps.server", *argv], env)
    # numba's OpenMP threads sleep between applies instead of spinning: on shared or busy CPUs a
    # spinning pool measured 5x slower applies (docs/benchmarks.md); dedicated cores may set ACTIVE.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.coordinator:
        from . import replication
        replication.ARGV[:] = argv   # a deposed leader re-executes itself with them
    server, port, shard = serve(args)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s, draining", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.health.enter_graceful_shutdown()
    if server.replica is not None:
        server.replica.stop()   # leadership moves now, not when the lease runs out
    stopped = server.stop(grace=5)
    if server.data_plane is not None:
        server.data_plane.stop(grace=5)
    stopped.wait()
    pipeline = server.pipeline
    if pipeline.periodic is not None:
        pipeline.periodic.stop()
    pipeline.evictor.stop()
    if pipeline.checkpoints is not None:
        try:
            path, nbytes, _ = pipeline.checkpoints.save()
            log.info("final checkpoint %s (%d bytes)", path, nbytes)
        except Exception as e:
            log.error("final checkpoint failed: %s", e)
    if pipeline.wal is not None:
        pipeline.wal.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
