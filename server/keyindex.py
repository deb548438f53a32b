"""The index of a dynamic table: int64 key -> row number, an open-addressing hash table.

Linear probing over two flat arrays (`keys` int64, `rows` int32, -1 = empty bucket), so a bucket
costs 12 bytes and a lookup of a batch is one compiled loop with no Python object per key. The
bucket of a key is the top bits of a 64-bit mix of it (splitmix64's finaliser, salted, so that
the bits routing already used to pick the shard play no part here). Deletion shifts the following
run of the cluster back instead of leaving tombstones, so probing stays correct and short after
any number of evictions (Knuth's algorithm R).

Every key is legal, the full int64 range included: emptiness lives in `rows`, not in `keys`.
The table doubles from 3/4 full, so its memory is 16-32 bytes per live key.

The kernels are numba-compiled when numba is installed (the server's `server` extra) and run as
plain Python otherwise: slower, same results.
"""
import numpy as np

try:
    import numba
    _jit = numba.njit(nogil=True, cache=True)
except ImportError:   # pragma: no cover - the numpy-only server
    def _jit(fn):
        return fn

EMPTY = -1
_SALT = np.uint64(0x5851F42D4C957F2D)
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
def _lookup(tkeys, trows, shift, query, out):
    mask = tkeys.shape[0] - 1
    for i in range(query.shape[0]):
        k = query[i]
        b = _bucket(k, shift)
        out[i] = -1
        while trows[b] != -1:
            if tkeys[b] == k:
                out[i] = trows[b]
                break
            b = (b + 1) & mask


@_jit
def _insert(tkeys, trows, shift, query, rows):
    """Insert absent keys (the caller checked); a key present is overwritten."""
    mask = tkeys.shape[0] - 1
    for i in range(query.shape[0]):
        k = query[i]
        b = _bucket(k, shift)
        while trows[b] != -1 and tkeys[b] != k:
            b = (b + 1) & mask
        tkeys[b] = k
        trows[b] = rows[i]


@_jit
def _remove(tkeys, trows, shift, query, out):
    """Delete keys; out[i] = the row the key had, or -1. Backward-shift deletion."""
    mask = tkeys.shape[0] - 1
    for i in range(query.shape[0]):
        k = query[i]
        b = _bucket(k, shift)
        out[i] = -1
        while trows[b] != -1:
            if tkeys[b] == k:
                out[i] = trows[b]
                break
            b = (b + 1) & mask
        if out[i] == -1:
            continue
        hole = b
        j = b
        while True:
            j = (j + 1) & mask
            if trows[j] == -1:
                break
            home = _bucket(tkeys[j], shift)
            # the entry at j may move into the hole if its home is not in (hole, j] cyclically
            if (j > hole and (home <= hole or home > j)) or (j < hole and (home <= hole and home > j)):
                tkeys[hole] = tkeys[j]
                trows[hole] = trows[j]
                hole = j
        trows[hole] = -1


@_jit
def _rehash(okeys, orows, tkeys, trows, shift):
    mask = tkeys.shape[0] - 1
    for i in range(okeys.shape[0]):
        if orows[i] == -1:
            continue
        k = okeys[i]
        b = _bucket(k, shift)
        while trows[b] != -1:
            b = (b + 1) & mask
        tkeys[b] = k
        trows[b] = orows[i]


class KeyIndex:
    """Key -> row for one dynamic table on one shard. Not thread-safe: the shard lock guards it."""

    def __init__(self, expected: int = 0):
        log2 = MIN_LOG2
        while (1 << log2) * 3 < expected * 4:
            log2 += 1
        self._alloc(log2)
        self.size = 0

    def _alloc(self, log2):
        self.log2 = log2
        self.keys = np.zeros(1 << log2, np.int64)
        self.rows = np.full(1 << log2, EMPTY, np.int32)

    @property
    def shift(self) -> int:
        return 64 - self.log2

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key (int64), -1 where the key has no row."""
        out = np.empty(len(keys), np.int64)
        _lookup(self.keys, self.rows, self.shift, np.ascontiguousarray(keys, np.int64), out)
        return out

    def reserve(self, n: int):
        """Room for `n` keys in all without passing 3/4 full (allocates before anything changes)."""
        log2 = self.log2
        while (1 << log2) * 3 < n * 4:
            log2 += 1
        if log2 != self.log2:
            okeys, orows = self.keys, self.rows
            self._alloc(log2)
            _rehash(okeys, orows, self.keys, self.rows, self.shift)

    def insert(self, keys: np.ndarray, rows: np.ndarray):
        """Add distinct keys that are absent, with their rows."""
        self.reserve(self.size + len(keys))
        _insert(self.keys, self.rows, self.shift, np.ascontiguousarray(keys, np.int64),
                np.ascontiguousarray(rows, np.int32))
        self.size += len(keys)

    def move(self, keys: np.ndarray, rows: np.ndarray):
        """Point present keys at new rows."""
        _insert(self.keys, self.rows, self.shift, np.ascontiguousarray(keys, np.int64),
                np.ascontiguousarray(rows, np.int32))

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Delete distinct keys; returns the row each had (-1: it had none)."""
        out = np.empty(len(keys), np.int64)
        _remove(self.keys, self.rows, self.shift, np.ascontiguousarray(keys, np.int64), out)
        self.size -= int((out >= 0).sum())
        return out
