"""Log shipping: a shard's replicas hold the same write-ahead log, and so the same state.

The model is Kafka's (acks=all with min.insync.replicas, leader epochs, KIP-101 truncation):

  leader    appends a push's record to its log and applies it (server/pushes.py, unchanged), then
            acknowledges only when every member of the in-sync set has the record durable and the
            set has at least --min-insync-replicas members (itself included); otherwise UNAVAILABLE.
  follower  fetches records after its own log end from the leader (a long poll; the next fetch
            is the acknowledgement of what it made durable), appends them to its own log with the
            same LSNs and applies them through the same PushPipeline.apply_record, so variables,
            slots, step counters and the exactly-once window are bit-identical to the leader's.
  serving   follows the same way, never counts toward the in-sync set, never leads, refuses
            writes with FAILED_PRECONDITION.

Why each rule (docs/replication.md has the whole list):
  * epoch = the etcd revision that created the leader key (server/coordination.py). A fetch
    carries the epoch its sender follows; a leader refuses any other, and one that sees a newer
    epoch knows it was deposed. A deposed leader re-executes itself: its memory may hold records
    no other replica has, and the only sound way to drop them is to rebuild from its log after
    truncating it.
  * the in-sync set lives in etcd and only its members may campaign, and a leader shrinks it in
    etcd before it acknowledges without a member: so whoever leads next has every acknowledged
    record.
  * every replica keeps an epoch history (epoch, first LSN written under it). A follower's first
    fetch from a new leader sends (its log end, the epoch of its last record); the leader answers
    where that epoch ended in its own log, and the follower truncates anything past it: a tail the
    new leader never had was never acknowledged.
  * a leader acknowledges nothing once its lease may have expired (Coordinator.valid_until), so a
    paused leader is fenced even with --min-insync-replicas 1.
"""
import collections
import itertools
import json
import logging
import os
import queue
import shutil
import struct
import sys
import threading
import time
import uuid

import grpc

from sparseps import errors

from . import coordination
from .wal import fsync_path, seal

log = logging.getLogger("sparseps.server")

SERVICE = "sparseps.v1.Replication"
FETCH = f"/{SERVICE}/Fetch"
SNAPSHOT = f"/{SERVICE}/Snapshot"
CHUNK = 1 << 20          # snapshot file bytes per streamed message
WRITES = {"Push", "PushPull", "PushChunked", "CreateOptimizer", "CreateVariable", "SetWeights", "Evict",
          "SyncVote", "SyncCommit", "Checkpoint"}
_REC = struct.Struct("<QI")
_U32 = struct.Struct("<I")
BATCH_BYTES = 8 << 20     # records per fetch answer (at least one)
CACHE_BYTES = 64 << 20    # recent records the leader keeps in memory for fetches (older: read from disk)
WAIT_MS = 250             # a fetch with nothing new waits this long for a record
ARGV: list = []           # the server's own arguments, to re-execute itself (set by main)


# ---------------------------------------------------------------------------------- wire
def encode_batch(header: dict, records=()) -> bytes:
    """A fetch answer: [u32 n][n bytes of JSON header] then per record [u64 lsn][u32 len][payload]."""
    head = json.dumps(header).encode()
    parts = [_U32.pack(len(head)), head]
    for lsn, payload in records:
        parts += [_REC.pack(lsn, len(payload)), payload]
    return b"".join(parts)


def decode_batch(data: bytes) -> tuple:
    n = _U32.unpack_from(data, 0)[0]
    header = json.loads(data[4:4 + n])
    pos, records = 4 + n, []
    while pos < len(data):
        lsn, length = _REC.unpack_from(data, pos)
        pos += _REC.size
        records.append((lsn, data[pos:pos + length]))
        pos += length
    return header, records


def _request(data: bytes) -> dict:
    """A fetch request (JSON), checked: garbage is INVALID_ARGUMENT and changes nothing."""
    try:
        req = json.loads(data)
        ok = isinstance(req, dict) and all(isinstance(req.get(k), int) for k in ("shard", "epoch", "lsn")) \
            and isinstance(req.get("cluster"), str) and isinstance(req.get("id"), str) and req["lsn"] >= 0
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise errors.InvalidArgument("replication fetch: not a fetch request (JSON with cluster, shard, epoch, "
                                     "id and lsn); nothing was changed")
    return req


# ---------------------------------------------------------------------------------- epochs
class EpochHistory:
    """[(epoch, first LSN written under it)] of this replica's log, kept in DATA_DIR/epochs.json."""

    def __init__(self, path: str):
        self.path = path
        self.entries: list = []
        if os.path.exists(path):
            with open(path) as f:
                self.entries = [tuple(e) for e in json.load(f)]

    def _save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.entries, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_path(os.path.dirname(self.path))

    def epoch_at(self, lsn: int) -> int:
        """The epoch the record `lsn` was written under (0: before any)."""
        return max((e for e, start in self.entries if start <= lsn), default=0)

    def end_of(self, epoch: int, log_end: int) -> int:
        """The last LSN this log holds from `epoch` or earlier (KIP-101's end offset)."""
        later = [start for e, start in self.entries if e > epoch]
        return min(later) - 1 if later else log_end

    def start(self, epoch: int, first_lsn: int):
        """This log continues under `epoch` from `first_lsn` (entries of an older leader's for
        records this log never got are dropped)."""
        self.entries = [(e, s) for e, s in self.entries if e < epoch and s < first_lsn] + [(epoch, first_lsn)]
        self._save()

    def adopt(self, entries: list):
        """Take the leader's history (after any truncation): it names the epochs of the records
        this replica holds and of those it is about to fetch."""
        self.entries = [tuple(e) for e in entries]
        self._save()


# ---------------------------------------------------------------------------------- the log
class ReplicatedLog:
    """The pipeline's write-ahead log on a replicated shard: the local log, plus the replication
    rules at its two ends (append: only a leader with enough in-sync replicas writes; wait_durable:
    durable here and on every in-sync replica). Everything else is the local log's."""

    def __init__(self, wal, replica: "Replica"):
        self._wal = wal
        self.replica = replica

    def __getattr__(self, name):
        return getattr(self._wal, name)

    @property
    def lsn(self) -> int:
        """The last record applied to this replica's state (what a checkpoint covers): a follower
        logs records before it applies them (Replica._apply_loop); a leader, under one hold of
        the shard lock."""
        return self.replica.applied_lsn

    def append(self, *parts, sealed: tuple | None = None) -> int:
        self.replica.check_writable()   # raises before anything is logged or applied
        views, crc, length = sealed if sealed is not None else seal(*parts)
        lsn = self._wal.append(sealed=(views, crc, length))
        self.replica.appended(lsn, b"".join(views))
        return lsn

    def wait_durable(self, lsn: int, timeout: float = 30.0):
        self._wal.wait_durable(lsn, timeout)
        self.replica.wait_committed(lsn, timeout)


class Gate(grpc.ServerInterceptor):
    """gRPC writes reach only the leader: a follower answers UNAVAILABLE (a client re-resolves
    the leader and retries), a serving replica FAILED_PRECONDITION (it never takes writes)."""

    def __init__(self):
        self.replica = None

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        replica = self.replica
        if handler is None or replica is None or details.method.rsplit("/", 1)[-1] not in WRITES:
            return handler
        try:
            replica.check_role()
        except errors.Error as e:
            from .auth import _aborting_handler
            return _aborting_handler(handler, e.code, e.message)
        return handler


# ---------------------------------------------------------------------------------- the replica
def replica_id(data_dir: str) -> str:
    """This data directory's replica id (kept in it: a restart is the same replica, an empty
    directory is a new one and must catch up before it counts as in sync)."""
    path = os.path.join(data_dir, "replica-id")
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(uuid.uuid4().hex[:12])
        os.replace(tmp, path)
        fsync_path(data_dir)
    with open(path) as f:
        return f.read().strip()


class Replica:
    """One replica of a shard: leader, follower or serving, as etcd and the log decide."""

    def __init__(self, args, pipeline):
        self.cluster, self.shard_index, self.num_shards = args.cluster_name, args.shard_index, args.num_shards
        self.k = args.min_insync_replicas
        self.serving = args.role == "serving"
        self.role = "serving" if self.serving else "follower"
        self.lag_max = args.replica_lag_max_ms / 1000.0
        self.max_message = args.max_message_mb << 20
        from .auth import peer_credentials
        self.credentials = peer_credentials(args)   # TLS as the server's own; a token of the `replica` role:
        token = os.environ.get("SPARSEPS_REPLICA_TOKEN") or os.environ.get("SPARSEPS_PEER_TOKEN")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.data_dir = args.data_dir
        self.id = replica_id(args.data_dir)
        self.history = EpochHistory(os.path.join(args.data_dir, "epochs.json"))
        self.pipeline = pipeline
        self.wal = pipeline.wal
        self.applied_lsn = self.wal.lsn   # (after replay) the last record applied to the state
        self.applying = queue.Queue(maxsize=16)
        pipeline.wal = ReplicatedLog(self.wal, self)
        self.coord = coordination.Coordinator(args.coordinator, self.cluster, self.shard_index, self.id,
                                              args.lease_seconds, on_lost=lambda: self.restart("its etcd lease expired"))
        self.epoch = 0
        self.cond = threading.Condition()
        self.followers: dict = {}     # leader: id -> {"acked", "seen", "caught_up", "prev_end", "serving"}
        self.isr: set = set()
        self.cache = collections.deque()   # leader: (lsn, payload, bytes appended up to it) of recent records
        self.cache_bytes = 0
        self.appended_bytes = 0            # leader: record bytes appended since it began leading
        self.leader = None            # follower: the leader it follows (etcd value)
        self.lag_records, self.lag_bytes, self.behind_since = 0, 0, None
        self.failovers = 0
        self.address, self.data_port = "", 0
        self.ack_wait = None          # histogram of the waits for in-sync replicas (with --metrics-port)
        self._stop = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self, address: str, data_port: int):
        self.address, self.data_port = address, data_port
        for target, name in ((self._run, "replication"), (self._apply_loop, "replica-apply"),
                             (self._publish_loop, "replica-status")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self):
        self._stop.set()
        with self.cond:
            self.role = "stopped"
            self.cond.notify_all()
        self.coord.close(revoke=True)

    def restart(self, why: str):
        """Re-execute this server (same pid, arguments and data dir): its memory may hold records
        the shard's log no longer has; replay from the (truncated) log is the sound way back."""
        log.warning("replica %s of shard %d restarts: %s", self.id, self.shard_index, why)
        with self.cond:
            self.role = "deposed"
            self.cond.notify_all()
        try:
            self.coord.close(revoke=True)
        except Exception:
            pass
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, "-m", "sparseps.server", *ARGV])

    # ------------------------------------------------------------------ leader side
    def check_role(self):
        if self.role == "leader":
            return
        if self.serving:
            raise errors.FailedPrecondition(
                f"this is a serving replica of shard {self.shard_index} (read-only, --role serving): writes go to the "
                "leader (sparseps.connect('etcd://HOST:PORT/NAME'))")
        where = f" (the leader is {self.leader['address']})" if self.leader else ""
        raise errors.Unavailable(f"replica {self.id} is not the leader of shard {self.shard_index}{where}; retry on "
                                 "the leader")

    def check_writable(self):
        self.check_role()
        if not self.coord.holds_lease():
            raise errors.Unavailable(f"shard {self.shard_index}: this leader's etcd lease may have expired; it "
                                     "accepts nothing until it knows whether it still leads")
        if len(self.isr) < self.k:
            raise errors.Unavailable(self._too_few())

    def _too_few(self) -> str:
        return (f"shard {self.shard_index} has {len(self.isr)} in-sync replica(s), fewer than "
                f"--min-insync-replicas {self.k}: pushes are refused until a follower catches up")

    def appended(self, lsn: int, payload: bytes):
        self.applied_lsn = lsn   # (the caller applies it under the same hold of the shard lock)
        with self.cond:
            self.appended_bytes += len(payload)
            self.cache.append((lsn, payload, self.appended_bytes))
            self.cache_bytes += len(payload)
            while self.cache_bytes > CACHE_BYTES and len(self.cache) > 1:
                self.cache_bytes -= len(self.cache.popleft()[1])
            self.cond.notify_all()

    def _committed(self, lsn: int) -> bool:
        return all(self.followers.get(m, {}).get("acked", 0) >= lsn for m in self.isr if m != self.id)

    def commit_lsn(self) -> int:
        acked = [self.followers.get(m, {}).get("acked", 0) for m in self.isr if m != self.id]
        return min(acked + [self.wal.durable_lsn])

    def wait_committed(self, lsn: int, timeout: float):
        """Return once record `lsn` is on every in-sync replica (and they are at least K), or
        raise UNAVAILABLE: the record may then be applied here; a retry is answered exactly once."""
        started = time.monotonic()
        deadline = started + timeout
        with self.cond:
            while True:
                if self.role != "leader":
                    raise errors.Unavailable(
                        f"replica {self.id} stopped leading shard {self.shard_index} before record {lsn} was on enough "
                        "replicas: it may or may not be applied; a retry (same client id and sequence) on the new "
                        "leader is answered exactly once")
                if len(self.isr) < self.k:
                    raise errors.Unavailable(self._too_few())
                if self._committed(lsn):
                    break
                if time.monotonic() > deadline:
                    raise errors.Unavailable(f"shard {self.shard_index}: record {lsn} is not on every in-sync replica "
                                             f"after {timeout} s")
                self.cond.wait(0.05)
        if not self.coord.holds_lease():
            raise errors.Unavailable(f"shard {self.shard_index}: this leader's etcd lease may have expired before "
                                     f"record {lsn} was acknowledged; retry on the leader")
        if self.ack_wait is not None:
            self.ack_wait.observe(time.monotonic() - started)

    def fetch(self, data: bytes, context) -> bytes:
        """The Replication/Fetch handler (bytes in, bytes out: no generated code)."""
        try:
            return self._fetch(_request(data))
        except errors.Error as e:
            context.abort(e.code, e.message)

    def _check(self, req: dict) -> dict:
        """A replication request for this cluster, shard and epoch, sent to the leader (or refused)."""
        if req["cluster"] != self.cluster or req["shard"] != self.shard_index:
            raise errors.FailedPrecondition(
                f"replication request for cluster {req['cluster']!r} shard {req['shard']}; this is cluster "
                f"{self.cluster!r} shard {self.shard_index}")
        if self.role != "leader":
            raise errors.FailedPrecondition(f"replica {self.id} is not the leader of shard {self.shard_index}")
        if req["epoch"] != self.epoch:
            if req["epoch"] > self.epoch:
                threading.Thread(target=self.restart, args=(f"a follower follows epoch {req['epoch']}",)).start()
            raise errors.FailedPrecondition(f"replication request of epoch {req['epoch']}; this leader's epoch is "
                                            f"{self.epoch}")
        return req

    def snapshot(self, data: bytes, context):
        """Replication/Snapshot: the leader's latest checkpoint, for a replica whose log ends before
        the leader's oldest log segment. Streamed: a header, each file in chunks, then done."""
        try:
            self._check(_request(data))
            ckpts = self.pipeline.checkpoints
            path = ckpts.latest()
            if path is None or _checkpoint_lsn(path) + 1 < self.wal.first_lsn():
                path = ckpts.save()[0]
        except errors.Error as e:
            context.abort(e.code, e.message)
        yield encode_batch({"name": os.path.basename(path), "epochs": self.history.entries})
        for root, _, names in os.walk(path):
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, path)
                with open(full, "rb") as f:
                    while True:
                        chunk = f.read(CHUNK)
                        yield encode_batch({"file": rel}, [(0, chunk)])
                        if len(chunk) < CHUNK:
                            break
        yield encode_batch({"done": True})

    def _fetch(self, req: dict) -> bytes:
        self._check(req)
        end = self.wal.lsn
        if req.get("handshake"):
            return encode_batch({"truncate_to": min(req["lsn"], self.history.end_of(int(req.get("last_epoch", 0)), end)),
                                 "epochs": self.history.entries, "first_lsn": self.wal.first_lsn(), "lsn": end})
        lsn = req["lsn"]
        if lsn > end:
            raise errors.FailedPrecondition(f"follower at record {lsn} is ahead of this leader ({end}); handshake first")
        now = time.monotonic()
        with self.cond:
            f = self.followers.setdefault(req["id"], {"acked": 0, "seen": now, "caught_up": 0.0, "prev_end": 0})
            f.update(acked=lsn, seen=now, serving=bool(req.get("serving")))
            if lsn >= f["prev_end"]:
                f["caught_up"] = now
            f["prev_end"] = end
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.wal.lsn > lsn or self.role != "leader",
                               min(int(req.get("wait_ms", WAIT_MS)), 2000) / 1000.0)
            first = self.cache[0][0] if self.cache else None   # the cache holds consecutive LSNs
            cached = list(itertools.islice(self.cache, lsn + 1 - first, None)) \
                if first is not None and first <= lsn + 1 else None
            appended, in_cache = self.appended_bytes, self.cache_bytes
        header = {"epoch": self.epoch, "lsn": self.wal.lsn, "commit": self.commit_lsn()}
        if cached is not None:
            records = [(n, p) for n, p, _ in cached]
        elif lsn + 1 < self.wal.first_lsn():
            header["snapshot"] = True
            return encode_batch(header)
        else:   # older than the cache: from the log segments, where this follower's last read ended
            records, f["cursor"] = self.wal.read(lsn, BATCH_BYTES, f.get("cursor"))
        size, out = 0, []
        for rec in records:
            out.append(rec)
            size += len(rec[1])
            if size >= BATCH_BYTES:
                break
        # Bytes of log the follower still lacks after this answer: exact from the cache; from disk
        # (a follower more than CACHE_BYTES behind), at least the cache's bytes.
        header["behind_bytes"] = appended - cached[len(out) - 1][2] if cached and out else in_cache
        return encode_batch(header, out)

    def handler(self):
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Fetch": grpc.unary_unary_rpc_method_handler(self.fetch),
            "Snapshot": grpc.unary_stream_rpc_method_handler(self.snapshot)})

    def _maintain_isr(self):
        """Leader: drop members that fell behind for lag_max (in etcd first), add caught-up followers."""
        warned = 0.0
        while not self._stop.wait(0.1) and self.role == "leader":
            now = time.monotonic()
            with self.cond:
                late = {m for m in self.isr if m != self.id
                        and now - self.followers.get(m, {}).get("caught_up", 0) > self.lag_max}
                ready = {m for m, f in self.followers.items() if m not in self.isr and not f.get("serving")
                         and now - f["caught_up"] < self.lag_max / 2}
            if not late and not ready:
                continue
            members = (self.isr - late) | ready
            try:
                ok = self.coord.set_isr(self.epoch, members)
            except Exception as e:   # etcd unreachable: keep the set (and its waits) as it is
                if now - warned > 5.0:   # once in 5 s, not at every 0.1 s retry
                    warned = now
                    log.warning("cannot update the in-sync set in etcd (%s: %s); pushes wait meanwhile",
                                type(e).__name__, e)
                continue
            if not ok:
                self.restart(f"the leader key of epoch {self.epoch} is gone")
            log.info("shard %d in-sync set: %s (dropped %s, added %s)", self.shard_index, sorted(members),
                     sorted(late), sorted(ready))
            with self.cond:
                self.isr = members
                self.cond.notify_all()

    def _lead(self, epoch: int, old: dict | None):
        self.applying.join()   # every logged record applied before this replica takes writes
        with self.pipeline.shard.lock:
            self.history.start(epoch, self.wal.lsn + 1)
        members = {self.id}
        if old:
            members |= {m for m in old["members"] if m != old.get("leader") or m == self.id}
        if not self.coord.set_isr(epoch, members):
            self.restart("lost the leader key right after winning it")
        now = time.monotonic()
        with self.cond:
            self.epoch, self.isr, self.leader = epoch, members, None
            self.followers = {m: {"acked": 0, "seen": now, "caught_up": now, "prev_end": 0}
                              for m in members if m != self.id}
            self.cache.clear()
            self.cache_bytes = self.appended_bytes = 0
            self.role = "leader"
            self.cond.notify_all()
        self.failovers += 1
        self.lag_records, self.lag_bytes, self.behind_since = 0, 0, None
        try:
            self.coord.withdraw()
        except Exception:
            pass
        log.info("replica %s leads shard %d from record %d, epoch %d, in-sync %s", self.id, self.shard_index,
                 self.wal.lsn + 1, epoch, sorted(members))
        threading.Thread(target=self._maintain_isr, name="isr", daemon=True).start()
        if self.pipeline.sync is not None:
            self.pipeline.sync.start()   # shard 0: re-send a decided sync step the old leader may not have finished

    # ------------------------------------------------------------------ follower side
    def _run(self):
        leaderless_since = None
        while not self._stop.is_set() and self.role != "leader":
            try:
                leader = self.coord.leader()
            except Exception as e:
                log.warning("etcd unreachable (%s)", e)
                self._stop.wait(0.2)
                continue
            if leader is None:
                leaderless_since = leaderless_since or time.monotonic()
                if not self.serving:
                    self._try_elect(time.monotonic() - leaderless_since)
                self._stop.wait(0.05)
                continue
            leaderless_since = None
            if leader["id"] == self.id:   # the seat of this replica's previous life: wait for its lease to end
                self._stop.wait(0.1)
                continue
            try:
                self._follow(leader)
            except grpc.RpcError as e:
                log.debug("fetch from %s: %s", leader["address"], e.details() if hasattr(e, "details") else e)
                self._stop.wait(0.05)
            except errors.Error as e:   # e.g. this replica's log failing: try again, it may recover
                log.error("replica %s cannot follow %s: %s", self.id, leader["address"], e)
                self._stop.wait(1.0)
            except Exception as e:      # a record out of order, an answer it cannot read: rebuild
                log.exception("replica %s: following %s failed", self.id, leader["address"])
                self.restart(f"following {leader['address']} failed ({type(e).__name__}: {e})")

    def _try_elect(self, leaderless: float):
        isr, revision = self.coord.isr()
        if isr is not None and self.id not in isr["members"]:
            return   # out of sync: may lack acknowledged records, so never leader
        self.coord.propose(self.wal.lsn)
        self._stop.wait(0.1)   # the other in-sync replicas saw the leader key go within ~0.05 s: let them propose
        if self.coord.leader() is not None:
            return
        cands = [c for c in self.coord.candidates() if isr is None or c["id"] in isr["members"]]
        best = max(cands, key=lambda c: (c["lsn"], c["id"]), default=None)
        if best is not None and best["id"] != self.id and leaderless < 3 * self.coord.ttl:
            return   # a more complete in-sync replica campaigns first
        epoch = self.coord.campaign(self._info(), revision)
        if epoch:
            self._lead(epoch, isr)

    def _follow(self, leader: dict):
        limit = self.max_message + (1 << 20)
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        channel = grpc.secure_channel(leader["address"], self.credentials, options) if self.credentials else \
            grpc.insecure_channel(leader["address"], options)
        try:
            call = channel.unary_unary(FETCH)

            def fetch(body, timeout):
                return call(body, timeout=timeout, metadata=self.metadata)
            self.leader, self.epoch = leader, leader["epoch"]
            base = {"cluster": self.cluster, "shard": self.shard_index, "epoch": self.epoch, "id": self.id,
                    "serving": self.serving}
            timeout = WAIT_MS / 1000.0 + self.coord.ttl
            hs, _ = decode_batch(fetch(json.dumps(dict(base, handshake=True, lsn=self.wal.lsn,
                                                       last_epoch=self.history.epoch_at(self.wal.lsn))).encode(),
                                       timeout=timeout))
            if hs["truncate_to"] < self.wal.lsn:
                self._truncate_and_restart(hs["truncate_to"])
            if self.wal.lsn + 1 < hs["first_lsn"]:
                self._install_snapshot(channel, base)
            self.history.adopt(hs["epochs"])
            while not self._stop.is_set():
                data = fetch(json.dumps(dict(base, lsn=self.wal.durable_lsn, wait_ms=WAIT_MS)).encode(), timeout=timeout)
                header, records = decode_batch(data)
                if header.get("snapshot"):
                    self._install_snapshot(channel, base)
                self._apply(records)
                lag = header["lsn"] - self.wal.lsn
                self.lag_records = max(0, lag)
                self.lag_bytes = header.get("behind_bytes", 0) if lag > 0 else 0
                self.behind_since = (self.behind_since or time.monotonic()) if lag > 0 else None
        finally:
            channel.close()

    def _apply(self, records):
        """Log a batch and make it durable (the next fetch acknowledges it), then hand it to the
        applier: the acknowledgement does not wait for the optimizer steps."""
        if not records:
            return
        for lsn, payload in records:
            if lsn != self.wal.lsn + 1:
                raise RuntimeError(f"replication: record {lsn} after {self.wal.lsn}")
            self.wal.append(payload)
        self.wal.flush()
        self.applying.put(records)   # bounded: a follower that cannot apply as fast stops fetching

    def _apply_loop(self):
        """Apply logged records in log order, through the same PushPipeline.apply_record as replay."""
        shard = self.pipeline.shard
        while True:
            records = self.applying.get()
            try:
                with shard.lock:
                    for lsn, payload in records:
                        self.pipeline.apply_record(lsn, payload)
                        self.applied_lsn = lsn
                        self.pipeline.pushes_since_checkpoint += 1
            except Exception as e:   # its state no longer follows its log: rebuild from the log
                log.exception("replica %s cannot apply record %d", self.id, self.applied_lsn + 1)
                self.restart(f"applying record {self.applied_lsn + 1} failed ({e})")
            finally:
                self.applying.task_done()

    def _install_snapshot(self, channel, base: dict):
        """Replace this replica's checkpoints and log with the leader's latest checkpoint, then
        restart from it (and fetch the log after it)."""
        ckdir = os.path.join(self.data_dir, "checkpoints")
        stream = channel.unary_stream(SNAPSHOT)(json.dumps(dict(base, lsn=self.wal.lsn)).encode(), timeout=3600,
                                                metadata=self.metadata)
        header, _ = decode_batch(next(stream))
        log.info("shard %d: this replica's log ends before the leader's; installing its checkpoint %s",
                 self.shard_index, header["name"])
        tmp = os.path.join(self.data_dir, "snapshot.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        done = False
        for data in stream:
            part, records = decode_batch(data)
            if part.get("done"):
                done = True
                break
            path = os.path.join(tmp, part["file"])
            if os.path.relpath(path, tmp).startswith(".."):
                raise RuntimeError(f"snapshot file {part['file']!r} outside the checkpoint")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "ab") as f:
                f.write(records[0][1])
        if not done:
            raise RuntimeError("the snapshot stream ended early")
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
        self.wal.close()
        for _, seg in self.wal.segments():
            os.remove(seg)
        shutil.rmtree(ckdir, ignore_errors=True)
        os.makedirs(ckdir)
        os.replace(tmp, os.path.join(ckdir, header["name"]))
        fsync_path(ckdir)
        self.history.adopt(header["epochs"])
        self.restart(f"installed the leader's checkpoint {header['name']}")

    def _truncate_and_restart(self, lsn: int):
        """Drop a tail the leader does not have; a checkpoint past it means starting empty (as a new
        replica: the in-sync set must not count one that holds nothing)."""
        ckpts = self.pipeline.checkpoints
        latest = ckpts.latest() if ckpts is not None else None
        self.wal.close()
        if latest and _checkpoint_lsn(latest) > lsn:
            # Start empty, under a new replica id: an empty replica must not count as in sync.
            for name in os.listdir(self.data_dir):
                path = os.path.join(self.data_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        else:
            self.wal.truncate_after(lsn)
        self.restart(f"its log had records after {lsn} that the leader of epoch {self.epoch} does not have")

    def leader_address(self, shard: int) -> str | None:
        """The address of shard `shard`'s leader in this cluster, from etcd (None if none)."""
        try:
            value, _, _ = self.coord.etcd.get(coordination.shard_prefix(self.cluster, shard) + "leader")
        except Exception:
            return None
        return value["address"] if value else None

    # ------------------------------------------------------------------ status
    def _info(self) -> dict:
        return {"id": self.id, "shard": self.shard_index, "num_shards": self.num_shards, "address": self.address, "data_port": self.data_port,
                "pid": os.getpid()}

    def status(self) -> dict:
        lag_s = time.monotonic() - self.behind_since if self.behind_since else 0.0
        return dict(self._info(), role=self.role, epoch=self.epoch, lsn=self.wal.lsn, lag_records=self.lag_records,
                    lag_bytes=self.lag_bytes, lag_seconds=round(lag_s, 3), in_sync=len(self.isr) if self.role == "leader" else None,
                    failovers=self.failovers)

    def _publish_loop(self):
        while not self._stop.wait(0.5):
            try:
                self.coord.publish(self.status())
            except Exception:
                pass


ROLES = ("leader", "follower", "serving")


class _Collector:
    """Replication gauges, read at scrape time (docs/replication.md lists them)."""

    def __init__(self, replica: Replica, shard_label: str):
        self.r, self.sl = replica, shard_label

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        r, sl = self.r, self.sl
        st = r.status()
        role = GaugeMetricFamily("sparseps_replica_role", "1 for this replica's role", labels=["shard", "role"])
        for name in ROLES:
            role.add_metric([sl, name], 1 if st["role"] == name else 0)
        out = [role]
        for name, doc, value in (
                ("epoch", "Leader epoch this replica leads or follows (etcd revision)", st["epoch"]),
                ("log_end", "Last record in this replica's write-ahead log", st["lsn"]),
                ("lag_records", "Records this follower is behind its leader", st["lag_records"]),
                ("lag_bytes", "Bytes of log records this follower is behind its leader", st["lag_bytes"]),
                ("lag_seconds", "Seconds since this follower was last caught up (0 when it is)", st["lag_seconds"]),
                ("in_sync", "Leader: replicas in the in-sync set, itself included (0 elsewhere)", st["in_sync"] or 0),
                ("min_insync", "--min-insync-replicas", r.k)):
            g = GaugeMetricFamily(f"sparseps_replica_{name}", doc, labels=["shard"])
            g.add_metric([sl], value)
            out.append(g)
        c = CounterMetricFamily("sparseps_replica_failovers", "Times this replica took over as its shard's leader "
                                "(each an election it won, at a new epoch)", labels=["shard"])
        c.add_metric([sl], r.failovers)
        return out + [c]


def register_metrics(replica: Replica, metrics):
    """Add the replication metrics to a shard's registry (server/metrics.py)."""
    from prometheus_client import Histogram

    from .metrics import PUSH_BUCKETS
    replica.ack_wait = Histogram("sparseps_replication_ack_wait_seconds",
                                 "Leader: a push's wait, after it is durable here, for every in-sync replica",
                                 ["shard"], buckets=PUSH_BUCKETS, registry=metrics.registry).labels(metrics.shard_label)
    metrics.registry.register(_Collector(replica, metrics.shard_label))


def _checkpoint_lsn(path: str) -> int:
    """The log position a checkpoint directory covers (0 if it does not say)."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return int(json.load(f).get("extra", {}).get("wal_lsn", 0))
    except (OSError, ValueError):
        return 1 << 62   # unknown: treat as past any truncation point


def attach(args, pipeline) -> Replica:
    if not args.data_dir:
        raise SystemExit("a replicated shard (--coordinator) needs --data-dir: its write-ahead log is what it ships")
    if args.min_insync_replicas < 1:
        raise SystemExit("--min-insync-replicas must be at least 1 (the leader itself)")
    replica = Replica(args, pipeline)
    if pipeline.sync is not None:   # sync mode's coordinator reaches the other shards' leaders
        pipeline.sync.locate = replica.leader_address
    return replica
