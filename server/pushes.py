"""The path of a push from arrival to acknowledgement: exactly-once, logged, applied, durable.

    received -> decoded and validated (outside the lock; a bad push changes nothing)
             -> [shard lock] duplicate check -> write-ahead log append -> apply -> remember the answer
             -> wait until the log record is durable -> acknowledge

A push carries (client id, sequence). The answer to every applied push is remembered (a window of
recent sequences per client, saved in checkpoints and rebuilt from the log on restart), so a
retry of a push that was already applied gets the original answer and applies nothing.
"""
import collections
import logging
import struct
import threading
import time

import numpy as np

from sparseps import errors, frames
from sparseps.proto import sparseps_pb2 as pb

from . import wire
from .wal import seal

log = logging.getLogger("sparseps.server")

WINDOW = 512           # remembered answers per client (retries come for the last few pushes)
MAX_CLIENTS = 20_000   # remembered clients (least recently used forgotten first)


# Log record kinds: the first byte of each write-ahead-log payload.
PUSH, CREATE_OPTIMIZER, CREATE_VARIABLE, SET_WEIGHTS = b"P", b"O", b"V", b"W"
# An eviction of a dynamic variable's rows: [u32 name length][name utf-8][int64 keys], the keys it
# removed (an age policy depends on the clock, so replay removes the logged keys, not "the old ones").
EVICT = b"E"
# A data-plane push: [u32 length of the PushRequest][the PushRequest, tensors without bytes][the
# tensors' bytes in frames.tensors() order], logged from the received buffer without re-encoding.
FRAME_PUSH = b"F"
_U32 = struct.Struct("<I")


def frame_record(request: "pb.PushRequest", payload) -> list:
    """The log record parts of a data-plane push (request: its tensors' bytes left out)."""
    meta = request.SerializeToString()
    return [FRAME_PUSH + _U32.pack(len(meta)) + meta, payload]


def _frame_request(payload: bytes):
    """(PushRequest, its tensors as arrays) of a FRAME_PUSH record's payload."""
    n = _U32.unpack_from(payload, 0)[0]
    request = pb.PushRequest.FromString(payload[4:4 + n])
    buf = np.frombuffer(payload, np.uint8, offset=4 + n)
    return request, iter(frames.views(buf, frames.layout(request, len(buf))))


def _create_optimizer(shard, request):
    return shard.create_optimizer(request.name, request.config_json, wire.consistency_from_wire(request.consistency))


def _create_variable(shard, request):
    return shard.create_variable(**wire.variable_spec(request))


def _set_weights(shard, request):
    return shard.set_weights(request.optimizer or None, request.iterations if request.set_iterations else None,
                             wire.weight_writes(request), dict(request.nonslot))


ADMIN = {  # request type -> (log kind, how it changes the shard)
    pb.CreateOptimizerRequest: (CREATE_OPTIMIZER, _create_optimizer),
    pb.CreateVariableRequest: (CREATE_VARIABLE, _create_variable),
    pb.SetWeightsRequest: (SET_WEIGHTS, _set_weights),
}
KINDS = {kind: (cls, fn) for cls, (kind, fn) in ADMIN.items()}


class PushPipeline:
    def __init__(self, shard, wal=None, metrics=None):
        self.shard = shard
        self.wal = wal
        self.metrics = metrics
        self.checkpoints = None
        self.sync = None                        # sync / bounded-staleness coordination, when present
        self.answers = collections.OrderedDict()  # client id -> OrderedDict(sequence -> (lsn, iterations))
        self.floors: dict[str, int] = {}         # client id -> highest sequence dropped from its window
        self.pushes_since_checkpoint = 0

    # ------------------------------------------------------------------ exactly-once
    def _remembered(self, client_id, sequence):
        """The answer of an applied push (client, sequence), or None if it is new. A sequence at or
        below the client's floor that is no longer in its window is refused rather than applied
        again: it was applied (and its answer forgotten), or it arrived after WINDOW later pushes."""
        seqs = self.answers.get(client_id)
        if seqs is None:
            return None
        hit = seqs.get(sequence)
        if hit is None and sequence <= self.floors.get(client_id, 0):
            raise errors.FailedPrecondition(
                f"push #{sequence} of client {client_id!r} is older than the last {WINDOW} pushes this shard "
                "remembers for that client: it was applied already, or arrived after them; it is not applied "
                "(again)")
        return hit

    def _remember(self, client_id, sequence, lsn, iterations):
        seqs = self.answers.get(client_id)
        if seqs is None:
            seqs = self.answers[client_id] = collections.OrderedDict()
            if len(self.answers) > MAX_CLIENTS:
                gone, _ = self.answers.popitem(last=False)
                self.floors.pop(gone, None)
        else:
            self.answers.move_to_end(client_id)
        seqs[sequence] = (lsn, dict(iterations))
        if len(seqs) > WINDOW:
            old, _ = seqs.popitem(last=False)
            self.floors[client_id] = max(self.floors.get(client_id, 0), old)

    def dedupe_state(self) -> dict:
        return {c: {"floor": self.floors.get(c, 0), "answers": [[s, lsn, its] for s, (lsn, its) in seqs.items()]}
                for c, seqs in self.answers.items()}

    def load_dedupe_state(self, state: dict):
        self.answers.clear()
        self.floors.clear()
        for c, entries in state.items():
            if isinstance(entries, dict):
                floor, entries = entries["floor"], entries["answers"]
            else:   # a checkpoint from before floors: the window of 4096 it kept
                floor = 0
            if len(entries) > WINDOW:
                floor = max(floor, max(s for s, _, _ in entries[:-WINDOW]))
                entries = entries[-WINDOW:]
            self.answers[c] = collections.OrderedDict((s, (lsn, its)) for s, lsn, its in entries)
            if floor:
                self.floors[c] = floor

    # ------------------------------------------------------------------ the push path
    def push(self, request, gradients, received: float, record=None, then=None) -> "pb.PushResponse":
        """record: the log record's parts when the caller has them (a data-plane push, frame_record);
        otherwise the request is serialized into the log. then: called right after the step, under
        the same hold of the shard lock (PushPull's pulls: no other step comes between); not called
        for a duplicate or a sync-mode prepare. Its exception is raised once the push is durable."""
        key = (request.client_id, request.sequence) if request.client_id else None
        if key is not None:
            hit = self._remembered(*key)
            if hit is not None:
                return self._duplicate(hit)
        by_opt = self.shard.decode_push(gradients, list(request.optimizers))
        if self.sync is not None and self.sync.handles(by_opt):
            return self.sync.push(request, by_opt, received)
        sealed = None
        if self.wal is not None:   # encoded and checksummed before the lock
            sealed = seal(*(record if record is not None else [PUSH + request.SerializeToString()]))
        queued = time.perf_counter()
        with self.shard.lock:
            if key is not None:
                hit = self._remembered(*key)
                if hit is not None:
                    return self._duplicate(hit)
            started = time.perf_counter()
            lsn = 0
            if self.wal is not None:
                self.shard.ensure_slots(by_opt)   # (out of memory here: refused before it is logged)
                lsn = self.wal.append(sealed=sealed)
            iterations = self.shard.apply(by_opt)
            if self.sync is not None and request.worker_id:
                self.sync.applied(request, by_opt)   # bounded staleness: the worker's clock
            if key is not None:
                self._remember(request.client_id, request.sequence, lsn, iterations)
            self.pushes_since_checkpoint += 1
            applied = time.perf_counter()
            failed = None
            if then is not None:
                try:
                    then()
                except Exception as e:   # the step stands (logged, remembered): answer after it is durable
                    failed = e
        if self.wal is not None:
            self.wal.wait_durable(lsn)
        if self.metrics is not None:
            self.metrics.push_done(by_opt, received=received, queued=queued, started=started, applied=applied,
                                   acked=time.perf_counter())
        if failed is not None:
            raise failed
        return wire.push_response(iterations)

    def _duplicate(self, hit):
        lsn, iterations = hit
        if self.wal is not None:
            self.wal.wait_durable(lsn)   # the first answer may still be waiting for its fsync
        if self.metrics is not None:
            self.metrics.duplicate()
        return wire.push_response(iterations, duplicate=True)

    def apply_logged(self, request: "pb.PushRequest", by_opt) -> dict:
        """Apply an already validated step (e.g. an aggregated sync step) through the log."""
        with self.shard.lock:
            lsn = self.wal.append(PUSH + request.SerializeToString()) if self.wal is not None else 0
            iterations = self.shard.apply(by_opt)
            self.pushes_since_checkpoint += 1
        if self.wal is not None:
            self.wal.wait_durable(lsn)
        return iterations

    def admin(self, request):
        """Create an optimizer or variable, or set weights: applied, then logged, then durable."""
        kind, fn = ADMIN[type(request)]
        with self.shard.lock:
            result = fn(self.shard, request)
            lsn = self.wal.append(kind + request.SerializeToString()) if self.wal is not None else 0
        if self.wal is not None:
            self.wal.wait_durable(lsn)
        return result

    def evict(self, variable: str | None = None) -> dict:
        """Run the age eviction of dynamic variables now; each removal is logged with its keys.
        Returns {variable: rows removed}."""
        lsn = 0
        with self.shard.lock:
            removed = self.shard.aged(variable)
            for name, keys in removed.items():   # logged before the rows go
                if self.wal is not None:
                    raw = name.encode()
                    lsn = self.wal.append(EVICT + _U32.pack(len(raw)) + raw,
                                          np.ascontiguousarray(keys, "<i8").tobytes())
                self.shard.evict_keys(name, keys)
        if lsn:
            self.wal.wait_durable(lsn)
        return {name: len(keys) for name, keys in removed.items()}

    # ------------------------------------------------------------------ recovery
    def replay(self, after_lsn: int) -> int:
        """Re-apply every logged push after the checkpoint; returns how many."""
        count = 0
        for lsn, payload in self.wal.replay(after_lsn):
            try:
                count += self.apply_record(lsn, payload)
            except errors.Error as e:   # cannot happen for a record that was accepted once
                log.error("write-ahead log record %d no longer applies (%s); stopping replay", lsn, e)
                break
        return count

    def apply_record(self, lsn: int, payload: bytes) -> int:
        """Apply one logged record as its first apply did (replay, and a follower applying its
        leader's records: server/replication.py); 1 for a push, 0 for anything else."""
        kind, payload = payload[:1], payload[1:]
        if kind == FRAME_PUSH:
            request, arrays = _frame_request(payload)
            grads = wire.gradients_of(request, arrays)
        elif kind == PUSH:
            request = pb.PushRequest.FromString(payload)
            grads = wire.gradients_of(request)
        elif kind == EVICT:
            n = _U32.unpack_from(payload, 0)[0]
            self.shard.evict_keys(payload[4:4 + n].decode(), np.frombuffer(payload, np.int64, offset=4 + n))
            return 0
        else:
            cls, fn = KINDS[kind]
            fn(self.shard, cls.FromString(payload))
            return 0
        by_opt = self.shard.decode_push(grads, list(request.optimizers))
        iterations = self.shard.apply(by_opt)
        if self.sync is not None and request.worker_id:
            self.sync.applied(request, by_opt)
        if request.client_id:
            self._remember(request.client_id, request.sequence, lsn, iterations)
        return 1

    def checkpoint_extra(self) -> dict:
        """Saved with each checkpoint (called under the shard lock: consistent with the state)."""
        self.pushes_since_checkpoint = 0
        return {"wal_lsn": self.wal.lsn if self.wal is not None else 0, "dedupe": self.dedupe_state(),
                "sync": self.sync.checkpoint_state() if self.sync is not None else {}}

    def checkpoint_saved(self, extra: dict):
        if self.wal is not None:
            with self.shard.lock:
                self.wal.rotate(extra["wal_lsn"])

    # ------------------------------------------------------------------ waiting for steps
    def wait_for(self, variable: str, min_iterations: int, timeout: float):
        """Block a pull until the variable's optimizer has applied `min_iterations` steps."""
        var = self.shard.variable(variable)
        if not var.optimizer:
            return
        opt = self.shard.optimizer(var.optimizer)
        timeout = timeout or 60.0
        with self.shard.step_cond:
            if not self.shard.step_cond.wait_for(lambda: opt.iterations >= min_iterations, timeout):
                raise errors.DeadlineExceeded(
                    f"pull of {variable!r}: optimizer {opt.name!r} is at step {opt.iterations}, "
                    f"still short of {min_iterations} after {timeout} s")


class PeriodicEviction:
    """Runs each dynamic variable's age eviction every `interval_seconds` of its policy."""

    def __init__(self, pipeline: PushPipeline, tick: float = 0.5):
        self.pipeline, self.tick = pipeline, tick
        self._stop = threading.Event()
        self._last: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="evictor", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            for name, var in list(self.pipeline.shard.variables.items()):
                pol = var.table.policy if var.table is not None else None
                if pol is None or not pol.ages:
                    continue
                last = self._last.setdefault(name, now)
                if now - last < pol.interval_seconds:
                    continue
                self._last[name] = now
                try:
                    self.pipeline.evict(name)
                except Exception:   # e.g. the log failing: try again next interval
                    log.exception("scheduled eviction of %r failed; the shard keeps serving", name)

    def stop(self):
        self._stop.set()
        self._thread.join(10)


class PeriodicCheckpoints:
    """Checkpoint every N pushes and/or every T seconds, in the background."""

    def __init__(self, pipeline: PushPipeline, every_steps: int = 0, every_seconds: float = 0.0):
        self.pipeline, self.every_steps, self.every_seconds = pipeline, every_steps, every_seconds
        self._stop = threading.Event()
        self._thread = None
        if every_steps > 0 or every_seconds > 0:
            self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
            self._thread.start()

    def _run(self):
        last = time.monotonic()
        while not self._stop.wait(0.2):
            due_steps = self.every_steps > 0 and self.pipeline.pushes_since_checkpoint >= self.every_steps
            due_time = self.every_seconds > 0 and time.monotonic() - last >= self.every_seconds \
                and self.pipeline.pushes_since_checkpoint > 0
            if due_steps or due_time:
                try:
                    self.pipeline.checkpoints.save()
                except errors.Error as e:
                    log.error("%s", e)
                except Exception:   # e.g. MemoryError copying a big shard: keep checkpointing later
                    log.exception("periodic checkpoint failed; the shard keeps serving")
                last = time.monotonic()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
