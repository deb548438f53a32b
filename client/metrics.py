"""The trainer's view of a sparseps cluster as Prometheus metrics: push and pull round trips.

    import sparseps, sparseps.metrics
    client = sparseps.metrics.connect("h0:50051,h1:50051", metrics_port=9401)   # connect + instrument + serve
    # or, step by step:
    client = sparseps.metrics.instrument(sparseps.connect("h0:50051,h1:50051"))
    sparseps.metrics.serve_client_metrics(9401)                                  # http://127.0.0.1:9401/metrics

Metrics (one registry per process, shared by every instrumented client):

  sparseps_client_push_seconds            histogram  client.push(): split, send to every shard, all answers in
  sparseps_client_pull_seconds{variable}  histogram  client.pull(): every shard's rows in
  sparseps_client_rows_pushed_total / sparseps_client_rows_pulled_total   counter
  sparseps_client_errors_total{method,code}   counter  push / pull calls that raised (gRPC code name)

Compared with the server's sparseps_push_latency_seconds, the difference is the network, the
serialisation on both sides and the slowest shard (a push waits for every shard's answer).
Variable names beyond the first 100 are counted under "other".
"""
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import start_http_server

from . import errors
from .client import Client

# A trainer's push is the server's push latency plus serialisation and the slowest of N shards:
# about 1-10 ms for 1k-4k rows on loopback, tens of ms for 64k rows, seconds under sync mode.
ROUND_TRIP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_VARIABLES = 100

REGISTRY = CollectorRegistry()
PUSH_SECONDS = Histogram("sparseps_client_push_seconds", "Trainer-side push round trip (all shards answered)",
                         buckets=ROUND_TRIP_BUCKETS, registry=REGISTRY)
PULL_SECONDS = Histogram("sparseps_client_pull_seconds", "Trainer-side pull round trip (all shards answered)",
                         ["variable"], buckets=ROUND_TRIP_BUCKETS, registry=REGISTRY)
ROWS_PUSHED = Counter("sparseps_client_rows_pushed", "Gradient rows pushed", registry=REGISTRY)
ROWS_PULLED = Counter("sparseps_client_rows_pulled", "Rows pulled", ["variable"], registry=REGISTRY)
ERRORS = Counter("sparseps_client_errors", "Push and pull calls that failed", ["method", "code"], registry=REGISTRY)

_labels: dict[str, str] = {}
_lock = threading.Lock()
_server = None


def _variable(name) -> str:
    name = getattr(name, "name", name)
    label = _labels.get(name)
    if label is None:
        with _lock:
            label = _labels.setdefault(name, name if len(_labels) < MAX_VARIABLES else "other")
    return label


def _rows(gradients) -> int:
    n = 0
    for g in gradients.values():
        if isinstance(g, tuple) and len(g) == 2:
            n += len(g[0])
        elif hasattr(g, "indices"):
            n += len(g.indices)
        else:
            shape = getattr(g, "shape", None)
            n += int(shape[0]) if shape else 1
    return n


def instrument(client):
    """Time this client's push() and pull() (the instance's methods are wrapped); returns it."""
    if getattr(client, "_metrics_instrumented", False):
        return client
    push, pull = client.push, client.pull

    def timed_push(gradients, *args, **kwargs):
        start = time.perf_counter()
        try:
            out = push(gradients, *args, **kwargs)
        except errors.Error as e:
            ERRORS.labels("push", e.code.name).inc()
            raise
        PUSH_SECONDS.observe(time.perf_counter() - start)
        ROWS_PUSHED.inc(_rows(gradients))
        return out

    def timed_pull(name, *args, **kwargs):
        start = time.perf_counter()
        try:
            out = pull(name, *args, **kwargs)
        except errors.Error as e:
            ERRORS.labels("pull", e.code.name).inc()
            raise
        label = _variable(name)
        PULL_SECONDS.labels(label).observe(time.perf_counter() - start)
        ROWS_PULLED.labels(label).inc(len(out))
        return out

    timed_push.__doc__, timed_pull.__doc__ = push.__doc__, pull.__doc__
    client.push, client.pull = timed_push, timed_pull
    client._metrics_instrumented = True
    return client


def serve_client_metrics(port: int = 0, host: str = "127.0.0.1") -> int:
    """Serve this process's client metrics at http://host:port/metrics (a daemon thread); returns
    the bound port. A second call returns the port of the first endpoint."""
    global _server
    with _lock:
        if _server is None:
            disable_created_metrics()   # no *_created series (process-wide)
            _server, _ = start_http_server(port, addr=host, registry=REGISTRY)
        return _server.server_port


def stop_client_metrics():
    global _server
    with _lock:
        if _server is not None:
            _server.shutdown()
            _server.server_close()
            _server = None


def connect(addresses, *, metrics_port: int | None = None, metrics_host: str = "127.0.0.1", **options):
    """sparseps.connect(), instrumented; with metrics_port (0 = any free port) also serves /metrics."""
    client = instrument(Client(addresses, **options))
    if metrics_port is not None:
        client.metrics_port = serve_client_metrics(metrics_port, metrics_host)
    return client
