"""The write-ahead log: every accepted push, durable before it is acknowledged.

Records are appended in apply order as [length u32][crc32 u32][lsn u64][payload], where the
payload is a kind byte and the change (server/pushes.py: a serialized PushRequest, or a data-plane
push as its message plus its raw tensor bytes, chunked pushes already reassembled). Segments are named by
their first LSN (`wal-00000000000000000001.log`); a checkpoint at LSN L starts a new segment and
deletes the ones wholly behind it. A torn or corrupt tail (crash mid-write) ends replay there.

Durability policies (`--wal-sync`):
  fsync  -- fsync before every acknowledgement (slowest, one fsync per push)
  group  -- a flusher thread fsyncs every `--wal-group-ms` (default 2 ms); acknowledgements wait
            for the fsync that covers them (default: many pushes share one fsync)
  none   -- written to the OS page cache only: survives a process crash, not a power loss
"""
import os
import struct
import threading
import zlib

from sparseps.errors import Unavailable

HEADER = struct.Struct("<IIQ")   # length of payload, crc32 of (payload + lsn), lsn
LSN = struct.Struct("<Q")
# Logs written before the crc moved out of the shard lock hold crc32(lsn + payload); replay accepts both.


def seal(*parts) -> tuple:
    """(parts as byte views, their crc32, their length): the costly half of an append, done
    before the caller takes the shard lock (a 1 MiB push's crc takes ~0.4 ms here)."""
    views = [memoryview(p).cast("B") for p in parts]
    crc = 0
    for v in views:
        crc = zlib.crc32(v, crc)
    return views, crc, sum(len(v) for v in views)


POLICIES = ("fsync", "group", "none")


def _intact(lsn: int, crc: int, payload) -> bool:
    """The record's checksum holds, in either layout: crc32(payload + lsn), or crc32(lsn + payload)."""
    packed = LSN.pack(lsn)
    return zlib.crc32(packed, zlib.crc32(payload)) == crc or zlib.crc32(payload, zlib.crc32(packed)) == crc


class WriteAheadLog:
    def __init__(self, directory: str, policy: str = "group", group_ms: float = 2.0):
        if policy not in POLICIES:
            raise ValueError(f"--wal-sync must be one of {POLICIES}, got {policy!r}")
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.policy, self.group_s = policy, group_ms / 1000.0
        self.lsn = 0              # last LSN written
        self.durable_lsn = 0      # last LSN known to be on disk
        self._cond = threading.Condition()
        self._fd_lock = threading.Lock()   # held around the flusher's fsync and while the file is swapped
        self._fd = None
        self._failed: Exception | None = None
        self._closing = False
        self._flusher = None

    # ------------------------------------------------------------------ reading
    def segments(self) -> list:
        names = sorted(n for n in os.listdir(self.dir) if n.startswith("wal-") and n.endswith(".log"))
        return [(int(n[4:-4]), os.path.join(self.dir, n)) for n in names]

    @staticmethod
    def _scan(data: bytes):
        """Yield (end offset, lsn, payload view) of each intact record of a segment's bytes, in
        order; stops at a torn or corrupt record (the caller sees where from the last end)."""
        pos = 0
        while pos + HEADER.size <= len(data):
            length, crc, lsn = HEADER.unpack_from(data, pos)
            end = pos + HEADER.size + length
            if end > len(data):
                return   # torn tail: the crash happened while this record was being written
            view = memoryview(data)[pos + HEADER.size:end]
            if not _intact(lsn, crc, view):
                return   # torn or corrupt record
            yield end, lsn, view
            pos = end

    def replay(self, after_lsn: int):
        """Yield (lsn, payload) of every intact record with lsn > after_lsn, in order."""
        last = after_lsn
        for first, path in self.segments():
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            for pos, lsn, view in self._scan(data):
                if lsn > last:
                    yield lsn, bytes(view)
                    last = lsn
            if pos < len(data):
                # Cut the torn tail so new records do not land after garbage.
                with open(path, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
        self.lsn = self.durable_lsn = max(self.lsn, last)

    def read(self, after_lsn: int, max_bytes: int, cursor: tuple | None = None) -> tuple:
        """([(lsn, payload)] of the records after after_lsn, about max_bytes of them (at least one
        if any), cursor), read from the segments on disk without changing them (a live log's older
        records, for a replica catching up). A segment grows until the next checkpoint, so a reader
        far behind passes back the cursor (segment, offset, lsn) of its previous read and resumes
        there: each batch then costs its own bytes, not the segment's. Without one (or a stale one)
        the records before after_lsn are skipped by their headers, payloads unread."""
        out, size = [], 0
        segs = self.segments()
        for i, (first, path) in enumerate(segs):
            if i + 1 < len(segs) and segs[i + 1][0] <= after_lsn + 1:
                continue   # wholly behind after_lsn
            offset = cursor[1] if cursor and cursor[0] == path and cursor[2] == after_lsn else 0
            with open(path, "rb") as f:
                f.seek(offset)
                while True:
                    head = f.read(HEADER.size)
                    if len(head) < HEADER.size:
                        break
                    length, crc, lsn = HEADER.unpack(head)
                    if lsn <= after_lsn:
                        f.seek(length, 1)
                        offset += HEADER.size + length
                        continue
                    payload = f.read(length)
                    if len(payload) < length or not _intact(lsn, crc, payload):
                        break   # a record still being written (or a torn one): the next read gets it
                    offset += HEADER.size + length
                    out.append((lsn, payload))
                    size += length
                    if size >= max_bytes:
                        return out, (path, offset, lsn)
            if out:
                return out, (path, offset, out[-1][0])   # the next segment on the next read
        return out, None

    def first_lsn(self) -> int:
        """The first LSN still on disk (records before it are in a checkpoint only)."""
        segs = self.segments()
        return segs[0][0] if segs else self.lsn + 1

    def truncate_after(self, lsn: int):
        """Drop every record after `lsn` (a divergent tail; call before open() or after close())."""
        for first, path in self.segments():
            if first > lsn:
                os.remove(path)
                continue
            with open(path, "rb") as f:
                data = f.read()
            cut = 0
            for end, rec_lsn, _ in self._scan(data):
                if rec_lsn > lsn:
                    break
                cut = end
            if cut < len(data):
                with open(path, "r+b") as f:
                    f.truncate(cut)
                    os.fsync(f.fileno())
        fsync_path(self.dir)
        self.lsn = self.durable_lsn = min(self.lsn, lsn)

    # ------------------------------------------------------------------ writing
    def open(self):
        """Start appending after whatever replay() found."""
        segs = self.segments()
        path = segs[-1][1] if segs else self._segment_path(self.lsn + 1)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        fsync_path(self.dir)
        if self.policy == "group":
            self._flusher = threading.Thread(target=self._flush_loop, name="wal-flusher", daemon=True)
            self._flusher.start()

    def _segment_path(self, first_lsn: int) -> str:
        return os.path.join(self.dir, f"wal-{first_lsn:020d}.log")

    def append(self, *parts, sealed: tuple | None = None) -> int:
        """Write one record whose payload is the parts joined (bytes or buffers, written with one
        writev, not copied together), or a record `seal()`ed earlier; the caller holds the shard's
        apply order. Returns its LSN."""
        if self._failed is not None:
            raise Unavailable(f"write-ahead log is failing ({self._failed}); pushes are refused until it recovers")
        lsn = self.lsn + 1
        views, crc, length = sealed if sealed is not None else seal(*parts)
        head = HEADER.pack(length, zlib.crc32(LSN.pack(lsn), crc), lsn)
        try:
            _writev_all(self._fd, [memoryview(head)] + views)
        except OSError as e:
            raise Unavailable(f"cannot write the write-ahead log in {self.dir}: {e.strerror}") from None
        self.lsn = lsn
        if self.policy == "none":
            self.durable_lsn = lsn
        return lsn

    def wait_durable(self, lsn: int, timeout: float = 30.0):
        """Block until the record `lsn` is on disk under the configured policy."""
        if self.policy == "none" or lsn <= self.durable_lsn:
            return
        if self.policy == "fsync":
            with self._cond:
                if lsn > self.durable_lsn:
                    target = self.lsn
                    self._sync()
                    self.durable_lsn = max(self.durable_lsn, target)
            return
        with self._cond:
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self.durable_lsn >= lsn or self._failed is not None, timeout):
                raise Unavailable("write-ahead log fsync timed out")
            if self._failed is not None and self.durable_lsn < lsn:
                raise Unavailable(f"write-ahead log fsync failed: {self._failed}")

    def flush(self):
        """fsync now, whatever the policy (a replica's follower has its batch already: waiting for
        more to join the group commit would only delay its acknowledgement)."""
        with self._fd_lock, self._cond:
            target = self.lsn
            if target > self.durable_lsn:
                self._sync()
                self.durable_lsn = target
                self._cond.notify_all()

    def _sync(self):
        try:
            os.fsync(self._fd)
        except OSError as e:
            self._failed = e
            raise Unavailable(f"write-ahead log fsync failed: {e.strerror}") from None

    def _flush_loop(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self.lsn > self.durable_lsn or self._closing)
                if self._closing and self.lsn == self.durable_lsn:
                    return
            threading.Event().wait(self.group_s)   # let more pushes join this fsync
            with self._cond:
                target = self.lsn
            try:
                with self._fd_lock:   # rotate() must not close the file under this fsync
                    os.fsync(self._fd)
            except OSError as e:
                with self._cond:
                    self._failed = e
                    self._cond.notify_all()
                return
            with self._cond:
                self.durable_lsn = max(self.durable_lsn, target)
                self._cond.notify_all()

    def rotate(self, checkpoint_lsn: int):
        """After a checkpoint covering everything up to checkpoint_lsn: new segment, drop old ones."""
        with self._fd_lock, self._cond:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
            self._fd = os.open(self._segment_path(self.lsn + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.durable_lsn = self.lsn
            self._cond.notify_all()   # group-commit waiters: everything so far is on disk
        segs = self.segments()
        for i, (first, path) in enumerate(segs[:-1]):
            next_first = segs[i + 1][0]
            if next_first - 1 <= checkpoint_lsn:
                os.remove(path)
        fsync_path(self.dir)

    def close(self):
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._flusher is not None:
            self._flusher.join(5)
        with self._fd_lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass
                os.close(self._fd)
                self._fd = None


def _write_all(fd, data: bytes):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _writev_all(fd, views: list):
    views = [v for v in views if len(v)]
    while views:
        n = os.writev(fd, views[:1024])   # IOV_MAX
        while n and views:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


def fsync_path(path: str):
    """fsync a file or a directory (a directory's entries: renames and new files) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
