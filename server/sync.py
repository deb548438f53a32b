"""SYNC and BOUNDED consistency: the two-phase commit of a sync step, and stale-synchronous clocks.

SYNC mode (TF1 SyncReplicasOptimizer; docs/consistency.md has the full contract)

    client                      every shard (participant)          shard 0 (coordinator)
    push(step=t) --PREPARE--->  validate, log, store; no apply
                 <--prepared--
    all prepared --SyncVote(t, replica)--------------------------->  admit the first N replicas of t
                                                                     log the decision (WAL)
                                <--SyncCommit(t, replicas)---------  to every shard, itself included
                                aggregate the N prepared parts,
                                apply through the push pipeline
                                (logged, replayed like any push)
                 <--admitted: iterations t+1 (after every shard applied) or stale--

A step is applied on every shard or on none: nothing is applied before the coordinator has the
N-th vote, and a vote is only sent once the replica's part is prepared on every shard. After the
decision is durable, the coordinator drives the commit to completion (retrying unreachable
shards in the background, and again after a restart from its log).

BOUNDED mode (stale synchronous parallel): a worker's clock is the number of its pushes (pushes
carrying its worker_id) this shard has applied; a pull carrying worker_id waits until the slowest
known worker is at most `staleness` pushes behind the puller.
"""
import collections
import contextlib
import logging
import math
import os
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from sparseps import errors
from sparseps.proto import sparseps_pb2 as pb
from sparseps.proto import sparseps_pb2_grpc as pb_grpc
from sparseps.tensors import to_tensor

from . import pushes, wire

log = logging.getLogger("sparseps.server")

# Write-ahead-log record kinds (the first payload byte, next to pushes.PUSH and the admin kinds).
PREPARE, DECISION = b"Q", b"D"
DECISIONS_KEPT = 256        # per optimizer: answers for retried votes of recent steps
COMMIT_RETRY_S = 10.0       # a commit round retries an unreachable shard this long before giving up
REDRIVE_EVERY_S = 1.0       # then the background re-driver tries again this often
DEFAULT_VOTE_WAIT_S = 60.0

_MANAGERS = {}              # id(shard) -> SyncManager (for write-ahead-log replay)


def _key(ref) -> tuple:
    return (ref.client_id, int(ref.sequence))


def _ref(key) -> "pb.ReplicaRef":
    return pb.ReplicaRef(client_id=key[0], sequence=key[1])


def _no_slot(what):
    """A wait that takes no slot (the service passes its limit on waiting threads instead)."""
    return contextlib.nullcontext()


class _Prepared:
    __slots__ = ("step", "request")

    def __init__(self, step, request):
        self.step, self.request = step, request


class _Coordinator:
    """Shard 0's view of one sync optimizer's steps (guarded by `cond`)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.admitted: dict[int, list] = {}                  # step -> replica keys, vote order
        self.decided = collections.OrderedDict()             # step -> admitted keys (recent)
        self.pending = None                                  # (step, keys): decided, not yet on every shard
        self.error = None                                    # why the pending commit has not completed
        self.redriver = None


class SyncManager:
    """The pipeline's `sync` hook: prepares, the coordinator, commits, bounded-staleness clocks."""

    def __init__(self, pipeline, cluster=(), credentials=None, metadata=None, max_message: int = 256 << 20):
        self.pipeline, self.shard = pipeline, pipeline.shard
        self.cluster = list(cluster)
        self.credentials, self.metadata, self.max_message = credentials, metadata, max_message
        self.prepares: dict[str, collections.OrderedDict] = {}   # optimizer -> key -> _Prepared
        self.decisions: dict[str, collections.OrderedDict] = {}  # optimizer -> step -> keys (logged)
        self.clocks: dict[str, dict] = {}                        # optimizer -> worker id -> pushes applied
        self.commit_lock = threading.Lock()
        self._coords: dict[str, _Coordinator] = {}
        self._coords_lock = threading.Lock()
        self._stubs = None
        self._pool = None
        # a replicated cluster (server/replication.py): shard k -> its leader's address, from etcd;
        # asked when the peers are first needed and again when a commit finds a shard gone
        self.locate = None
        _MANAGERS[id(self.shard)] = self

    # ------------------------------------------------------------------ helpers
    def _mode(self, opt_name: str) -> str:
        opt = self.shard.optimizers.get(opt_name)
        return opt.consistency.get("mode", "async") if opt is not None else "async"

    def _sync_optimizer(self, name: str):
        opt = self.shard.optimizer(name)
        if opt.consistency.get("mode") != "sync":
            raise errors.FailedPrecondition(f"optimizer {name!r} is not in sync mode "
                                            f"(it is {opt.consistency.get('mode', 'async')})")
        return opt

    def _gc(self, name: str, iterations: int):
        """Forget prepares of steps that are already applied (caller holds the shard lock)."""
        table = self.prepares.get(name)
        if table:
            for key in [k for k, p in table.items() if p.step < iterations]:
                del table[key]

    def _capacity(self, opt) -> int:
        return max(64, 4 * int(opt.consistency.get("total_num_replicas") or 1))

    # ------------------------------------------------------------------ pipeline hook: phase 1
    def handles(self, optimizer_names) -> bool:
        """Whether any of these optimizers is in sync mode (a push to it is a prepare)."""
        return any(self._mode(o) == "sync" for o in optimizer_names)

    def push(self, request, by_opt, received: float) -> "pb.PushResponse":
        """PREPARE: validate (done by the caller), log and store a replica's part of step `request.step`."""
        names = [o for o in by_opt if self._mode(o) == "sync"]
        if len(by_opt) > 1:
            others = sorted(o for o in by_opt if o != names[0])
            raise errors.InvalidArgument(
                f"push: optimizer {names[0]!r} is in sync mode; a push to it may not also carry variables "
                f"of other optimizers ({others}): push them separately")
        name = names[0]
        if not request.client_id:
            raise errors.InvalidArgument("sync mode: a push needs client_id and sequence (the sparseps client "
                                         "sets them)")
        key, step = (request.client_id, int(request.sequence)), int(request.step)
        shard, wal = self.shard, self.pipeline.wal
        lsn = 0
        with shard.lock:
            opt = shard.optimizer(name)
            it = opt.iterations
            self._gc(name, it)
            if step < it:
                return wire.push_response({name: it}, stale=True)
            if step > it + 1:
                raise errors.FailedPrecondition(
                    f"sync push for step {step}: optimizer {name!r} is at step {it} on shard {shard.index}; "
                    f"compute on the state of step {it} (pull with min_iterations={it}) and push with step={it}")
            table = self.prepares.setdefault(name, collections.OrderedDict())
            if key in table:   # a retried prepare
                return wire.push_response({name: it}, prepared=True, duplicate=True)
            if len(table) >= self._capacity(opt):
                raise errors.ResourceExhausted(
                    f"sync optimizer {name!r}: {len(table)} prepared pushes are waiting for their steps on shard "
                    f"{shard.index}; raise total_num_replicas or let the workers catch up")
            if wal is not None:
                lsn = wal.append(PREPARE + request.SerializeToString())
            table[key] = _Prepared(step, request)
        if wal is not None:
            wal.wait_durable(lsn)
        return wire.push_response({name: it}, prepared=True)

    # ------------------------------------------------------------------ participant: phase 2
    def commit(self, request) -> int:
        """COMMIT(step, replicas): apply the aggregate of the replicas' prepared parts as one step."""
        name, step = request.optimizer, int(request.step)
        keys = [_key(r) for r in request.replicas]
        shard = self.shard
        with self.commit_lock:
            with shard.lock:
                opt = self._sync_optimizer(name)
                if opt.iterations > step:
                    return opt.iterations          # already applied (a re-driven commit)
                if opt.iterations < step:
                    raise errors.FailedPrecondition(
                        f"shard {shard.index} is at step {opt.iterations} of {name!r} and cannot commit step {step}")
                if not keys:
                    raise errors.InvalidArgument(f"commit of step {step} of {name!r} names no replicas")
                table = self.prepares.get(name, {})
                for k in keys:
                    p = table.get(k)
                    if p is None or p.step != step:
                        raise errors.FailedPrecondition(
                            f"shard {shard.index} has no prepared push of replica {k[0]}#{k[1]} for step {step} of "
                            f"{name!r} (was its state lost?); the step cannot be committed here")
                entries = [table[k] for k in keys]
            agg = self.aggregate(opt, step, entries)
            by_opt = shard.decode_push(wire.gradients_of(agg), [name])
            iterations = self.pipeline.apply_logged(agg, by_opt)[name]
            with shard.lock:
                self._gc(name, opt.iterations)
        return iterations

    def aggregate(self, opt, step: int, entries: list) -> "pb.PushRequest":
        """The step's gradient: the replicas' parts summed (duplicate ids too) and, when averaging,
        divided as TF's accumulators do: a dense sum by N, a sparse row by the replicas that have it."""
        n = len(entries)
        average = bool(opt.consistency.get("average"))
        by_var = collections.OrderedDict()
        for e in entries:
            for name, ids, values, _ in wire.gradients_of(e.request):
                by_var.setdefault(name, []).append((ids, values))
        out = pb.PushRequest(optimizers=[opt.name], step=step)
        for name, items in by_var.items():
            var = self.shard.variable(name)
            dt = var.dtype
            if any(ids is None for ids, _ in items):
                acc = np.zeros((var.local_rows,) + tuple(var.shape[1:]), dt)
                for ids, values in items:
                    if ids is None:
                        acc += values.astype(dt, copy=False)
                    else:
                        np.add.at(acc, var.local_ids(ids, "sync aggregate"), values.astype(dt, copy=False))
                if average:
                    acc /= dt.type(n)
                out.gradients.append(pb.Gradient(variable=name, values=to_tensor(acc)))
                continue
            row = tuple(var.shape[1:])
            fused = self.shard.bk.kernel("replica_sum")
            # (the fused sum indexes by id: a dynamic variable's int64 keys take the numpy path)
            if fused is not None and var.table is None and sum(len(i) for i, _ in items):   # same bits, ~50x faster
                d = int(np.prod(row, dtype=np.int64))
                uniq, acc = fused([(i, v.astype(dt, copy=False).reshape(len(i), d)) for i, v in items], average)
                out.gradients.append(pb.Gradient(variable=name, ids=to_tensor(uniq),
                                                 values=to_tensor(acc.reshape((len(uniq),) + row))))
                continue
            ids = np.concatenate([i.astype(np.int64, copy=False) for i, _ in items])
            values = np.concatenate([v.astype(dt, copy=False) for _, v in items]).reshape((len(ids),) + row)
            if len(ids):
                # TF's SparseConditionalAccumulator order: the first row copied, each later one
                # added to the running sum, in (replica, input) order
                uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
                acc = values[first]
                later = np.ones(len(ids), bool)
                later[first] = False
                np.add.at(acc, inv.reshape(-1)[later], values[later])
            else:
                uniq, acc = ids, values
            if average:
                # TF's SparseConditionalAccumulator averages element-wise: each row is divided by
                # the number of replica gradients that contain it, not by N.
                seen = np.concatenate([np.unique(i.astype(np.int64, copy=False)) for i, _ in items])
                u, counts = np.unique(seen, return_counts=True)
                count = counts[np.searchsorted(u, uniq)].astype(dt)
                acc = (acc / count.reshape((-1,) + (1,) * (acc.ndim - 1))).astype(dt, copy=False)
            out.gradients.append(pb.Gradient(variable=name, ids=to_tensor(uniq), values=to_tensor(acc)))
        return out

    # ------------------------------------------------------------------ coordinator
    def _coord(self, name: str) -> _Coordinator:
        with self._coords_lock:
            c = self._coords.get(name)
            if c is None:
                c = self._coords[name] = _Coordinator()
                for step, keys in self.decisions.get(name, {}).items():
                    c.decided[step] = list(keys)
            return c

    def vote(self, request, wait_slot=_no_slot) -> "pb.SyncVoteResponse":
        """A replica's push for `step` is prepared everywhere: admit it (or not), commit when N are in.
        wait_slot(what): a context held while waiting for the other votes (the service's limit on
        waiting threads); when it refuses, the vote stays recorded and the replica asks again."""
        shard = self.shard
        if shard.index != 0:
            raise errors.FailedPrecondition(f"shard {shard.index} is not the sync coordinator: send votes to shard 0")
        name, step, key = request.optimizer, int(request.step), _key(request.replica)
        opt = self._sync_optimizer(name)
        need = int(opt.consistency["replicas_to_aggregate"])
        if not math.isfinite(request.timeout_seconds) or request.timeout_seconds < 0:
            raise errors.InvalidArgument(f"sync vote for step {step} of {name!r}: timeout_seconds must be a finite "
                                         f"number >= 0, got {request.timeout_seconds}")
        wait = min(request.timeout_seconds or DEFAULT_VOTE_WAIT_S, DEFAULT_VOTE_WAIT_S * 60)
        deadline = time.monotonic() + wait
        c = self._coord(name)
        with c.cond:
            self._finish_pending(name, c)
            keys = c.decided.get(step)
            if keys is not None:
                return self._answer(name, step, key in keys, opt)
            it = opt.iterations
            if step < it:
                return self._answer(name, step, False, opt)
            if step > it:
                raise errors.FailedPrecondition(
                    f"sync vote for step {step}: optimizer {name!r} is at step {it}; push with step={it}")
            for old in [s for s in c.admitted if s < it]:
                del c.admitted[old]
            admitted = c.admitted.setdefault(step, [])
            if key not in admitted:
                with shard.lock:
                    p = self.prepares.get(name, {}).get(key)
                if p is None or p.step != step:
                    raise errors.FailedPrecondition(
                        f"replica {key[0]}#{key[1]} voted for step {step} of {name!r} but its push is not prepared "
                        "on shard 0: push it to every shard first")
                admitted.append(key)
            if len(admitted) >= need:
                self._decide(name, c, step, admitted[:need])
                self._finish_pending(name, c)
                return self._answer(name, step, True, opt)
            with wait_slot(f"sync vote for step {step} of {name!r} (recorded: {len(admitted)} of "
                                         f"{need} replicas have voted)"):
                while True:
                    keys = c.decided.get(step)
                    if keys is not None and (c.pending is None or c.pending[0] != step):
                        return self._answer(name, step, key in keys, opt)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        have = len(c.admitted.get(step, ())) if keys is None else need
                        why = f"; its commit is pending: {c.error}" if keys is not None else \
                            f": {have} of {need} replicas have voted"
                        raise errors.DeadlineExceeded(
                            f"sync step {step} of {name!r} was not committed within {wait:g} s{why} (this vote "
                            "stays counted: pushing the same step again from the same client is safe)")
                    c.cond.wait(left)

    def _answer(self, name, step, admitted: bool, opt) -> "pb.SyncVoteResponse":
        if admitted:
            return pb.SyncVoteResponse(iterations=step + 1)
        if self.pipeline.metrics is not None and hasattr(self.pipeline.metrics, "stale_dropped"):
            self.pipeline.metrics.stale_dropped(name)
        return pb.SyncVoteResponse(stale=True, iterations=max(step + 1, opt.iterations))

    def _decide(self, name: str, c: _Coordinator, step: int, keys: list):
        """Make the decision durable (caller holds c.cond), then mark it pending."""
        wal = self.pipeline.wal
        lsn = 0
        with self.shard.lock:
            if wal is not None:
                record = pb.PushRequest(optimizers=[name], step=step, replicas=[_ref(k) for k in keys])
                lsn = wal.append(DECISION + record.SerializeToString())
            self._remember_decision(name, step, keys)
        if wal is not None:
            wal.wait_durable(lsn)
        c.admitted.pop(step, None)
        c.decided[step] = list(keys)
        while len(c.decided) > DECISIONS_KEPT:
            c.decided.popitem(last=False)
        c.pending, c.error = (step, list(keys)), None

    def _remember_decision(self, name, step, keys):
        table = self.decisions.setdefault(name, collections.OrderedDict())
        table[step] = list(keys)
        while len(table) > DECISIONS_KEPT:
            table.popitem(last=False)

    def _peers(self):
        with self._coords_lock:
            return self._make_peers()

    def _make_peers(self):
        if self._stubs is None:
            n = self.shard.num_shards
            if self.locate is not None:
                self.cluster = [self.locate(k) for k in range(n)]
                missing = [k for k, a in enumerate(self.cluster) if not a]
                if missing:
                    raise errors.Unavailable(f"sync mode: shards {missing} have no leader right now")
            if n > 1 and len(self.cluster) != n:
                raise errors.FailedPrecondition(
                    f"sync mode on {n} shards needs the coordinator (shard 0) to reach every shard: start each "
                    "server with --cluster ADDR0,ADDR1,... (sparseps cluster up and start_cluster do)")
            stubs = {k: self._stub(addr) for k, addr in enumerate(self.cluster) if k != self.shard.index}
            self._pool = futures.ThreadPoolExecutor(max_workers=max(1, n), thread_name_prefix="sync-commit")
            self._stubs = stubs
        return self._stubs

    def _stub(self, addr):
        options = [("grpc.max_receive_message_length", self.max_message),
                   ("grpc.max_send_message_length", self.max_message)]
        ch = grpc.secure_channel(addr, self.credentials, options) if self.credentials else \
            grpc.insecure_channel(addr, options)
        return pb_grpc.ParameterServerStub(ch)

    def _relocate(self, k):
        """A replicated cluster: point shard k's stub at its current leader."""
        addr = self.locate(k) if self.locate is not None else None
        if addr and addr != self.cluster[k]:
            self.cluster[k], self._stubs[k] = addr, self._stub(addr)

    def _commit_on(self, k, request, deadline):
        if k == self.shard.index:
            return self.commit(request)
        delay = 0.05
        while True:
            try:
                # a hung shard costs the round at most its deadline (a commit that takes longer is
                # applied anyway; the re-driver's next send is answered at once)
                timeout = max(1.0, min(30.0, deadline - time.monotonic()))
                return self._stubs[k].SyncCommit(request, timeout=timeout, metadata=self.metadata).iterations
            except grpc.RpcError as e:
                err = errors.from_rpc_error(e)
                if err.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or \
                        time.monotonic() + delay > deadline:
                    raise type(err)(f"commit on shard {k} ({self.cluster[k]}): {err.message}", err.code) from None
                self._relocate(k)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _finish_pending(self, name: str, c: _Coordinator, retry_s: float = COMMIT_RETRY_S):
        """Send the pending decision's COMMIT to every shard (caller holds c.cond); raise if it fails.

        Once a first round has failed, the re-driver owns the decision and resends it without the
        lock; a vote then hears UNAVAILABLE at once instead of each vote holding the coordinator
        (and a server thread) for another round while a shard is down."""
        if c.pending is None:
            return
        step = c.pending[0]
        try:
            self._peers()
        except errors.Error as e:   # no --cluster: nothing to re-drive until the server is restarted right
            c.error = e.message
            raise
        if c.error is not None and c.redriver is not None and c.redriver.is_alive():
            raise errors.Unavailable(f"sync step {step} of {name!r} is decided but not yet applied on every shard "
                                     f"({c.error}); it is being re-sent: retry shortly")
        try:
            self._send_commit(name, c.pending, retry_s)
        except errors.Error as e:
            c.error = e.message
            log.error("sync step %d of %r is decided but not yet applied everywhere: %s (retrying)", step, name,
                      c.error)
            self._start_redriver(name, c)
            raise type(e)(f"sync step {step} of {name!r} is decided and will be applied on every shard, but "
                          f"not all have it yet: {c.error}", e.code) from None
        c.pending, c.error = None, None
        c.cond.notify_all()

    def _send_commit(self, name: str, pending: tuple, retry_s: float):
        """COMMIT (step, replicas) on every shard in parallel; raise one error naming every failure."""
        step, keys = pending
        request = pb.SyncCommitRequest(optimizer=name, step=step, replicas=[_ref(k) for k in keys])
        self._peers()
        deadline = time.monotonic() + retry_s
        jobs = {k: self._pool.submit(self._commit_on, k, request, deadline) for k in range(self.shard.num_shards)}
        failures = []
        for k, job in jobs.items():
            try:
                job.result()
            except errors.Error as e:
                failures.append(e)
            except Exception as e:   # a bug: report it, keep the decision pending
                log.exception("commit of step %d of %r on shard %d failed", step, name, k)
                failures.append(errors.Internal(f"commit on shard {k}: {type(e).__name__}: {e}"))
        if failures:
            raise type(failures[0])("; ".join(f.message for f in failures), failures[0].code)

    def _start_redriver(self, name: str, c: _Coordinator):
        """Resend the pending decision every REDRIVE_EVERY_S until every shard has it (caller holds
        c.cond); the rounds run without the lock, so votes are answered meanwhile."""
        if c.redriver is not None and c.redriver.is_alive():
            return

        def loop():
            while True:
                time.sleep(REDRIVE_EVERY_S)
                with c.cond:
                    pending = c.pending
                if pending is None:
                    return
                try:
                    self._send_commit(name, pending, REDRIVE_EVERY_S)
                except errors.Error as e:
                    with c.cond:
                        if c.pending == pending:
                            c.error = e.message
                    continue
                with c.cond:
                    if c.pending == pending:
                        c.pending, c.error = None, None
                        c.cond.notify_all()
                log.info("sync step %s of %r is now applied on every shard", pending[0], name)
                return
        c.redriver = threading.Thread(target=loop, name=f"sync-redrive-{name}", daemon=True)
        c.redriver.start()

    def start(self):
        """After restore and replay: the coordinator re-sends the last decision of each optimizer
        (shards that already applied it answer at once), in the background."""
        if self.shard.index != 0:
            return
        for name, table in self.decisions.items():
            if not table:
                continue
            step = next(reversed(table))
            c = self._coord(name)
            with c.cond:
                c.pending = (step, list(table[step]))
                c.error = "re-sending after a restart"
                self._start_redriver(name, c)

    # ------------------------------------------------------------------ bounded staleness
    def applied(self, request, by_opt):
        """After a push was applied (caller holds the shard lock): advance its worker's clock."""
        w = request.worker_id
        if not w:
            return
        with self.shard.step_cond:   # re-entrant: the push path holds it already, replay does not
            for o in by_opt:
                if self._mode(o) == "bounded":
                    clocks = self.clocks.setdefault(o, {})
                    clocks[w] = clocks.get(w, 0) + 1
            self.shard.step_cond.notify_all()

    def wait_bounded(self, variable: str, worker_id: str, timeout: float, wait_slot=_no_slot):
        """Hold a pull of `worker_id` until the slowest worker is within `staleness` pushes of it.
        wait_slot(what): a context held while waiting (the service's limit on waiting threads)."""
        var = self.shard.variable(variable)
        if not var.optimizer or self._mode(var.optimizer) != "bounded":
            return
        opt = self.shard.optimizers[var.optimizer]
        s = int(opt.consistency.get("staleness", 0))
        expected = int(opt.consistency.get("total_num_replicas") or 0)
        timeout = timeout or DEFAULT_VOTE_WAIT_S
        cond = self.shard.step_cond
        with cond:
            clocks = self.clocks.setdefault(opt.name, {})
            if worker_id not in clocks:
                clocks[worker_id] = 0
                cond.notify_all()

            def slowest():
                if expected and len(clocks) < expected:
                    return "(a worker not seen yet)", 0
                w = min(clocks, key=clocks.get)
                return w, clocks[w]

            def within():
                return slowest()[1] >= clocks[worker_id] - s
            if within():
                return
            with wait_slot(f"pull of {variable!r} by worker {worker_id!r} (bounded staleness)"):
                waited = cond.wait_for(within, timeout)
            if not waited:
                w, c = slowest()
                raise errors.DeadlineExceeded(
                    f"pull of {variable!r} by worker {worker_id!r} at clock {clocks[worker_id]}: the slowest worker "
                    f"{w} is at clock {c}, more than staleness {s} behind, after {timeout:g} s "
                    f"({len(clocks)} worker(s) known{f', {expected} expected' if expected else ''})")

    # ------------------------------------------------------------------ durability
    def replay_prepare(self, request):
        name, step = (request.optimizers[0] if request.optimizers else ""), int(request.step)
        by_opt = self.shard.decode_push(wire.gradients_of(request), list(request.optimizers))
        for o in by_opt:
            if self._mode(o) == "sync":
                name = o
        opt = self.shard.optimizers.get(name)
        if opt is not None and step >= opt.iterations:
            self.prepares.setdefault(name, collections.OrderedDict())[(request.client_id, int(request.sequence))] = \
                _Prepared(step, request)

    def replay_decision(self, request):
        self._remember_decision(request.optimizers[0], int(request.step), [_key(r) for r in request.replicas])

    def checkpoint_state(self) -> dict:
        """JSON-able state saved with a checkpoint (caller holds the shard lock): prepares still waiting
        for their step, recent decisions (coordinator) and bounded-staleness clocks."""
        import base64
        for name, table in self.prepares.items():
            opt = self.shard.optimizers.get(name)
            if opt is not None:
                self._gc(name, opt.iterations)
        return {
            "prepares": {name: [base64.b64encode(p.request.SerializeToString()).decode() for p in table.values()]
                         for name, table in self.prepares.items() if table},
            "decisions": {name: [[s, [list(k) for k in keys]] for s, keys in table.items()]
                          for name, table in self.decisions.items() if table},
            "clocks": {name: dict(c) for name, c in self.clocks.items() if c},
        }

    def load_state(self, state: dict):
        import base64
        for name, payloads in (state or {}).get("prepares", {}).items():
            for b in payloads:
                self.replay_prepare(pb.PushRequest.FromString(base64.b64decode(b)))
        for name, entries in (state or {}).get("decisions", {}).items():
            for step, keys in entries:
                self._remember_decision(name, int(step), [(k[0], int(k[1])) for k in keys])
        for name, c in (state or {}).get("clocks", {}).items():
            self.clocks[name] = {w: int(v) for w, v in c.items()}


def _replay(method):
    def fn(shard, request):
        manager = _MANAGERS.get(id(shard))
        if manager is None:
            raise errors.FailedPrecondition("a sync-mode log record was found but no sync manager is attached")
        return getattr(manager, method)(request)
    return fn


pushes.KINDS[PREPARE] = (pb.PushRequest, _replay("replay_prepare"))
pushes.KINDS[DECISION] = (pb.PushRequest, _replay("replay_decision"))


def attach(pipeline, args=None) -> SyncManager:
    """Give the pipeline its sync hook; peers come from --cluster (TLS and a token as for clients)."""
    from .auth import peer_credentials
    cluster = [a for a in (getattr(args, "cluster", "") or "").split(",") if a]
    credentials = peer_credentials(args)
    token = os.environ.get("SPARSEPS_PEER_TOKEN")
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    max_message = (getattr(args, "max_message_mb", 256) or 256) << 20
    pipeline.sync = SyncManager(pipeline, cluster, credentials, metadata, max_message)
    return pipeline.sync
