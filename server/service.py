"""The gRPC transport: turns wire messages into Shard calls and errors into gRPC statuses.

Nothing here owns state. Decoding (bytes -> numpy views) happens outside the shard lock, so
several requests can be received and checked while one step is being applied.
"""
import contextlib
import logging
import math
import threading
import time

import grpc
import numpy as np

from sparseps import errors
from sparseps.proto import sparseps_pb2 as pb
from sparseps.proto import sparseps_pb2_grpc as pb_grpc
from sparseps.tensors import from_tensor, to_tensor

from . import wire
from .limits import WaitSlots, pull_answer_bytes, pull_waits
from .pushes import PushPipeline

log = logging.getLogger("sparseps.server")

def _handler(method):
    """Run a servicer method, mapping sparseps errors (and crashes) to gRPC statuses."""
    def wrapped(self, request, context):
        start = time.perf_counter()
        self.observe_start(method.__name__)
        try:
            return method(self, request, context)
        except errors.Error as e:
            self.observe_error(method.__name__, e.code)
            context.abort(e.code, wire.clip_message(e.message))
        except MemoryError as e:
            self.observe_error(method.__name__, grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          wire.clip_message(f"{method.__name__}: out of memory ({e}); nothing was changed"))
        except grpc.RpcError:   # the request stream broke (the client cancelled or went away)
            self.observe_error(method.__name__, grpc.StatusCode.CANCELLED)
            context.abort(grpc.StatusCode.CANCELLED, f"{method.__name__}: the request stream was cancelled")
        except Exception as e:  # a bug: say so instead of crashing the server
            log.exception("%s failed", method.__name__)
            self.observe_error(method.__name__, grpc.StatusCode.INTERNAL)
            context.abort(grpc.StatusCode.INTERNAL, wire.clip_message(f"{type(e).__name__}: {e}"))
        finally:
            self.observe_latency(method.__name__, time.perf_counter() - start)
    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped


MAX_WAIT_SECONDS = 600.0   # the longest a pull may wait for a step (min_iterations / bounded staleness)


class ParameterServerService(pb_grpc.ParameterServerServicer):
    max_message = 0            # the server's message limit; a pull answer over it is refused clearly
    budget = None              # the limits.MemoryBudget of both transports (a waiting pull's answer is charged here)
    data_port = 0              # the data plane's port, advertised in ServerInfo (0 = none)
    data_tls = False
    def __init__(self, shard, cluster=(), metrics=None, pushes=None, threads: int = 16):
        self.shard = shard
        self.cluster = list(cluster)
        self.metrics = metrics
        self.pushes = pushes if pushes is not None else PushPipeline(shard)  # every state change goes here
        self.replica = None   # server/replication.Replica of a replicated shard
        self.waits = WaitSlots(threads)   # of the gRPC pool's threads, those that may wait for other workers
        self._active_lock = threading.Lock()
        self._active = 0   # pulls and pushes being served right now (both transports)

    # ---- metrics hooks (no-ops without metrics) ----
    def observe_start(self, method):
        if self.metrics is not None:
            self.metrics.started(method)

    def observe_error(self, method, code):
        if self.metrics is not None:
            self.metrics.rejected(method, code)

    def observe_latency(self, method, seconds):
        if self.metrics is not None:
            self.metrics.latency(method, seconds)

    @contextlib.contextmanager
    def waiting(self, method: str, what: str):
        """Hold one of the gRPC threads allowed to wait for other workers (or raise UNAVAILABLE)."""
        self.waits.acquire(what)
        if self.metrics is not None:
            self.metrics.waiting(method, +1)
        try:
            yield
        finally:
            self.waits.release()
            if self.metrics is not None:
                self.metrics.waiting(method, -1)

    # ---- info ----
    def _variable_info(self, var) -> "pb.VariableInfo":
        return wire.variable_info(var, self.shard.bytes_held(var))

    @_handler
    def GetServerInfo(self, request, context):
        s = self.shard
        return pb.ServerInfo(version=_version(), backend=s.bk.name, device=s.bk.device, shard_index=s.index,
                             num_shards=s.num_shards, cluster=self.cluster, instance_id=s.instance_id, data_port=self.data_port,
                             data_tls=self.data_tls,
                             live_rows={n: v.table.live for n, v in list(s.variables.items()) if v.table is not None},
                             **self._replica_info())

    def _replica_info(self) -> dict:
        r = self.replica
        return {} if r is None else {"role": r.role, "epoch": r.epoch, "log_end": r.wal.lsn}

    @_handler
    def CreateOptimizer(self, request, context):
        return wire.optimizer_info(self.pushes.admin(request))

    @_handler
    def GetOptimizer(self, request, context):
        return wire.optimizer_info(self.shard.optimizer(request.name))

    @_handler
    def ListOptimizers(self, request, context):
        return pb.ListOptimizersResponse(optimizers=[wire.optimizer_info(o) for o in list(self.shard.optimizers.values())])

    @_handler
    def CreateVariable(self, request, context):
        return self._variable_info(self.pushes.admin(request))

    @_handler
    def DescribeVariable(self, request, context):
        return self._variable_info(self.shard.variable(request.name))

    @_handler
    def ListVariables(self, request, context):
        return pb.ListVariablesResponse(variables=[self._variable_info(v) for v in list(self.shard.variables.values())])

    def _pull(self, name, ids, slot, row_start, row_stop, what, since_step=0):
        return self._answer(name, ids, self.shard.pull(name, ids, slot, row_start, row_stop, since_step), what)

    def _answer(self, name, ids, read, what):
        """A read's (values, global ids of a range pull or None, iterations), checked and counted."""
        values, gids, iterations = read
        if self.max_message:
            size = values.nbytes + (gids.nbytes if ids is None else 0) + 64
            if size > self.max_message:
                raise errors.ResourceExhausted(
                    f"{what} of {name!r}: the answer ({size} bytes, {len(values)} rows) is larger than the "
                    f"message limit ({self.max_message} bytes); pull fewer rows at a time")
        if self.metrics is not None:
            self.metrics.pulled(name, len(values), values.nbytes)
        return values, (gids if ids is None else None), iterations

    @_handler
    def Pull(self, request, context):
        ids = wire.optional_tensor(request, "ids", "pull ids")
        with self.serving():
            return wire.pull_response(*self.pull(request, ids, context.time_remaining(), pooled=True))

    @contextlib.contextmanager
    def serving(self):
        """Count a pull/push in progress; kernels run on several cores only when it is alone."""
        with self._active_lock:
            self._active += 1
            alone = self._active == 1
        parallel = getattr(self.shard.bk, "parallel", None)
        if parallel is not None:
            parallel(alone)
        try:
            yield
        finally:
            with self._active_lock:
                self._active -= 1

    def pull(self, request, ids, remaining=None, pooled=False):
        """A pull, after any wait it asks for: (values, global ids of a range pull or None, iterations).
        pooled: it runs on a gRPC pool thread, so a wait takes one of the limited wait slots (a
        data-plane connection has its own thread)."""
        waits = request.min_iterations or (request.worker_id and self.pushes.sync is not None)
        if waits:
            t = request.timeout_seconds
            if not math.isfinite(t) or t < 0:
                raise errors.InvalidArgument(f"pull of {request.variable!r}: timeout_seconds must be a finite "
                                             f"number >= 0, got {t}")
            # never wait past the call's own deadline, nor longer than MAX_WAIT_SECONDS
            t = min(t or 60.0, MAX_WAIT_SECONDS, remaining if remaining is not None else math.inf)
            t = max(t, 1e-3)
            def slot(what):
                return self.waiting("Pull", what) if pooled else contextlib.nullcontext()
            if request.min_iterations and not self._reached(request.variable, request.min_iterations):
                with slot(f"pull of {request.variable!r} waiting for step {request.min_iterations}"):
                    self.pushes.wait_for(request.variable, request.min_iterations, t)
            if request.worker_id and self.pushes.sync is not None:   # bounded staleness
                self.pushes.sync.wait_bounded(request.variable, request.worker_id, t, wait_slot=slot)
        held = contextlib.nullcontext()
        if self.budget is not None and pull_waits(request):   # its answer is charged now that the wait is over
            held = self.budget.hold("Pull", pull_answer_bytes(self.shard, request.variable,
                                                              len(ids) if ids is not None else None,
                                                              request.row_start, request.row_stop))
        with held:
            return self._pull(request.variable, ids, request.slot, request.row_start, request.row_stop, "pull",
                              request.since_step)

    def _reached(self, variable, min_iterations) -> bool:
        var = self.shard.variable(variable)
        opt = self.shard.optimizers.get(var.optimizer)
        return opt is None or opt.iterations >= min_iterations

    @_handler
    def GetSlot(self, request, context):
        if not request.slot:
            raise errors.InvalidArgument("get_slot: a slot name is required")
        ids = wire.optional_tensor(request, "ids", "get_slot ids")
        return wire.pull_response(*self._pull(request.variable, ids, request.slot, request.row_start,
                                              request.row_stop, "get_slot"))

    def push(self, request, grads, record=None, then=None) -> "pb.PushResponse":
        """record: the write-ahead-log record's parts, when the transport already has them; then:
        PushPipeline.push's."""
        received = time.perf_counter()
        if self.metrics is not None:
            self.metrics.push_received(grads)
        resp = self.pushes.push(request, grads, received, record, then)
        if self.metrics is not None:   # received -> applied (and durable), answer ready
            self.metrics.push_answered([o.optimizer for o in resp.iterations], time.perf_counter() - received,
                                       stale=resp.stale, duplicate=resp.duplicate)
        return resp

    @_handler
    def Push(self, request, context):
        grads = wire.gradients_of(request)
        with self.serving():
            return self.push(request, grads)

    @_handler
    def PushPull(self, request, context):
        grads = wire.gradients_of(request.push)
        pull_ids = [wire.optional_tensor(q, "ids", f"push_pull ids of {q.variable!r}") for q in request.pulls]
        with self.serving():
            pushed, pulls = self.push_pull(request, grads, pull_ids)
        return pb.PushPullResponse(push=pushed, pulls=[wire.pull_response(*p) for p in pulls])

    def push_pull(self, request, grads, pull_ids, record=None):
        """Push, then pull under the same hold of the shard lock: the rows include this push and no later one."""
        for q in request.pulls:
            if q.min_iterations or q.worker_id:
                raise errors.InvalidArgument(f"push_pull of {q.variable!r}: a PushPull's pulls cannot wait for "
                                             "steps (min_iterations / worker_id); use Pull")
        names = set(request.push.optimizers) | {self.shard.variable(g.variable).optimizer
                                                for g in request.push.gradients}
        for name in names:
            if name and self.shard.optimizer(name).consistency.get("mode", "async") != "async":
                raise errors.FailedPrecondition(f"push_pull: optimizer {name!r} is in "
                                                f"{self.shard.optimizer(name).consistency['mode']} mode, whose steps "
                                                "wait for other workers; use push and pull")
        # a pull that cannot succeed refuses the whole call first
        located = [self.shard.locate(q.variable, ids, q.row_start, q.row_stop, "push_pull")
                   for q, ids in zip(request.pulls, pull_ids)]
        pulls = []

        def pull_all():   # under the push's hold of the shard lock: one handoff fewer per call
            pulls[:] = [self._answer(q.variable, ids, self.shard.read(*loc, q.slot), "push_pull")
                        for q, ids, loc in zip(request.pulls, pull_ids, located)]
        pushed = self.push(request.push, grads, record, then=pull_all)
        if pushed.duplicate:   # answered from the exactly-once window: the rows as they are now
            pull_all()
        return pushed, pulls

    @_handler
    def PushChunked(self, request_iterator, context):
        """Concatenate the parts (same variables, rows appended), then apply as one push."""
        merged = pb.PushRequest()
        parts: dict[str, list] = {}
        complete = False
        for part in request_iterator:
            complete = part.last_chunk
            if not merged.client_id:
                merged.client_id, merged.sequence, merged.step = part.client_id, part.sequence, part.step
                merged.worker_id = part.worker_id
            merged.optimizers.extend(o for o in part.optimizers if o not in merged.optimizers)
            for g in part.gradients:
                parts.setdefault(g.variable, []).append(g)
        if not complete:
            raise errors.Aborted("push stream ended before its last chunk (did the sender go away?); "
                                 "nothing of it was applied")
        for name, gs in parts.items():
            if len(gs) == 1:
                merged.gradients.append(gs[0])
                continue
            if any(not g.HasField("ids") for g in gs):
                raise errors.InvalidArgument(f"push: dense gradient of {name!r} was split across chunks")
            ids = [from_tensor(g.ids, f"push ids of {name!r}") for g in gs]
            vals = [from_tensor(g.values, f"push values of {name!r}") for g in gs]
            for i, v in zip(ids, vals):   # the parts must agree before they can be joined
                if i.ndim != 1 or v.ndim < 1 or v.shape[1:] != vals[0].shape[1:] or i.dtype.kind != ids[0].dtype.kind \
                        or v.dtype != vals[0].dtype:
                    raise errors.InvalidArgument(
                        f"push: the chunks of {name!r} disagree: ids {[list(x.shape) for x in ids]} "
                        f"({sorted({str(x.dtype) for x in ids})}), values {[list(x.shape) for x in vals]} "
                        f"({sorted({str(x.dtype) for x in vals})}); each chunk needs 1-D ids and rows of one shape")
            ids, vals = np.concatenate(ids), np.concatenate(vals)
            joined = merged.gradients.add(variable=name)
            to_tensor(ids, joined.ids)
            to_tensor(vals, joined.values)
            if gs[0].HasField("l2sum"):
                joined.l2sum = gs[0].l2sum
        return self.push(merged, wire.gradients_of(merged))

    @_handler
    def SetWeights(self, request, context):
        return pb.SetWeightsResponse(iterations=self.pushes.admin(request))

    @_handler
    def Checkpoint(self, request, context):
        if self.pushes.checkpoints is None:
            raise errors.FailedPrecondition("this server has no --data-dir, so it cannot write checkpoints")
        path, nbytes, its = self.pushes.checkpoints.save(request.path or None)
        return pb.CheckpointResponse(path=path, bytes=nbytes, iterations=wire.iterations_to_wire(its))

    @_handler
    def Evict(self, request, context):
        return pb.EvictResponse(evicted=self.pushes.evict(request.variable or None))

    def _sync(self):
        if self.pushes.sync is None:
            raise errors.FailedPrecondition("this server has no sync-mode support attached")
        return self.pushes.sync

    @_handler
    def SyncVote(self, request, context):
        """SYNC mode phase 2 (client -> shard 0); server/sync.py."""
        return self._sync().vote(request, wait_slot=lambda what: self.waiting("SyncVote", what))

    @_handler
    def SyncCommit(self, request, context):
        """SYNC mode commit (shard 0 -> every shard); server/sync.py."""
        return pb.SyncCommitResponse(iterations=self._sync().commit(request))


def _version():
    try:
        from importlib.metadata import version
        return version("sparseps")
    except Exception:
        return "unknown"
