"""Which shard holds which rows: the `mod` and `div` strategies of tf.nn.embedding_lookup, and
`hash` for dynamic tables, whose int64 keys go to shard splitmix64(key) mod N.

Shared by the client (routing) and the server (global id -> local row); numpy only.

Why a hash and not `key % N` for dynamic tables: real feature keys are patterned (multiples of a
stride, sequential blocks, hashes that share low bits), and modulo routing piles such keys onto
a few shards. splitmix64's output function is a bijection on 64 bits whose every output bit
depends on every input bit, so any such pattern spreads evenly.
"""
import zlib

import numpy as np

STRATEGIES = ("mod", "div", "whole", "hash")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x) -> np.ndarray:
    """splitmix64's output function over uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key_shard(keys, num_shards: int) -> np.ndarray:
    """The shard of each int64 key of a dynamic table."""
    keys = np.ascontiguousarray(keys, np.int64)
    if num_shards == 1:
        return np.zeros(keys.shape, np.int64)
    return (splitmix64(keys.view(np.uint64)) % np.uint64(num_shards)).astype(np.int64)


def owner_shard(name: str, num_shards: int) -> int:
    """A stable home for a small dense variable (crc32, not Python's salted hash())."""
    return zlib.crc32(name.encode()) % num_shards


class Layout:
    """Rows 0..rows-1 of one variable spread over `num_shards` shards."""

    def __init__(self, rows: int, num_shards: int, strategy: str = "mod", owner: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"partition strategy {strategy!r} is not one of {STRATEGIES}")
        self.rows, self.n, self.strategy, self.owner = int(rows), int(num_shards), strategy, int(owner)
        if strategy == "div":
            self._per, self._extras = divmod(self.rows, self.n)

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.strategy == "whole":
            return np.full(ids.shape, self.owner, dtype=np.int64)
        if self.strategy == "hash":
            return key_shard(ids, self.n)
        if self.strategy == "mod":
            return ids % self.n
        per, extras = self._per, self._extras
        if per == 0:
            return ids.copy()
        return np.maximum(ids // (per + 1), (ids - extras) // per)

    def start(self, shard: int) -> int:
        if self.strategy == "div":
            return shard * self._per + min(shard, self._extras)
        return 0

    def local_count(self, shard: int) -> int:
        if self.strategy == "whole":
            return self.rows if shard == self.owner else 0
        if self.strategy == "mod":
            return max(0, (self.rows - shard + self.n - 1) // self.n)
        return self._per + (1 if shard < self._extras else 0)

    def to_local(self, ids: np.ndarray, shard: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.strategy == "mod":
            return ids // self.n
        return ids - self.start(shard)

    def global_ids(self, shard: int) -> np.ndarray:
        """Global ids of the shard's rows, in local row order."""
        count = self.local_count(shard)
        if self.strategy == "mod":
            return np.arange(count, dtype=np.int64) * self.n + shard
        return np.arange(count, dtype=np.int64) + self.start(shard)
