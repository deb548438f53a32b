"""Wire messages <-> the server's own types: partition strategies, consistency modes, dtypes,
tensors of requests, the Info and Response messages, status details.

Both transports (service.py for gRPC, dataplane.py for frames) and the state path (pushes.py,
sync.py, write-ahead-log replay) convert here, so that a proto change touches one module and
neither transport is a dependency of the state path.
"""
import json

import numpy as np

from sparseps import errors
from sparseps.proto import sparseps_pb2 as pb
from sparseps.tensors import DTYPE_NAMES, from_tensor, to_tensor

PARTITION_TO_WIRE = {"mod": pb.MOD, "div": pb.DIV, "whole": pb.WHOLE, "hash": pb.HASH}
PARTITION_FROM_WIRE = {v: k for k, v in PARTITION_TO_WIRE.items()}
MODE_NAMES = {pb.CONSISTENCY_UNSPECIFIED: "async", pb.ASYNC: "async", pb.SYNC: "sync", pb.BOUNDED: "bounded"}
MODE_TO_WIRE = {"async": pb.ASYNC, "sync": pb.SYNC, "bounded": pb.BOUNDED}


# ---------------------------------------------------------------------- requests in
def consistency_from_wire(c: "pb.Consistency") -> dict:
    mode = MODE_NAMES.get(c.mode)
    if mode is None:
        raise errors.InvalidArgument(f"unknown consistency mode {c.mode}")
    out = {"mode": mode}
    if mode == "sync":
        if c.replicas_to_aggregate <= 0:
            raise errors.InvalidArgument("sync mode needs replicas_to_aggregate >= 1")
        total = c.total_num_replicas or c.replicas_to_aggregate
        if total < c.replicas_to_aggregate:
            raise errors.InvalidArgument("total_num_replicas must be >= replicas_to_aggregate")
        out.update(replicas_to_aggregate=c.replicas_to_aggregate, total_num_replicas=total, average=c.average)
    if mode == "bounded":
        if c.staleness < 0:
            raise errors.InvalidArgument("bounded mode needs staleness >= 0")
        out.update(staleness=c.staleness)
        if c.total_num_replicas > 0:
            out.update(total_num_replicas=c.total_num_replicas)   # workers expected (server/sync.py)
    return out


def optional_tensor(message, field: str, what: str):
    """The array of an optional Tensor field, or None when it is not set."""
    return from_tensor(getattr(message, field), what) if message.HasField(field) else None


def gradients_of(request: "pb.PushRequest", arrays=None) -> list:
    """[(variable, ids or None, values, l2sum or None)] of a push; `arrays`: its tensors' data as
    arrays in frames.tensors() order (a data-plane payload) instead of the Tensors' bytes."""
    grads = []
    for g in request.gradients:
        if arrays is not None:
            ids = next(arrays) if g.HasField("ids") else None
            values = next(arrays)
        else:
            ids = optional_tensor(g, "ids", f"push ids of {g.variable!r}")
            values = from_tensor(g.values, f"push values of {g.variable!r}")
        grads.append((g.variable, ids, values, g.l2sum if g.HasField("l2sum") else None))
    return grads


def variable_spec(request: "pb.CreateVariableRequest") -> dict:
    """Shard.create_variable's arguments: the partition strategy (its default by shape), the dtype
    (float32 or float64) and the initial value, checked in that order."""
    if request.partition not in PARTITION_FROM_WIRE and request.partition != pb.PARTITION_UNSPECIFIED:
        raise errors.InvalidArgument(f"variable {request.name!r}: unknown partition {request.partition} "
                                     "(MOD, DIV, WHOLE or HASH)")
    if DTYPE_NAMES.get(request.dtype) not in ("float32", "float64"):
        raise errors.InvalidArgument(f"variable {request.name!r}: dtype must be FLOAT32 or FLOAT64")
    if request.dynamic and request.key_dtype not in (pb.DTYPE_UNSPECIFIED, pb.INT64):
        raise errors.InvalidArgument(f"dynamic variable {request.name!r}: keys are int64, got key dtype "
                                     f"{DTYPE_NAMES.get(request.key_dtype, request.key_dtype)}")
    default = "hash" if request.dynamic else "mod" if len(request.shape) > 1 else "whole"
    return dict(
        name=request.name, shape=request.shape, dtype=DTYPE_NAMES[request.dtype], optimizer=request.optimizer,
        partition=PARTITION_FROM_WIRE.get(request.partition, default),
        owner=request.owner_shard, initializer_json=request.initializer_json,
        initial_value=optional_tensor(request, "initial_value", f"initial value of {request.name!r}"),
        dynamic=request.dynamic, table_json=request.table_json)


def weight_writes(request: "pb.SetWeightsRequest") -> list:
    """[(variable, slot, ids or None, values)] of a SetWeights."""
    return [(w.variable, w.slot, optional_tensor(w, "ids", "set_weights ids"),
             from_tensor(w.values, "set_weights values")) for w in request.writes]


# ---------------------------------------------------------------------- answers out
def consistency_to_wire(d: dict) -> "pb.Consistency":
    return pb.Consistency(mode=MODE_TO_WIRE[d["mode"]], replicas_to_aggregate=d.get("replicas_to_aggregate", 0),
                          total_num_replicas=d.get("total_num_replicas", 0), average=d.get("average", False),
                          staleness=d.get("staleness", 0))


def optimizer_info(opt) -> "pb.OptimizerInfo":
    """An OptimizerState (server/state.py) as the wire describes it."""
    return pb.OptimizerInfo(
        name=opt.name, class_name=opt.impl.class_names[0],
        config_json=json.dumps({"class_name": opt.impl.class_names[0], "config": opt.impl.get_config()}),
        iterations=opt.iterations, slot_names=opt.impl.slot_names(), variables=list(opt.variables),
        consistency=consistency_to_wire(opt.consistency), nonslot_names=list(opt.impl.nonslot_names),
        weights=opt.impl.weights_entries(opt.weights_order()), nonslot=opt.nonslot)


def variable_info(var, bytes_held: int) -> "pb.VariableInfo":
    """A VariableState (server/state.py) as the wire describes it."""
    return pb.VariableInfo(
        name=var.name, shape=var.shape, dtype=to_tensor(np.zeros(0, var.dtype)).dtype, optimizer=var.optimizer,
        partition=PARTITION_TO_WIRE[var.layout.strategy], owner_shard=var.layout.owner,
        local_rows=var.local_rows, bytes_held=bytes_held, initializer_json=var.initializer_json,
        dynamic=var.table is not None, table_json=var.table_json,
        table_stats=var.table.describe() if var.table is not None else {},
        table_version=var.table.version if var.table is not None else 0)


def iterations_to_wire(iterations: dict) -> list:
    """{optimizer: iterations} as OptimizerIterations messages."""
    return [pb.OptimizerIterations(optimizer=k, iterations=v) for k, v in iterations.items()]


def push_response(iterations: dict, **flags) -> "pb.PushResponse":
    """flags: duplicate, prepared, stale."""
    return pb.PushResponse(iterations=iterations_to_wire(iterations), **flags)


def pull_response(values, gids, iterations) -> "pb.PullResponse":
    """A read (values, global ids of a range pull or None, iterations) with its rows as protobuf bytes."""
    resp = pb.PullResponse(iterations=iterations)
    to_tensor(values, resp.values)
    if gids is not None:
        to_tensor(gids, resp.ids)
    return resp


def clip_message(message: str, limit: int = 2000) -> str:
    """Status details travel in a header: keep them short (a 1 MB variable name must not be echoed)."""
    return message if len(message) <= limit else message[:limit] + f"... [{len(message) - limit} more characters]"
