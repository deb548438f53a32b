"""The Prometheus endpoint of real shards (`--metrics-port`) and of an instrumented client.

Every number asserted here is one the test caused: pushes, rows, bytes, rejected calls, slots.
"""
import socket
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sparseps
import sparseps.metrics as client_metrics
from sparseps.local import LocalServer
from sparseps.partition import key_shard
from sparseps.server import metrics as server_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(name, frozenset(labels.items())): value} of every sample at http://127.0.0.1:port/metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(port: int, name: str, **labels) -> float:
    """The one sample called `name` (with these labels) at http://127.0.0.1:port/metrics; 0 if the
    labelled series does not exist yet."""
    want = set((k, str(v)) for k, v in labels.items())
    hits = [v for (n, ls), v in scrape(port).items() if n == name and want <= set(ls)]
    assert len(hits) <= 1 and (hits or labels), (name, labels, hits)
    return hits[0] if hits else 0.0


def wait_until(condition, seconds: float = 30.0, what: str = "the server"):
    """Poll condition() every 10 ms; fail after `seconds` (a generous bound for a slow CI machine)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.01)


def value(samples, name, **labels):
    want = set((k, str(v)) for k, v in labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert hits, f"no sample {name}{labels}; have {sorted({n for n, _ in samples if n.startswith('sparseps')})}"
    return sum(hits)


@pytest.fixture(scope="module")
def metered_cluster():
    ports = [free_port(), free_port()]
    servers = []
    try:
        for k in range(2):
            servers.append(LocalServer("--shard-index", str(k), "--num-shards", "2", "--backend", "numpy",
                                       "--metrics-port", str(ports[k])))
        yield servers, ports
    finally:
        for s in servers:
            s.stop()


def test_shard_metrics_count_what_the_client_did(metered_cluster):
    servers, ports = metered_cluster
    client = sparseps.connect(",".join(s.address for s in servers))
    client.create_optimizer("mopt", "LazyAdam", learning_rate=0.01)
    client.create_variable("memb", shape=(1000, 8), initializer="Zeros", optimizer="mopt")
    rng = np.random.default_rng(0)
    pushed = [0, 0]
    steps = 20
    for _ in range(steps):
        ids = rng.choice(1000, 64, replace=False)
        client.pull("memb", ids)
        client.push({"memb": (ids, rng.normal(size=(64, 8)).astype(np.float32))})
        for k in range(2):
            pushed[k] += int(np.sum(ids % 2 == k))
    with pytest.raises(sparseps.NotFound):
        client.pull("no_such_variable", np.array([1]))
    client.close()

    for k, port in enumerate(ports):
        m = scrape(port)
        sh = str(k)
        assert value(m, "sparseps_push_latency_seconds_count", shard=sh, optimizer="mopt") == steps
        assert value(m, "sparseps_pushes_total", shard=sh, optimizer="mopt") == steps
        assert value(m, "sparseps_rows_pushed_total", shard=sh, variable="memb") == pushed[k]
        assert value(m, "sparseps_rows_pulled_total", shard=sh, variable="memb") == pushed[k]
        assert value(m, "sparseps_bytes_received_total", shard=sh) == pushed[k] * (8 * 4 + 8)  # rows + int64 ids
        assert value(m, "sparseps_bytes_sent_total", shard=sh) == pushed[k] * 8 * 4
        assert value(m, "sparseps_apply_seconds_count", shard=sh, variable="memb", optimizer="mopt") == steps
        assert value(m, "sparseps_queue_wait_seconds_count", shard=sh) == steps
        assert value(m, "sparseps_pull_latency_seconds_count", shard=sh) >= steps
        assert value(m, "sparseps_optimizer_iterations", shard=sh, optimizer="mopt") == steps
        assert value(m, "sparseps_variable_rows", shard=sh, variable="memb") == 500
        # the table and LazyAdam's m and v slots, float32
        assert value(m, "sparseps_variable_bytes", shard=sh, variable="memb") == 3 * 500 * 8 * 4
        assert value(m, "sparseps_stale_gradients_dropped_total", shard=sh, optimizer="mopt") == 0
        assert value(m, "sparseps_requests_in_flight", shard=sh) == 0
        assert value(m, "sparseps_requests_total", shard=sh, method="Push") == steps
        assert value(m, "sparseps_shard_info", shard=sh, num_shards="2", backend="numpy") == 1
        assert value(m, "process_resident_memory_bytes") > 0
        # the latency buckets are cumulative and end in +Inf == count
        assert value(m, "sparseps_push_latency_seconds_bucket", shard=sh, le="+Inf") == steps
    # the unknown variable was asked of one shard (the client describes it there first)
    rejected = [value(scrape(p), "sparseps_requests_rejected_total", code="NOT_FOUND")
                if any(n == "sparseps_requests_rejected_total" for n, _ in scrape(p)) else 0 for p in ports]
    assert sum(rejected) >= 1


TABLE_EVENTS = ("created", "admitted", "evicted", "refused_admission", "refused_capacity")


def table_series(port: int, variable: str) -> dict:
    """A dynamic variable's sparseps_table_* samples on one shard: {event: value, "live_rows": n}."""
    m = scrape(port)
    out = {e: value(m, "sparseps_table_rows_total", variable=variable, event=e) for e in TABLE_EVENTS}
    out["live_rows"] = value(m, "sparseps_table_live_rows", variable=variable)
    return out


def test_table_counters_move_as_rows_are_admitted_refused_and_evicted(metered_cluster):
    """Every key below lives on shard 0 (hash routing), so shard 0 counts it all and shard 1 nothing."""
    servers, ports = metered_cluster
    client = sparseps.connect(",".join(s.address for s in servers))
    client.create_optimizer("topt", "SGD", learning_rate=0.1)
    client.create_variable("tdyn", dim=2, dynamic=True, optimizer="topt", admission={"min_count": 2},
                           capacity=4, on_full="refuse", eviction={"max_age_steps": 1, "interval_seconds": 3600})
    candidates = np.arange(1, 1000, dtype=np.int64) * 7919
    keys = candidates[key_shard(candidates, 2) == 0][:6]
    expect = dict.fromkeys(TABLE_EVENTS, 0)

    def push(k):
        client.push({"tdyn": (k, np.ones((len(k), 2), np.float32))})

    def check():
        assert table_series(ports[0], "tdyn") == expect
        assert table_series(ports[1], "tdyn") == dict.fromkeys(TABLE_EVENTS + ("live_rows",), 0)

    expect["live_rows"] = 0
    check()                                   # the series exist from creation, at 0
    push(keys[:3])                            # seen once: not admitted, gradients dropped
    expect["refused_admission"] = 3
    check()
    push(keys[:3])                            # seen twice: admitted, rows created
    expect.update(admitted=3, created=3, live_rows=3)
    check()
    push(keys[3:])                            # 3 more keys, seen once
    expect["refused_admission"] = 6
    check()
    with pytest.raises(sparseps.ResourceExhausted):
        push(keys[3:])                        # admitted now, but 6 rows do not fit in 4: refused whole
    expect["refused_capacity"] = 3
    check()
    push(keys[:1])
    push(keys[:1])                            # keys 1 and 2 are now 2 steps old
    assert client.evict("tdyn") == {"tdyn": 2}
    expect.update(evicted=2, live_rows=1)
    check()
    client.close()


def test_exposition_format(metered_cluster):
    servers, ports = metered_cluster
    text = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=10).read().decode()
    assert "# TYPE sparseps_push_latency_seconds histogram" in text
    assert "_created" not in text   # no *_created series: half the series, nothing uses them


def test_variable_labels_are_capped():
    """Past max_variables distinct names, variables are counted under "other"."""
    from sparseps.server.backends import create
    from sparseps.server.state import Shard

    shard = Shard(create("numpy"))
    m = server_metrics.ServerMetrics(shard, max_variables=2, process_metrics=False)
    shard.create_optimizer("o", '{"class_name": "SGD", "config": {"learning_rate": 0.1}}')
    for name in ("a", "b", "c", "d"):
        shard.create_variable(name, (10, 2), "float32", "o", "mod", 0, '{"class_name": "Zeros", "config": {}}')
    shard.push([(n, np.array([1, 2]), np.ones((2, 2), np.float32)) for n in ("a", "b", "c", "d")])
    labels = {s.labels["variable"] for fam in m.registry.collect() for s in fam.samples
              if "variable" in s.labels}
    assert labels == {"a", "b", "other"}
    rows = {s.labels["variable"]: s.value for fam in m.registry.collect() for s in fam.samples
            if s.name == "sparseps_variable_rows"}
    assert rows == {"a": 10, "b": 10, "other": 20}
    applies = {s.labels["variable"]: s.value for fam in m.registry.collect() for s in fam.samples
               if s.name == "sparseps_apply_seconds_count"}
    assert applies == {"a": 1, "b": 1, "other": 2}


def test_buckets_span_sub_millisecond_to_seconds():
    for buckets in (server_metrics.PUSH_BUCKETS, server_metrics.PULL_BUCKETS, server_metrics.APPLY_BUCKETS,
                    server_metrics.QUEUE_BUCKETS, client_metrics.ROUND_TRIP_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
        assert buckets[0] <= 0.0005 and buckets[-1] >= 1.0


def test_client_round_trip_metrics(metered_cluster):
    servers, _ = metered_cluster
    client = client_metrics.connect(",".join(s.address for s in servers), metrics_port=0)
    before = scrape(client.metrics_port)
    pushes0 = before.get(("sparseps_client_push_seconds_count", frozenset()), 0)
    client.create_optimizer("copt", "SGD", learning_rate=0.1)
    client.create_variable("cemb", shape=(100, 4), initializer="Zeros", optimizer="copt")
    for _ in range(5):
        client.pull("cemb", np.arange(10))
        client.push({"cemb": (np.arange(10), np.ones((10, 4), np.float32))})
    with pytest.raises(sparseps.InvalidArgument):
        client.push({"cemb": (np.array([1000]), np.ones((1, 4), np.float32))})
    client.close()
    m = scrape(client.metrics_port)
    assert m[("sparseps_client_push_seconds_count", frozenset())] - pushes0 == 5
    assert value(m, "sparseps_client_pull_seconds_count", variable="cemb") == 5
    assert value(m, "sparseps_client_rows_pulled_total", variable="cemb") == 50
    assert value(m, "sparseps_client_errors_total", method="push", code="INVALID_ARGUMENT") >= 1
    assert client_metrics.serve_client_metrics() == client.metrics_port   # one endpoint per process


def test_sync_mode_stale_push_is_counted():
    port = free_port()
    server = LocalServer("--backend", "numpy", "--metrics-port", str(port))
    try:
        client = sparseps.connect(server.address)
        client.create_optimizer("so", "SGD", learning_rate=0.1, consistency={"mode": "sync", "replicas_to_aggregate": 1})
        client.create_variable("sv", shape=(10, 2), initializer="Zeros", optimizer="so")
        grad = (np.array([1]), np.ones((1, 2), np.float32))
        assert client.push({"sv": grad}, step=0) == 1
        with pytest.raises(sparseps.StaleGradient):
            client.push({"sv": grad}, step=0)   # step 0 is already applied: dropped
        client.close()
        m = scrape(port)
        assert value(m, "sparseps_stale_gradients_dropped_total", optimizer="so") == 1
        assert value(m, "sparseps_pushes_total", optimizer="so") == 1
        assert value(m, "sparseps_push_latency_seconds_count", optimizer="so") == 2
        assert value(m, "sparseps_optimizer_iterations", optimizer="so") == 1
    finally:
        server.stop()
