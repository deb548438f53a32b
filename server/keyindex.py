"""The index of a dynamic table: int64 key -> row number, an open-addressing hash table.

Linear probing over one flat (capacity, 2) int64 array of buckets (key, row; row -1 = empty), so
a probe touches one cache line and a lookup of a batch is one compiled loop with no Python
object per key: a first pass hashes every key and prefetches its bucket, a second probes, so the
memory latency of thousands of independent lookups overlaps. The bucket of a key is the top bits
of a 64-bit mix of it (splitmix64's finaliser, salted, so that the bits routing used to pick the
shard play no part here). Deletion shifts the following run of the cluster back instead of
leaving tombstones, so probing stays correct and short after any number of evictions (Knuth's
algorithm R).

Every key is legal, the full int64 range included: emptiness lives in the row, not in the key.
The table doubles from 3/4 full, so its memory is 21-43 bytes per live key.

The kernels are numba-compiled when numba is installed (the server's `server` extra) and run as
plain Python otherwise: slower, same results.
"""
import numpy as np

try:
    import numba

    from .backends.fused import _prefetch_w as _prefetch
    _jit = numba.njit(nogil=True, cache=True)
except ImportError:   # pragma: no cover - the numpy-only server
    def _jit(fn):
        return fn

    def _prefetch(arr, row, col):
        pass

EMPTY = -1
MIN_LOG2 = 4


@_jit
def _bucket(key, shift):
    z = np.uint64(key) ^ np.uint64(0x5851F42D4C957F2D)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z >> np.uint64(shift))


@_jit
def _find(tab, mask, key, b):
    """The bucket holding `key`, probing from bucket b; -1 when the key is absent."""
    while tab[b, 1] != -1:
        if tab[b, 0] == key:
            return b
        b = (b + 1) & mask
    return -1


@_jit
def _lookup(tab, shift, query, out):
    mask = tab.shape[0] - 1
    n = query.shape[0]
    for i in range(n):   # pass 1: home buckets, prefetched
        b = _bucket(query[i], shift)
        out[i] = b
        _prefetch(tab, b, 0)
    for i in range(n):   # pass 2: probe
        b = _find(tab, mask, query[i], out[i])
        out[i] = tab[b, 1] if b >= 0 else -1


@_jit
def _insert(tab, shift, query, rows):
    """Insert absent keys (the caller checked); a key present gets the new row."""
    mask = tab.shape[0] - 1
    for i in range(query.shape[0]):
        k = query[i]
        b = _bucket(k, shift)
        while tab[b, 1] != -1 and tab[b, 0] != k:
            b = (b + 1) & mask
        tab[b, 0] = k
        tab[b, 1] = rows[i]


@_jit
def _remove(tab, shift, query, out):
    """Delete keys; out[i] = the row the key had, or -1. Backward-shift deletion."""
    mask = tab.shape[0] - 1
    for i in range(query.shape[0]):
        b = _find(tab, mask, query[i], _bucket(query[i], shift))
        out[i] = tab[b, 1] if b >= 0 else -1
        if b < 0:
            continue
        hole = b
        j = b
        while True:
            j = (j + 1) & mask
            if tab[j, 1] == -1:
                break
            home = _bucket(tab[j, 0], shift)
            # the entry at j may move into the hole if its home is not in (hole, j] cyclically
            if (j > hole and (home <= hole or home > j)) or (j < hole and (home <= hole and home > j)):
                tab[hole, 0] = tab[j, 0]
                tab[hole, 1] = tab[j, 1]
                hole = j
        tab[hole, 1] = -1


@_jit
def _rehash(old, tab, shift):
    mask = tab.shape[0] - 1
    for i in range(old.shape[0]):
        if old[i, 1] == -1:
            continue
        k = old[i, 0]
        b = _bucket(k, shift)
        while tab[b, 1] != -1:
            b = (b + 1) & mask
        tab[b, 0] = k
        tab[b, 1] = old[i, 1]


def _log2_for(n: int) -> int:
    """log2 of the fewest buckets (at least 2**MIN_LOG2) that hold n keys at most 3/4 full."""
    log2 = MIN_LOG2
    while (1 << log2) * 3 < n * 4:
        log2 += 1
    return log2


class KeyIndex:
    """Key -> row for one dynamic table on one shard. Not thread-safe: the shard lock guards it."""

    def __init__(self, expected: int = 0):
        self._alloc(_log2_for(expected))
        self.size = 0

    def _alloc(self, log2):
        tab = np.empty((1 << log2, 2), np.int64)   # may raise MemoryError: nothing changed yet
        tab[:, 1] = EMPTY
        self.tab, self.log2 = tab, log2

    @property
    def shift(self) -> int:
        return 64 - self.log2

    @property
    def nbytes(self) -> int:
        return self.tab.nbytes

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key (int64), -1 where the key has no row."""
        out = np.empty(len(keys), np.int64)
        _lookup(self.tab, self.shift, np.ascontiguousarray(keys, np.int64), out)
        return out

    def reserve(self, n: int):
        """Room for `n` keys in all without passing 3/4 full (allocates before anything changes)."""
        log2 = _log2_for(n)
        if log2 > self.log2:
            self._rebuild(log2)

    def _rebuild(self, log2):
        old = self.tab
        self._alloc(log2)
        _rehash(old, self.tab, self.shift)

    def shrink(self):
        """Give buckets back after evictions: an index four times larger than its keys need is
        rebuilt at twice what they need (room to refill without rebuilding at once)."""
        need = _log2_for(self.size)
        if self.log2 >= need + 2:
            self._rebuild(need + 1)

    def insert(self, keys: np.ndarray, rows: np.ndarray):
        """Add distinct keys that are absent, with their rows."""
        self.reserve(self.size + len(keys))
        _insert(self.tab, self.shift, np.ascontiguousarray(keys, np.int64), np.ascontiguousarray(rows, np.int64))
        self.size += len(keys)

    def move(self, keys: np.ndarray, rows: np.ndarray):
        """Point present keys at new rows."""
        _insert(self.tab, self.shift, np.ascontiguousarray(keys, np.int64), np.ascontiguousarray(rows, np.int64))

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Delete distinct keys; returns the row each had (-1: it had none)."""
        out = np.empty(len(keys), np.int64)
        _remove(self.tab, self.shift, np.ascontiguousarray(keys, np.int64), out)
        self.size -= int((out >= 0).sum())
        return out


def warmup():
    """Compile (or load from numba's cache) the index kernels, so a shard's first dynamic push
    does not pay for it."""
    ix = KeyIndex(4)
    keys = np.arange(8, dtype=np.int64)
    ix.insert(keys, keys)
    ix.move(keys[:2], keys[2:4])
    ix.lookup(keys)
    ix.remove(keys[:3])
    ix.reserve(64)
