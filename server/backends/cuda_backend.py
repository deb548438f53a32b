"""Variables and slots as CUDA device arrays (numba.cuda), updated by fused kernels.

Tables and slots live in device memory. A push's ids are de-duplicated on the host (numba's
fused `unique_sum`: duplicates summed in input order, the reference's order, with no atomics),
then the unique ids and their summed rows are packed into one pinned host buffer and cross to
the device in one copy; one fused kernel per optimizer family (server/backends/cuda_kernels.py)
then reads each touched element's gradient, value and slots once and writes them back.

Optimizers without a fused kernel here (the Keras 2.11+/3 classes, anything added later) run on
the generic methods: `read` / `gather` bring arrays to the host as numpy, the math runs there
exactly as on the numpy backend, `assign` / `scatter_*` write back. Correct, only slower.

Device memory: every table, slot and staging buffer is allocated through `_alloc`, counted in
`in_use` (with the transfer buffer, a Prometheus gauge), and refused with RESOURCE_EXHAUSTED, naming the device and the
bytes, when it would pass the budget (`--device-memory-budget-mb`, default: what the device had
free at start less HEADROOM) or the memory the device has free: a shard never dies of an
out-of-memory error. `admit()` refuses a new variable whose value and slots do not fit, before
anything is allocated.

Kernel launches are serialised by one lock (the simulator runs one kernel at a time; on a device
the default stream orders them anyway), and every call makes the backend's device current in the
calling thread (numba's contexts are per thread).
"""
import threading
import weakref

import numpy as np

from sparseps.errors import ResourceExhausted

from . import cuda_kernels as ck
from .numpy_backend import NumpyBackend

#: device memory kept free for transient buffers (pull answers, kernels' own needs) by default
HEADROOM = 1 << 30
_ALIGN = 16


def _device_index(device) -> int:
    """None, 'cuda:1', 'gpu:1', '/GPU:1', '/device:GPU:1' or '1' -> 1."""
    if device is None or str(device).strip() == "":
        return 0
    tail = str(device).rsplit(":", 1)[-1].strip()
    if not tail.isdigit():
        raise ValueError(f"CUDA device {device!r}: expected cuda:N, /GPU:N or N")
    return int(tail)


class CudaBackend(NumpyBackend):
    name = "cuda"

    def __init__(self, device=None, memory_budget_bytes=None):
        from numba import cuda
        self.cuda = cuda
        if not cuda.is_available():
            raise RuntimeError("--backend cuda: no CUDA device is visible (numba.cuda.is_available() is False)")
        self.index = _device_index(device)
        if self.index >= len(cuda.gpus):
            raise ValueError(f"CUDA device {device!r}: this machine has {len(cuda.gpus)} visible device(s)")
        self._lock = threading.RLock()
        with self._ctx():
            ctx = cuda.current_context()
            free, total = ctx.get_memory_info()
            dev = ctx.device
            self.device_name = "simulator" if ck.SIMULATOR else _text(dev.name)
            self.sm_count = 1 if ck.SIMULATOR else int(dev.MULTIPROCESSOR_COUNT)
        self.device = f"cuda:{self.index}"
        self.total_bytes = None if ck.SIMULATOR else int(total)
        if memory_budget_bytes:
            self.budget = int(memory_budget_bytes)
        else:
            self.budget = None if ck.SIMULATOR else max(0, int(free) - HEADROOM)
        self.in_use = 0             # tables, slots, row map: what the budget bounds
        self.transfer_bytes = 0     # the transfer buffer
        self._pos = None            # int32 row -> position map (-1: untouched), grown as tables come
        self._pinned = None         # host staging (page-locked) and its device twin
        self._staged = None
        self._dummy = {}
        from . import fused         # host de-duplication (CPU numba kernels)
        self._fused = fused
        self._kernels = {
            "lazy_adam": self._lazy_adam, "adam_sparse": self._adam_sparse, "adam_dense": self._adam_dense,
            "radam_sparse": self._radam_sparse, "radam_dense": self._radam_dense,
            "momentum_sparse": self._momentum_sparse, "sgd_dense": self._sgd_dense,
            "lookahead_sync": self._lookahead_sync, "replica_sum": fused.replica_sum,
        }

    # ---- device memory ----
    def _ctx(self):
        return self.cuda.gpus[self.index]

    def device_memory(self) -> dict:
        """What the metrics report: bytes held by this backend on the device (tables, slots, the
        row map and the transfer buffer) and the budget of the first three."""
        return {"device": self.device, "in_use": self.in_use + self.transfer_bytes, "budget": self.budget}

    def _free(self) -> float:
        if ck.SIMULATOR:
            return float("inf")
        with self._ctx():
            return self.cuda.current_context().get_memory_info()[0]

    def _room(self) -> float:
        """Bytes that may still be allocated: under the budget and free on the device."""
        room = float("inf") if self.budget is None else self.budget - self.in_use
        return min(room, self._free())

    def _refuse(self, what: str, nbytes: int):
        budget = "no budget" if self.budget is None else f"a budget of {self.budget} bytes"
        return ResourceExhausted(
            f"{what} needs {nbytes} bytes of device memory on {self.device} ({self.device_name}), but only "
            f"{max(0, int(min(self._room(), 2 ** 62)))} bytes are left ({budget}, {self.in_use} bytes in use by "
            "this shard): use more shards, a smaller table or a larger --device-memory-budget-mb")

    def admit(self, what: str, nbytes: int, rows: int = 0):
        """Refuse (RESOURCE_EXHAUSTED) a variable whose value and slots (`nbytes`) do not fit;
        otherwise make the per-row scratch cover its rows now, so no push allocates it later."""
        with self._lock:
            extra = 4 * rows if self._pos is None or rows > self._pos.shape[0] else 0
            if nbytes + extra > self._room():
                raise self._refuse(what, nbytes + extra)
            if extra:
                self._pos_map(rows)

    def _alloc(self, shape, dtype, what="an array", budgeted=True):
        """A device array counted in `in_use` (budgeted) or `transfer_bytes` (the transfer buffer,
        bounded by the largest message, which the default budget's HEADROOM leaves room for)."""
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        with self._lock:
            if nbytes > (self._room() if budgeted else self._free()):
                raise self._refuse(what, nbytes)
            try:
                with self._ctx():
                    arr = self.cuda.device_array(shape, dtype)
            except Exception as e:   # CudaAPIError / MemoryError: out of memory after all
                if "OUT_OF_MEMORY" in str(e).upper() or isinstance(e, MemoryError):
                    raise self._refuse(what, nbytes) from None
                raise
            if budgeted:
                self.in_use += nbytes
            else:
                self.transfer_bytes += nbytes
        weakref.finalize(arr, self._freed, nbytes, budgeted)
        return arr

    def _freed(self, nbytes, budgeted):
        with self._lock:
            if budgeted:
                self.in_use -= nbytes
            else:
                self.transfer_bytes -= nbytes

    def _fill(self, arr, byte: int):
        if ck.SIMULATOR:
            arr.copy_to_device(np.full(arr.nbytes, byte, np.uint8).view(arr.dtype).reshape(arr.shape))
        elif arr.size:
            from numba.cuda.cudadrv import driver
            with self._ctx():
                driver.device_memset(arr, byte, arr.nbytes)

    def _pos_map(self, rows):
        if self._pos is None or self._pos.shape[0] < rows:
            self._pos = None   # the old map's bytes count as free before the new one is allocated
            self._pos = self._alloc((max(rows, 1),), np.int32, "the row map of the dense-equivalent applies")
            self._fill(self._pos, 0xFF)   # -1 everywhere
        return self._pos

    def _upload(self, *arrays):
        """Host arrays -> device views, packed into one pinned buffer and copied in one transfer."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += (a.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        total = max(total, _ALIGN)
        if self._pinned is None or self._pinned.shape[0] < total:
            size = max(total, 2 * (0 if self._pinned is None else self._pinned.shape[0]), 1 << 20)
            self._staged = None
            self._staged = self._alloc((size,), np.uint8, "the transfer buffer of a push", budgeted=False)
            with self._ctx():
                self._pinned = self.cuda.pinned_array((size,), np.uint8)
        for a, off in zip(arrays, offsets):
            self._pinned[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
        with self._ctx():
            self._staged[:total].copy_to_device(self._pinned[:total])
        return [self._staged[off:off + max(a.nbytes, a.itemsize)].view(a.dtype)[:a.size].reshape(a.shape)
                if a.size else self._empty(a) for a, off in zip(arrays, offsets)]

    def _empty(self, a):
        return self.cuda.device_array(a.shape, a.dtype)

    # ---- storage ----
    def zeros(self, shape, dtype):
        arr = self._alloc(shape, dtype, f"an array of shape {list(shape)} {np.dtype(dtype)}")
        self._fill(arr, 0)
        return arr

    def zeros_like(self, arr):
        return self.zeros(arr.shape, arr.dtype)

    def from_numpy(self, a, dtype=None):
        a = np.ascontiguousarray(a, dtype=dtype)
        arr = self._alloc(a.shape, a.dtype, f"an array of shape {list(a.shape)} {a.dtype}")
        with self._lock, self._ctx():
            arr.copy_to_device(a)
        return arr

    def to_numpy(self, arr, rows=None):
        if rows is not None:
            return self.gather(arr, rows)
        if isinstance(arr, np.ndarray):
            return arr.copy()
        with self._lock, self._ctx():
            return arr.copy_to_host()

    def copy(self, arr):
        out = self._alloc(arr.shape, arr.dtype, f"a copy of an array of shape {list(arr.shape)}")
        with self._lock, self._ctx():
            out.copy_to_device(arr)
        return out

    def nbytes(self, arr):
        return int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize

    def grow(self, arr, rows: int, used: int | None = None):
        """A new array of `rows` rows whose first `used` (default: all) rows are arr's, the rest zero."""
        used = arr.shape[0] if used is None else used
        if rows < used:
            raise ValueError(f"grow: {rows} rows is fewer than the {used} held")
        out = self.zeros((rows,) + tuple(arr.shape[1:]), arr.dtype)
        if used:
            with self._lock, self._ctx():
                out[:used].copy_to_device(arr[:used])
        return out

    def move_rows(self, arr, src, dst):
        """arr[dst] = arr[src] (int64 row indices, src and dst disjoint)."""
        src = np.ascontiguousarray(src, dtype=np.int64)
        dst = np.ascontiguousarray(dst, dtype=np.int64)
        if src.shape != dst.shape:
            raise ValueError("move_rows: src and dst must have the same length")
        a = self._2d(arr)
        with self._lock, self._ctx():
            d_src, d_dst = self._upload(src, dst)
            self._launch("move_rows", a, len(src) * a.shape[1], a, d_src, d_dst)

    def kernel(self, name):
        return self._kernels.get(name)

    def to_device(self, a):
        return a   # gradients stay on the host until a kernel uploads them (once)

    # ---- helpers ----
    @staticmethod
    def _2d(arr):
        if arr.ndim == 2:
            return arr
        n = arr.shape[0]
        return arr.reshape(n, int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else 1)

    def _launch(self, kernel, table, elements, *args):
        ck.launch(getattr(ck.kernels(table.dtype), kernel), elements, self.sm_count, *args)

    def _dummy_for(self, dtype):
        """A 1x1 stand-in for an absent slot (vhat without amsgrad): kernels never touch it."""
        dt = np.dtype(dtype)
        if dt not in self._dummy:
            self._dummy[dt] = self.zeros((1, 1), dt)
        return self._dummy[dt]

    def _rows2d(self, rows, dim, dtype):
        return np.ascontiguousarray(rows, dtype=dtype).reshape(-1, dim)

    # ---- reads and writes used by the generic optimizer paths ----
    def read(self, arr):
        return self.to_numpy(arr)

    def assign(self, arr, value):
        value = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=arr.dtype), arr.shape))
        with self._lock, self._ctx():
            arr.copy_to_device(value)

    def gather(self, arr, ids):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        a = self._2d(arr)
        if ids.size and (ids.min() < 0 or ids.max() >= a.shape[0]):
            raise IndexError(f"row id out of range [0, {a.shape[0]})")
        with self._lock, self._ctx():
            (d_ids,) = self._upload(ids)
            out = self.cuda.device_array((len(ids), a.shape[1]), a.dtype)
            self._launch("gather", a, len(ids) * a.shape[1], a, d_ids, out)
            host = out.copy_to_host() if len(ids) else np.empty((0, a.shape[1]), a.dtype)
        return host.reshape((len(ids),) + tuple(arr.shape[1:]))

    def _scatter(self, arr, ids, values, mode):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        a = self._2d(arr)
        with self._lock, self._ctx():
            d_ids, d_vals = self._upload(ids, self._rows2d(np.broadcast_to(
                np.asarray(values, dtype=a.dtype), (len(ids),) + tuple(arr.shape[1:])), a.shape[1], a.dtype))
            self._launch("scatter", a, len(ids) * a.shape[1], a, d_ids, d_vals, mode)

    def scatter_update(self, arr, ids, values):
        self._scatter(arr, ids, values, 0)

    def scatter_add(self, arr, ids, values):  # ids unique
        self._scatter(arr, ids, values, 1)

    def scatter_sub(self, arr, ids, values):  # ids unique
        self._scatter(arr, ids, values, 2)

    def scatter_add_raw(self, arr, ids, values):
        """Every row added in input order, duplicates included: per distinct id, one thread per
        element adds that id's rows in the order they came."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        a = self._2d(arr)
        order = np.argsort(ids, kind="stable")
        uniq, starts = np.unique(ids[order], return_index=True)
        offs = np.append(starts, len(ids)).astype(np.int64)
        vals = self._rows2d(values, a.shape[1], a.dtype)
        with self._lock, self._ctx():
            d = self._upload(uniq, offs, order.astype(np.int64), vals)
            self._launch("scatter_add_grouped", a, len(uniq) * a.shape[1], a, *d)

    def unique_sum(self, ids, rows):
        """Unique ids (first-occurrence order) and their rows summed in input order, on the host."""
        if rows.ndim == 2:
            return self._fused.unique_sum(np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(rows))
        return super().unique_sum(ids, rows)

    # ---- fused applies (kernel(name)) ----
    def _lazy_adam(self, var, m, v, ids, rows, lr, b1, b2, omb1, omb2, eps):
        """tfa LazyAdam's sparse step on raw ids; returns the number of unique rows."""
        a = self._2d(var)
        uniq, summed = self._fused.unique_sum(np.ascontiguousarray(ids, dtype=np.int64),
                                              self._rows2d(rows, a.shape[1], a.dtype))
        dt = a.dtype.type
        with self._lock, self._ctx():
            d_ids, d_g = self._upload(uniq, summed)
            self._launch("lazy_adam", a, len(uniq) * a.shape[1], a, self._2d(m), self._2d(v), d_ids, d_g,
                         dt(0), dt(lr), dt(b1), dt(b2), dt(omb1), dt(omb2), dt(eps))
        return len(uniq)

    def _marked(self, a, uniq, summed, kernel, *args):
        """Run a dense-equivalent kernel with the touched rows marked in the row map."""
        pos = self._pos_map(a.shape[0])
        d_ids, d_g = self._upload(np.ascontiguousarray(uniq, dtype=np.int64), self._rows2d(summed, a.shape[1], a.dtype))
        n = len(uniq)
        self._launch("mark", a, n, pos, d_ids, False)
        try:
            self._launch(kernel, a, a.shape[0] * a.shape[1], *args[:4], pos, d_g, *args[4:])
        finally:
            self._launch("mark", a, n, pos, d_ids, True)

    def _slot_or_dummy(self, arr, a):
        return self._2d(arr) if arr is not None else self._dummy_for(a.dtype)

    def _adam_sparse(self, var, m, v, vhat, uniq, summed, lr, b1, b2, omb1, omb2, eps):
        """Keras legacy Adam on unique rows: every row of m, v (vhat) and var is updated."""
        dt = var.dtype.type
        self._moments_sparse(var, m, v, vhat, uniq, summed, (b1, b2, omb1, omb2, eps), False, dt(lr),
                             (0, 0, 0, 0, 0), False, False)

    def _moments_sparse(self, var, m, v, vhat, uniq, summed, moments, radam, lr, radam_args, rectify, has_wd):
        a = self._2d(var)
        dt = a.dtype.type
        with self._lock, self._ctx():
            self._marked(a, uniq, summed, "moments_sparse", a, self._2d(m), self._2d(v),
                         self._slot_or_dummy(vhat, a), *(dt(x) for x in moments), vhat is not None, radam, dt(lr),
                         *(dt(x) for x in radam_args), bool(rectify), bool(has_wd))

    def _adam_dense(self, var, m, v, vhat, grad, alpha, omb1, omb2, eps):
        a = self._2d(var)
        dt = a.dtype.type
        with self._lock, self._ctx():
            (d_g,) = self._upload(self._rows2d(grad, a.shape[1], a.dtype))
            self._launch("adam_dense", a, a.shape[0] * a.shape[1], a, self._2d(m), self._2d(v),
                         self._slot_or_dummy(vhat, a), d_g, dt(alpha), dt(omb1), dt(omb2), dt(eps), vhat is not None)

    @staticmethod
    def _radam_args(dt, c):
        return (dt(c["b1"]), dt(c["b2"]), dt(c["one_minus_b1"]), dt(c["one_minus_b2"]), dt(c["recip_1"]),
                dt(c["recip_2"]), dt(c["r_t"]), dt(c["eps"]))

    def _radam_sparse(self, var, m, v, vhat, uniq, summed, c, has_wd):
        """tfa RectifiedAdam on unique rows: moments of every row, var of the touched rows."""
        self._moments_sparse(var, m, v, vhat, uniq, summed,
                             (c["b1"], c["b2"], c["one_minus_b1"], c["one_minus_b2"], c["eps"]), True, 0,
                             (c["recip_1"], c["recip_2"], c["r_t"], c["neg_lr_t"], c["wd_t"]), c["rectify"], has_wd)

    def _radam_dense(self, var, m, v, vhat, grad, c, has_wd):
        a = self._2d(var)
        dt = a.dtype.type
        with self._lock, self._ctx():
            (d_g,) = self._upload(self._rows2d(grad, a.shape[1], a.dtype))
            self._launch("radam_dense", a, a.shape[0] * a.shape[1], a, self._2d(m), self._2d(v),
                         self._slot_or_dummy(vhat, a), d_g, *self._radam_args(dt, c), dt(c["lr_t"]), dt(c["wd_t"]),
                         bool(c["rectify"]), bool(has_wd), vhat is not None)

    def _momentum_sparse(self, var, accum, uniq, summed, lr, momentum, nesterov):
        a = self._2d(var)
        dt = a.dtype.type
        with self._lock, self._ctx():
            d_ids, d_g = self._upload(np.ascontiguousarray(uniq, dtype=np.int64),
                                      self._rows2d(summed, a.shape[1], a.dtype))
            self._launch("momentum_sparse", a, len(uniq) * a.shape[1], a, self._2d(accum), d_ids, d_g,
                         dt(lr), dt(momentum), bool(nesterov))

    def _sgd_dense(self, var, accum, grad, lr, momentum, nesterov):
        a = self._2d(var)
        dt = a.dtype.type
        with self._lock, self._ctx():
            (d_g,) = self._upload(self._rows2d(grad, a.shape[1], a.dtype))
            self._launch("sgd_dense", a, a.shape[0] * a.shape[1], a, self._slot_or_dummy(accum, a), d_g,
                         dt(lr), dt(momentum), bool(nesterov), accum is not None)

    def _lookahead_sync(self, var, slow, alpha):
        a = self._2d(var)
        with self._lock, self._ctx():
            self._launch("lookahead_sync", a, a.shape[0] * a.shape[1], a, self._2d(slow), a.dtype.type(alpha))


def _text(name):
    return name.decode() if isinstance(name, bytes) else str(name)
