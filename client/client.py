"""The trainer's view of a sparseps cluster: variables to pull, gradients to push, one optimizer.

    client = sparseps.connect("127.0.0.1:50051")          # or "h1:p1,h2:p2,h3:p3"
    emb = client.create_variable("emb", initial_value=np.zeros((1000, 64), np.float32), optimizer="opt")
    it = client.push({"emb": (ids, grad_rows)})           # one atomic step; iterations after it

The client routes rows to shards (the layout comes from the servers), splits requests that would
exceed the message limit, and retries a push that may not have arrived (UNAVAILABLE,
DEADLINE_EXCEEDED) with the same (client id, sequence) so the server applies it exactly once.
Pull, Push and PushPull go to each shard's data port when it has one (client/dataplane.py: the
same messages with the rows as raw bytes, several times less CPU than gRPC for large rows);
`data_plane=False` or SPARSEPS_DATA_PLANE=0 keeps everything on gRPC.
"""
import json
import logging
import os
import random
import threading
import time
import uuid

import grpc
import numpy as np

from . import errors, frames
from .dataplane import DataChannel, client_tls_context, host_of
from .partition import Layout, owner_shard
from .proto import sparseps_pb2 as pb
from .proto import sparseps_pb2_grpc as pb_grpc
from .tensors import DTYPE_NAMES, from_tensor, to_tensor, wire_dtype

_PARTITIONS = {"mod": pb.MOD, "div": pb.DIV, "whole": pb.WHOLE}
_PARTITION_NAMES = {v: k for k, v in _PARTITIONS.items()}
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_DATA_METHODS = {"Pull": frames.PULL, "Push": frames.PUSH, "PushPull": frames.PUSH_PULL}
log = logging.getLogger("sparseps")


_MALLOC_TUNED = []


def _tune_malloc():
    """Keep large request buffers in the heap (glibc): the server's MALLOC_* settings, at run time.

    Without it every ~1 MiB push or pull buffer is freshly mmapped and page-faulted: measured
    3.2-3.9 ms of client CPU per 4096 x 64 push, against ~1.3 ms with it (docs/benchmarks.md).
    Once per process; SPARSEPS_CLIENT_MALLOC_TUNING=0 leaves malloc alone.
    """
    import os
    if _MALLOC_TUNED or os.environ.get("SPARSEPS_CLIENT_MALLOC_TUNING", "1") == "0":
        return
    _MALLOC_TUNED.append(True)
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, 512 << 20)
        libc.mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):   # not glibc: nothing to tune
        pass


def connect(addresses, *, metrics_port: int | None = None, **options) -> "Client":
    """Connect to a cluster: a list or comma-separated string of shard addresses (any order).

        client = sparseps.connect("127.0.0.1:50051")
        client = sparseps.connect(["10.0.0.1:50051", "10.0.0.2:50051"], retry_deadline=120)
        client = sparseps.connect(addr, metrics_port=9400)  # the trainer's push/pull round trips at /metrics
    """
    if metrics_port is not None:
        from . import metrics
        return metrics.connect(addresses, metrics_port=metrics_port, **options)
    return Client(addresses, **options)


def tls_credentials(ca=None, cert=None, key=None) -> grpc.ChannelCredentials:
    """grpc.ssl_channel_credentials from PEM file paths or bytes; ca=None trusts the system roots."""
    def pem(x, what):
        if x is None or isinstance(x, bytes):
            return x
        try:
            with open(x, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"cannot read {what} {x}: {e.strerror or e}") from None
    if (cert is None) != (key is None):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(pem(ca, "tls_ca"), pem(key, "tls_key"), pem(cert, "tls_cert"))


def _call(fn, request, timeout=None, metadata=None):
    try:
        return fn(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        raise errors.from_rpc_error(e) from None


def _array(t) -> np.ndarray:
    """A response tensor's rows: already an array on the data plane, protobuf bytes on gRPC."""
    return t if isinstance(t, np.ndarray) else from_tensor(t)


def _dense_gradient(grad):
    """(ids, rows) for sparse gradients (tuples or objects with .indices/.values), else None."""
    if isinstance(grad, tuple) and len(grad) == 2:
        return np.asarray(grad[0]), np.asarray(grad[1])
    if hasattr(grad, "indices") and hasattr(grad, "values"):
        return np.asarray(grad.indices), np.asarray(grad.values)
    return None


class Client:
    """A connection to every shard of one cluster. Thread-safe; share one per process."""

    def __init__(self, addresses, *, max_message_mb: int = 256, timeout: float | None = None,
                 retry_deadline: float = 60.0, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, client_id: str | None = None, tls_ca=None, tls_cert=None,
                 tls_key=None, server_name: str | None = None, data_plane: bool | None = None):
        """tls_ca / tls_cert / tls_key: PEM file paths or bytes (TLS; cert+key for mutual TLS);
        server_name: the name to verify the server certificate against (default: the address's host);
        data_plane: use the shards' data ports (default: yes, unless SPARSEPS_DATA_PLANE=0)."""
        explicit_credentials = credentials is not None
        if credentials is None and (tls_ca or tls_cert or tls_key):
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("connect() needs at least one shard address")
        _tune_malloc()
        self.max_message = max_message_mb << 20
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self.client_id = client_id or uuid.uuid4().hex
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._sync_pending: dict[int, int] = {}   # sync step -> sequence of its push whose vote failed
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", self.max_message),
                   ("grpc.max_send_message_length", self.max_message)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channels = [grpc.secure_channel(a, credentials, options) if credentials else grpc.insecure_channel(a, options)
                    for a in addresses]
        stubs = [pb_grpc.ParameterServerStub(c) for c in channels]
        infos = [self._retry(lambda s=s: _call(s.GetServerInfo, pb.ServerInfoRequest(), 10, self._metadata))
                 for s in stubs]
        n = infos[0].num_shards
        bad = [(a, i.num_shards) for a, i in zip(addresses, infos) if i.num_shards != n]
        if bad or n != len(addresses):
            raise errors.FailedPrecondition(
                f"the shards disagree on the cluster size: {[(a, i.num_shards) for a, i in zip(addresses, infos)]} "
                f"for {len(addresses)} addresses given")
        order = sorted(range(n), key=lambda k: infos[k].shard_index)
        if sorted(i.shard_index for i in infos) != list(range(n)):
            raise errors.FailedPrecondition(
                f"the shards' indexes are {[i.shard_index for i in infos]}, expected each of 0..{n - 1} once")
        self.addresses = [addresses[k] for k in order]
        self._channels = [channels[k] for k in order]
        self._stubs = [stubs[k] for k in order]
        self.server_info = [infos[k] for k in order]
        self.num_shards = n
        if data_plane is None:
            data_plane = os.environ.get("SPARSEPS_DATA_PLANE", "1") != "0"
        self._data = [None] * n
        if data_plane:   # probed in parallel: a firewalled port costs one connect timeout, not one per shard
            def probe(k):
                self._data[k] = self._data_channel(self.addresses[k], self.server_info[k], token, explicit_credentials,
                                                   (tls_ca, tls_cert, tls_key), server_name)
            probes = [threading.Thread(target=probe, args=(k,)) for k in range(n)]
            for t in probes:
                t.start()
            for t in probes:
                t.join()
        self._layouts: dict[str, tuple] = {}
        self._clip_configs: dict[str, tuple] = {}

    def _data_channel(self, address, info, token, explicit_credentials, tls_files, server_name):
        """A shard's data-plane connections, or None (gRPC only) if it has none we can use."""
        if not info.data_port:
            return None
        tls = None
        if info.data_tls:
            if explicit_credentials or not any(tls_files):
                return None   # TLS given as opaque gRPC credentials: only gRPC can use them
            try:
                tls = client_tls_context(*tls_files)
            except (OSError, ValueError) as e:
                log.warning("shard %s: cannot use the TLS files for the data plane (%s); using gRPC", address, e)
                return None
        elif any(tls_files) or explicit_credentials:
            return None       # never send over plain TCP what the caller wanted encrypted
        channel = DataChannel(host_of(address), info.data_port, tls=tls, server_name=server_name, token=token,
                              timeout=self.timeout)
        try:
            channel.probe()
        except (errors.Error, OSError) as e:
            log.warning("shard %s: data plane unreachable (%s); using gRPC for pulls and pushes", address, e)
            return None
        return channel

    def _data_call(self, k, method, request, arrays):
        data = self._data[k]
        try:
            return data.call(method, request, arrays)
        except errors.Unavailable:
            # a restarted shard may listen on another data port: ask its gRPC port where
            try:
                info = _call(self._stubs[k].GetServerInfo, pb.ServerInfoRequest(), 5, self._metadata)
                if info.data_port and info.data_port != data.port:
                    self._data[k] = data.moved(info.data_port)
                    data.close()
            except errors.Error:
                pass
            raise

    @property
    def data_plane(self) -> list:
        """Per shard: 'host:port' of the data plane in use, or None where calls go over gRPC."""
        return [f"{d.host}:{d.port}" if d is not None else None for d in self._data]

    # ------------------------------------------------------------------ plumbing
    def close(self):
        for d in self._data:
            if d is not None:
                d.close()
        for c in self._channels:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _retry(self, fn, codes=_RETRYABLE):
        """Call fn, retrying UNAVAILABLE / DEADLINE_EXCEEDED with backoff until retry_deadline."""
        deadline = time.monotonic() + self.retry_deadline
        delay = 0.05
        while True:
            try:
                return fn()
            except errors.Error as e:
                if e.code not in codes or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    def _attach(self):
        """{shard: []} for the shards whose requests go to the data plane (rows then travel aside)."""
        return {k: [] for k, d in enumerate(self._data) if d is not None}

    def _put(self, k, array, t, attach):
        """Fill a request Tensor for shard k: its bytes inline (gRPC) or aside (data plane)."""
        if attach is not None and k in attach:
            frames.describe(array, t, attach[k])
        else:
            to_tensor(array, t)

    def _each(self, method: str, requests: dict, retry: bool | tuple = True, attach: dict | None = None) -> dict:
        """Send requests[shard] to each shard in parallel; {shard: response}. retry: a tuple
        narrows the status codes retried (a pull that waits server-side must not retry its own
        DEADLINE_EXCEEDED). attach: {shard: arrays} of requests built for the data plane."""
        codes = (retry if isinstance(retry, tuple) else _RETRYABLE) if retry else ()

        def one(k, req):
            if attach is not None and k in attach:
                def call():
                    return self._data_call(k, _DATA_METHODS[method], req, attach[k])
            else:
                def call():
                    return _call(getattr(self._stubs[k], method), req, self.timeout, self._metadata)
            return self._retry(call, codes) if codes else call()
        if len(requests) == 1:
            (k, req), = requests.items()
            return {k: one(k, req)}
        if attach is not None and all(k in attach for k in requests):
            return self._fan_out(method, requests, attach, one, codes)
        results, failures = {}, []

        def run(k, req):
            try:
                results[k] = one(k, req)
            except errors.Error as e:
                failures.append(e)
        threads = [threading.Thread(target=run, args=kv) for kv in requests.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        return results

    def _fan_out(self, method, requests, attach, one, codes) -> dict:
        """Data plane to several shards: send every request, then read every answer (no threads).
        A shard whose connection failed is sent again through `one` (retries, exactly-once)."""
        code = _DATA_METHODS[method]
        pending, results, failed = {}, {}, {}
        for k, req in requests.items():
            try:
                pending[k] = self._data[k].start(code, req, attach[k])
            except errors.Error as e:
                failed[k] = e
        for k, p in pending.items():
            try:
                results[k] = self._data[k].finish(p)
            except errors.Error as e:
                failed[k] = e
        for k, e in failed.items():
            if e.code not in codes:
                raise e
        for k in failed:
            results[k] = one(k, requests[k])
        return results

    def _all(self, method: str, request) -> dict:
        return self._each(method, {k: request for k in range(self.num_shards)})

    def _layout(self, name: str):
        """(Layout, dtype, shape, optimizer name) of a variable, learned once from the servers."""
        if name not in self._layouts:
            self._describe(name)
        return self._layouts[name]

    def _describe(self, name: str) -> "pb.VariableInfo":
        infos = self._all("DescribeVariable", pb.DescribeVariableRequest(name=name))
        first = infos[0]
        for k, info in infos.items():
            if (list(info.shape), info.dtype, info.partition, info.owner_shard) != \
                    (list(first.shape), first.dtype, first.partition, first.owner_shard):
                raise errors.FailedPrecondition(f"shards 0 and {k} disagree on the layout of variable {name!r}")
        layout = Layout(first.shape[0], self.num_shards, _PARTITION_NAMES.get(first.partition, "mod"),
                        first.owner_shard)
        self._layouts[name] = (layout, np.dtype(DTYPE_NAMES[first.dtype]), tuple(first.shape), first.optimizer)
        return first

    def _next_sequence(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    # ------------------------------------------------------------------ optimizers
    def create_optimizer(self, name: str, config=None, /, *, consistency: dict | None = None,
                         **kwargs) -> "Optimizer":
        """Create (or find, if identical) an optimizer from a Keras configuration.

            client.create_optimizer("opt", {"class_name": "LazyAdam", "config": {"learning_rate": 1e-3}})
            client.create_optimizer("opt", "Adam", learning_rate=1e-3, amsgrad=True)
            client.create_optimizer("opt", tfa.optimizers.LazyAdam(1e-3))   # a live optimizer object
        consistency: {"mode": "async"} (default), {"mode": "sync", "replicas_to_aggregate": 4,
        "total_num_replicas": 5, "average": True} or {"mode": "bounded", "staleness": 2}.
        """
        if isinstance(config, str):
            config = {"class_name": config, "config": dict(kwargs)}
        elif config is None:
            raise ValueError("create_optimizer needs a config dict, a class name or an optimizer object")
        elif not isinstance(config, dict):
            config = {"class_name": type(config).__name__, "config": config.get_config()}
            if kwargs:
                config["config"].update(kwargs)
        elif kwargs:
            config = {"class_name": config["class_name"], "config": dict(config.get("config") or {}, **kwargs)}
        request = pb.CreateOptimizerRequest(name=name, config_json=json.dumps(config, default=_json_default))
        if consistency:
            c = dict(consistency)
            mode = {"async": pb.ASYNC, "sync": pb.SYNC, "bounded": pb.BOUNDED}.get(c.pop("mode", "async"))
            if mode is None:
                raise ValueError(f"unknown consistency mode {consistency.get('mode')!r}")
            request.consistency.CopyFrom(pb.Consistency(mode=mode, **c))
        self._all("CreateOptimizer", request)
        return Optimizer(self, name)

    def optimizer(self, name: str) -> "Optimizer":
        """A handle to an existing optimizer (NotFound if there is none)."""
        _call(self._stubs[0].GetOptimizer, pb.GetOptimizerRequest(name=name), self.timeout, self._metadata)
        return Optimizer(self, name)

    def optimizers(self) -> list:
        resp = _call(self._stubs[0].ListOptimizers, pb.ListOptimizersRequest(), self.timeout, self._metadata)
        return [Optimizer(self, o.name) for o in resp.optimizers]

    # ------------------------------------------------------------------ variables
    def create_variable(self, name: str, initial_value=None, *, shape=None, dtype="float32", initializer=None,
                        optimizer=None, partition: str | None = None) -> "Variable":
        """Create (or find, if identical) a variable, split by rows over the shards.

            client.create_variable("emb", initial_value=np.zeros((1000, 64), np.float32), optimizer="opt")
            client.create_variable("emb", shape=(10**6, 64), initializer={"class_name": "RandomNormal",
                                   "config": {"stddev": 0.05, "seed": 1}}, optimizer="opt")
        partition: "mod" (row id % shards, the default for tables), "div" (contiguous blocks) or
        "whole" (one shard, the default for 1-D variables).
        """
        if isinstance(optimizer, Optimizer):
            optimizer = optimizer.name
        if initial_value is not None:
            initial_value = np.asarray(initial_value)
            if initial_value.dtype not in (np.float32, np.float64):
                initial_value = initial_value.astype(dtype)
            shape, dtype = initial_value.shape, initial_value.dtype
        if shape is None:
            raise ValueError("create_variable needs initial_value or shape")
        shape = tuple(int(s) for s in shape)
        partition = partition or ("mod" if len(shape) > 1 else "whole")
        if partition not in _PARTITIONS:
            raise ValueError(f"partition must be one of {sorted(_PARTITIONS)}, got {partition!r}")
        owner = owner_shard(name, self.num_shards) if partition == "whole" else 0
        init_json = ""
        if initializer is not None:
            init = {"class_name": initializer, "config": {}} if isinstance(initializer, str) else \
                {"class_name": initializer["class_name"], "config": dict(initializer.get("config") or {})}
            if init["class_name"] not in ("Zeros", "Ones", "Constant", "zeros", "ones") and \
                    init["config"].get("seed") is None:
                init["config"]["seed"] = random.randrange(1 << 31)   # one seed for every shard
            init_json = json.dumps(init)
        layout = Layout(shape[0], self.num_shards, partition, owner)
        base = dict(name=name, shape=shape, dtype=wire_dtype(dtype), optimizer=optimizer or "",
                    partition=_PARTITIONS[partition], owner_shard=owner)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        chunked = initial_value is not None and layout.rows * row_bytes > self.max_message // 2
        requests = {}
        for k in range(self.num_shards):
            req = pb.CreateVariableRequest(initializer_json=init_json, **base)
            if initial_value is not None and not chunked:
                to_tensor(initial_value[layout.global_ids(k)], req.initial_value)
            requests[k] = req
        self._each("CreateVariable", requests)
        self._layouts[name] = (layout, np.dtype(dtype), shape, optimizer or "")
        var = Variable(self, name)
        if chunked:
            var.assign(initial_value)
        return var

    def variable(self, name: str) -> "Variable":
        """A handle to an existing variable (NotFound if there is none)."""
        self._describe(name)
        return Variable(self, name)

    def variables(self) -> list:
        resp = _call(self._stubs[0].ListVariables, pb.ListVariablesRequest(), self.timeout, self._metadata)
        names = [v.name for v in resp.variables]
        for k in range(1, self.num_shards):   # whole variables live on their owner only
            more = _call(self._stubs[k].ListVariables, pb.ListVariablesRequest(), self.timeout, self._metadata)
            names += [v.name for v in more.variables if v.name not in names]
        return [Variable(self, n) for n in names]

    # ------------------------------------------------------------------ pull
    def pull(self, name: str, ids=None, *, slot: str = "", min_iterations: int = 0,
             timeout: float = 0.0, worker_id: str = "", _seen: set | None = None) -> np.ndarray:
        """Rows `ids` of a variable (or of one of its slots); every row when ids is None.

            rows = client.pull("emb", np.array([3, 7, 7]))   # ndarray (3, 64)
        min_iterations: wait until every shard asked has applied that many steps. For a sync-mode
        optimizer the rows returned always come from one step s (>= min_iterations), never mixed
        across shards (docs/consistency.md). worker_id: bounded mode, hold the pull until the
        slowest worker is within the optimizer's staleness of this one.
        """
        layout, dtype, shape, _ = self._layout(name)
        retry = (grpc.StatusCode.UNAVAILABLE,) if (min_iterations or worker_id) else True
        if _seen is None and self.num_shards > 1 and layout.strategy != "whole" and \
                self._mode_of(self._optimizer_of(name)) == "sync":
            deadline = time.monotonic() + (timeout or 60.0)
            while True:   # the shards answered at different steps: read again at the newest one
                seen = set()
                out = self.pull(name, ids, slot=slot, min_iterations=min_iterations, timeout=timeout,
                                worker_id=worker_id, _seen=seen)
                if len(seen) <= 1:
                    return out
                if time.monotonic() > deadline:
                    raise errors.DeadlineExceeded(f"pull of {name!r}: the shards kept answering at different "
                                                  f"steps {sorted(seen)}")
                min_iterations = max(seen)
                if slot:   # GetSlot cannot wait server-side: the commit round takes milliseconds
                    time.sleep(0.005)
        method = "GetSlot" if slot else "Pull"
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        # a range pull returns ids too (8 bytes a row); keep 64 KiB for the message framing
        per_request = max(1, (self.max_message - 65536) // (row_bytes + 8))
        if ids is None:
            out = np.empty(shape, dtype)
            for k in self._shards_of(layout):
                count = layout.local_count(k)
                gids = layout.global_ids(k)
                for lo in range(0, count, per_request):
                    hi = min(count, lo + per_request)
                    attach = None if slot else self._attach()
                    req = self._pull_request(slot, name, None, min_iterations, timeout, worker_id)
                    req.row_start, req.row_stop = int(gids[lo]), int(gids[hi - 1]) + 1
                    resp = self._each(method, {k: req}, retry, attach)[k]
                    if _seen is not None:
                        _seen.add(resp.iterations)
                    out[_array(resp.ids)] = _array(resp.values)
            return out
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise errors.InvalidArgument(f"pull of {name!r}: ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64, copy=False).reshape(-1)
        out = np.empty((len(ids),) + shape[1:], dtype)
        if layout.n == 1 or layout.strategy == "whole":
            shard_of = np.full(len(ids), layout.owner if layout.strategy == "whole" else 0)
        else:
            shard_of = layout.shard_of(ids)
        for lo in range(0, max(len(ids), 1), per_request):
            sel = slice(lo, lo + per_request)
            requests = {}
            attach = None if slot else self._attach()
            if self.num_shards == 1:
                masks = {0: slice(None)} if len(ids) else {}
            else:
                masks = {int(k): shard_of[sel] == k for k in np.unique(shard_of[sel])}
            for k, mask in masks.items():
                requests[k] = self._pull_request(slot, name, ids[sel][mask], min_iterations, timeout, worker_id,
                                                 k, attach)
            if not requests:
                break
            for k, resp in self._each(method, requests, retry, attach).items():
                if len(requests) == 1 and isinstance(resp.values, np.ndarray) and resp.values.shape == out.shape:
                    out = resp.values   # the data plane received these rows into a fresh array: no copy
                elif len(requests) == 1:
                    out[sel] = _array(resp.values)
                else:
                    out[sel][masks[k]] = _array(resp.values)
                if _seen is not None:
                    _seen.add(resp.iterations)
        return out

    def _pull_request(self, slot, name, ids, min_iterations, timeout, worker_id="", k=0, attach=None):
        if slot:
            req = pb.GetSlotRequest(variable=name, slot=slot)
        else:
            req = pb.PullRequest(variable=name, min_iterations=min_iterations, timeout_seconds=timeout,
                                 worker_id=worker_id)
        if ids is not None:
            self._put(k, ids, req.ids, attach)
        return req

    def _shards_of(self, layout):
        return [layout.owner] if layout.strategy == "whole" else range(self.num_shards)

    # ------------------------------------------------------------------ push
    def push(self, gradients: dict, *, step: int | None = None, worker_id: str = ""):
        """Apply one step: {variable name: dense ndarray | (ids, rows) | obj with .indices/.values}.

            it = client.push({"emb": (ids, grad_rows), "kernel": dense_grad})
        The whole push is one step of each optimizer it touches (iterations advance once) and is
        applied atomically on each shard. Returns the iterations after the step (a dict when the
        push touches several optimizers). `step`: sync mode, the step the gradients were computed
        on; the push then returns step + 1 once that step is applied on every shard, or raises
        StaleGradient if the step had its replicas already (docs/consistency.md). `worker_id`:
        bounded mode, the worker whose clock this push advances.
        """
        attach = self._attach()
        # sync mode: a push of a step whose vote failed (timed out) is that push again, under the same
        # sequence, so that the server counts this replica once
        pending = self._sync_pending
        requests, opt_names, seq = self._push_requests(gradients, step, worker_id, attach,
                                                       seq=pending.get(step) if step is not None else None)
        responses = self._send_pushes(requests, attach)
        its: dict[str, int] = {}
        stale = False
        for resp in responses.values():
            stale |= resp.stale
            for o in resp.iterations:
                its[o.optimizer] = max(its.get(o.optimizer, 0), o.iterations)
        if stale:
            pending.pop(step, None)
            raise StaleGradient(f"push for step {step} arrived after that step was applied; it was dropped",
                                iterations=its)
        if any(r.prepared for r in responses.values()):   # sync mode: phase 1 done everywhere
            pending[step or 0] = seq
            try:
                it = self._vote(opt_names[0], step or 0, seq)
            except StaleGradient:
                pending.pop(step or 0, None)
                raise
            for s in [s for s in pending if s <= (step or 0)]:
                pending.pop(s, None)
            return it
        return next(iter(its.values())) if len(its) == 1 else its

    def push_pull(self, gradients: dict, pulls: dict):
        """Push one step, then pull rows, in one round trip per shard (ps-lite's PushPull).

            it, rows = client.push_pull({"emb": (ids, grad_rows)}, {"emb": next_ids})
        The rows are read right after this push is applied, with no other step in between on
        each shard (so they include it and nothing later). Returns
        (iterations as push() returns them, {variable: ndarray}). Async-mode optimizers only;
        a push too large for one message falls back to push() then pull().
        """
        attach = self._attach()
        requests, opt_names, seq = self._push_requests(gradients, None, "", attach)
        if any(self._size(k, r, attach) > self.max_message // 2 for k, r in requests.items()):
            self._send_pushes(requests, attach)
            its = self.optimizer(opt_names[0]).iterations if len(opt_names) == 1 else \
                {o: self.optimizer(o).iterations for o in opt_names}
            return its, {name: self.pull(name, ids) for name, ids in pulls.items()}
        calls = {k: pb.PushPullRequest(push=req) for k, req in requests.items()}
        where = []   # (variable, shard, positions in the caller's ids)
        outs = {}
        for name, ids in pulls.items():
            layout, dtype, shape, _ = self._layout(name)
            ids = np.asarray(ids)
            if ids.dtype.kind not in "iu":
                raise errors.InvalidArgument(f"push_pull of {name!r}: ids must be integers, got {ids.dtype}")
            ids = ids.astype(np.int64, copy=False).reshape(-1)
            outs[name] = np.empty((len(ids),) + shape[1:], dtype)
            if layout.n == 1 or layout.strategy == "whole":
                owners = {layout.owner if layout.strategy == "whole" else 0: slice(None)}
            else:
                shard_of = layout.shard_of(ids)
                owners = {int(k): shard_of == k for k in np.unique(shard_of)}
            for k, sel in owners.items():
                q = calls[k].pulls.add(variable=name)
                self._put(k, ids[sel], q.ids, attach)
                where.append((name, k, sel))
        responses = self._each("PushPull", calls, True, attach)
        its: dict[str, int] = {}
        for resp in responses.values():
            for o in resp.push.iterations:
                its[o.optimizer] = max(its.get(o.optimizer, 0), o.iterations)
        cursor = {k: 0 for k in responses}
        for name, k, sel in where:
            values = responses[k].pulls[cursor[k]].values
            if isinstance(sel, slice) and isinstance(values, np.ndarray) and values.shape == outs[name].shape:
                outs[name] = values   # the data plane received these rows into a fresh array: no copy
            else:
                outs[name][sel] = _array(values)
            cursor[k] += 1
        return (next(iter(its.values())) if len(its) == 1 else its), outs

    def _push_requests(self, gradients: dict, step, worker_id, attach=None, seq=None):
        """One PushRequest per shard (every shard gets a part), and the optimizers involved.
        attach: {shard: []} collects the rows of data-plane shards instead of copying them in.
        seq: the sequence of an earlier push this one repeats (else a new one)."""
        if not gradients:
            raise errors.InvalidArgument("push: no gradients (a step needs at least one variable)")
        seq = seq or self._next_sequence()
        # Built in place: a 4096 x 64 push is ~1 MiB, and every nested-constructor copy costs.
        requests = {k: pb.PushRequest(client_id=self.client_id, sequence=seq, worker_id=worker_id)
                    for k in range(self.num_shards)}
        if step is not None:
            for req in requests.values():
                req.step = step
        opt_names = []
        for name, grad in gradients.items():
            if isinstance(name, Variable):
                name = name.name
            layout, dtype, shape, _ = self._layout(name)
            sparse = _dense_gradient(grad)
            # Every shard gets a part, empty where it holds none of the rows: Adam's m and v decay
            # on every shard, and slots are created in the same order everywhere.
            added = []
            if sparse is None:
                values = np.asarray(grad)
                if values.shape != shape:
                    raise errors.InvalidArgument(f"push: dense gradient of {name!r} has shape {list(values.shape)}, "
                                                 f"expected {list(shape)}")
                for k in range(self.num_shards):
                    g = requests[k].gradients.add(variable=name)
                    self._put(k, values if layout.n == 1 else values[layout.global_ids(k)], g.values, attach)
                    added.append(g)
            else:
                ids, rows = sparse
                if ids.ndim != 1 or ids.dtype.kind not in "iu":
                    raise errors.InvalidArgument(f"push: ids of {name!r} must be a 1-D integer array")
                if layout.n == 1:
                    parts = {0: (ids, rows)}
                else:
                    if ids.size and (ids.min() < 0 or ids.max() >= shape[0]):
                        bad = ids.min() if ids.min() < 0 else ids.max()
                        raise errors.InvalidArgument(
                            f"push: row id {bad} is out of range for variable {name!r} with {shape[0]} rows")
                    if rows.shape[:1] != ids.shape:
                        raise errors.InvalidArgument(f"push: {len(ids)} ids but {rows.shape[0] if rows.ndim else 0} "
                                                     f"gradient rows for {name!r}")
                    owner = layout.shard_of(ids)
                    parts = {k: (ids[owner == k], rows[owner == k]) for k in range(self.num_shards)}
                for k, (i, r) in parts.items():
                    g = requests[k].gradients.add(variable=name)
                    self._put(k, i, g.ids, attach)
                    self._put(k, r, g.values, attach)
                    added.append(g)
            opt = self._optimizer_of(name)
            if opt and opt not in opt_names:
                opt_names.append(opt)
            if self.num_shards > 1 and opt:
                l2sum = self._whole_l2sum(opt, values if sparse is None else sparse[1], dtype)
                if l2sum is not None:
                    for g in added:
                        g.l2sum = l2sum
        for req in requests.values():
            req.optimizers.extend(opt_names)
        return requests, opt_names, seq

    def _vote(self, optimizer: str, step: int, seq: int) -> int:
        """Sync mode, phase 2: tell the coordinator (shard 0) this push is prepared on every shard;
        it answers once the step is committed everywhere (iterations after it) or stale."""
        # the coordinator gives up waiting for votes early enough that its answer (how many replicas
        # voted) reaches us before our own deadline, even on a busy machine
        wait = max(1e-3, self.timeout - max(0.2 * self.timeout, 0.5)) if self.timeout else 0.0
        req = pb.SyncVoteRequest(optimizer=optimizer, step=step, timeout_seconds=wait,
                                 replica=pb.ReplicaRef(client_id=self.client_id, sequence=seq))
        resp = self._each("SyncVote", {0: req})[0]
        if resp.stale:
            raise StaleGradient(f"sync step {step} of {optimizer!r} already had its replicas_to_aggregate gradients "
                                f"(or was applied); this push was dropped: compute step {resp.iterations} next",
                                iterations={optimizer: resp.iterations})
        return resp.iterations

    def _mode_of(self, optimizer: str) -> str:
        """An optimizer's consistency mode ("async", "sync", "bounded"), asked once."""
        modes = self.__dict__.setdefault("_modes", {})
        if optimizer not in modes:
            if not optimizer:
                return "async"
            info = _call(self._stubs[0].GetOptimizer, pb.GetOptimizerRequest(name=optimizer), self.timeout,
                         self._metadata)
            modes[optimizer] = {pb.SYNC: "sync", pb.BOUNDED: "bounded"}.get(info.consistency.mode, "async")
        return modes[optimizer]

    def _whole_l2sum(self, optimizer: str, values, dtype):
        """With clipnorm/global_clipnorm, each shard must clip with the norm of the whole gradient."""
        if optimizer not in self._clip_configs:
            cfg = json.loads(_call(self._stubs[0].GetOptimizer, pb.GetOptimizerRequest(name=optimizer),
                                   self.timeout, self._metadata).config_json)["config"]
            self._clip_configs[optimizer] = (cfg.get("clipvalue"),
                                             cfg.get("clipnorm") is not None or cfg.get("global_clipnorm") is not None)
        clipvalue, by_norm = self._clip_configs[optimizer]
        if not by_norm:
            return None
        from .reductions import eigen_sum
        v = np.asarray(values, dtype=dtype)
        if clipvalue is not None:
            v = np.clip(v, -dtype.type(clipvalue), dtype.type(clipvalue))
        return float(eigen_sum(v * v))

    @staticmethod
    def _size(k, request, attach) -> int:
        size = request.ByteSize()
        if attach is not None and k in attach:
            size += sum(a.nbytes for a in attach[k])
        return size

    def _send_pushes(self, requests: dict, attach=None) -> dict:
        big = {k for k, r in requests.items() if self._size(k, r, attach) > self.max_message - 65536}
        for k in big:
            if attach is not None and k in attach:   # too big for one frame: gRPC's chunked push
                frames.reattach(requests[k], attach.pop(k))
        small = {k: r for k, r in requests.items() if k not in big}
        out = self._each("Push", small, True, attach) if small else {}
        for k in big:
            chunks = list(self._chunks(requests[k]))
            fn = self._stubs[k].PushChunked

            def send(chunks=chunks, fn=fn):
                try:
                    return fn(iter(chunks), timeout=self.timeout, metadata=self._metadata)
                except grpc.RpcError as e:
                    raise errors.from_rpc_error(e) from None
            out[k] = self._retry(send)
        return out

    def _chunks(self, req: "pb.PushRequest"):
        """Split a push into messages under the limit; the server reassembles them into one step."""
        budget = self.max_message // 2
        head = dict(client_id=req.client_id, sequence=req.sequence, step=req.step, worker_id=req.worker_id)
        cur = pb.PushRequest(optimizers=req.optimizers, **head)
        for g in req.gradients:
            if not g.HasField("ids"):
                if g.ByteSize() > budget:
                    raise errors.InvalidArgument(f"push: the dense gradient of {g.variable!r} is larger than the "
                                                 "message limit; raise max_message_mb on server and client")
                cur.gradients.append(g)
                continue
            ids, vals = from_tensor(g.ids), from_tensor(g.values)
            step = max(1, budget // max(1, vals[:1].nbytes + 8))
            for lo in range(0, max(len(ids), 1), step):
                part = pb.Gradient(variable=g.variable, ids=to_tensor(ids[lo:lo + step]),
                                   values=to_tensor(vals[lo:lo + step]))
                if g.HasField("l2sum"):
                    part.l2sum = g.l2sum
                if cur.ByteSize() + part.ByteSize() > budget and cur.gradients:
                    yield cur
                    cur = pb.PushRequest(**head)
                cur.gradients.append(part)
        cur.last_chunk = True
        yield cur

    def _optimizer_of(self, name):
        return self._layout(name)[3]

    # ------------------------------------------------------------------ state writes
    def set_weights(self, writes, *, optimizer: str = "", iterations: int | None = None, nonslot=None):
        """writes: [(variable, slot or "", ids or None, values)]; applied atomically per shard."""
        requests = {}
        for k in range(self.num_shards):
            req = pb.SetWeightsRequest(optimizer=optimizer)
            if iterations is not None:
                req.set_iterations, req.iterations = True, int(iterations)
            for key, val in (nonslot or {}).items():
                req.nonslot[key] = float(val)
            requests[k] = req
        for name, slot, ids, values in writes:
            layout, dtype, shape, _ = self._layout(name)
            values = np.asarray(values)
            if ids is None:
                if values.shape != shape:
                    raise errors.InvalidArgument(f"set_weights: {name!r}{'/' + slot if slot else ''} needs shape "
                                                 f"{list(shape)}, got {list(values.shape)}")
                for k in self._shards_of(layout):
                    requests[k].writes.append(pb.WeightWrite(variable=name, slot=slot,
                                                             values=to_tensor(values[layout.global_ids(k)])))
            else:
                ids = np.asarray(ids, dtype=np.int64)
                owner = layout.shard_of(ids) if layout.n > 1 else np.zeros(len(ids), np.int64)
                for k in np.unique(owner):
                    m = owner == k
                    requests[int(k)].writes.append(pb.WeightWrite(variable=name, slot=slot, ids=to_tensor(ids[m]),
                                                                  values=to_tensor(values[m])))
        if not optimizer and iterations is None:
            requests = {k: r for k, r in requests.items() if r.writes}
        return self._each("SetWeights", requests)

    def checkpoint(self) -> list:
        """Ask every shard to write a checkpoint now; [(shard, path, bytes)]."""
        out = self._all("Checkpoint", pb.CheckpointRequest())
        return [(k, r.path, r.bytes) for k, r in sorted(out.items())]

    def status(self) -> dict:
        """Variables, optimizers and iterations of every shard (what `sparseps status` prints)."""
        out = {"shards": []}
        for k, stub in enumerate(self._stubs):
            info = _call(stub.GetServerInfo, pb.ServerInfoRequest(), self.timeout, self._metadata)
            vs = _call(stub.ListVariables, pb.ListVariablesRequest(), self.timeout, self._metadata)
            os_ = _call(stub.ListOptimizers, pb.ListOptimizersRequest(), self.timeout, self._metadata)
            out["shards"].append({
                "address": self.addresses[k], "shard": info.shard_index, "backend": info.backend,
                "device": info.device, "version": info.version,
                "variables": [{"name": v.name, "shape": list(v.shape), "dtype": DTYPE_NAMES[v.dtype],
                               "optimizer": v.optimizer, "partition": _PARTITION_NAMES.get(v.partition, "mod"),
                               "local_rows": v.local_rows, "bytes": v.bytes_held} for v in vs.variables],
                "optimizers": [{"name": o.name, "class_name": o.class_name, "iterations": o.iterations}
                               for o in os_.optimizers]})
        return out


class StaleGradient(errors.Aborted):
    """Sync mode: the push was for a step that had already been applied, so it was dropped."""

    def __init__(self, message, iterations=None):
        super().__init__(message)
        self.iterations = iterations or {}


def _json_default(obj):
    """Make reference get_config() output JSON-able (numpy scalars, schedule objects)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "get_config"):
        return {"class_name": type(obj).__name__, "config": obj.get_config()}
    raise TypeError(f"cannot serialise {type(obj).__name__} in an optimizer config")


class Variable:
    """A handle to one variable of the cluster (cheap; holds no data)."""

    def __init__(self, client: Client, name: str):
        self.client, self.name = client, name
        layout, dtype, shape, _ = client._layout(name)
        self.shape, self.dtype, self.partition = shape, dtype, layout.strategy

    def __repr__(self):
        return f"<sparseps.Variable {self.name!r} shape={self.shape} dtype={self.dtype.name}>"

    def pull(self, ids=None) -> np.ndarray:
        """Rows by id (duplicates allowed); every row when ids is None.

            rows = emb.pull(np.array([3, 7, 7]))
        """
        return self.client.pull(self.name, ids)

    def numpy(self) -> np.ndarray:
        """The whole variable as an ndarray."""
        return self.client.pull(self.name)

    def push(self, grad):
        """One step with a gradient for this variable only: ndarray or (ids, rows)."""
        return self.client.push({self.name: grad})

    def assign(self, value, ids=None):
        """Overwrite the whole variable (or rows `ids`) without an optimizer step."""
        self.client.set_weights([(self.name, "", ids, np.asarray(value, self.dtype))])

    @property
    def optimizer(self) -> "Optimizer | None":
        name = self.client._optimizer_of(self.name)
        return Optimizer(self.client, name) if name else None


class Optimizer:
    """A handle to a server-side optimizer, with the reference optimizer's API."""

    def __init__(self, client: Client, name: str):
        self.client, self.name = client, name

    def __repr__(self):
        return f"<sparseps.Optimizer {self.name!r}>"

    def _info(self, shard=0) -> "pb.OptimizerInfo":
        return _call(self.client._stubs[shard].GetOptimizer, pb.GetOptimizerRequest(name=self.name),
                     self.client.timeout, self.client._metadata)

    @property
    def iterations(self) -> int:
        """Steps applied so far (one per push that touched this optimizer's variables)."""
        return max(self._info(k).iterations for k in range(self.client.num_shards))

    def get_config(self) -> dict:
        return json.loads(self._info().config_json)["config"]

    @property
    def class_name(self) -> str:
        return self._info().class_name

    def get_slot_names(self) -> list:
        return list(self._info().slot_names)

    def get_slot(self, var, slot_name: str) -> np.ndarray:
        """The whole slot tensor, e.g. opt.get_slot("emb", "m")."""
        return self.client.pull(var.name if isinstance(var, Variable) else var, slot=slot_name)

    def variables(self) -> list:
        """The optimizer's state, as the reference lists it: iterations, then the slots."""
        return self.get_weights()

    def nonslot(self) -> dict:
        return dict(self._info().nonslot)

    def _weight_entries(self, info) -> list:
        """get_weights() layout: "var/slot" entries, "iterations", or a non-slot name (no "/").

        The server lists only the slots when get_weights() starts with iterations (most classes);
        otherwise (TF1 beta powers, Keras 3 learning rate) it names every entry itself."""
        entries = list(info.weights)
        return entries if any("/" not in e for e in entries) else ["iterations"] + entries

    def get_weights(self) -> list:
        """The optimizer's state exactly like the reference's get_weights(): [iterations, slot arrays
        in creation order] for Keras optimizers, non-slot values (float32 scalars) where it has them."""
        info = self._info()
        out = []
        for entry in self._weight_entries(info):
            if entry == "iterations":
                out.append(np.array(self.iterations, dtype=np.int64))
            elif "/" not in entry:
                out.append(np.array(info.nonslot[entry], dtype=np.float32))
            else:
                var, slot = entry.rsplit("/", 1)
                out.append(self.get_slot(var, slot))
        return out

    def set_weights(self, weights: list):
        """Restore get_weights() output (iterations, non-slot values and every slot) in one call."""
        entries = self._weight_entries(self._info())
        if len(weights) != len(entries):
            raise errors.InvalidArgument(f"set_weights: optimizer {self.name!r} has {len(entries)} weights "
                                         f"({entries}), got {len(weights)}")
        writes, iterations, nonslot = [], None, {}
        for e, w in zip(entries, weights):
            if e == "iterations":
                iterations = int(np.asarray(w))
            elif "/" not in e:
                nonslot[e] = float(np.asarray(w))
            else:
                writes.append((e.rsplit("/", 1)[0], e.rsplit("/", 1)[1], None, w))
        self.client.set_weights(writes, optimizer=self.name, iterations=iterations, nonslot=nonslot)

    def apply_gradients(self, grads_and_vars):
        """One step: [(grad, var), ...]; grad an ndarray, an (ids, rows) tuple or an IndexedSlices.

            opt.apply_gradients([((ids, rows), emb), (dense_grad, "kernel")])
        """
        grads = {}
        for grad, var in grads_and_vars:
            if grad is None:
                continue
            grads[var.name if isinstance(var, Variable) else (var if isinstance(var, str) else var.name)] = grad
        return self.client.push(grads)
