"""The trainer's view of a sparseps cluster: variables to pull, gradients to push, one optimizer.

    client = sparseps.connect("127.0.0.1:50051")          # or "h1:p1,h2:p2,h3:p3"
    emb = client.create_variable("emb", initial_value=np.zeros((1000, 64), np.float32), optimizer="opt")
    it = client.push({"emb": (ids, grad_rows)})           # one atomic step; iterations after it

This file is the contract; the machinery is elsewhere: client/shards.py (connections, retries,
fan-out, the data plane), client/routing.py (which shard holds which rows), client/pulls.py and
client/pushes.py (requests split by shard and by the message limit, clipping over shards),
client/sync.py (sync mode's vote), client/handles.py (Variable, Optimizer).
"""
import json
import random
import uuid

import grpc
import numpy as np

from . import errors
from .handles import Optimizer, Variable
from .partition import Layout, owner_shard
from .proto import sparseps_pb2 as pb
from .pulls import Pulls
from .pushes import Pushes, iterations_after
from .routing import PARTITION_NAMES, PARTITIONS, Placement, Placements, holders, route
from .shards import Shards
from .sync import StaleGradient, Sync
from .tensors import DTYPE_NAMES, to_tensor, wire_dtype

__all__ = ["Client", "Variable", "Optimizer", "StaleGradient"]


def _json_default(obj):
    """Make reference get_config() output JSON-able (numpy scalars, schedule objects)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "get_config"):
        return {"class_name": type(obj).__name__, "config": obj.get_config()}
    raise TypeError(f"cannot serialise {type(obj).__name__} in an optimizer config")


def _of_shards(name: str, doc: str, settable: bool = False) -> property:
    """A Client attribute that lives on its Shards."""
    setter = (lambda self, value: setattr(self._shards, name, value)) if settable else None
    return property(lambda self: getattr(self._shards, name), setter, doc=doc)


def _initializer_json(initializer) -> str:
    """A Keras initializer (name or serialize form) as JSON, with a seed every shard shares."""
    if initializer is None:
        return ""
    init = {"class_name": initializer, "config": {}} if isinstance(initializer, str) else \
        {"class_name": initializer["class_name"], "config": dict(initializer.get("config") or {})}
    if init["class_name"] not in ("Zeros", "Ones", "Constant", "zeros", "ones") and \
            init["config"].get("seed") is None:
        init["config"]["seed"] = random.randrange(1 << 31)   # one seed for every shard
    return json.dumps(init)


class Client:
    """A connection to every shard of one cluster. Thread-safe; share one per process."""

    def __init__(self, addresses, *, max_message_mb: int = 256, timeout: float | None = None,
                 retry_deadline: float = 60.0, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, client_id: str | None = None, tls_ca=None, tls_cert=None,
                 tls_key=None, server_name: str | None = None, data_plane: bool | None = None,
                 read_from: str = "leader"):
        """tls_ca / tls_cert / tls_key: PEM file paths or bytes (TLS; cert+key for mutual TLS);
        server_name: the name to verify the server certificate against (default: the address's host);
        data_plane: use the shards' data ports (default: yes, unless SPARSEPS_DATA_PLANE=0).
        addresses may be "etcd://HOST:PORT/NAME" (a replicated cluster: the shards' leaders, found
        again after a failover; read_from="serving": its serving replicas, for inference)."""
        self._shards = Shards(addresses, max_message_mb=max_message_mb, timeout=timeout,
                              retry_deadline=retry_deadline, credentials=credentials, token=token, tls_ca=tls_ca,
                              tls_cert=tls_cert, tls_key=tls_key, server_name=server_name, data_plane=data_plane,
                              read_from=read_from)
        self.client_id = client_id or uuid.uuid4().hex
        self._placements = Placements(self._shards)
        self._pulls = Pulls(self._shards, self._placements)
        self._pushes = Pushes(self._shards, self._placements, self.client_id)
        self._sync = Sync(self._shards, self.client_id)

    addresses = _of_shards("addresses", "The shards' addresses, in shard-index order.")
    num_shards = _of_shards("n", "How many shards the cluster has.")
    server_info = _of_shards("server_info", "Each shard's ServerInfo, in shard-index order.")
    timeout = _of_shards("timeout", "Seconds a call may take (None: no limit).", settable=True)
    retry_deadline = _of_shards("retry_deadline", "Seconds a retried call keeps trying.", settable=True)
    max_message = _of_shards("max_message", "The largest message in bytes, both ways.", settable=True)

    @property
    def data_plane(self) -> list:
        """Per shard: 'host:port' of the data plane in use, or None where calls go over gRPC."""
        return self._shards.data_plane()

    def close(self):
        self._shards.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ optimizers
    def create_optimizer(self, name: str, config=None, /, *, consistency: dict | None = None,
                         **kwargs) -> Optimizer:
        """Create (or find, if identical) an optimizer on every shard from a Keras configuration.
        consistency: {"mode": "async"} (default), {"mode": "sync", "replicas_to_aggregate": 4,
        "total_num_replicas": 5, "average": True} or {"mode": "bounded", "staleness": 2}.

            client.create_optimizer("opt", {"class_name": "LazyAdam", "config": {"learning_rate": 1e-3}})
            client.create_optimizer("opt", "Adam", learning_rate=1e-3, amsgrad=True)
            client.create_optimizer("opt", tfa.optimizers.LazyAdam(1e-3))   # a live optimizer object
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
        self._shards.all("CreateOptimizer", request)
        return Optimizer(self, name)

    def optimizer(self, name: str) -> Optimizer:
        """A handle to an existing optimizer (NotFound if there is none).

            opt = client.optimizer("opt")
            opt.iterations, opt.get_config()["learning_rate"]
            opt.get_slot("emb", "m")
        """
        self._shards.read(0, "GetOptimizer", pb.GetOptimizerRequest(name=name))
        return Optimizer(self, name)

    def optimizers(self) -> list:
        """Handles to every optimizer of the cluster."""
        resp = self._shards.read(0, "ListOptimizers", pb.ListOptimizersRequest())
        return [Optimizer(self, o.name) for o in resp.optimizers]

    # ------------------------------------------------------------------ variables
    def create_variable(self, name: str, initial_value=None, *, shape=None, dtype="float32", initializer=None,
                        optimizer=None, partition: str | None = None, dim: int | None = None, dynamic: bool = False,
                        key_dtype="int64", admission: dict | None = None, eviction: dict | None = None,
                        capacity: int | None = None, on_full: str | None = None,
                        evict_batch: float | None = None) -> Variable:
        """Create (or find, if identical) a variable, split by rows over the shards. partition:
        "mod" (row id % shards, the default for tables), "div" (contiguous blocks) or "whole" (one
        shard, the default for 1-D variables). dynamic=True: rows of width `dim` keyed by any int64,
        created on first touch, routed by a hash of the key; admission / eviction / capacity (per
        shard) / on_full ("evict" or "refuse") / evict_batch (the least share of the capacity a full
        table evicts at once, default 0.05) set its policy (docs/dynamic.md).

            client.create_variable("emb", initial_value=np.zeros((1000, 64), np.float32), optimizer="opt")
            client.create_variable("emb", shape=(10**6, 64), initializer={"class_name": "RandomNormal",
                                   "config": {"stddev": 0.05, "seed": 1}}, optimizer="opt")
            client.create_variable("ids", dim=64, dynamic=True, optimizer="opt", admission={"min_count": 3})
        """
        if isinstance(optimizer, Optimizer):
            optimizer = optimizer.name
        if dynamic:
            return self._create_dynamic(name, dim if dim is not None else (shape[-1] if shape else None), dtype,
                                        initializer, optimizer, key_dtype, initial_value, partition,
                                        {"admission": admission, "eviction": eviction, "capacity": capacity,
                                         "on_full": on_full, "evict_batch": evict_batch})
        if dim is not None or any(x is not None for x in (admission, eviction, capacity, on_full, evict_batch)):
            raise errors.InvalidArgument(f"variable {name!r}: dim, admission, eviction, capacity, on_full and "
                                         "evict_batch are for dynamic variables (dynamic=True)")
        if initial_value is not None:
            initial_value = np.asarray(initial_value)
            if initial_value.dtype not in (np.float32, np.float64):
                initial_value = initial_value.astype(dtype)
            shape, dtype = initial_value.shape, initial_value.dtype
        if shape is None:
            raise ValueError("create_variable needs initial_value or shape")
        shape = tuple(int(s) for s in shape)
        partition = partition or ("mod" if len(shape) > 1 else "whole")
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {sorted(PARTITIONS)}, got {partition!r}")
        owner = owner_shard(name, self.num_shards) if partition == "whole" else 0
        init_json = _initializer_json(initializer)
        layout = Layout(shape[0], self.num_shards, partition, owner)
        base = dict(name=name, shape=shape, dtype=wire_dtype(dtype), optimizer=optimizer or "",
                    partition=PARTITIONS[partition], owner_shard=owner)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        chunked = initial_value is not None and layout.rows * row_bytes > self.max_message // 2
        requests = {}
        for k in range(self.num_shards):
            req = pb.CreateVariableRequest(initializer_json=init_json, **base)
            if initial_value is not None and not chunked:
                to_tensor(initial_value[layout.global_ids(k)], req.initial_value)
            requests[k] = req
        self._shards.each("CreateVariable", requests)
        self._placements.add(name, Placement(layout, np.dtype(dtype), shape, optimizer or ""))
        var = Variable(self, name)
        if chunked:
            var.assign(initial_value)
        return var

    def _create_dynamic(self, name, dim, dtype, initializer, optimizer, key_dtype, initial_value, partition, table):
        if initial_value is not None:
            raise errors.InvalidArgument(f"dynamic variable {name!r}: rows start from the initializer; write "
                                         "chosen rows with assign(values, ids=keys)")
        if partition not in (None, "hash"):
            raise errors.InvalidArgument(f"dynamic variable {name!r}: keys are routed by hash, not {partition!r}")
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise errors.InvalidArgument(f"dynamic variable {name!r}: dim must be a positive integer, got {dim!r}")
        try:
            key_dtype = np.dtype(key_dtype)
        except TypeError:
            key_dtype = None
        if key_dtype != np.int64:
            raise errors.InvalidArgument(f"dynamic variable {name!r}: keys are int64 (hash strings or other ids to "
                                         f"int64 first: sparseps.keras.hash_strings), got key_dtype {key_dtype}")
        table_json = json.dumps({k: v for k, v in table.items() if v is not None})
        shape = (0, int(dim))
        self._shards.all("CreateVariable", pb.CreateVariableRequest(
            name=name, shape=shape, dtype=wire_dtype(dtype), optimizer=optimizer or "", partition=pb.HASH,
            initializer_json=_initializer_json(initializer), dynamic=True, table_json=table_json,
            key_dtype=pb.INT64))
        self._placements.add(name, Placement(Layout(0, self.num_shards, "hash"), np.dtype(dtype), shape,
                                             optimizer or ""))
        return Variable(self, name)

    def evict(self, variable: str | None = None) -> dict:
        """Run the age eviction policies of dynamic variables now, on every shard (they also run
        every eviction.interval_seconds); {variable: rows removed, all shards}.

            client.create_variable("ids", dim=16, dynamic=True, optimizer="opt", eviction={"max_age_steps": 1000})
            removed = client.evict()                       # {"ids": 1234}
            removed = client.evict("ids")
        """
        out: dict[str, int] = {}
        for resp in self._shards.all("Evict", pb.EvictRequest(variable=variable or "")).values():
            for name, count in resp.evicted.items():
                out[name] = out.get(name, 0) + count
        return out

    def variable(self, name: str) -> Variable:
        """A handle to an existing variable (NotFound if there is none).

            emb = client.variable("emb")
            emb.shape, emb.dtype, emb.optimizer
            rows = emb.pull([3, 7])
        """
        self._placements.describe(name)
        return Variable(self, name)

    def variables(self) -> list:
        """Handles to every variable of the cluster."""
        resp = self._shards.read(0, "ListVariables", pb.ListVariablesRequest())
        names = [v.name for v in resp.variables]
        for k in range(1, self.num_shards):   # whole variables live on their owner only
            more = self._shards.read(k, "ListVariables", pb.ListVariablesRequest())
            names += [v.name for v in more.variables if v.name not in names]
        return [Variable(self, n) for n in names]

    # ------------------------------------------------------------------ pull and push
    def pull(self, name: str, ids=None, *, slot: str = "", min_iterations: int = 0,
             timeout: float = 0.0, worker_id: str = "") -> np.ndarray:
        """Rows `ids` of a variable (or of one of its slots); every row when ids is None.
        min_iterations: wait until every shard asked has applied that many steps. For a sync-mode
        optimizer the rows returned always come from one step s (>= min_iterations), never mixed
        across shards (docs/consistency.md). worker_id: bounded mode, hold the pull until the
        slowest worker is within the optimizer's staleness of this one. A slot read before the
        first push that updates the variable returns the value the slot will start at.

            rows = client.pull("emb", np.array([3, 7, 7]))        # ndarray (3, 64)
            table = client.pull("emb")                            # every row
            m = client.pull("emb", [3, 7], slot="m")              # the optimizer's slot rows
        """
        placement = self._placements.get(name)
        if self.num_shards > 1 and placement.layout.strategy != "whole" and \
                self._sync.mode_of(placement.optimizer) == "sync":
            def read(min_its, seen):
                return self._pulls.read(name, ids, slot, min_its, timeout, worker_id, seen)
            return self._sync.one_step_read(name, read, min_iterations, timeout, slot)
        return self._pulls.read(name, ids, slot, min_iterations, timeout, worker_id)

    def push(self, gradients: dict, *, step: int | None = None, worker_id: str = ""):
        """Apply one step: {variable name: dense ndarray | (ids, rows) | obj with .indices/.values}.
        The whole push is one step of each optimizer it touches (iterations advance once) and is
        applied atomically on each shard. Returns the iterations after the step (a dict when the
        push touches several optimizers). `step`: sync mode, the step the gradients were computed
        on; the push then returns step + 1 once that step is applied on every shard, or raises
        StaleGradient if the step had its replicas already (docs/consistency.md). `worker_id`:
        bounded mode, the worker whose clock this push advances.

            it = client.push({"emb": (ids, grad_rows), "kernel": dense_grad})
            it = client.push({"emb": (ids, g)}, step=s)           # sync mode: s + 1, or StaleGradient
            it = client.push({"emb": (ids, g)}, worker_id="w3")   # bounded mode
        """
        attach = self._shards.attach()
        # sync mode: a push of a step whose vote failed (timed out) is that push again, under the same
        # sequence, so that the server counts this replica once
        requests, opt_names, seq = self._pushes.requests(gradients, step, worker_id, attach,
                                                         seq=self._sync.repeat_of(step))
        responses = self._pushes.send(requests, attach)
        return self._sync.after_push(step, seq, opt_names, responses, vote=self._vote)

    def push_pull(self, gradients: dict, pulls: dict):
        """Push one step, then pull rows, in one round trip per shard (ps-lite's PushPull).
        The rows are read right after this push is applied, with no other step in between on
        each shard (so they include it and nothing later). Returns
        (iterations as push() returns them, {variable: ndarray}). Async-mode optimizers only;
        a push too large for one message falls back to push() then pull().

            it, rows = client.push_pull({"emb": (ids, grad_rows)}, {"emb": next_ids})
            next_rows = rows["emb"]                               # (len(next_ids), 64)
            it, rows = client.push_pull({"emb": (ids, g)}, {"emb": next_ids, "bias": [0]})
        """
        shards = self._shards
        attach = shards.attach()
        requests, opt_names, seq = self._pushes.requests(gradients, None, "", attach)
        if any(shards.size(k, r, attach) > shards.max_message // 2 for k, r in requests.items()):
            self._pushes.send(requests, attach)
            its = self.optimizer(opt_names[0]).iterations if len(opt_names) == 1 else \
                {o: self.optimizer(o).iterations for o in opt_names}
            return its, {name: self.pull(name, ids) for name, ids in pulls.items()}
        calls = {k: pb.PushPullRequest(push=req) for k, req in requests.items()}
        where, outs = self._pulls.add_to(calls, pulls, attach)
        responses = shards.each("PushPull", calls, True, attach)
        its = iterations_after(r.push for r in responses.values())
        outs = self._pulls.gather(responses, where, outs)
        return (next(iter(its.values())) if len(its) == 1 else its), outs

    # ------------------------------------------------------------------ state writes
    def set_weights(self, writes, *, optimizer: str = "", iterations: int | None = None, nonslot=None):
        """Overwrite variables or slots without a step, atomically per shard (restores, imports).
        writes: [(variable, slot or "", ids or None, values)]; optimizer/iterations/nonslot also
        set that optimizer's step counter and non-slot values.

            client.set_weights([("emb", "", None, table)])                 # the whole variable
            client.set_weights([("emb", "m", [3, 7], m_rows)], optimizer="opt", iterations=100)
            client.set_weights([], optimizer="opt", nonslot={"beta1_power": 0.9})
        """
        requests = {}
        for k in range(self.num_shards):
            req = pb.SetWeightsRequest(optimizer=optimizer)
            if iterations is not None:
                req.set_iterations, req.iterations = True, int(iterations)
            for key, val in (nonslot or {}).items():
                req.nonslot[key] = float(val)
            requests[k] = req
        for name, slot, ids, values in writes:
            layout, dtype, shape, _ = self._placements.get(name)
            values = np.asarray(values)
            if ids is None and layout.strategy == "hash":
                raise errors.InvalidArgument(f"set_weights: {name!r} is a dynamic variable: give the keys of the "
                                             "rows to write")
            if ids is None:
                if values.shape != shape:
                    raise errors.InvalidArgument(f"set_weights: {name!r}{'/' + slot if slot else ''} needs shape "
                                                 f"{list(shape)}, got {list(values.shape)}")
                for k in holders(layout):
                    requests[k].writes.append(pb.WeightWrite(variable=name, slot=slot,
                                                             values=to_tensor(values[layout.global_ids(k)])))
            else:
                ids = np.asarray(ids)
                if ids.dtype.kind not in "iu":
                    raise errors.InvalidArgument(f"set_weights: ids of {name!r} must be integers, got {ids.dtype}")
                ids = ids.astype(np.int64, copy=False)
                owner = route(layout, ids)
                for k in np.unique(owner):
                    m = owner == k
                    requests[int(k)].writes.append(pb.WeightWrite(variable=name, slot=slot, ids=to_tensor(ids[m]),
                                                                  values=to_tensor(values[m])))
        if not optimizer and iterations is None:
            requests = {k: r for k, r in requests.items() if r.writes}
        return self._shards.each("SetWeights", requests)

    def checkpoint(self) -> list:
        """Ask every shard to write a checkpoint now (to its --data-dir); [(shard, path, bytes)].

            for shard, path, size in client.checkpoint():
                print(f"shard {shard}: {path} ({size} bytes)")
            # a restarted shard resumes from its newest checkpoint and write-ahead log
        """
        out = self._shards.all("Checkpoint", pb.CheckpointRequest())
        return [(k, r.path, r.bytes) for k, r in sorted(out.items())]

    def status(self) -> dict:
        """Variables, optimizers and iterations of every shard (what `sparseps status` prints).

            for shard in client.status()["shards"]:
                print(shard["address"], [v["name"] for v in shard["variables"]],
                      [(o["name"], o["iterations"]) for o in shard["optimizers"]])
        """
        out = {"shards": []}
        for k in range(self.num_shards):
            info = self._shards.call(k, "GetServerInfo", pb.ServerInfoRequest())
            vs = self._shards.call(k, "ListVariables", pb.ListVariablesRequest())
            os_ = self._shards.call(k, "ListOptimizers", pb.ListOptimizersRequest())
            out["shards"].append({
                "address": self.addresses[k], "shard": info.shard_index, "backend": info.backend,
                "device": info.device, "version": info.version,
                "variables": [{"name": v.name, "shape": list(v.shape), "dtype": DTYPE_NAMES[v.dtype],
                               "optimizer": v.optimizer, "partition": PARTITION_NAMES.get(v.partition, "mod"),
                               "local_rows": v.local_rows, "bytes": v.bytes_held,
                               **({"dynamic": True, "table": json.loads(v.table_json or "{}"),
                                   "table_stats": dict(v.table_stats)} if v.dynamic else {})}
                              for v in vs.variables],
                "optimizers": [{"name": o.name, "class_name": o.class_name, "iterations": o.iterations}
                               for o in os_.optimizers]})
        return out

    # ------------------------------------------------------------------ internals that tests and bench reach for
    _stubs = _of_shards("stubs", "Per shard: the gRPC stub (bench/bench_overlap.py swaps in a slow one).",
                        settable=True)
    _channels = _of_shards("channels", "Per shard: the gRPC channel.")
    _data = _of_shards("data", "Per shard: its DataChannel, or None (gRPC only).")

    @property
    def _layouts(self) -> dict:
        return self._placements.known

    def _optimizer_of(self, name: str) -> str:
        return self._placements.get(name).optimizer

    def _push_requests(self, gradients: dict, step, worker_id, attach=None, seq=None):
        return self._pushes.requests(gradients, step, worker_id, attach, seq)

    def _send_pushes(self, requests: dict, attach=None) -> dict:
        return self._pushes.send(requests, attach)

    def _vote(self, optimizer: str, step: int, seq: int) -> int:
        """Sync mode's phase 2 (push() calls it here: tests replace it on an instance to step in)."""
        return self._sync.vote(optimizer, step, seq)

    @property
    def _sync_pending(self) -> dict:
        return self._sync.pending
