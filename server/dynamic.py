"""Dynamic tables: rows keyed by any int64, created on first touch, admitted and evicted by policy.

A dynamic variable's rows and each of its optimizer slots are ordinary contiguous backend arrays
(`Variable.value`, `Variable.slots`) holding the live rows at positions [0, live); `KeyIndex` maps
key -> position. The optimizers therefore run their usual kernels on gathered positions, on any
backend, and a push's keys are turned into positions (creating admitted rows) just before its step.

Per live row the table keeps its key (export, eviction), the step it was last updated at and the
second it was last updated (eviction by age, incremental export). Removing rows moves the last
rows into the holes, so positions stay dense; every removal bumps `version`, which a chunked
export watches to start over instead of skipping a moved row.

Admission (a key becomes a row only when a push is allowed to create it):
  * `min_count: K`  - a count-min sketch (4 x `sketch_width` uint16 counters, saturating) counts the
    pushes that touched each key without a row; the push that brings the count to K creates it.
    Gradients of pushes before that are dropped (counted as refused, reason "admission"). The
    sketch may over-count (hash collisions admit a key early), never under-count.
  * `probability: p` - a key without a row is admitted by a push at step t when
    splitmix64(seed, key, t) < p * 2^64: a coin that is the same for that key and step on every
    shard, on replay and after a restart, and lets a frequent key in after about 1/p pushes.
Eviction:
  * by age: rows not updated in the last `max_age_steps` steps of the variable's optimizer, or for
    `max_age_seconds`, are removed with their slots on a schedule (`interval_seconds`) and on
    demand (the Evict RPC, `sparseps evict ADDR`). Each such eviction is written to the
    write-ahead log as the keys it removed, so replay removes exactly those.
  * `capacity: C` live rows per shard: a push that would pass it either evicts the least recently
    updated rows first (`on_full: "evict"`, ties broken by key, in batches of at least
    `evict_batch` of C so that eviction is not paid per push) or is refused RESOURCE_EXHAUSTED
    (`on_full: "refuse"`), before anything changes.
"""
import json
import math
import time

import numpy as np

from sparseps.errors import InvalidArgument
from sparseps.partition import splitmix64

from .keyindex import KeyIndex

_SKETCH_DEPTH = 4
_SKETCH_SALTS = np.array([0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89],
                         np.uint64)
_COIN_SALT = np.uint64(0xB7E151628AED2A6A)


def _num(section, key, value, *, integer=False, lo=None, hi=None, lo_open=False):
    where = f"table config {section}.{key}" if section else f"table config {key}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise InvalidArgument(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    v = int(value) if integer else float(value)
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {'(' if lo_open else '['}{lo}, {hi}]"
        raise InvalidArgument(f"{where}: {value!r} must be {rng}")
    return v


class TablePolicy:
    """Admission, eviction and capacity of one dynamic table, parsed from its `table_json`."""

    KEYS = {"admission": ("min_count", "probability", "seed", "sketch_width"),
            "eviction": ("max_age_steps", "max_age_seconds", "interval_seconds"),
            "capacity": None, "on_full": None, "evict_batch": None}

    def __init__(self, table_json: str = ""):
        try:
            cfg = json.loads(table_json) if table_json else {}
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"table config is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise InvalidArgument(f"table config must be an object, got {type(cfg).__name__}")
        unknown = set(cfg) - set(self.KEYS)
        if unknown:
            raise InvalidArgument(f"table config: unknown key(s) {sorted(unknown)}; accepted: {sorted(self.KEYS)}")
        adm = self._section(cfg, "admission")
        ev = self._section(cfg, "eviction")
        self.min_count = _num("admission", "min_count", adm.get("min_count", 0), integer=True, lo=0, hi=65535)
        p = adm.get("probability")
        self.probability = None if p is None else _num("admission", "probability", p, lo=0, hi=1, lo_open=True)
        if self.min_count > 1 and self.probability is not None:
            raise InvalidArgument("table config admission: give min_count or probability, not both")
        self.seed = _num("admission", "seed", adm.get("seed", 0), integer=True, lo=0, hi=2 ** 63 - 1)
        width = _num("admission", "sketch_width", adm.get("sketch_width", 1 << 20), integer=True, lo=64,
                     hi=1 << 28)
        if width & (width - 1):
            raise InvalidArgument(f"table config admission.sketch_width: {width} must be a power of two")
        self.sketch_width = width
        age = ev.get("max_age_steps")
        self.max_age_steps = None if age is None else _num("eviction", "max_age_steps", age, integer=True, lo=1)
        sec = ev.get("max_age_seconds")
        self.max_age_seconds = None if sec is None else _num("eviction", "max_age_seconds", sec, lo=0, lo_open=True)
        self.interval_seconds = _num("eviction", "interval_seconds", ev.get("interval_seconds", 60.0), lo=0,
                                     lo_open=True)
        cap = cfg.get("capacity")
        self.capacity = None if cap is None else _num("", "capacity", cap, integer=True, lo=1, hi=2 ** 31 - 1)
        self.on_full = cfg.get("on_full", "evict")
        if self.on_full not in ("evict", "refuse"):
            raise InvalidArgument(f"table config on_full: {self.on_full!r} must be \"evict\" or \"refuse\"")
        self.evict_batch = _num("", "evict_batch", cfg.get("evict_batch", 0.05), lo=0, hi=1)

    @staticmethod
    def _section(cfg, name):
        sec = cfg.get(name) or {}
        if not isinstance(sec, dict):
            raise InvalidArgument(f"table config {name}: expected an object, got {sec!r}")
        unknown = set(sec) - set(TablePolicy.KEYS[name])
        if unknown:
            raise InvalidArgument(f"table config {name}: unknown key(s) {sorted(unknown)}; "
                                  f"accepted: {list(TablePolicy.KEYS[name])}")
        return sec

    @property
    def ages(self) -> bool:
        return self.max_age_steps is not None or self.max_age_seconds is not None

    def to_dict(self) -> dict:
        adm = {"min_count": self.min_count, "sketch_width": self.sketch_width} if self.min_count > 1 else {}
        if self.probability is not None:
            adm = {"probability": self.probability, "seed": self.seed}
        ev = {k: getattr(self, k) for k in ("max_age_steps", "max_age_seconds") if getattr(self, k) is not None}
        if ev:
            ev["interval_seconds"] = self.interval_seconds
        return {"admission": adm, "eviction": ev, "capacity": self.capacity, "on_full": self.on_full,
                "evict_batch": self.evict_batch}


class DynamicTable:
    """The key side of one dynamic variable on one shard (the rows live in the Variable)."""

    def __init__(self, policy: TablePolicy):
        self.policy = policy
        self.index = KeyIndex()
        self.live = 0
        self.keys = np.zeros(0, np.int64)         # key of each row position
        self.step = np.zeros(0, np.int64)         # optimizer step that last updated the row
        self.when = np.zeros(0, np.uint32)        # unix second of that update
        self.sketch = np.zeros((_SKETCH_DEPTH, policy.sketch_width), np.uint16) if policy.min_count > 1 else None
        self.version = 0
        self.stats = {"created": 0, "admitted": 0, "evicted": 0, "refused_admission": 0, "refused_capacity": 0}

    @property
    def capacity_rows(self) -> int:
        return len(self.keys)

    def meta_nbytes(self) -> int:
        return self.index.nbytes + self.keys.nbytes + self.step.nbytes + self.when.nbytes + \
            (self.sketch.nbytes if self.sketch is not None else 0)

    # ---------------------------------------------------------------- admission
    def _sketch_buckets(self, keys):
        shift = np.uint64(64 - int(self.policy.sketch_width).bit_length() + 1)
        k = keys.view(np.uint64)
        return [(splitmix64(k ^ _SKETCH_SALTS[d]) >> shift).astype(np.int64) for d in range(_SKETCH_DEPTH)]

    def _counts(self, buckets):
        return np.min(np.stack([self.sketch[d, b] for d, b in enumerate(buckets)]), axis=0)

    def admits(self, keys: np.ndarray, step: int, count: bool) -> np.ndarray:
        """Which of these distinct row-less keys a push at `step` may turn into rows; with `count`,
        the push is counted in the sketch (min_count)."""
        pol = self.policy
        if pol.min_count > 1:
            buckets = self._sketch_buckets(keys)
            if count:
                for d, b in enumerate(buckets):   # distinct keys may share a bucket: add their counts
                    ub, n = np.unique(b, return_counts=True)
                    self.sketch[d, ub] = np.minimum(self.sketch[d, ub].astype(np.int64) + n, 65535)
                return self._counts(buckets) >= pol.min_count
            return self._counts(buckets) + 1 >= pol.min_count
        if pol.probability is not None:
            if pol.probability >= 1.0:
                return np.ones(len(keys), bool)
            mix = splitmix64(splitmix64(keys.view(np.uint64) ^ np.uint64(pol.seed) ^ _COIN_SALT)
                             + np.uint64(step % (1 << 64)))
            return mix < np.uint64(min(int(pol.probability * 2.0 ** 64), 2 ** 64 - 1))
        return np.ones(len(keys), bool)

    # ---------------------------------------------------------------- rows
    def reserve(self, cap: int, keys: int):
        """Metadata room for `cap` rows, and index room for `keys` keys (values and slots are grown
        by the Shard alongside); allocated before anything changes."""
        self.index.reserve(keys)
        if cap <= len(self.keys):
            return
        for name in ("keys", "step", "when"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[:self.live] = old[:self.live]
            setattr(self, name, new)

    def shrink(self, cap: int):
        """Metadata for `cap` (>= live) rows, and a smaller index if evictions left it oversized."""
        arrays = {name: getattr(self, name)[:cap].copy() for name in ("keys", "step", "when")}
        self.index.shrink()
        for name, arr in arrays.items():
            setattr(self, name, arr)

    def add(self, keys: np.ndarray, step: int) -> np.ndarray:
        """Rows for distinct new keys at the end (room reserved); returns their positions."""
        pos = np.arange(self.live, self.live + len(keys), dtype=np.int64)
        self.keys[pos] = keys
        self.step[pos] = step
        self.when[pos] = int(time.time())
        self.index.insert(keys, pos)
        self.live += len(keys)
        self.stats["created"] += len(keys)
        return pos

    def touch(self, pos: np.ndarray, step: int):
        """Rows `pos` (duplicates allowed) were updated by step `step`, now."""
        self.step[pos] = step
        self.when[pos] = int(time.time())

    def plan_removal(self, pos: np.ndarray):
        """(holes, movers): removing the distinct positions `pos` moves the rows at `movers` (the
        last live rows that stay) into `holes` (removed positions below the new end)."""
        end = self.live - len(pos)
        gone = np.zeros(self.live, bool)
        gone[pos] = True
        holes = np.flatnonzero(gone[:end])
        movers = end + np.flatnonzero(~gone[end:])
        return holes, movers

    def remove(self, pos: np.ndarray, holes, movers):
        """Forget the rows at `pos`; the caller has moved values and slots from movers to holes."""
        self.index.remove(self.keys[pos])
        if len(holes):
            for arr in (self.keys, self.step, self.when):
                arr[holes] = arr[movers]
            self.index.move(self.keys[holes], holes)
        self.live -= len(pos)
        self.version += 1
        self.stats["evicted"] += len(pos)

    def aged(self, iterations: int, now: float) -> np.ndarray:
        """Positions of the rows the age policy evicts now."""
        pol, live = self.policy, self.live
        old = np.zeros(live, bool)
        if pol.max_age_steps is not None:
            old |= self.step[:live] <= iterations - pol.max_age_steps
        if pol.max_age_seconds is not None:
            old |= self.when[:live].astype(np.float64) <= now - pol.max_age_seconds
        return np.flatnonzero(old)

    def least_recent(self, count: int, protect: np.ndarray) -> np.ndarray:
        """The `count` least recently updated positions, ties by key, none of `protect`."""
        live = self.live
        steps = self.step[:live].copy()
        steps[protect] = np.iinfo(np.int64).max
        count = min(count, live - len(protect))
        if count <= 0:
            return np.zeros(0, np.int64)
        if count == live:
            return np.arange(live, dtype=np.int64)
        cut = np.partition(steps, count - 1)[count - 1]
        below = np.flatnonzero(steps < cut)
        tied = np.flatnonzero(steps == cut)
        tied = tied[np.argsort(self.keys[tied], kind="stable")][:count - len(below)]
        return np.concatenate([below, tied])

    def describe(self) -> dict:
        return {"live_rows": self.live, "capacity_rows": self.capacity_rows, **self.stats}
