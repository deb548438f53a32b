"""Prometheus metrics of one shard, served at http://HOST:PORT/metrics (`--metrics-port`).

What is measured where (every name starts with `sparseps_`; every series has a `shard` label):

  push_latency_seconds{optimizer}       histogram  service: request received -> applied, response ready
  pull_latency_seconds                  histogram  service: Pull / GetSlot handler time
  queue_wait_seconds                    histogram  pipeline: waiting for the shard lock before an apply
  log_sync_wait_seconds                 histogram  pipeline: applied -> write-ahead log record durable
  apply_seconds{optimizer,variable}     histogram  state: one variable's optimizer update, under the lock
  requests_total{method}                counter    every RPC handled
  requests_rejected_total{method,code}  counter    RPCs that ended in an error status (code = gRPC name)
  requests_in_flight                    gauge      RPCs being handled now
  calls_waiting{method}                 gauge      gRPC calls holding a thread while they wait for other
                                                   workers: Pull (min_iterations, bounded staleness) and
                                                   SyncVote; beyond the limit they are refused UNAVAILABLE
  pushes_total{optimizer}               counter    pushes applied (sync mode: prepared), per optimizer
  stale_gradients_dropped_total{optimizer}  counter sync mode: pushes (prepares, or votes on shard 0) for
                                                   a step already applied
  duplicate_pushes_total                counter    retried pushes answered from the exactly-once table
  rows_pushed_total{variable}           counter    gradient rows received (ids, or rows of a dense part)
  rows_pulled_total{variable}           counter    rows sent by Pull / GetSlot
  bytes_received_total / bytes_sent_total  counter tensor payload bytes of pushes / pulls
  optimizer_iterations{optimizer}       gauge      steps applied (read from the shard at scrape time)
  variable_rows{variable}, variable_bytes{variable}  gauge  rows and bytes held here, slots included
  shard_info{num_shards,backend,device,version}      gauge  always 1
  memory_budget_bytes, memory_budget_in_use_bytes    gauge  --memory-budget-mb, and the bytes of the
                                                   requests (and pull answers) admitted and not yet done
  requests_shed_total                   counter    requests refused because they would exceed the budget
  table_live_rows{variable}             gauge      dynamic variables: live rows held here
  table_rows_total{variable,event}      counter    dynamic variables: rows created, admitted, evicted,
                                                   refused_admission, refused_capacity (docs/dynamic.md)
  device_memory_bytes{device}, device_memory_budget_bytes{device}  gauge  --backend cuda: device
                                                   memory held by tables, slots and transfer buffers,
                                                   and its budget (--device-memory-budget-mb)
plus the standard process_* metrics (CPU, resident memory, open files).

Label cardinality is bounded: the first `max_variables` variable names (and `max_optimizers`
optimizer names) seen keep their own label value, later ones are counted under "other".

The hot path pays a few perf_counter() calls and histogram observations per push; children of
labelled metrics are cached, so no label lookup happens per request. Nothing here takes the
shard lock: the gauges read plain attributes at scrape time.
"""
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Bucket bounds, in seconds, from latencies measured on a 2-core VM (perf_anchors.md, and the
# histograms of this server under `sparseps demo`): a 64 KiB push takes 0.6-1.5 ms end to end,
# a LazyAdam apply of 4096 rows 0.3-3 ms, a 1 MiB push 2-5 ms, a 65536-row apply 20-60 ms; lock
# waits are microseconds when idle and whole applies under contention. The top buckets catch
# sync-mode pushes, which wait for the other replicas (seconds).
PUSH_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
PULL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
APPLY_BUCKETS = (0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,
                 0.5, 1.0)
QUEUE_BUCKETS = (0.000005, 0.00002, 0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0)

OTHER = "other"
PULL_METHODS = ("Pull", "GetSlot")


class LabelCap:
    """Maps names to label values: the first `limit` names keep theirs, the rest become "other"."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        value = self._seen.get(name)
        if value is None:
            with self._lock:
                value = self._seen.get(name)
                if value is None:
                    value = name if len(self._seen) < self.limit else OTHER
                    self._seen[name] = value
        return value


class ServerMetrics:
    """Metrics of one shard. Pass it to ParameterServerService(..., metrics=) and call serve()."""

    def __init__(self, shard, *, budget=None, max_variables: int = 100, max_optimizers: int = 20,
                 registry: CollectorRegistry | None = None, process_metrics: bool = True):
        self.shard, self.budget = shard, budget   # budget: the limits.MemoryBudget both transports share
        self.registry = registry or CollectorRegistry()
        self.variable_label = LabelCap(max_variables)
        self.optimizer_label = LabelCap(max_optimizers)
        self.shard_label = str(shard.index)
        r, s = self.registry, ("shard",)
        self.push_latency = Histogram("sparseps_push_latency_seconds",
                                      "Push received until applied and acknowledged", s + ("optimizer",),
                                      buckets=PUSH_BUCKETS, registry=r)
        self.pull_latency = Histogram("sparseps_pull_latency_seconds", "Pull and GetSlot handling time", s,
                                      buckets=PULL_BUCKETS, registry=r).labels(self.shard_label)
        self.queue_wait = Histogram("sparseps_queue_wait_seconds", "Time a push waited for the shard lock", s,
                                    buckets=QUEUE_BUCKETS, registry=r).labels(self.shard_label)
        self.durable_wait = Histogram("sparseps_log_sync_wait_seconds",
                                      "Time an applied push waited for its write-ahead log record to be durable",
                                      s, buckets=QUEUE_BUCKETS, registry=r).labels(self.shard_label)
        self.apply_time = Histogram("sparseps_apply_seconds", "One variable's optimizer update under the lock",
                                    s + ("optimizer", "variable"), buckets=APPLY_BUCKETS, registry=r)
        self.requests = Counter("sparseps_requests", "RPCs handled", s + ("method",), registry=r)
        self.rejected_total = Counter("sparseps_requests_rejected", "RPCs answered with an error status",
                                      s + ("method", "code"), registry=r)
        self.in_flight = Gauge("sparseps_requests_in_flight", "RPCs being handled", s,
                               registry=r).labels(self.shard_label)
        self.calls_waiting = Gauge("sparseps_calls_waiting",
                                   "gRPC calls holding a server thread while they wait for other workers",
                                   s + ("method",), registry=r)
        self.pushes = Counter("sparseps_pushes", "Pushes applied (sync mode: prepared), per optimizer",
                              s + ("optimizer",),
                              registry=r)
        self.stale = Counter("sparseps_stale_gradients_dropped",
                             "Sync-mode pushes dropped because their step was already applied",
                             s + ("optimizer",), registry=r)
        self.duplicates = Counter("sparseps_duplicate_pushes", "Retried pushes answered without applying again",
                                  s, registry=r).labels(self.shard_label)
        self.rows_pushed = Counter("sparseps_rows_pushed", "Gradient rows received", s + ("variable",), registry=r)
        self.rows_pulled = Counter("sparseps_rows_pulled", "Rows sent by Pull and GetSlot", s + ("variable",),
                                   registry=r)
        self.bytes_in = Counter("sparseps_bytes_received", "Tensor payload bytes received in pushes", s,
                                registry=r).labels(self.shard_label)
        self.bytes_out = Counter("sparseps_bytes_sent", "Tensor payload bytes sent by pulls", s,
                                 registry=r).labels(self.shard_label)
        self.registry.register(_ShardCollector(self))
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self._children: dict = {}
        self.http_server = None
        shard.listeners.append(self.on_shard_event)

    # ---------------------------------------------------------------- cached children
    def _child(self, metric, *labels):
        key = (id(metric),) + labels
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.shard_label, *labels)
        return child

    def _opt(self, name):
        return self.optimizer_label(name)

    def _var(self, name):
        return self.variable_label(name)

    # ---------------------------------------------------------------- hooks of the transport
    def started(self, method: str):
        """An RPC began (the service's handler wrapper calls this)."""
        self.in_flight.inc()

    def latency(self, method: str, seconds: float):
        """An RPC ended, successfully or not, after `seconds`."""
        self.in_flight.dec()
        self._child(self.requests, method).inc()
        if method in PULL_METHODS:
            self.pull_latency.observe(seconds)

    def waiting(self, method: str, delta: int):
        """A call began (+1) or ended (-1) holding a thread to wait for other workers."""
        self._child(self.calls_waiting, method).inc(delta)

    def rejected(self, method: str, code):
        """An RPC ended with an error status; code is a grpc.StatusCode (or its name)."""
        self._child(self.rejected_total, method, getattr(code, "name", str(code))).inc()

    def pulled(self, variable: str, rows: int, nbytes: int):
        self._child(self.rows_pulled, self._var(variable)).inc(rows)
        self.bytes_out.inc(nbytes)

    def push_received(self, gradients):
        """Decoded gradients [(variable, ids|None, values, ...)] of one push: rows and bytes in."""
        nbytes = 0
        for g in gradients:
            name, ids, values = g[0], g[1], g[2]
            self._child(self.rows_pushed, self._var(name)).inc(len(values) if values.ndim else 1)
            nbytes += values.nbytes + (ids.nbytes if ids is not None else 0)
        self.bytes_in.inc(nbytes)

    def push_answered(self, optimizers, seconds: float, *, stale: bool = False, duplicate: bool = False):
        """The service answered a push `seconds` after receiving it; `optimizers` it stepped.

        Called by the service for every successful Push / PushChunked, whichever path handled it
        (the plain shard, the push pipeline, its sync mode), so the end-to-end latency and the
        applied / stale counts never depend on a pipeline remembering to report them.
        """
        for opt in optimizers:
            label = self._opt(opt)
            self._child(self.push_latency, label).observe(seconds)
            if stale:
                self._child(self.stale, label).inc()
            elif not duplicate:
                self._child(self.pushes, label).inc()

    def push_done(self, by_opt=None, *, received=None, queued=None, started=None, applied=None, acked=None,
                  **_):
        """The push pipeline's phase timestamps (time.perf_counter()) of one applied push:
        queued (about to take the shard lock) -> started (holding it) -> applied -> acked (durable).

        Records the lock wait and the wait for the write-ahead log; the end-to-end latency is the
        service's (push_answered), so nothing is counted twice.
        """
        if queued is not None and started is not None:
            self.queue_wait.observe(max(0.0, started - queued))
        if applied is not None and acked is not None:
            self.durable_wait.observe(max(0.0, acked - applied))

    def duplicate(self):
        """The pipeline answered a retried push from its exactly-once table."""
        self.duplicates.inc()

    def stale_dropped(self, optimizer: str, count: int = 1):
        """For code that drops stale gradients without answering a push with `stale` set (the
        service counts answers with `stale` itself)."""
        self._child(self.stale, self._opt(optimizer)).inc(count)

    # ---------------------------------------------------------------- hooks of the shard
    def on_shard_event(self, event, **info):
        """Shard.listeners callback: `applied` carries per-variable apply times."""
        if event == "applied":
            for variable, optimizer, seconds in info["timings"]:
                self._child(self.apply_time, self._opt(optimizer), self._var(variable)).observe(seconds)
        elif event == "variable_created":
            var = info["variable"]
            # Make the per-variable and per-optimizer series exist (at 0) before the first step, so
            # rate() over them returns numbers, not nothing.
            self._child(self.rows_pushed, self._var(var.name))
            self._child(self.rows_pulled, self._var(var.name))
            if var.optimizer:
                for metric in (self.pushes, self.stale):
                    self._child(metric, self._opt(var.optimizer))

    # ---------------------------------------------------------------- endpoint
    def serve(self, host: str, port: int):
        """Serve /metrics on host:port in a daemon thread; returns the bound port."""
        disable_created_metrics()   # no *_created series: half the series, nothing a dashboard uses
        try:
            self.http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise SystemExit(f"could not serve metrics on {host}:{port}: {e}") from None
        return self.http_server.server_port

    def close(self):
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None


class _ShardCollector:
    """Gauges read from the shard when Prometheus scrapes (nothing to update on the hot path)."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        m, shard, sl = self.m, self.m.shard, self.m.shard_label
        its = GaugeMetricFamily("sparseps_optimizer_iterations", "Steps applied by each optimizer on this shard",
                                labels=["shard", "optimizer"])
        per_opt: dict[str, int] = {}
        for opt in list(shard.optimizers.values()):
            label = m.optimizer_label(opt.name)
            per_opt[label] = max(per_opt.get(label, 0), opt.iterations)
        for label, value in per_opt.items():
            its.add_metric([sl, label], value)
        rows = GaugeMetricFamily("sparseps_variable_rows", "Rows of each variable held on this shard",
                                 labels=["shard", "variable"])
        nbytes = GaugeMetricFamily("sparseps_variable_bytes",
                                   "Bytes of each variable held on this shard, optimizer slots included",
                                   labels=["shard", "variable"])
        per_var: dict[str, list] = {}
        for var in list(shard.variables.values()):
            acc = per_var.setdefault(m.variable_label(var.name), [0, 0])
            acc[0] += var.local_rows
            try:
                acc[1] += shard.bytes_held(var)
            except Exception:   # a slot being created right now: count it next scrape
                pass
        for label, (r, b) in per_var.items():
            rows.add_metric([sl, label], r)
            nbytes.add_metric([sl, label], b)
        count = GaugeMetricFamily("sparseps_variables", "Variables held on this shard", labels=["shard"])
        count.add_metric([sl], len(shard.variables))
        info = GaugeMetricFamily("sparseps_shard_info", "Static facts about this shard (value 1)",
                                 labels=["shard", "num_shards", "backend", "device", "version"])
        info.add_metric([sl, str(shard.num_shards), shard.bk.name, str(shard.bk.device), VERSION], 1)
        out = [its, rows, nbytes, count, info]
        live = GaugeMetricFamily("sparseps_table_live_rows", "Live rows of each dynamic variable on this shard",
                                 labels=["shard", "variable"])
        events = CounterMetricFamily(
            "sparseps_table_rows", "Rows of dynamic variables by event: created, admitted (created by a push that "
            "passed admission), evicted, refused_admission (keys of a push not admitted yet: their gradient "
            "dropped), refused_capacity (keys a full table refused)", labels=["shard", "variable", "event"])
        per_table: dict[str, dict] = {}
        for var in list(shard.variables.values()):
            if var.table is not None:
                acc = per_table.setdefault(m.variable_label(var.name), {"live_rows": 0})
                acc["live_rows"] += var.table.live
                for k, v in var.table.stats.items():
                    acc[k] = acc.get(k, 0) + v
        for label, acc in per_table.items():
            live.add_metric([sl, label], acc.pop("live_rows"))
            for event, value in acc.items():
                events.add_metric([sl, label, event], value)
        out += [live, events]
        device_memory = getattr(shard.bk, "device_memory", None)
        if device_memory is not None:
            dm = device_memory()
            used = GaugeMetricFamily("sparseps_device_memory_bytes",
                                     "Device memory held by this shard's tables, slots and transfer buffers",
                                     labels=["shard", "device"])
            used.add_metric([sl, dm["device"]], dm["in_use"])
            out.append(used)
            if dm["budget"] is not None:
                cap = GaugeMetricFamily("sparseps_device_memory_budget_bytes",
                                        "Device memory the shard may hold (--device-memory-budget-mb)",
                                        labels=["shard", "device"])
                cap.add_metric([sl, dm["device"]], dm["budget"])
                out.append(cap)
        b = m.budget
        if b is not None:
            limit = GaugeMetricFamily("sparseps_memory_budget_bytes", "The memory budget (--memory-budget-mb)",
                                      labels=["shard"])
            limit.add_metric([sl], b.limit)
            in_use = GaugeMetricFamily("sparseps_memory_budget_in_use_bytes",
                                       "Bytes of requests and pull answers admitted and not yet done",
                                       labels=["shard"])
            in_use.add_metric([sl], b.in_use)
            shed = CounterMetricFamily("sparseps_requests_shed",
                                       "Requests refused because they would exceed the memory budget",
                                       labels=["shard"])
            shed.add_metric([sl], b.shed)
            out += [limit, in_use, shed]
        return out


def _version():
    try:
        from importlib.metadata import version
        return version("sparseps")
    except Exception:
        return "unknown"


VERSION = _version()
