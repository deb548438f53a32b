"""Variables and slots as numpy arrays in host memory.

The generic optimizer math runs as numpy expressions in the variable's dtype; scalars arrive as
numpy scalars of that dtype, so float32 stays float32 and every elementwise operation rounds the
way TensorFlow's CPU kernels do. `NumbaBackend` adds fused per-row kernels for the hot paths.
"""
import os

import numpy as np

from sparseps.reductions import eigen_sum
from sparseps.server.eigen_pow import eigen_layout_pow


class NumpyBackend:
    name = "numpy"
    device = "cpu"

    def parallel(self, wanted: bool):
        """Whether this thread's next kernels may use several cores (numba only)."""

    # ---- storage ----
    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def zeros_like(self, arr):
        return np.zeros(arr.shape, arr.dtype)   # calloc: pages are zeroed as they are first touched

    def from_numpy(self, a, dtype=None):
        return np.array(a, dtype=dtype, copy=True, order="C")

    def to_numpy(self, arr, rows=None):
        return arr.copy() if rows is None else self.gather(arr, rows)

    def copy(self, arr):
        return arr.copy()

    def nbytes(self, arr):
        return arr.nbytes

    def grow(self, arr, rows: int, used: int | None = None):
        """A new array of `rows` rows whose first `used` (default: all) rows are arr's (dynamic
        tables). The rest are zero pages (calloc), which take no memory until a row is written."""
        used = arr.shape[0] if used is None else used
        if rows < used:
            raise ValueError(f"grow: {rows} rows is fewer than the {used} held")
        new = np.zeros((rows,) + arr.shape[1:], arr.dtype)
        new[:used] = arr[:used]
        return new

    def move_rows(self, arr, src, dst):
        """arr[dst] = arr[src] for disjoint row index arrays (compacting a dynamic table)."""
        arr[dst] = arr[src]

    def kernel(self, name):
        return None

    def coefficients(self, c: dict) -> dict:
        """Host scalars for one step, as the backend's math wants them."""
        return c

    def to_device(self, a):
        return a

    # ---- reads and writes used by the optimizers ----
    def read(self, arr):
        return arr

    def assign(self, arr, value):
        arr[...] = value

    def gather(self, arr, ids):
        return np.take(arr, ids, axis=0)

    def scatter_update(self, arr, ids, values):
        arr[ids] = values

    def scatter_add(self, arr, ids, values):  # ids unique
        arr[ids] += values

    def scatter_sub(self, arr, ids, values):  # ids unique
        arr[ids] -= values

    def scatter_add_raw(self, arr, ids, values):
        """Add every row in input order, duplicates included (tf scatter_add on raw ids)."""
        np.add.at(arr, ids, values)

    def unique_sum(self, ids, rows):
        """Unique ids and their summed rows, summed in input order (tf.unique + segment_sum)."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = np.zeros((len(uniq),) + rows.shape[1:], dtype=rows.dtype)
        np.add.at(summed, inverse.reshape(-1), rows)
        return uniq, summed

    # ---- math ----
    sqrt = staticmethod(np.sqrt)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)

    @staticmethod
    def pow(x, y, run=None):
        """x ** y as the reference's CPU kernel evaluates it over runs of `run` elements (None:
        the whole tensor is one run): Eigen's packet pow, libm's on each run's tail (eigen_pow)."""
        return eigen_layout_pow(x, y, run)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def clip_by_value(self, values, lo, hi):
        return np.clip(values, lo, hi)

    def clip_by_norm(self, values, clip):
        """tf.clip_by_norm over the whole tensor: (t * c) / max(||t||, c), ||t|| summed as Eigen does."""
        l2sum = eigen_sum(values * values)
        norm = np.sqrt(l2sum) if l2sum > 0 else l2sum
        return (values * clip) / np.maximum(norm, clip)

    def reduce_sum(self, x):
        """tf.reduce_sum over every element, in Eigen's order (eigen_sum); x an array or a list of
        0-d values (stacked first, as `reduce_sum(stack(...))`). Returns a 0-d value."""
        return eigen_sum(np.array(x) if isinstance(x, (list, tuple)) else x)

    def clip_by_global_norm(self, grads, clip):
        """tf.clip_by_global_norm: norm = sqrt(2 * sum(l2_loss(t))), scale = c * min(1/norm, 1/c).

        l2_loss(t) is Eigen's `(t.square() * 0.5).sum()`; the per-tensor halves are summed by the
        same reduction (`reduce_sum(stack(...))`)."""
        dtype = grads[0].values.dtype
        half = np.array([eigen_sum(g.values * g.values * dtype.type(0.5)) for g in grads], dtype=dtype)
        norm = np.sqrt(eigen_sum(half) * dtype.type(2))
        c = dtype.type(clip)
        with np.errstate(divide="ignore"):   # an all-zero push: 1/0 = inf, scale = 1 as in TF
            scale = c * np.minimum(dtype.type(1.0) / norm, dtype.type(1.0) / c) if np.isfinite(norm) else dtype.type(np.nan)
        return [g.replace(g.values * scale.astype(g.values.dtype)) for g in grads]


class NumbaBackend(NumpyBackend):
    """numpy storage plus fused numba kernels (server/backends/fused.py) for the hot paths."""

    name = "numba"

    def __init__(self):
        from . import fused
        self._fused = fused
        self._kernels = {"lazy_adam": self._lazy_adam, "replica_sum": fused.replica_sum,
                         "adagrad": self._flat(fused.adagrad, 2), "ftrl": self._ftrl,
                         "rmsprop": self._flat(fused.rmsprop, 4)}
        # SPARSEPS_PARALLEL_KERNELS=always: every request may use all numba threads (see parallel())
        self._always_parallel = os.environ.get("SPARSEPS_PARALLEL_KERNELS", "auto") == "always"
        fused.warmup()   # compile (or load the cached machine code) before the first push
        self._warm_read_only(fused)

    @staticmethod
    def _warm_read_only(fused):
        """Pushed ids and rows arrive as read-only views of the request bytes: a separate
        specialisation of each kernel, compiled (or loaded from cache) here rather than mid-push."""
        for dt in (np.float32, np.float64):
            for n in (4, max(2 * fused.PARALLEL_MIN_ROWS, 8)):
                ids = np.arange(n, dtype=np.int64) % 7
                g = np.ones((n, 2), dt)
                ids.setflags(write=False)
                g.setflags(write=False)
                var, m, v = (np.zeros((8, 2), dt) for _ in range(3))
                one = dt(1)
                fused.lazy_adam(var, m, v, ids, g, one, one, one, one, one, one)
                fused.unique_sum(ids, g)
                fused.sgd_sparse_add(var, ids, g, one)
                fused.gather_rows(var, ids)
                fused.adagrad(var, m, ids, g, one, one)

    def kernel(self, name):
        return self._kernels.get(name)

    def pow(self, x, y, run=None):
        """The fused kernels' own pow (fused.pow_runs), bit for bit NumpyBackend.pow."""
        return self._fused.pow_runs(x, y, run)

    def parallel(self, wanted: bool):
        """Parallel kernels shorten one request but cost ~40 % more CPU per row (thread wake-ups);
        when requests queue at the shard, the cores are better spent on them than on that.
        numba's thread count is per calling thread, so this only affects the caller's kernels."""
        import numba
        if self._always_parallel:
            wanted = True
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS if wanted else 1)

    def _lazy_adam(self, var, m, v, ids, rows, *coefficients):
        """The fused kernel works on 2-D tables: rows of any other rank are flattened (views, so
        the update lands in the variable itself)."""
        if var.ndim != 2:
            if not (var.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
                raise ValueError("lazy_adam: the variable and its slots must be C-contiguous")
            n, d = var.shape[0], int(np.prod(var.shape[1:], dtype=np.int64))
            var, m, v = var.reshape(n, d), m.reshape(n, d), v.reshape(n, d)
            rows = np.ascontiguousarray(rows).reshape(len(ids), d)
        return self._fused.lazy_adam(var, m, v, ids, rows, *coefficients)

    @staticmethod
    def _as_2d(tables, ids, rows):
        """2-D views of the variable and its slots (None kept) and the rows, for the fused kernels."""
        var = tables[0]
        if var.ndim == 2:
            return tables, rows
        if not all(t is None or t.flags.c_contiguous for t in tables):
            raise ValueError("fused kernels: the variable and its slots must be C-contiguous")
        n, d = var.shape[0], int(np.prod(var.shape[1:], dtype=np.int64))
        tables = [None if t is None else t.reshape(n, d) for t in tables]
        return tables, np.ascontiguousarray(rows).reshape(len(ids), d)

    def _flat(self, kernel, k):
        """A fused kernel (k tables, then ids, rows, scalars) for variables of any rank."""
        def run(*args):
            tables, rows = self._as_2d(args[:k], args[k], args[k + 1])
            return kernel(*tables, args[k], rows, *args[k + 2:])
        return run

    def _ftrl(self, var, accum, linear, ids, rows, *coefficients):
        # a 1-D variable takes the reference kernel's scalar loop
        return self._flat(self._fused.ftrl, 3)(var, accum, linear, ids, rows, *coefficients, var.ndim == 1)

    def gather(self, arr, ids):
        if arr.ndim == 2 and arr.flags.c_contiguous:
            return self._fused.gather_rows(arr, np.ascontiguousarray(ids, dtype=np.int64))
        return super().gather(arr, ids)

    def unique_sum(self, ids, rows):
        if rows.ndim == 2:
            return self._fused.unique_sum(np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(rows))
        return super().unique_sum(ids, rows)

    def scatter_add_raw(self, arr, ids, values):
        if arr.ndim == 2:
            self._fused.sgd_sparse_add(arr, np.ascontiguousarray(ids, dtype=np.int64),
                                       np.ascontiguousarray(values), arr.dtype.type(1))
        else:
            super().scatter_add_raw(arr, ids, values)
