"""What one shard holds: variables, their optimizer slots, and each optimizer's step counter.

Every mutation goes through `Shard`, under one lock, in two phases: validate and decode the
whole request first (nothing changes if anything is wrong), then apply it. A push is therefore
atomic on this shard: a concurrent pull sees all of its rows or none of them.
"""
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from sparseps.errors import AlreadyExists, Error, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from sparseps.partition import Layout

from . import initializers
from .backends.numpy_backend import NumpyBackend
from .dynamic import DynamicTable, TablePolicy
from .optimizers import from_config as optimizer_from_config

FLOAT_DTYPES = (np.dtype("float32"), np.dtype("float64"))
_HOST = NumpyBackend()   # initial slot rows of a dynamic table, made on the host
MAX_NDIM = 32
# what a config of the wrong types makes the parsers raise (deep JSON, huge integers, lists for numbers)
_CONFIG_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, KeyError, AttributeError, IndexError)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _initialized(name: str, initializer_json: str, dtype, make) -> np.ndarray:
    """make()'s initial values, with a bad initializer config or non-finite values refused."""
    try:
        with np.errstate(over="ignore"):
            value = make()
    except Error:
        raise
    except _CONFIG_ERRORS as e:
        raise InvalidArgument(f"variable {name!r}: invalid initializer {initializer_json[:200]!r} "
                              f"({type(e).__name__}: {e})") from None
    if not np.all(np.isfinite(value)):
        raise InvalidArgument(f"variable {name!r}: initializer {initializer_json[:200]!r} gives NaN or Inf "
                              f"(or numbers too large for {dtype})")
    return value


@dataclass
class Grad:
    """One variable's part of a push, decoded: local row ids (or None for dense) and values."""
    var: "Variable"
    ids: np.ndarray | None
    values: np.ndarray
    l2sum: float | None = None   # the whole gradient's sum of squares when it was split over shards
    rows: np.ndarray | None = None   # a dynamic variable: its keys' row positions, when all had one

    def replace(self, values):
        return Grad(self.var, self.ids, values, self.l2sum, self.rows)


@dataclass
class Variable:
    name: str
    shape: tuple            # logical (full) shape
    dtype: np.dtype
    optimizer: str
    layout: Layout
    shard: int
    value: object           # backend array of this shard's rows
    initializer_json: str = ""
    slots: dict = field(default_factory=dict)
    table: DynamicTable | None = None   # a dynamic (hash-keyed) variable's keys; None: a fixed table

    @property
    def table_json(self) -> str:
        return json.dumps(self.table.policy.to_dict(), sort_keys=True) if self.table is not None else ""

    @property
    def local_rows(self) -> int:
        return self.table.live if self.table is not None else self.layout.local_count(self.shard)

    def local_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        """Global row ids -> this shard's rows (a dynamic variable: its keys, checked to be this
        shard's); every bad id is an InvalidArgument."""
        if ids.dtype.kind not in "iu":
            raise InvalidArgument(f"{what}: ids of variable {self.name!r} must be integers, got {ids.dtype}")
        if ids.ndim != 1:
            raise InvalidArgument(f"{what}: ids of variable {self.name!r} must be 1-D, got shape {list(ids.shape)}")
        if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise InvalidArgument(f"{what}: ids of variable {self.name!r} must fit in int64")
        ids = ids.astype(np.int64, copy=False)
        if self.table is not None:
            if self.layout.n > 1 and ids.size and np.any(self.layout.shard_of(ids) != self.shard):
                raise InvalidArgument(
                    f"{what}: some keys of dynamic variable {self.name!r} belong to another shard (this is shard "
                    f"{self.shard} of {self.layout.n}; keys go to splitmix64(key) mod {self.layout.n}): the client's "
                    "cluster disagrees with this server's")
            return ids
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.shape[0]:
                bad = lo if lo < 0 else hi
                raise InvalidArgument(
                    f"{what}: row id {bad} is out of range for variable {self.name!r} with {self.shape[0]} rows")
            if self.layout.n > 1 and np.any(self.layout.shard_of(ids) != self.shard):
                raise InvalidArgument(
                    f"{what}: some row ids of variable {self.name!r} belong to another shard "
                    f"(this is shard {self.shard} of {self.layout.n}, partition {self.layout.strategy})")
        return self.layout.to_local(ids, self.shard) if self.layout.n > 1 else ids


@dataclass
class OptimizerState:
    name: str
    impl: object
    config: dict
    consistency: dict
    iterations: int = 0
    variables: list = field(default_factory=list)   # names, creation order
    slot_order: list = field(default_factory=list)  # per slot group: [(var, slot), ...]
    nonslot: dict = field(default_factory=dict)

    def weights_order(self):
        return [entry for group in self.slot_order for entry in group]


class Shard:
    """The state of one shard and the only code that changes it."""

    def __init__(self, backend, shard_index: int = 0, num_shards: int = 1, allow_nonfinite: bool = False,
                 max_pull_elements: int = 1 << 31):
        self.bk = backend
        self.index, self.num_shards = shard_index, num_shards
        self.allow_nonfinite = allow_nonfinite
        self.lock = threading.RLock()
        self.step_cond = threading.Condition(self.lock)
        self.variables: dict[str, Variable] = {}
        self.optimizers: dict[str, OptimizerState] = {}
        self.instance_id = uuid.uuid4().hex
        self.max_pull_elements = max_pull_elements
        self.max_variable_bytes = _memory_bytes()   # one variable's rows on this shard, at most
        self.listeners = []   # callables(event, **info): metrics, write-ahead log

    # ------------------------------------------------------------------ optimizers
    def create_optimizer(self, name: str, config_json: str, consistency: dict | None = None) -> OptimizerState:
        if not name:
            raise InvalidArgument("optimizer name must not be empty")
        try:
            config = json.loads(config_json)
        except (TypeError, ValueError, RecursionError) as e:
            raise InvalidArgument(f"optimizer {name!r}: config is not valid JSON: {e}") from None
        try:
            impl = optimizer_from_config(config)
        except Error:
            raise
        except _CONFIG_ERRORS as e:   # a value of the wrong type or size deep in the config
            raise InvalidArgument(f"optimizer {name!r}: invalid config ({type(e).__name__}: {e})") from None
        consistency = consistency or {"mode": "async"}
        with self.lock:
            existing = self.optimizers.get(name)
            if existing is not None:
                if existing.config == config and existing.consistency == consistency:
                    return existing
                raise AlreadyExists(f"optimizer {name!r} already exists with a different configuration")
            state = OptimizerState(name=name, impl=impl, config=config, consistency=consistency,
                                   slot_order=[[] for _ in impl.slot_groups()], nonslot=impl.initial_nonslot())
            self.optimizers[name] = state
            return state

    def optimizer(self, name: str) -> OptimizerState:
        try:
            return self.optimizers[name]
        except KeyError:
            raise NotFound(f"optimizer {name!r} does not exist") from None

    # ------------------------------------------------------------------ variables
    def create_variable(self, name: str, shape, dtype, optimizer: str, partition: str = "mod",
                        owner: int = 0, initializer_json: str = "", initial_value=None,
                        dynamic: bool = False, table_json: str = "") -> Variable:
        if not name:
            raise InvalidArgument("variable name must not be empty")
        shape = tuple(int(s) for s in shape)
        if dynamic:
            return self._create_dynamic(name, shape, dtype, optimizer, partition, initializer_json, initial_value,
                                        table_json)
        if partition == "hash":
            raise InvalidArgument(f"variable {name!r}: the hash partition is for dynamic variables (dynamic=True)")
        if table_json:
            raise InvalidArgument(f"variable {name!r}: a table config (admission, eviction, capacity) needs a "
                                  "dynamic variable (dynamic=True)")
        if not shape or any(s <= 0 for s in shape):
            raise InvalidArgument(f"variable {name!r}: shape {list(shape)} must have at least one dimension, all > 0")
        if len(shape) > MAX_NDIM:
            raise InvalidArgument(f"variable {name!r}: {len(shape)} dimensions, at most {MAX_NDIM} are supported")
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise InvalidArgument(f"variable {name!r}: dtype {dtype} is not supported (float32 or float64)")
        if optimizer:
            self.optimizer(optimizer)
        layout = Layout(shape[0], self.num_shards, partition, owner)
        if partition == "whole" and not 0 <= owner < self.num_shards:
            raise InvalidArgument(f"variable {name!r}: owner shard {owner} is not in 0..{self.num_shards - 1}")
        local_shape = (layout.local_count(self.index),) + shape[1:]
        nbytes = math.prod(local_shape) * dtype.itemsize
        if nbytes > self.max_variable_bytes:   # refuse before allocating anything
            raise ResourceExhausted(
                f"variable {name!r}: shape {list(shape)} of {dtype} needs {nbytes / 2 ** 30:.3g} GiB on this shard "
                f"(before optimizer slots); this shard accepts at most {self.max_variable_bytes / 2 ** 30:.3g} GiB "
                "per variable (the machine's memory): use more shards or a smaller table")
        if initial_value is not None:
            if initial_value.shape != local_shape:
                raise InvalidArgument(f"variable {name!r}: initial value has shape {list(initial_value.shape)}, "
                                      f"this shard holds {list(local_shape)}")
            with np.errstate(over="ignore"):
                value = initial_value.astype(dtype)
            if not np.all(np.isfinite(value)):
                raise InvalidArgument(f"variable {name!r}: initial value contains NaN or Inf "
                                      f"(or a number too large for {dtype})")
        else:
            value = _initialized(name, initializer_json, dtype, lambda: initializers.make(
                initializer_json, shape, dtype, layout.global_ids(self.index), name))
        spec = (shape, dtype, optimizer, partition, owner)
        with self.lock:
            existing = self.variables.get(name)
            if existing is not None:
                same = (existing.shape, existing.dtype, existing.optimizer, existing.layout.strategy,
                        existing.layout.owner) == spec
                if same and (initial_value is None and existing.initializer_json == initializer_json
                             or initial_value is not None and np.array_equal(self.bk.to_numpy(existing.value), value)):
                    return existing
                raise AlreadyExists(f"variable {name!r} already exists with a different specification")
            admit = getattr(self.bk, "admit", None)
            if admit is not None:   # a device backend: value and slots must fit the device memory left
                n_slots = len(self.optimizers[optimizer].impl.slot_names()) if optimizer else 0
                admit(f"variable {name!r} (value and {n_slots} optimizer slots)", nbytes * (1 + n_slots),
                      local_shape[0])
            var = Variable(name, shape, dtype, optimizer, layout, self.index, self.bk.from_numpy(value, dtype),
                           initializer_json)
            self.variables[name] = var
            if optimizer:
                self.optimizers[optimizer].variables.append(name)
            self._notify("variable_created", variable=var)
            return var

    def _create_dynamic(self, name, shape, dtype, optimizer, partition, initializer_json, initial_value,
                        table_json) -> Variable:
        if len(shape) != 2 or shape[0] != 0 or shape[1] <= 0:
            raise InvalidArgument(f"dynamic variable {name!r}: shape must be [0, dim] with dim > 0 (rows are keyed "
                                  f"by int64 and have no count), got {list(shape)}")
        if partition not in ("hash", ""):
            raise InvalidArgument(f"dynamic variable {name!r}: keys are routed by hash; partition {partition!r} is "
                                  "for fixed tables")
        if initial_value is not None:
            raise InvalidArgument(f"dynamic variable {name!r}: an initial value needs a fixed table; a dynamic "
                                  "table's rows start from its initializer (or set_weights of their keys)")
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise InvalidArgument(f"variable {name!r}: dtype {dtype} is not supported (float32 or float64)")
        if optimizer:
            self.optimizer(optimizer)
        policy = TablePolicy(table_json)
        table_json = json.dumps(policy.to_dict(), sort_keys=True)
        _initialized(name, initializer_json, dtype, lambda: initializers.for_keys(   # checked on two keys
            initializer_json, shape[1:], dtype, np.array([0, -1], np.int64), name))
        with self.lock:
            existing = self.variables.get(name)
            if existing is not None:
                if existing.table is not None and (existing.shape, existing.dtype, existing.optimizer,
                                                   existing.initializer_json, existing.table_json) == \
                        (shape, dtype, optimizer, initializer_json, table_json):
                    return existing
                raise AlreadyExists(f"variable {name!r} already exists with a different specification")
            var = Variable(name, shape, dtype, optimizer, Layout(0, self.num_shards, "hash"), self.index,
                           self.bk.from_numpy(np.zeros((0,) + shape[1:], dtype), dtype), initializer_json,
                           table=DynamicTable(policy))
            self.variables[name] = var
            if optimizer:
                self.optimizers[optimizer].variables.append(name)
            self._notify("variable_created", variable=var)
            return var

    def variable(self, name: str) -> Variable:
        try:
            return self.variables[name]
        except KeyError:
            raise NotFound(f"variable {name!r} does not exist") from None

    def bytes_held(self, var: Variable) -> int:
        return self.bk.nbytes(var.value) + sum(self.bk.nbytes(s) for s in var.slots.values())

    # ------------------------------------------------------------------ reads
    def _rows(self, var: Variable, ids, row_start: int, row_stop: int, what: str):
        """(local rows or None for all, global ids or None). A dynamic variable: (its keys, None) for
        keys, else (None, (row_start, row_stop)): positions, resolved under the lock by read()."""
        if ids is not None:
            return var.local_ids(ids, what), None
        if var.table is not None:
            if row_start < 0 or row_stop < 0 or (row_stop and row_stop < row_start):
                raise InvalidArgument(f"{what}: bad row range [{row_start}, {row_stop}) for {var.name!r}")
            return None, (row_start, row_stop)
        gids = var.layout.global_ids(self.index)
        if row_start or row_stop:
            stop = row_stop or var.shape[0]
            if row_start < 0 or stop < row_start:
                raise InvalidArgument(f"{what}: bad row range [{row_start}, {row_stop}) for {var.name!r}")
            lo, hi = np.searchsorted(gids, row_start), np.searchsorted(gids, stop)
            return np.arange(lo, hi, dtype=np.int64), gids[lo:hi]
        return None, gids

    def pull(self, name: str, ids=None, slot: str = "", row_start: int = 0, row_stop: int = 0,
             since_step: int = 0):
        return self.read(*self.locate(name, ids, row_start, row_stop, "pull"), slot, since_step)

    def locate(self, name: str, ids=None, row_start: int = 0, row_stop: int = 0, what: str = "pull"):
        """(variable, local rows or None for all, global ids of a range or None): a pull's checks,
        all of which need no lock."""
        var = self.variable(name)
        rows, gids = self._rows(var, ids, row_start, row_stop, what)
        if var.table is not None and rows is None:
            start, stop = gids
            count = max(0, min(stop or var.local_rows, var.local_rows) - start)
        else:
            count = len(rows) if rows is not None else var.local_rows
        n = count * int(np.prod(var.shape[1:], dtype=np.int64))
        if n > self.max_pull_elements:
            raise InvalidArgument(f"{what} of {name!r}: {n} elements exceed the limit of {self.max_pull_elements}; "
                                  "pull fewer rows at a time")
        return var, rows, gids

    def read(self, var: Variable, rows, gids, slot: str = "", since_step: int = 0):
        """(values, gids, iterations) of located rows, read under the lock."""
        if since_step and (var.table is None or rows is not None):
            raise InvalidArgument(
                f"pull of {var.name!r}: since_step selects the rows of a dynamic variable changed after a step, in "
                "a whole or row-range pull (an export); "
                + ("this one has keys" if var.table is not None else "this variable is a fixed table"))
        if var.table is not None:
            return self._read_dynamic(var, rows, gids, slot, since_step)
        name = var.name
        with self.lock:
            if slot:
                if slot not in var.slots:
                    opt = self.optimizers.get(var.optimizer)
                    names = opt.impl.slot_names() if opt else []
                    if slot not in names:
                        raise NotFound(f"variable {name!r} has no slot {slot!r} (its optimizer has {names})")
                    # Slots are made by the first push that updates the variable; until then one
                    # reads as what it will be made with (Adagrad's initial_accumulator_value,
                    # Lookahead's copy of the weights), as a built Keras optimizer's slot would.
                    values = opt.impl.initial_slot(_HOST, self.bk.to_numpy(var.value, rows), slot)
                    return values, gids, opt.iterations
                arr = var.slots[slot]
            else:
                arr = var.value
            values = self.bk.to_numpy(arr, rows)
            iterations = self.optimizers[var.optimizer].iterations if var.optimizer else 0
        return values, gids, iterations

    def _slot_array(self, var: Variable, slot: str):
        if slot not in var.slots:
            opt = self.optimizers.get(var.optimizer)
            names = opt.impl.slot_names() if opt else []
            if slot in names:
                return None
            raise NotFound(f"variable {var.name!r} has no slot {slot!r} (its optimizer has {names})")
        return var.slots[slot]

    def _read_dynamic(self, var: Variable, keys, span, slot: str, since_step: int):
        """Rows of keys (a key without a row reads as its initial value, or its slot's), or the
        live rows at positions [start, stop) with their keys, those updated after `since_step`."""
        table = var.table
        with self.lock:
            arr = self._slot_array(var, slot) if slot else var.value
            iterations = self.optimizers[var.optimizer].iterations if var.optimizer else 0
            if keys is not None:
                pos = table.index.lookup(keys)
                found = pos >= 0
                if arr is not None and found.all():
                    return self.bk.to_numpy(arr, pos), None, iterations
                values = np.empty((len(keys),) + var.shape[1:], var.dtype)
                if arr is not None and found.any():
                    values[found] = self.bk.to_numpy(arr, pos[found])
            else:
                start, stop = span
                stop = min(stop or table.live, table.live)
                pos = np.arange(start, max(start, stop), dtype=np.int64)
                if since_step:
                    pos = pos[table.step[pos] > since_step]
                gids = table.keys[pos].copy()
                if arr is None:
                    return np.zeros((0,) + var.shape[1:], var.dtype), gids[:0], iterations
                return self.bk.to_numpy(arr, pos), gids, iterations
        missing = ~found if arr is not None else np.ones(len(keys), bool)
        if missing.any():   # computed outside the lock: a pure function of the key
            values[missing] = self._initial_rows(var, keys[missing], slot)
        return values, None, iterations

    def _initial_rows(self, var: Variable, keys, slot: str = ""):
        with np.errstate(over="ignore"):
            rows = initializers.for_keys(var.initializer_json, var.shape[1:], var.dtype, keys, var.name)
        if slot:
            rows = self.optimizers[var.optimizer].impl.initial_slot(_HOST, rows, slot)
        return rows

    # ------------------------------------------------------------------ push
    def decode_push(self, gradients, optimizer_names=()):
        """[(name, ids ndarray|None, values ndarray)] -> {opt name: [Grad]}; raises before any change."""
        by_opt: dict[str, list] = {}
        seen = set()
        for name, ids, values, *rest in gradients:
            l2sum = rest[0] if rest else None
            var = self.variable(name)
            if name in seen:
                raise InvalidArgument(f"push: variable {name!r} appears twice in one push")
            seen.add(name)
            if not var.optimizer:
                raise FailedPrecondition(f"push: variable {name!r} has no optimizer")
            if values.dtype not in FLOAT_DTYPES:
                raise InvalidArgument(f"push: gradient of {name!r} must be float32 or float64, got {values.dtype}")
            if ids is not None:
                local = var.local_ids(ids, "push")
                want = (len(ids),) + var.shape[1:]
                if values.shape != want:
                    raise InvalidArgument(f"push: gradient rows of {name!r} have shape {list(values.shape)}, "
                                          f"expected {list(want)} ({len(ids)} ids x row shape {list(var.shape[1:])})")
            else:
                if var.table is not None:
                    raise InvalidArgument(f"push: {name!r} is a dynamic variable: its gradients are sparse "
                                          "(keys, rows); a dense gradient needs a fixed table")
                opt = self.optimizers.get(var.optimizer)
                if getattr(opt and opt.impl, "sparse_only", False):
                    raise InvalidArgument(f"push: {name!r} is updated by {opt.impl.class_names[0]}, which takes sparse "
                                          "gradients (ids, rows) only")
                local = None
                want = (var.local_rows,) + var.shape[1:]
                if values.shape != want:
                    raise InvalidArgument(f"push: dense gradient of {name!r} has shape {list(values.shape)}, "
                                          f"expected {list(want)}")
            if not self.allow_nonfinite and not np.all(np.isfinite(values)):
                bad = values[~np.isfinite(values)].flat[0]
                raise InvalidArgument(f"push: gradient of {name!r} contains {bad} (NaN and Inf are rejected; "
                                      "start the server with --allow-nonfinite to accept them)")
            if values.dtype != var.dtype:
                with np.errstate(over="ignore"):
                    values = np.ascontiguousarray(values, dtype=var.dtype)
                if not self.allow_nonfinite and not np.all(np.isfinite(values)):
                    raise InvalidArgument(f"push: gradient of {name!r} has values too large for {var.dtype} "
                                          "(they would become Inf)")
            values = np.ascontiguousarray(values)
            by_opt.setdefault(var.optimizer, []).append(Grad(var, local, values, l2sum))
        for opt in optimizer_names:
            self.optimizer(opt)
            by_opt.setdefault(opt, [])
        if not by_opt:
            raise InvalidArgument("push: no gradients (a step needs at least one variable)")
        return by_opt

    def apply(self, by_opt) -> dict:
        """Apply decoded gradients as one step of each optimizer involved; returns iterations.

        With listeners, they get an `applied` event with `timings`, [(variable, optimizer,
        seconds)]: each variable's update time (outside this lock, unless the caller holds it).
        """
        out = {}
        timings = [] if self.listeners else None
        with self.lock:
            self.ensure_slots(by_opt)
            for opt_name, grads in by_opt.items():
                out[opt_name] = self._step(self.optimizers[opt_name], grads, timings)
            self.step_cond.notify_all()
        if timings is not None:
            self._notify("applied", timings=timings)
        return out

    def push(self, gradients, optimizer_names=()) -> dict:
        return self.apply(self.decode_push(gradients, optimizer_names))

    def ensure_slots(self, by_opt):
        """Create the missing slots of every variable these gradients update, and the room of the
        rows a push will create in dynamic variables (caller holds the lock), before anything is
        logged or applied: running out of memory, or a full table that refuses, changes nothing."""
        for opt_name, grads in by_opt.items():
            opt = self.optimizers[opt_name]
            names = opt.impl.slot_names()
            new = [g.var for g in grads if names and any(n not in g.var.slots for n in names)]
            if new:
                self._create_slots(opt, new)   # (decode_push refused a variable named twice)
            for g in grads:
                if g.var.table is not None and g.rows is None:
                    pos = g.var.table.index.lookup(g.ids)
                    missing = pos < 0
                    if not missing.any():
                        g.rows = pos   # (the step under this same hold of the lock reuses them)
                    else:
                        new = np.unique(g.ids[missing])
                        admitted = int(g.var.table.admits(new, opt.iterations + 1, count=False).sum())
                        keep = len(np.unique(pos[~missing])) if g.var.table.policy.capacity is not None else 0
                        self._make_room(g.var, admitted, "push", keep=keep)

    # ------------------------------------------------------------------ dynamic rows
    def _make_room(self, var: Variable, new: int, what: str, keep: int = 0):
        """Room for `new` more rows of a dynamic variable beside `keep` rows the request updates:
        refuse (RESOURCE_EXHAUSTED) what a full table or the memory cannot take, and grow the
        arrays; nothing visible changes."""
        table, pol = var.table, var.table.policy
        if new == 0:
            return
        want = table.live + new
        if pol.capacity is not None:
            if new + keep > pol.capacity or (pol.on_full == "refuse" and want > pol.capacity):
                table.stats["refused_capacity"] += new
                raise ResourceExhausted(
                    f"{what}: dynamic variable {var.name!r} holds {table.live} of at most {pol.capacity} rows on "
                    f"shard {self.index}; {new} new keys do not fit "
                    + ("(its table refuses new rows when full: on_full=\"refuse\")" if pol.on_full == "refuse"
                       else "even after evicting every other row"))
            want = min(want, pol.capacity)
        if want <= table.capacity_rows:
            try:
                table.index.reserve(want)   # (the index may still need to double)
            except MemoryError:
                raise ResourceExhausted(f"{what}: out of memory growing the key index of dynamic variable "
                                        f"{var.name!r} on shard {self.index}; nothing was changed") from None
            return
        row_bytes = int(np.prod(var.shape[1:], dtype=np.int64)) * var.dtype.itemsize * (1 + len(var.slots))
        cap = max(want, int(table.capacity_rows * 1.5), 1024)
        if pol.capacity is not None:
            cap = min(cap, pol.capacity)
        if cap * row_bytes > self.max_variable_bytes:
            raise ResourceExhausted(
                f"{what}: dynamic variable {var.name!r} would need {cap * row_bytes / 2 ** 30:.3g} GiB on shard "
                f"{self.index} for {want} rows; this shard accepts at most {self.max_variable_bytes / 2 ** 30:.3g} "
                "GiB per variable: add shards, or bound the table (capacity, eviction)")
        try:
            table.reserve(cap, want)
            value = self.bk.grow(var.value, cap, table.live)
            slots = {n: self.bk.grow(a, cap, table.live) for n, a in var.slots.items()}
        except MemoryError:
            raise ResourceExhausted(f"{what}: out of memory growing dynamic variable {var.name!r} to {cap} rows on "
                                    f"shard {self.index}; nothing was changed") from None
        var.value = value
        var.slots.update(slots)

    def _resolve(self, opt: OptimizerState, g: Grad) -> Grad:
        """A dynamic variable's pushed keys -> row positions: rows of admitted new keys are created
        (their initial value and slots), gradients of keys not admitted are dropped."""
        var, table = g.var, g.var.table
        step = opt.iterations + 1
        pos = g.rows if g.rows is not None else table.index.lookup(g.ids)
        missing = pos < 0
        if missing.any():
            new = np.unique(g.ids[missing])
            ok = table.admits(new, step, count=True)
            table.stats["refused_admission"] += int((~ok).sum())
            new = new[ok]
            room = table.policy.capacity - table.live if table.policy.capacity is not None else len(new)
            if table.policy.on_full == "refuse" and len(new) > room:
                # (sketch collisions admitted more keys than ensure_slots counted: the rest wait)
                table.stats["refused_capacity"] += len(new) - room
                new = new[:room]
            if len(new):
                table.stats["admitted"] += len(new)
                self._create_rows(var, new, protect=np.unique(pos[~missing]))
                pos = table.index.lookup(g.ids)
                missing = pos < 0
        if missing.any():
            keep = ~missing
            g = Grad(var, pos[keep], g.values[keep], g.l2sum)
        else:
            g = Grad(var, pos, g.values, g.l2sum)
        table.touch(g.ids, step)
        return g

    def _create_rows(self, var: Variable, keys, protect=None, values=None):
        """Rows for distinct new keys: their initial values (or `values`) and their slots' initial
        values; a full table that evicts makes room first (never evicting `protect`)."""
        table, pol = var.table, var.table.policy
        if pol.capacity is not None and table.live + len(keys) > pol.capacity:
            need = table.live + len(keys) - pol.capacity
            batch = max(need, int(pol.capacity * pol.evict_batch))
            self._remove_rows(var, table.least_recent(batch, protect if protect is not None else np.zeros(0, int)))
        self._make_room(var, len(keys), "push")
        if values is None:
            values = self._initial_rows(var, keys)
        opt = self.optimizers.get(var.optimizer)
        step = opt.iterations if opt is not None else 0
        pos = table.add(keys, step)
        self.bk.scatter_update(var.value, pos, values)
        for name, arr in var.slots.items():
            self.bk.scatter_update(arr, pos, opt.impl.initial_slot(_HOST, values, name))
        return pos

    def _remove_rows(self, var: Variable, pos):
        """Remove rows (distinct positions) with their slots; the last rows move into the holes."""
        if len(pos) == 0:
            return
        table = var.table
        holes, movers = table.plan_removal(pos)
        if len(holes):
            for arr in [var.value, *var.slots.values()]:
                self.bk.move_rows(arr, movers, holes)
        table.remove(pos, holes, movers)

    def aged(self, name: str | None = None, now: float | None = None) -> dict:
        """{variable: keys its age policy evicts now} (the caller logs, then evict_keys)."""
        now = time.time() if now is None else now
        out = {}
        with self.lock:
            names = [name] if name else [n for n, v in self.variables.items() if v.table is not None]
            for n in names:
                var = self.variable(n)
                if var.table is None:
                    raise InvalidArgument(f"evict: {n!r} is a fixed table; eviction is for dynamic variables")
                if not var.table.policy.ages:
                    continue
                its = self.optimizers[var.optimizer].iterations if var.optimizer else 0
                keys = var.table.keys[var.table.aged(its, now)]
                if len(keys):
                    out[n] = keys
        return out

    def load_rows(self, var: Variable, keys, values, slots: dict, steps, when, sketch=None, stats=None):
        """A restored dynamic variable's rows (keys distinct, all this shard's) with their slots."""
        table = var.table
        with self.lock:
            for name in slots:   # (the optimizer's slot order comes with the checkpoint)
                var.slots.setdefault(name, self.bk.zeros_like(var.value))
            self._make_room(var, len(keys), "restore")
            pos = table.add(keys, 0)
            table.step[pos], table.when[pos] = steps, when
            self.bk.scatter_update(var.value, pos, np.ascontiguousarray(values))
            for name, arr in slots.items():
                self.bk.scatter_update(var.slots[name], pos, np.ascontiguousarray(arr))
            if sketch is not None and table.sketch is not None and sketch.shape == table.sketch.shape:
                table.sketch[...] = sketch
            table.stats = dict(stats) if stats else {**{k: 0 for k in table.stats}, "created": len(keys)}

    def evict_keys(self, name: str, keys) -> int:
        """Remove the rows of these keys (a logged eviction, replayed); returns how many existed."""
        with self.lock:
            var = self.variable(name)
            pos = var.table.index.lookup(np.unique(np.asarray(keys, np.int64)))
            pos = pos[pos >= 0]
            self._remove_rows(var, pos)
            self._shrink(var)
            return len(pos)

    def _shrink(self, var: Variable):
        """After an eviction, give memory back from a table at most a quarter full: down to twice
        its live rows (at least 1024), so a table that refills does not regrow at once. The same
        evictions replayed from the log shrink the same way; row positions do not change."""
        table = var.table
        cap = max(2 * table.live, 1024)
        if table.live * 4 > table.capacity_rows or cap >= table.capacity_rows:
            return
        try:   # grow() copies the live rows into a new array of `cap` rows: smaller, here
            value = self.bk.grow(var.value, cap, table.live)
            slots = {n: self.bk.grow(a, cap, table.live) for n, a in var.slots.items()}
            table.shrink(cap)
        except MemoryError:   # keep the larger arrays: nothing was changed
            return
        var.value = value
        var.slots.update(slots)

    def _step(self, opt: OptimizerState, grads: list, timings: list | None = None) -> int:
        impl, bk = opt.impl, self.bk
        coefficients = {}
        grads = impl.clip(bk, grads)
        for g in grads:
            started = time.perf_counter() if timings is not None else 0.0
            dt = g.var.dtype
            if dt not in coefficients:
                coefficients[dt] = bk.coefficients(impl.prepare(opt.iterations, dt))
            c = coefficients[dt]
            if g.var.table is not None:
                g = self._resolve(opt, g)
            if g.ids is None:
                impl.apply_dense(bk, g.var.value, g.var.slots, bk.to_device(g.values), c)
            else:
                impl.apply_sparse_raw(bk, g.var.value, g.var.slots, g.ids, g.values, c)
            impl.after_variable(bk, g.var.value, g.var.slots, c)
            if timings is not None:   # metrics (Shard.listeners); TF kernels may still be running
                timings.append((g.var.name, opt.name, time.perf_counter() - started))
        impl.finish(opt.nonslot)
        opt.iterations += 1
        return opt.iterations

    def _create_slots(self, opt: OptimizerState, new_vars: list):
        """The slots these variables lack, all allocated before any is attached (all or nothing)."""
        impl = opt.impl
        made, order = {id(v): {} for v in new_vars}, []
        for gi, group in enumerate(impl.slot_groups()):  # variable-major within a group (see slot_groups)
            for var in new_vars:
                for slot in group:
                    if slot not in var.slots:
                        made[id(var)][slot] = impl.initial_slot(self.bk, var.value, slot)
                        order.append((gi, var.name, slot))
        for var in new_vars:
            var.slots.update(made[id(var)])
        for gi, name, slot in order:
            opt.slot_order[gi].append((name, slot))

    # ------------------------------------------------------------------ optimizer state writes
    def set_weights(self, optimizer: str | None, iterations: int | None, writes, nonslot: dict):
        """writes: [(var name, slot, ids|None, values)]; validated fully before any change."""
        opt = self.optimizer(optimizer) if optimizer else None
        if iterations is not None and opt is None:
            raise InvalidArgument("set_weights: setting iterations needs an optimizer name")
        if iterations is not None and iterations < 0:
            raise InvalidArgument(f"set_weights: iterations must be >= 0, got {iterations}")
        if nonslot:
            if opt is None:
                raise InvalidArgument("set_weights: non-slot state needs an optimizer name")
            unknown = set(nonslot) - set(opt.impl.nonslot_names)
            if unknown:
                raise InvalidArgument(f"set_weights: optimizer {optimizer!r} has no non-slot state {sorted(unknown)}")
            bad = {k: v for k, v in nonslot.items() if not math.isfinite(v)}
            if bad and not self.allow_nonfinite:
                raise InvalidArgument(f"set_weights: non-slot state of {optimizer!r} must be finite, got {bad}")
        plan = []
        with self.lock:
            for name, slot, ids, values in writes:
                var = self.variable(name)
                if slot:
                    vopt = self.optimizers.get(var.optimizer)
                    names = vopt.impl.slot_names() if vopt else []
                    if slot not in names:
                        raise NotFound(f"set_weights: variable {name!r} has no slot {slot!r} (its optimizer has {names})")
                if var.table is not None and ids is None:
                    raise InvalidArgument(f"set_weights: {name!r} is a dynamic variable: give the keys of the rows "
                                          "to write (a whole-variable write needs a fixed table)")
                local = var.local_ids(ids, "set_weights") if ids is not None else None
                want = ((len(ids) if ids is not None else var.local_rows),) + var.shape[1:]
                if tuple(values.shape) != want:
                    raise InvalidArgument(f"set_weights: values for {name!r}{'/' + slot if slot else ''} have shape "
                                          f"{list(values.shape)}, expected {list(want)}")
                if values.dtype not in FLOAT_DTYPES:
                    raise InvalidArgument(f"set_weights: values for {name!r} must be float32 or float64")
                with np.errstate(over="ignore"):
                    cast = values.astype(var.dtype)
                if not np.all(np.isfinite(cast)) and not self.allow_nonfinite:
                    raise InvalidArgument(f"set_weights: values for {name!r}{'/' + slot if slot else ''} contain "
                                          f"NaN or Inf (or numbers too large for {var.dtype})")
                if var.table is not None:
                    keys = np.unique(local)
                    found = var.table.index.lookup(keys) >= 0
                    self._make_room(var, int((~found).sum()), "set_weights", keep=int(found.sum()))
                plan.append((var, slot, local, cast))
            for var, slot, local, values in plan:
                if slot and slot not in var.slots:
                    vopt = self.optimizers[var.optimizer]
                    self._create_slots(vopt, [var])
                if var.table is not None:
                    pos = var.table.index.lookup(local)
                    if (pos < 0).any():
                        self._create_rows(var, np.unique(local[pos < 0]), protect=np.unique(pos[pos >= 0]))
                        pos = var.table.index.lookup(local)
                    local = pos
                arr = var.slots[slot] if slot else var.value
                if local is None:
                    self.bk.assign(arr, self.bk.to_device(values))
                else:
                    self.bk.scatter_update(arr, local, values)
            if opt is not None:
                if iterations is not None:
                    opt.iterations = int(iterations)
                opt.nonslot.update({k: float(v) for k, v in nonslot.items()})
            self.step_cond.notify_all()
            return opt.iterations if opt else 0

    def _notify(self, event, **info):
        for fn in self.listeners:
            fn(event, **info)
