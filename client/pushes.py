"""Building pushes: one request per shard for one step, chunked under the message limit, clipped as a whole.

Every shard gets a part of every push, empty where it holds none of the rows (Adam's m and v decay
on every shard, and slots are created in the same order everywhere). With clipnorm or
global_clipnorm each shard must clip by the norm of the WHOLE gradient, which only the client
sees: it sends that sum of squares (l2sum) along with each part.
"""
import json
import threading

import grpc
import numpy as np

from . import errors, frames
from .handles import Variable
from .proto import sparseps_pb2 as pb
from .reductions import eigen_sum
from .routing import split
from .tensors import from_tensor, to_tensor


def sparse_gradient(grad):
    """(ids, rows) for sparse gradients (tuples or objects with .indices/.values), else None."""
    if isinstance(grad, tuple) and len(grad) == 2:
        return np.asarray(grad[0]), np.asarray(grad[1])
    if hasattr(grad, "indices") and hasattr(grad, "values"):
        return np.asarray(grad.indices), np.asarray(grad.values)
    return None


def iterations_after(push_responses) -> dict:
    """{optimizer: iterations} after a push: the highest any shard reports."""
    its: dict[str, int] = {}
    for resp in push_responses:
        for o in resp.iterations:
            its[o.optimizer] = max(its.get(o.optimizer, 0), o.iterations)
    return its


class Pushes:
    def __init__(self, shards, placements, client_id: str):
        self._shards, self._placements, self.client_id = shards, placements, client_id
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._clip_configs: dict[str, tuple] = {}

    def next_sequence(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def requests(self, gradients: dict, step, worker_id, attach=None, seq=None):
        """One PushRequest per shard (every shard gets a part), the optimizers involved, the sequence.
        attach: {shard: []} collects the rows of data-plane shards instead of copying them in.
        seq: the sequence of an earlier push this one repeats (else a new one)."""
        if not gradients:
            raise errors.InvalidArgument("push: no gradients (a step needs at least one variable)")
        shards = self._shards
        seq = seq or self.next_sequence()
        # Built in place: a 4096 x 64 push is ~1 MiB, and every nested-constructor copy costs.
        requests = {k: pb.PushRequest(client_id=self.client_id, sequence=seq, worker_id=worker_id)
                    for k in range(shards.n)}
        if step is not None:
            for req in requests.values():
                req.step = step
        opt_names = []
        for name, grad in gradients.items():
            if isinstance(name, Variable):
                name = name.name
            layout, dtype, shape, opt = self._placements.get(name)
            sparse = sparse_gradient(grad)
            added = []
            if sparse is None and layout.strategy == "hash":
                raise errors.InvalidArgument(f"push: {name!r} is a dynamic variable: its gradients are sparse "
                                             "(keys, rows); a dense gradient needs a fixed table")
            if sparse is None:
                values = np.asarray(grad)
                if values.shape != shape:
                    raise errors.InvalidArgument(f"push: dense gradient of {name!r} has shape {list(values.shape)}, "
                                                 f"expected {list(shape)}")
                for k in range(shards.n):
                    g = requests[k].gradients.add(variable=name)
                    shards.put(k, values if layout.n == 1 else values[layout.global_ids(k)], g.values, attach)
                    added.append(g)
            else:
                ids, rows = sparse
                if ids.ndim != 1 or ids.dtype.kind not in "iu":
                    raise errors.InvalidArgument(f"push: ids of {name!r} must be a 1-D integer array")
                if layout.n > 1:
                    if layout.strategy != "hash" and ids.size and (ids.min() < 0 or ids.max() >= shape[0]):
                        bad = ids.min() if ids.min() < 0 else ids.max()
                        raise errors.InvalidArgument(
                            f"push: row id {bad} is out of range for variable {name!r} with {shape[0]} rows")
                    if rows.shape[:1] != ids.shape:
                        raise errors.InvalidArgument(f"push: {len(ids)} ids but {rows.shape[0] if rows.ndim else 0} "
                                                     f"gradient rows for {name!r}")
                for k, sel in split(layout, ids, every=True).items():
                    i, r = (ids, rows) if isinstance(sel, slice) else (ids[sel], rows[sel])
                    g = requests[k].gradients.add(variable=name)
                    shards.put(k, i, g.ids, attach)
                    shards.put(k, r, g.values, attach)
                    added.append(g)
            if opt and opt not in opt_names:
                opt_names.append(opt)
            if shards.n > 1 and opt:
                l2sum = self.whole_l2sum(opt, values if sparse is None else sparse[1], dtype)
                if l2sum is not None:
                    for g in added:
                        g.l2sum = l2sum
        for req in requests.values():
            req.optimizers.extend(opt_names)
        return requests, opt_names, seq

    def whole_l2sum(self, optimizer: str, values, dtype):
        """With clipnorm/global_clipnorm, each shard must clip with the norm of the whole gradient."""
        if optimizer not in self._clip_configs:
            cfg = json.loads(self._shards.read(0, "GetOptimizer", pb.GetOptimizerRequest(name=optimizer))
                             .config_json)["config"]
            self._clip_configs[optimizer] = (cfg.get("clipvalue"),
                                             cfg.get("clipnorm") is not None or cfg.get("global_clipnorm") is not None)
        clipvalue, by_norm = self._clip_configs[optimizer]
        if not by_norm:
            return None
        v = np.asarray(values, dtype=dtype)
        if clipvalue is not None:
            v = np.clip(v, -dtype.type(clipvalue), dtype.type(clipvalue))
        return float(eigen_sum(v * v))

    def send(self, requests: dict, attach=None) -> dict:
        """Send one push's requests; a part too large for one message goes as a chunked stream."""
        shards = self._shards
        big = {k for k, r in requests.items() if shards.size(k, r, attach) > shards.max_message - 65536}
        for k in big:
            if attach is not None and k in attach:   # too big for one frame: gRPC's chunked push
                frames.reattach(requests[k], attach.pop(k))
        small = {k: r for k, r in requests.items() if k not in big}
        out = shards.each("Push", small, True, attach) if small else {}
        for k in big:
            chunks = list(self.chunks(requests[k]))
            fn = shards.stubs[k].PushChunked

            def send(chunks=chunks, fn=fn):
                try:
                    return fn(iter(chunks), timeout=shards.timeout, metadata=shards.metadata)
                except grpc.RpcError as e:
                    raise errors.from_rpc_error(e) from None
            out[k] = shards.retry(send)
        return out

    def chunks(self, req: "pb.PushRequest"):
        """Split a push into messages under the limit; the server reassembles them into one step."""
        budget = self._shards.max_message // 2
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
