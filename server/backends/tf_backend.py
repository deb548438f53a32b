"""Variables and slots as `tf.Variable`s on a TensorFlow device (the GPU when there is one).

Every method of `NumpyBackend` has a TensorFlow twin with the same numerics: elementwise math
runs as single TF ops in the variable's dtype (one op per numpy operation, so nothing is fused
or contracted into an FMA), the per-step scalars become constants of their own dtype on the
device (`coefficients`), and the sparse paths use resource gathers and scatters that touch only
the pushed rows (no full-table copies).

Order of sums. The reference (TF on CPU) adds duplicate rows in input order: `tf.unique` +
`tf.math.unsorted_segment_sum` for the de-duplicated optimizers, a raw `scatter_add` for SGD
without momentum. Pushed rows arrive in host memory, so by default (`host_dedupe`) duplicates
are summed there, in input order (numba's fused `unique_sum`, else np.add.at), and only the
unique ids and their sums travel to the device: no `tf.unique` (which waits for the GPU to
learn its output size), less to copy, and no atomics whose order varies. `scatter_add_raw`
adds rows of unique ids on the device and accumulates the rows of repeated ids onto their
current values on the host. Rows already on the device take device paths: on CPU TF's own
kernels (scatters go parallel, adding duplicates in a racy order, from 1024 indices up, so
they get at most 1023 rows at a time); on a GPU, whose kernels use atomics, `ordered_sums`
adds the first row of every id at once and the k-th later occurrence of every id in round k.
All of these give the reference's bits. Gradient clipping (norms are sums, whose order the
GPU's reductions change) runs on the host CPU device, as in the reference.

`kernel("lazy_adam")` is the whole tfa LazyAdam sparse step as one `tf.function` (gather, update,
scatter; de-duplication too for rows on the device): one call per variable instead of ~20 ops.

Grappler's arithmetic optimizer is switched off for this process: inside tf.functions it
re-associates products with scalars, which changes the last bit (measured on LazyAdam's v).

TensorFlow is imported here only, when the backend is created.
"""
import threading

import numpy as np

from sparseps.server.eigen_pow import eigen_layout_pow

# ResourceScatterAdd & co. run serially (in input order) below this many indices on CPU.
CPU_SERIAL_SCATTER = 1023


def _tf():
    import tensorflow as tf
    return tf


def _canonical_device(tf, device):
    """'/GPU:0', 'gpu:1', '/device:CPU:0' -> '/GPU:0' style; raises if no such logical device."""
    spec = tf.DeviceSpec.from_string(device if device.startswith("/") else "/" + device)
    kind = (spec.device_type or "CPU").upper()
    index = spec.device_index or 0
    name = f"/{kind}:{index}"
    known = {f"/{d.device_type}:{d.name.rsplit(':', 1)[1]}" for d in tf.config.list_logical_devices()}
    if name not in known:
        raise ValueError(f"TensorFlow device {device!r} does not exist here (devices: {sorted(known)})")
    return name


class TensorFlowBackend:
    """tf.Variables on one TensorFlow device.

    device: "/GPU:0" when a GPU is visible, else "/CPU:0"; or any "/CPU:0", "gpu:1", ... Created
    before TF's runtime starts (as in a server process), the backend makes that device TF's
    default one (hiding the GPUs for "/CPU:0", all but the chosen one for "/GPU:k", which then
    reads "/GPU:0" in `device`; `physical_device` names it), so that the optimizers' operator
    arithmetic runs there as well; backend methods place their ops explicitly in any case.
    GPUs get memory growth: the process holds what its tables need, not the whole GPU.
    host_dedupe (default on): pushed rows are de-duplicated on the host (see the module doc).
    ordered_sums (default: on a GPU): duplicates of rows already on the device are summed in
    rounds rather than by TF's (atomic, on a GPU) kernels. fused: kernel("lazy_adam").
    """

    name = "tensorflow"

    def __init__(self, device=None, ordered_sums=None, fused=True, host_dedupe=True):
        tf = _tf()
        self.tf = tf
        gpus = tf.config.list_physical_devices("GPU")
        self.requested_device = device
        spec = tf.DeviceSpec.from_string(("/GPU:0" if gpus else "/CPU:0") if not device
                                         else device if device.startswith("/") else "/" + device)
        kind, index = (spec.device_type or "CPU").upper(), spec.device_index or 0
        if kind == "GPU" and index >= len(gpus):
            raise ValueError(f"TensorFlow device {device!r}: this machine has {len(gpus)} visible GPU(s)")
        self.physical_device = gpus[index].name if kind == "GPU" else "/physical_device:CPU:0"
        # Make TF's default placement the chosen device, so that the optimizers' operator
        # arithmetic (a * b outside any backend method) runs there too: only possible before
        # TF's runtime starts (it has not in a server process); otherwise every backend method
        # still places its own ops explicitly.
        try:
            if kind == "CPU" and gpus:
                tf.config.set_visible_devices([], "GPU")
            elif kind == "GPU" and index:
                tf.config.set_visible_devices([gpus[index]], "GPU")
                index = 0
        except RuntimeError:
            pass
        for gpu in tf.config.get_visible_devices("GPU"):  # hold what the tables need, not the whole GPU
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except (RuntimeError, ValueError):
                pass
        self.device = _canonical_device(tf, f"/{kind}:{index}")
        self.on_gpu = kind == "GPU"
        # Grappler's arithmetic optimizer re-associates scalar products inside tf.functions
        # (measured: v = b2 v + (1 - b2) g g then differs from the reference in the last bit).
        tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
        # input-order duplicate sums by rounds (needed where the native kernels use atomics)
        self.ordered_sums = self.on_gpu if ordered_sums is None else bool(ordered_sums)
        self.host_dedupe = bool(host_dedupe)
        self._numba = None
        if self.host_dedupe:
            try:
                from . import fused as numba_kernels
                self._numba = numba_kernels
            except ImportError:   # numba is optional: np.add.at gives the same bits, slower
                pass
        self._fused = fused
        # var -= step: on CPU a gather, a subtraction and a scatter_update beat ResourceScatterSub
        # (which goes parallel under a lock per row block from 1024 rows); same bits either way
        self._sub_via_update = not self.on_gpu
        self._lock = threading.Lock()
        self._fns = {}
        self._consts = {}   # (dtype, bits) -> scalar constant on the device (immutable, shared)

    # ---- helpers ----
    def scope(self):
        """`with bk.scope():` places the optimizers' operator arithmetic on this device."""
        return self.tf.device(self.device)

    def _ids(self, ids):
        if isinstance(ids, np.ndarray):
            return self.tf.constant(ids if ids.dtype == np.int64 else ids.astype(np.int64))
        return ids

    def _host_unique_sum(self, ids, rows):
        """(uniq, summed) numpy: 0 + r1 + r2 + ... per id in input order (first-occurrence order)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self._numba is not None and rows.ndim == 2 and len(ids) < 2**30:
            return self._numba.unique_sum(ids, np.ascontiguousarray(rows))
        uniq, inverse = np.unique(ids, return_inverse=True)
        summed = np.zeros((len(uniq),) + rows.shape[1:], dtype=rows.dtype)
        np.add.at(summed, inverse.reshape(-1), rows)
        return uniq, summed

    def _host(self, values, dtype=None):
        """With host_dedupe: values as a numpy array (of dtype) when they are host data (numpy, or
        a CPU tensor); None for data on a GPU, or without host_dedupe."""
        if not self.host_dedupe:
            return None
        if isinstance(values, self.tf.Tensor):
            if "CPU" not in values.device:
                return None
            values = values.numpy()
        elif not isinstance(values, np.ndarray):
            return None
        return values if dtype is None or values.dtype == dtype else values.astype(dtype)

    def _fn(self, key, build):
        fn = self._fns.get(key)
        if fn is None:
            with self._lock:
                fn = self._fns.get(key)
                if fn is None:
                    fn = self._fns[key] = build()
        return fn

    # ---- storage ----
    def zeros(self, shape, dtype):
        tf = self.tf
        with tf.device(self.device):
            return tf.Variable(tf.zeros(shape, dtype=tf.as_dtype(np.dtype(dtype))), trainable=False)

    def zeros_like(self, arr):
        return self.zeros(tuple(arr.shape), arr.dtype.as_numpy_dtype if hasattr(arr.dtype, "as_numpy_dtype")
                          else arr.dtype)

    def from_numpy(self, a, dtype=None):
        tf = self.tf
        a = np.ascontiguousarray(a, dtype=dtype)
        with tf.device(self.device):
            return tf.Variable(tf.constant(a), trainable=False)

    def to_numpy(self, arr, rows=None):
        if rows is None:
            if isinstance(arr, np.ndarray):
                return arr.copy()
            return arr.numpy()
        return self.gather(arr, rows).numpy()

    def copy(self, arr):
        tf = self.tf
        with tf.device(self.device):
            return tf.Variable(tf.identity(arr), trainable=False)

    def nbytes(self, arr):
        return int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.size

    def grow(self, arr, rows: int, used: int | None = None):
        """A new variable of `rows` rows whose first `used` (default: all) rows are arr's (dynamic tables)."""
        used = int(arr.shape[0]) if used is None else used
        if rows < used:
            raise ValueError(f"grow: {rows} rows is fewer than the {used} held")
        tf = self.tf
        with tf.device(self.device):
            head = arr[:used]
            tail = tf.zeros((rows - used,) + tuple(arr.shape[1:]), dtype=arr.dtype)
            return tf.Variable(tf.concat([head, tail], 0), trainable=False)

    def move_rows(self, arr, src, dst):
        """arr[dst] = arr[src] for disjoint row index arrays (compacting a dynamic table)."""
        self.scatter_update(arr, dst, self.gather(arr, src))

    def kernel(self, name):
        if not self._fused:
            return None
        if name == "lazy_adam":
            return self._lazy_adam
        return None

    def coefficients(self, c: dict) -> dict:
        """numpy scalars -> constants of their own dtype on the device.

        Constants are cached by value (betas, epsilon, a constant learning rate repeat every
        step); the new ones of a step travel to the device together, one transfer per dtype.
        Anything that is not a float scalar (Python bools and ints for control flow) is kept."""
        tf = self.tf
        out = dict(c)
        missing = {}
        for k, v in c.items():
            if isinstance(v, (np.floating, np.ndarray)) and np.ndim(v) == 0:
                v = np.asarray(v)
                key = (v.dtype.char, v.tobytes())
                t = self._consts.get(key)
                if t is None:
                    missing.setdefault(v.dtype, []).append((k, key, v))
                else:
                    out[k] = t
        if missing:
            if len(self._consts) > 4096:
                self._consts.clear()
            with tf.device(self.device):
                for dt, items in missing.items():
                    if len(items) == 1:
                        tensors = [tf.constant(items[0][2])]
                    else:
                        tensors = tf.unstack(tf.constant(np.array([v for _, _, v in items], dtype=dt)))
                    for (k, key, _), t in zip(items, tensors):
                        out[k] = self._consts[key] = t
        return out

    def to_device(self, a):
        tf = self.tf
        with tf.device(self.device):
            if isinstance(a, np.ndarray) or np.isscalar(a):
                return tf.constant(a)
            return tf.identity(a)

    # ---- reads and writes used by the optimizers ----
    def read(self, arr):
        if isinstance(arr, self.tf.Variable):
            with self.tf.device(self.device):
                return arr.read_value()
        return arr

    def assign(self, arr, value):
        with self.tf.device(self.device):
            arr.assign(value, read_value=False)

    def gather(self, arr, ids):
        tf = self.tf
        with tf.device(self.device):
            if isinstance(arr, tf.Variable):
                return tf.raw_ops.ResourceGather(resource=arr.handle, indices=self._ids(ids), dtype=arr.dtype)
            return tf.gather(arr, self._ids(ids))

    def _scatter(self, op, arr, ids, values):
        tf = self.tf
        with tf.device(self.device):
            op(resource=arr.handle, indices=self._ids(ids), updates=tf.convert_to_tensor(values, dtype=arr.dtype))

    def scatter_update(self, arr, ids, values):
        self._scatter(self.tf.raw_ops.ResourceScatterUpdate, arr, ids, values)

    def scatter_add(self, arr, ids, values):  # ids unique
        self._scatter(self.tf.raw_ops.ResourceScatterAdd, arr, ids, values)

    def scatter_sub(self, arr, ids, values):  # ids unique
        self._scatter(self.tf.raw_ops.ResourceScatterSub, arr, ids, values)

    def scatter_add_raw(self, arr, ids, values):
        """Add every row in input order, duplicates included (tf scatter_add on raw ids)."""
        tf = self.tf
        dtype = arr.dtype.as_numpy_dtype
        host = self._host(values, dtype) if isinstance(ids, np.ndarray) else None
        with tf.device(self.device):
            if host is not None:
                ids = np.ascontiguousarray(ids, dtype=np.int64)
                uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
                if len(uniq) == len(ids):   # no duplicates: nothing depends on the order
                    tf.raw_ops.ResourceScatterAdd(resource=arr.handle, indices=ids, updates=host)
                    return
                inverse = inverse.reshape(-1)
                repeated = counts[inverse] > 1
                if not repeated.all():
                    tf.raw_ops.ResourceScatterAdd(resource=arr.handle, indices=ids[~repeated],
                                                  updates=host[~repeated])
                rep_ids = uniq[counts > 1]
                acc = tf.raw_ops.ResourceGather(resource=arr.handle, indices=rep_ids, dtype=arr.dtype).numpy()
                np.add.at(acc, np.searchsorted(rep_ids, ids[repeated]), host[repeated])  # var + r1 + r2 ...
                tf.raw_ops.ResourceScatterUpdate(resource=arr.handle, indices=rep_ids, updates=acc)
                return
            ids = self._ids(ids)
            values = tf.convert_to_tensor(values, dtype=arr.dtype)
            if self.ordered_sums:
                self._fn(("ordered_scatter_add", arr.dtype), self._build_ordered_scatter_add)(arr, ids, values)
                return
            n = int(ids.shape[0])
            for lo in range(0, n, CPU_SERIAL_SCATTER):
                tf.raw_ops.ResourceScatterAdd(resource=arr.handle, indices=ids[lo:lo + CPU_SERIAL_SCATTER],
                                              updates=values[lo:lo + CPU_SERIAL_SCATTER])

    def unique_sum(self, ids, rows):
        """Unique ids and their summed rows, summed in input order (tf.unique + segment_sum)."""
        tf = self.tf
        host = self._host(rows) if isinstance(ids, np.ndarray) else None
        with tf.device(self.device):
            if host is not None:
                uniq, summed = self._host_unique_sum(ids, host)
                return tf.constant(uniq), tf.constant(summed)
            ids = self._ids(ids)
            rows = tf.convert_to_tensor(rows)
            return self._fn(("unique_sum", rows.dtype), self._build_unique_sum)(ids, rows)

    # ---- math ----
    def sqrt(self, x):
        with self.tf.device(self.device):
            return self.tf.sqrt(x)

    def maximum(self, a, b):
        with self.tf.device(self.device):
            return self.tf.maximum(a, b)

    def minimum(self, a, b):
        with self.tf.device(self.device):
            return self.tf.minimum(a, b)

    def pow(self, x, y, run=None):
        """x ** y as TF 2.15's CPU kernels evaluate it (server/eigen_pow.py, on the host): this
        TensorFlow's own Pow is another Eigen's, and a GPU's another library's again."""
        tf = self.tf
        host = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        out = eigen_layout_pow(host, np.asarray(y, dtype=host.dtype), run)
        with tf.device(self.device):
            return tf.constant(out)

    def where(self, cond, a, b):
        with self.tf.device(self.device):
            return self.tf.where(cond, a, b)

    # Clipping runs on the host CPU device (the pushed rows are there; the reference's norms are
    # Eigen CPU reductions) and returns numpy arrays, which the sparse paths then de-duplicate.
    def clip_by_value(self, values, lo, hi):
        tf = self.tf
        with tf.device("/CPU:0"):
            return tf.clip_by_value(values, lo, hi).numpy()

    def clip_by_norm(self, values, clip):
        """tf.clip_by_norm over the whole tensor: (t * c) / max(||t||, c)."""
        tf = self.tf
        with tf.device("/CPU:0"):
            values = tf.convert_to_tensor(values)
            return tf.clip_by_norm(values, tf.constant(clip, dtype=values.dtype)).numpy()

    def reduce_sum(self, x):
        """tf.reduce_sum over every element (x a tensor/array, or a list of 0-d values, stacked
        first as `reduce_sum(stack(...))`), on the host CPU device: the reference's Eigen CPU
        reduction order. A 0-d tensor."""
        tf = self.tf
        with tf.device("/CPU:0"):
            if isinstance(x, (list, tuple)):
                x = tf.stack([tf.convert_to_tensor(v) for v in x])
            return tf.reduce_sum(x)

    def clip_by_global_norm(self, grads, clip):
        """tf.clip_by_global_norm: norm = sqrt(2 sum(l2_loss(t))), scale = c * min(1/norm, 1/c)."""
        tf = self.tf
        with tf.device("/CPU:0"):
            values = [tf.convert_to_tensor(g.values) for g in grads]
            dtype = values[0].dtype
            half = tf.stack([tf.cast(tf.nn.l2_loss(v), dtype) for v in values])
            norm = tf.sqrt(tf.reduce_sum(half) * tf.constant(2, dtype))
            c = tf.constant(clip, dtype)
            one = tf.constant(1, dtype)
            scale = c * tf.minimum(one / norm, one / c)
            scale = tf.where(tf.math.is_finite(norm), scale, tf.constant(np.nan, dtype))
            return [g.replace((v * tf.cast(scale, v.dtype)).numpy()) for g, v in zip(grads, values)]

    # ---- tf.functions ----
    def _ordered_rounds(self):
        """fn(ids, rows, init_fn) -> (uniq, acc): acc[u] = init + r1 + r2 + ..., the rows of
        uniq[u] added one by one in input order (init_fn(uniq), or +0 when init_fn is None: the
        zero-initialised accumulator of tf.math.unsorted_segment_sum).

        Round 0 adds every id's first row, gathered by position; only the later occurrences of
        duplicated ids then go through rounds, the k-th later occurrence of every id in round k.
        Within a round no id repeats, so nothing depends on the order of atomic adds."""
        tf = self.tf

        def rounds(ids, rows, init_fn):
            uniq, idx = tf.unique(ids, out_idx=tf.int32)
            n = tf.shape(uniq)[0]
            pos = tf.range(tf.shape(ids)[0], dtype=tf.int32)
            first = tf.math.unsorted_segment_min(pos, idx, n)    # integer min: order-free
            first_rows = tf.gather(rows, first)
            acc = (first_rows + tf.zeros([], rows.dtype)) if init_fn is None else init_fn(uniq) + first_rows
            dup_pos = tf.cast(tf.where(tf.not_equal(tf.gather(first, idx), pos))[:, 0], tf.int32)

            def later_rows(acc):
                d_idx = tf.gather(idx, dup_pos)                  # the id of every later occurrence
                order = tf.argsort(d_idx, stable=True)           # grouped by id, input order within
                s_idx, s_pos = tf.gather(d_idx, order), tf.gather(dup_pos, order)
                k_pos = tf.range(tf.shape(s_idx)[0], dtype=tf.int32)
                rank = k_pos - tf.gather(tf.math.unsorted_segment_min(k_pos, s_idx, n), s_idx)
                n_rounds = tf.reduce_max(rank) + 1

                def body(k, acc):
                    sel = tf.where(tf.equal(rank, k))[:, 0]
                    seg = tf.gather(s_idx, sel)
                    new = tf.gather(acc, seg) + tf.gather(rows, tf.gather(s_pos, sel))
                    return k + 1, tf.tensor_scatter_nd_update(acc, seg[:, None], new)

                return tf.while_loop(lambda k, acc: k < n_rounds, body, (tf.constant(0, tf.int32), acc))[1]

            acc = tf.cond(tf.size(dup_pos) > 0, lambda: later_rows(acc), lambda: acc)
            return uniq, acc
        return rounds

    def _build_unique_sum(self):
        tf = self.tf
        if self.ordered_sums:
            rounds = self._ordered_rounds()

            @tf.function(reduce_retracing=True)
            def unique_sum(ids, rows):
                return rounds(ids, rows, None)
        else:
            @tf.function(reduce_retracing=True)
            def unique_sum(ids, rows):
                uniq, idx = tf.unique(ids)
                return uniq, tf.math.unsorted_segment_sum(rows, idx, tf.shape(uniq)[0])
        return unique_sum

    def _build_ordered_scatter_add(self):
        tf = self.tf
        rounds = self._ordered_rounds()

        @tf.function(reduce_retracing=True)
        def scatter_add(var, ids, rows):
            uniq, acc = rounds(ids, rows, lambda uniq: var.sparse_read(uniq))
            var.scatter_update(tf.IndexedSlices(acc, uniq))
        return scatter_add

    def _build_lazy_adam(self, dedupe):
        """The LazyAdam step as a tf.function; dedupe: the ids may repeat (rows on the device)."""
        tf = self.tf
        rounds = self._ordered_rounds() if self.ordered_sums else None
        ordered, sub_via_update = self.ordered_sums, self._sub_via_update

        @tf.function(reduce_retracing=True)
        def lazy_adam(var, m, v, ids, rows, lr, b1, b2, omb1, omb2, eps):
            if not dedupe:
                uniq, g = ids, rows
            elif ordered:
                uniq, g = rounds(ids, rows, None)
            else:
                uniq, idx = tf.unique(ids)
                g = tf.math.unsorted_segment_sum(rows, idx, tf.shape(uniq)[0])
            m_rows = b1 * m.sparse_read(uniq) + omb1 * g
            v_rows = b2 * v.sparse_read(uniq) + omb2 * (g * g)
            m.scatter_update(tf.IndexedSlices(m_rows, uniq))
            v.scatter_update(tf.IndexedSlices(v_rows, uniq))
            step = (lr * m_rows) / (tf.sqrt(v_rows) + eps)
            if sub_via_update:
                var.scatter_update(tf.IndexedSlices(var.sparse_read(uniq) - step, uniq))
            else:
                var.scatter_sub(tf.IndexedSlices(step, uniq))
            return tf.shape(uniq)[0]
        return lazy_adam

    def _lazy_adam(self, var, m, v, ids, rows, lr, b1, b2, omb1, omb2, eps):
        """tfa LazyAdam._resource_apply_sparse on raw (duplicated) ids, as one tf.function call.

        Returns the number of unique rows (an int when de-duplicated on the host, else a device
        scalar). The step itself may still be running on the device when this returns."""
        tf = self.tf
        dtype = var.dtype.as_numpy_dtype
        host = self._host(rows, dtype) if isinstance(ids, np.ndarray) else None
        if host is not None:
            uniq, summed = self._host_unique_sum(ids, host)
            fn = self._fn(("lazy_adam", var.dtype, False), lambda: self._build_lazy_adam(False))
            with tf.device(self.device):
                fn(var, m, v, uniq, summed, lr, b1, b2, omb1, omb2, eps)
            return len(uniq)
        fn = self._fn(("lazy_adam", var.dtype, True), lambda: self._build_lazy_adam(True))
        with tf.device(self.device):
            return fn(var, m, v, self._ids(ids), tf.convert_to_tensor(rows, dtype=var.dtype),
                      lr, b1, b2, omb1, omb2, eps)
