"""Fused per-row numba kernels for sparse optimizer updates (CPU backend).

Plain module: numpy + numba, and from the project only server/eigen_pow.py (TF's pow, one source).

Every kernel is ``@numba.njit(nogil=True, cache=True, fastmath=False, error_model="numpy")``:

* ``fastmath=False`` means LLVM never contracts ``a * b + c`` into an FMA and never reassociates,
  so each element goes through exactly the IEEE operations written below, in that order (the row
  loops are still vectorised: AVX/AVX-512 ``vmulps/vaddps/vsqrtps/vdivps``, which are exact);
* the float scalars are converted to the array dtype by the Python wrappers (``np.float32(x)``
  for float32 tables) before they reach a kernel, so float32 arithmetic is never promoted to
  float64 (``np.sqrt`` of a float32 stays float32; ``math.sqrt`` is never used);
* ``error_model="numpy"``: ``x / 0`` gives inf/nan like numpy and TF instead of raising.

The results are therefore bit-identical to numpy evaluating the same formula with scalars of the
array dtype, which is how TensorFlow Addons' ``LazyAdam._resource_apply_sparse`` evaluates it
(``tf.unique`` + ``tf.math.unsorted_segment_sum`` for the duplicate sum, then
``m = b1 * m + (1 - b1) * g``, ``v = b2 * v + (1 - b2) * g * g``,
``var -= lr * m / (sqrt(v) + eps)``). The scalars are the caller's business; note that TF
computes ``beta ** t`` with Eigen's ``pow``, which differs from libm's ``powf``/``pow`` (numpy) by
1 ulp for some t, so a caller matching TF bit for bit must reproduce TF's powers.

Conventions of the public functions:

* ``var``, ``m``, ``v``, ``accum``, ``table``: 2-D ``(rows, dim)``, C-contiguous, float32 or float64,
  updated in place;
* ``ids``: LOCAL row indices, 1-D int64 (other integer dtypes are converted), unsorted, possibly
  duplicated; every id must be in ``[0, rows)`` -- otherwise ``IndexError`` is raised before
  anything is modified;
* ``grads``: ``(len(ids), dim)``, same dtype as ``var``.

Kernels exist in a serial and a ``parallel=True`` (``numba.prange``, one contiguous share of the
unique rows per thread) flavour; the wrappers pick the parallel one from ``PARALLEL_MIN_ROWS`` ids
on, when numba has more than one thread (``numba.set_num_threads(1)`` forces serial). Both
flavours give identical bits (rows are independent; the duplicate sum of a row is always done in
input order by one thread). The per-row loops prefetch the rows ``PREFETCH_ROWS`` ahead.

Thread safety: the kernels release the GIL. With numba's ``omp`` or ``tbb`` threading layer
parallel kernels may be called from several Python threads at once; the ``workqueue`` layer is
not thread-safe, so when it is the active layer (or before the layer is known) parallel calls are
serialised through a module lock. With the ``omp`` layer, how libgomp's workers wait between
calls matters (set it in the environment before the first parallel call). Measured with
bench/bench_apply.py at B=4096 uniform on a 2-core VM that other jobs kept at load ~3: libgomp's
default (300k spins, then sleep) 0.07x np.take -- a fork-join stalls whenever a spinning worker
is descheduled; ``GOMP_SPINCOUNT=20000`` 0.16-0.27x; ``OMP_WAIT_POLICY=ACTIVE`` 0.5x (but it
halves np.take's own rate by occupying the other core); ``OMP_WAIT_POLICY=PASSIVE`` 0.37-0.40x,
about the serial kernel's rate. At load ~2 a bounded spin / ACTIVE reached 0.53-0.6x. On a shared
CPU use ``OMP_WAIT_POLICY=PASSIVE``; spin only on dedicated cores.

numba's on-disk cache records the importing module's name: load this file under one name only
(``sparseps.server.backends.fused``), or cached kernels fail to load in the other process.
"""
from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace as types_ns

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from sparseps.server import eigen_pow as _eigen_pow   # TF 2.15's pow, one source (numpy only)

__all__ = [
    "unique_sum",
    "lazy_adam",
    "sgd_sparse_add",
    "keras_momentum_sparse",
    "adagrad",
    "ftrl",
    "rmsprop",
    "gather_rows",
    "replica_sum",
    "pow_runs",
    "warmup",
    "PARALLEL_MIN_ROWS",
]

# error_model='numpy': x / 0 gives inf/nan as in numpy and TF (the default 'python' model raises
# ZeroDivisionError, and its check is an early loop exit that stops LLVM vectorising the row loop).
_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")
_JIT_NOCACHE = dict(_JIT, cache=False)

#: from this many ids (rows for keras_momentum_sparse / gather_rows) on, the parallel kernels are
#: used: a prange launch costs ~5-20 us with spinning workers, a futex wake-up (tens of us) with
#: OMP_WAIT_POLICY=PASSIVE.
PARALLEL_MIN_ROWS = 1024

_FIB = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Fibonacci hashing)


#: rows prefetched ahead in the per-row update loops (each row = var, m, v lines)
PREFETCH_ROWS = 8


@intrinsic
def _prefetch_w(typingctx, arr, row, col):
    """Prefetch (for write, keep in all cache levels) the cache line holding arr[row, col].

    A hint only: no fault on any address, no effect on results.
    """
    if not isinstance(arr, types.Array) or arr.ndim != 2:
        return None
    sig = types.void(arr, row, col)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        r = context.cast(builder, args[1], signature.args[1], types.intp)
        c = context.cast(builder, args[2], signature.args[2], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [r, c], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(**_JIT)
def _line_elems(a):
    """Elements of ``a`` per 64-byte cache line."""
    return max(1, 64 // a.itemsize)


# --------------------------------------------------------------------------------------------
# de-duplication: open-addressing hash table (linear probing), first-occurrence order
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _dedupe(ids, n_rows):
    """Return (uniq, inv, counts, k, bad).

    uniq[:k]: distinct ids in first-occurrence order; inv[i]: position of ids[i] in uniq;
    counts[u]: occurrences of uniq[u]. On an id outside [0, n_rows): k = -1, bad = its position.
    """
    n = ids.shape[0]
    log2 = 4
    while (1 << log2) < 2 * n:
        log2 += 1
    cap = 1 << log2
    mask = cap - 1
    shift = np.uint64(64 - log2)
    slots = np.full(cap, -1, np.int32)
    uniq = np.empty(n, np.int64)
    inv = np.empty(n, np.int32)
    counts = np.empty(n, np.int32)
    k = 0
    for i in range(n):
        r = ids[i]
        if r < 0 or r >= n_rows:
            return uniq, inv, counts, -1, i
        s = np.int64((np.uint64(r) * _FIB) >> shift)
        while True:
            u = slots[s]
            if u < 0:
                slots[s] = k
                uniq[k] = r
                inv[i] = k
                counts[k] = 1
                k += 1
                break
            if uniq[u] == r:
                inv[i] = u
                counts[u] += 1
                break
            s = (s + 1) & mask
    return uniq, inv, counts, k, -1


@numba.njit(**_JIT)
def _check_ids(ids, n_rows):
    """Position of the first id outside [0, n_rows), or -1."""
    for i in range(ids.shape[0]):
        r = ids[i]
        if r < 0 or r >= n_rows:
            return i
    return -1


@numba.njit(**_JIT)
def _unique_sum_kernel(ids, grads, n_rows):
    uniq, inv, counts, k, bad = _dedupe(ids, n_rows)
    dim = grads.shape[1]
    kk = k if k > 0 else 0
    summed = np.zeros((kk, dim), grads.dtype)
    if k < 0:
        return uniq[:0], summed, bad
    # np.add.at order: acc = 0; acc += g_first; acc += g_second; ...
    for i in range(ids.shape[0]):
        u = inv[i]
        for j in range(dim):
            summed[u, j] += grads[i, j]
    return uniq[:k], summed, -1


# --------------------------------------------------------------------------------------------
# LazyAdam
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _group(ids, n_rows):
    """Dedupe + counting sort of positions by unique id (stable: input order inside a group).

    Returns (uniq, offs, order, k, bad): the positions of uniq[u] in ids are
    order[offs[u]:offs[u + 1]], ascending.
    """
    uniq, inv, counts, k, bad = _dedupe(ids, n_rows)
    n = ids.shape[0]
    kk = k if k > 0 else 0
    offs = np.empty(kk + 1, np.int64)
    order = np.empty(n, np.int32)
    if k < 0:
        return uniq, offs, order, k, bad
    offs[0] = 0
    for u in range(k):
        offs[u + 1] = offs[u] + counts[u]
    if k == n:  # no duplicates: group u is position u
        for i in range(n):
            order[i] = i
        return uniq, offs, order, k, -1
    fill = offs[:k].copy()
    for i in range(n):
        u = inv[i]
        order[fill[u]] = i
        fill[u] += 1
    return uniq, offs, order, k, -1


@numba.njit(**_JIT)
def _adam_rows(var, m, v, uniq, offs, order, grads, scratch, si, lo, hi,
               zero, lr, beta1, beta2, omb1, omb2, eps):
    """LazyAdam on unique rows uniq[lo:hi] (one thread's share; scratch[si] is its own line for
    the sum of a duplicated row).

    The var/m/v rows PREFETCH_ROWS ahead are prefetched (for write): the rows are random, so
    without it every row waits on DRAM three times and the math cannot overlap the misses.
    """
    dim = var.shape[1]
    line = _line_elems(var)
    for u in range(lo, hi):
        up = u + PREFETCH_ROWS
        if up < hi:
            rp = uniq[up]
            for j in range(0, dim, line):
                _prefetch_w(var, rp, j)
                _prefetch_w(m, rp, j)
                _prefetch_w(v, rp, j)
            # numpy aligns large arrays to 16 bytes only: a row can straddle one more line
            _prefetch_w(var, rp, dim - 1)
            _prefetch_w(m, rp, dim - 1)
            _prefetch_w(v, rp, dim - 1)
        r = uniq[u]
        s = offs[u]
        e = offs[u + 1]
        if e - s == 1:
            g = grads
            gi = np.int64(order[s])
        else:
            # duplicated row: sum in input order (0 + g_first + g_second + ...) into scratch[si]
            g = scratch
            gi = np.int64(si)
            for j in range(dim):
                scratch[si, j] = zero
            for p in range(s, e):
                i = order[p]
                for j in range(dim):
                    scratch[si, j] += grads[i, j]
        # zero + g turns a lone -0.0 gradient into +0.0, exactly like the reference's 0 + g
        for j in range(dim):
            gj = zero + g[gi, j]
            mj = beta1 * m[r, j] + omb1 * gj
            vj = beta2 * v[r, j] + omb2 * (gj * gj)
            m[r, j] = mj
            v[r, j] = vj
            var[r, j] = var[r, j] - (lr * mj) / (np.sqrt(vj) + eps)


@numba.njit(**_JIT)
def _lazy_adam_serial(var, m, v, ids, grads, zero, lr, beta1, beta2, omb1, omb2, eps):
    uniq, offs, order, k, bad = _group(ids, var.shape[0])
    if k < 0:
        return k, bad
    scratch = np.empty((1, var.shape[1]), var.dtype)
    _adam_rows(var, m, v, uniq, offs, order, grads, scratch, 0, 0, k,
               zero, lr, beta1, beta2, omb1, omb2, eps)
    return k, -1


@numba.njit(parallel=True, **_JIT)
def _lazy_adam_parallel(var, m, v, ids, grads, zero, lr, beta1, beta2, omb1, omb2, eps, nth):
    # nth = numba.get_num_threads(), passed in (calling it here would make the kernel uncachable)
    uniq, offs, order, k, bad = _group(ids, var.shape[0])
    if k < 0:
        return k, bad
    nch = max(1, min(nth, k))  # one contiguous chunk of unique rows per thread
    scratch = np.empty((nch, var.shape[1]), var.dtype)
    for c in prange(nch):
        _adam_rows(var, m, v, uniq, offs, order, grads, scratch, c, c * k // nch,
                   (c + 1) * k // nch, zero, lr, beta1, beta2, omb1, omb2, eps)
    return k, -1


# --------------------------------------------------------------------------------------------
# Keras legacy SGD (no momentum): scatter_add(var, ids, -grad * lr), raw rows in input order
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _sgd_sparse_add_kernel(var, ids, grads, neg_lr):
    bad = _check_ids(ids, var.shape[0])
    if bad >= 0:
        return bad
    dim = var.shape[1]
    for i in range(ids.shape[0]):
        r = ids[i]
        for j in range(dim):
            var[r, j] = var[r, j] + grads[i, j] * neg_lr
    return -1


@numba.njit(**_JIT)
def _prefetch_row(arr, r, dim, line):
    """Prefetch (for write) every cache line of row r (a row may straddle one more line)."""
    for j in range(0, dim, line):
        _prefetch_w(arr, r, j)
    _prefetch_w(arr, r, dim - 1)


@numba.njit(**_JIT)
def _prefetch_ahead(a, b, uniq, u, hi, dim, line):
    """Prefetch the rows of a and b that row u's loop reaches PREFETCH_ROWS rows later."""
    up = u + PREFETCH_ROWS
    if up < hi:
        _prefetch_row(a, uniq[up], dim, line)
        _prefetch_row(b, uniq[up], dim, line)


# --------------------------------------------------------------------------------------------
# Keras SGD with momentum on de-duplicated rows
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _momentum_rows(var, accum, uniq, g, lo, hi, lr, momentum, nesterov):
    dim = var.shape[1]
    line = _line_elems(var)
    for u in range(lo, hi):
        _prefetch_ahead(var, accum, uniq, u, hi, dim, line)
        r = uniq[u]
        if nesterov:
            for j in range(dim):
                gl = g[u, j] * lr
                a = accum[r, j] * momentum - gl
                accum[r, j] = a
                var[r, j] = var[r, j] + (a * momentum - gl)
        else:
            for j in range(dim):
                a = accum[r, j] * momentum - g[u, j] * lr
                accum[r, j] = a
                var[r, j] = var[r, j] + a


@numba.njit(**_JIT)
def _momentum_serial(var, accum, uniq, summed, lr, momentum, nesterov):
    bad = _check_ids(uniq, var.shape[0])
    if bad >= 0:
        return bad
    _momentum_rows(var, accum, uniq, summed, 0, uniq.shape[0], lr, momentum, nesterov)
    return -1


@numba.njit(parallel=True, **_JIT)
def _momentum_parallel(var, accum, uniq, summed, lr, momentum, nesterov, nth):
    bad = _check_ids(uniq, var.shape[0])
    if bad >= 0:
        return bad
    k = uniq.shape[0]
    nch = max(1, min(nth, k))  # one contiguous chunk of unique rows per thread
    for c in prange(nch):
        _momentum_rows(var, accum, uniq, summed, c * k // nch, (c + 1) * k // nch, lr,
                       momentum, nesterov)
    return -1


# --------------------------------------------------------------------------------------------
# x ** y as TF 2.15's CPU kernels compute it (server/eigen_pow.py, built here from its one source
# with numba's scalar operations): Eigen's packet pow on the full packets of a row, glibc's powf
# (restated) on the row's tail. Not cached on their own: the kernels
# that call them are, and embed them (after editing eigen_pow.py, touch this file).
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT_NOCACHE)
def _nb_where(c, a, b):
    return a if c else b


@numba.njit(**_JIT_NOCACHE)
def _nb_mul(a, b):
    return a * b


@numba.njit(**_JIT_NOCACHE)
def _nb_add(a, b):
    return a + b


@numba.njit(**_JIT_NOCACHE)
def _nb_sub(a, b):
    return a - b


@numba.njit(**_JIT_NOCACHE)
def _nb_div(a, b):
    return a / b


@numba.njit(**_JIT_NOCACHE)
def _nb_signbit(x):
    return math.copysign(1.0, x) < 0.0


@numba.njit(**_JIT_NOCACHE)
def _nb_isnan(x):
    return x != x


@numba.njit(**_JIT_NOCACHE)
def _nb_lnot(c):
    return not c


def _nb_ops(F):
    @numba.njit(**_JIT_NOCACHE)
    def trunc(x):
        return F(np.trunc(x))

    @numba.njit(**_JIT_NOCACHE)
    def floor(x):
        return F(np.floor(x))

    @numba.njit(**_JIT_NOCACHE)
    def frexp(x):
        m, e = math.frexp(x)
        return F(m), F(e)

    @numba.njit(**_JIT_NOCACHE)
    def ldexp2(b):
        return F(math.ldexp(1.0, int(b)))

    return types_ns(jit=numba.njit(**_JIT_NOCACHE), mul=_nb_mul, add=_nb_add, sub=_nb_sub, div=_nb_div,
                    where=_nb_where, trunc=trunc, floor=floor, frexp=frexp, ldexp2=ldexp2,
                    signbit=_nb_signbit, isnan=_nb_isnan, F=F, is32=F is np.float32, bits=_nb_bits64,
                    fbits32=_nb_fbits32, nextafter=_nb_nextafter, idx=_nb_idx, lnot=_nb_lnot)


@numba.njit(**_JIT_NOCACHE)
def _nb_bits64(x):
    a = np.empty(1, np.float64)
    a[0] = x
    return a.view(np.int64)[0]


@numba.njit(**_JIT_NOCACHE)
def _nb_fbits32(x):
    a = np.empty(1, np.float32)
    a[0] = x
    return np.int64(a.view(np.int32)[0])


@numba.njit(**_JIT_NOCACHE)
def _nb_nextafter(x, toward):
    return np.nextafter(x, toward)


@numba.njit(**_JIT_NOCACHE)
def _nb_idx(x):
    return int(x)


@numba.njit(**_JIT_NOCACHE)
def _nb_flush(x, tiny):
    """TF's CPU threads run with FTZ and DAZ (see eigen_pow._flush)."""
    return x * (tiny - tiny) if abs(x) < tiny else x   # a signed zero of x's own type


_pow32 = _eigen_pow.build(_nb_ops(np.float32)).pow
_EIGEN64 = _eigen_pow.build(_nb_ops(np.float64))
_pow64, _powf = _EIGEN64.pow, _EIGEN64.scalar_powf
_TINY32, _TINY64 = np.float32(np.finfo(np.float32).tiny), np.finfo(np.float64).tiny


def _tf_pow(x, y, packet):
    """x ** y on the reference's packet path (packet True) or its scalar path."""


@overload(_tf_pow, jit_options=_JIT_NOCACHE)
def _tf_pow_impl(x, y, packet):
    if x == types.float32:
        def pow32(x, y, packet):
            x, y = _nb_flush(x, _TINY32), _nb_flush(y, _TINY32)
            if packet:
                return _nb_flush(_pow32(x, y), _TINY32)
            return _nb_flush(np.float32(_powf(np.float64(x), np.float64(y))), _TINY32)
        return pow32

    def pow64(x, y, packet):
        return _nb_flush(_pow64(_nb_flush(x, _TINY64), _nb_flush(y, _TINY64)), _TINY64)
    return pow64


@numba.njit(**_JIT)
def _pow_runs_kernel(x, y, out, run):
    packet_end = run - run % (8 if x.itemsize == 4 else 4)
    for i in range(x.shape[0]):
        out[i] = _tf_pow(x[i], y[i], i % run < packet_end)


def pow_runs(x, y, run=None):
    """x ** y (y broadcast to x) as the reference evaluates it over runs of `run` elements in C
    order (None: one run): the packet path on each run's full packets, the scalar path on its tail.
    The kernels' own pow, bit for bit server/eigen_pow.eigen_layout_pow."""
    x = np.asarray(x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"pow_runs: float32 or float64 only, got {x.dtype}")
    y = np.array(np.broadcast_to(np.asarray(y, x.dtype), x.shape)).reshape(-1)
    flat = np.array(x, order="C").reshape(-1)   # a writable copy: one compiled specialisation
    out = np.empty_like(flat)
    run = flat.shape[0] if run is None else int(run)
    if flat.shape[0]:
        _pow_runs_kernel(flat, y, out, max(run, 1))
    return out.reshape(x.shape)


# Adagrad, Ftrl, RMSprop (Keras legacy sparse kernels) on raw ids: one driver, one row loop each
# --------------------------------------------------------------------------------------------
ADAGRAD, FTRL, RMSPROP = 0, 1, 2
FTRL_SHRINK, FTRL_SQRT, FTRL_SCALAR = 1, 2, 4          # flags of FTRL
RMS_CENTERED, RMS_MOMENTUM = 1, 2                      # flags of RMSPROP


@numba.njit(**_JIT)
def _keras_rows(kind, flags, var, s1, s2, s3, uniq, offs, order, grads, scratch, si, lo, hi, zero, one, c):
    """Unique rows uniq[lo:hi]; each row's gradient is 0 + g_first + g_second + ... (input order,
    as tf.unique + unsorted_segment_sum), summed into scratch[si]. s1..s3 are the slots (unused
    ones are any table of the same type). c holds the kind's coefficients (see the wrappers).
    The flag tests sit outside the per-element loops, so each loop is one straight-line body; the
    rows of every slot a kind uses are prefetched (a random row missed in cache costs more than
    its arithmetic)."""
    dim = var.shape[1]
    line = _line_elems(var)
    centered = kind == RMSPROP and flags & RMS_CENTERED != 0
    momentum = kind == RMSPROP and flags & RMS_MOMENTUM != 0
    use_s2 = kind == FTRL or centered
    shrink = flags & FTRL_SHRINK != 0
    ftrl_fast = kind == FTRL and flags & (FTRL_SQRT | FTRL_SCALAR) == FTRL_SQRT
    c0, c1, c2, c3 = c[0], c[1], c[2] if c.shape[0] > 2 else zero, c[3] if c.shape[0] > 3 else zero
    c4, c5 = c[4] if c.shape[0] > 4 else zero, c[5] if c.shape[0] > 5 else zero
    nc1 = -c1
    # Ftrl's pow: Eigen's packet path on a row chip's full packets, std::pow on its tail and in
    # the scalar loop of 1-D variables (FTRL_SCALAR: dim is 1, so packet_end is 0)
    packet_end = dim - dim % (8 if var.itemsize == 4 else 4)
    for u in range(lo, hi):
        up = u + PREFETCH_ROWS
        if up < hi:
            rp = uniq[up]
            _prefetch_row(var, rp, dim, line)
            _prefetch_row(s1, rp, dim, line)
            if use_s2:
                _prefetch_row(s2, rp, dim, line)
            if momentum:
                _prefetch_row(s3, rp, dim, line)
        r = uniq[u]
        for j in range(dim):
            scratch[si, j] = zero
        for p in range(offs[u], offs[u + 1]):
            i = order[p]
            for j in range(dim):
                scratch[si, j] += grads[i, j]
        if kind == ADAGRAD:   # c = lr, eps; s1 = accumulator
            for j in range(dim):
                g = scratch[si, j]
                a = s1[r, j] + g * g
                s1[r, j] = a
                var[r, j] = var[r, j] - (c0 * g) / (np.sqrt(a) + c1)
        elif ftrl_fast:       # Ftrl with learning_rate_power -0.5 on a 2-D table: no pow
            for j in range(dim):
                g = scratch[si, j]
                a = s1[r, j]
                v = var[r, j]
                gs = g
                if shrink:
                    gs = g + c3 * v
                new = a + g * g
                pn = np.sqrt(new)
                lin = s2[r, j] + (gs - ((pn - np.sqrt(a)) / c0) * v)
                clipped = c1 if c1 < lin else lin   # max(min(lin, l1), -l1) bit for bit, as selects
                clipped = nc1 if clipped < nc1 else clipped
                var[r, j] = (clipped - lin) / (pn / c0 + c2)
                s2[r, j] = lin
                s1[r, j] = new
        elif kind == FTRL:    # c = lr, l1, 2 l2', 2 l2_shrinkage, -lr_power; s1 = accumulator, s2 = linear
            for j in range(dim):
                g = scratch[si, j]
                a = s1[r, j]
                v = var[r, j]
                gs = g + c3 * v if shrink else g
                new = a + g * g
                if flags & FTRL_SQRT:
                    pn = np.sqrt(new)
                    pa = np.sqrt(a)
                else:
                    pn = _tf_pow(new, c4, j < packet_end)
                    pa = _tf_pow(a, c4, j < packet_end)
                if flags & FTRL_SCALAR:   # the kernel's loop for 1-D variables: pow, other order
                    lin = (s2[r, j] + gs) - ((_tf_pow(new, c4, False) - _tf_pow(a, c4, False)) / c0) * v
                else:
                    lin = s2[r, j] + (gs - ((pn - pa) / c0) * v)
                clipped = c1 if c1 < lin else lin   # max(min(lin, l1), -l1) bit for bit, as selects
                clipped = nc1 if clipped < nc1 else clipped
                var[r, j] = (clipped - lin) / (pn / c0 + c2)
                s2[r, j] = lin
                s1[r, j] = new
        elif momentum:        # RMSPROP: c = lr, -lr, rho, 1 - rho, momentum, eps; s1 rms, s2 mg, s3 momentum
            if centered:
                for j in range(dim):
                    g = scratch[si, j]
                    ms = s1[r, j] * c2 + (g * g) * c3
                    s1[r, j] = ms
                    mg = s2[r, j] * c2 + g * c3
                    s2[r, j] = mg
                    m = s3[r, j] * c4 + ((one / np.sqrt((ms + c5) - mg * mg)) * c0) * g
                    s3[r, j] = m
                    var[r, j] = var[r, j] - m
            else:
                for j in range(dim):
                    g = scratch[si, j]
                    ms = s1[r, j] * c2 + (g * g) * c3
                    s1[r, j] = ms
                    m = s3[r, j] * c4 + ((one / np.sqrt(ms + c5)) * c0) * g
                    s3[r, j] = m
                    var[r, j] = var[r, j] - m
        else:                 # RMSPROP without momentum: the slots have decayed already (every row)
            if centered:
                for j in range(dim):
                    g = scratch[si, j]
                    ms = s1[r, j] + (g * g) * c3
                    s1[r, j] = ms
                    mg = s2[r, j] + g * c3
                    s2[r, j] = mg
                    var[r, j] = var[r, j] + (c1 * g) / (np.sqrt(ms - mg * mg) + c5)
            else:
                for j in range(dim):
                    g = scratch[si, j]
                    ms = s1[r, j] + (g * g) * c3
                    s1[r, j] = ms
                    var[r, j] = var[r, j] + (c1 * g) / (np.sqrt(ms) + c5)


@numba.njit(**_JIT)
def _keras_serial(kind, flags, var, s1, s2, s3, ids, grads, c):
    uniq, offs, order, k, bad = _group(ids, var.shape[0])
    if k < 0:
        return k, bad
    scratch = np.empty((1, var.shape[1]), var.dtype)
    zo = np.arange(2).astype(var.dtype)   # 0 and 1 in the table dtype
    _keras_rows(kind, flags, var, s1, s2, s3, uniq, offs, order, grads, scratch, 0, 0, k, zo[0], zo[1], c)
    return k, -1


@numba.njit(parallel=True, **_JIT)
def _keras_parallel(kind, flags, var, s1, s2, s3, ids, grads, c, nth):
    uniq, offs, order, k, bad = _group(ids, var.shape[0])
    if k < 0:
        return k, bad
    nch = max(1, min(nth, k))
    scratch = np.empty((nch, var.shape[1]), var.dtype)
    zo = np.arange(2).astype(var.dtype)
    for ch in prange(nch):
        _keras_rows(kind, flags, var, s1, s2, s3, uniq, offs, order, grads, scratch, ch, ch * k // nch,
                    (ch + 1) * k // nch, zo[0], zo[1], c)
    return k, -1


# --------------------------------------------------------------------------------------------
# row gather (pulls)
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _gather_serial(table, ids, out):
    bad = _check_ids(ids, table.shape[0])
    if bad >= 0:
        return bad
    dim = table.shape[1]
    for i in range(ids.shape[0]):
        r = ids[i]
        for j in range(dim):
            out[i, j] = table[r, j]
    return -1


@numba.njit(parallel=True, **_JIT)
def _gather_parallel(table, ids, out):
    bad = _check_ids(ids, table.shape[0])
    if bad >= 0:
        return bad
    dim = table.shape[1]
    for i in prange(ids.shape[0]):
        r = ids[i]
        for j in range(dim):
            out[i, j] = table[r, j]
    return -1


# --------------------------------------------------------------------------------------------
# sync mode: the sum (or mean) of the replicas' sparse gradients of one step
# --------------------------------------------------------------------------------------------
@numba.njit(**_JIT)
def _replica_sum_kernel(ids, values, replica, average):
    """Per distinct id (ascending): its first row, then each later row added, in (replica, input)
    order, as TF's SparseConditionalAccumulator sums; with average, divided by the number of
    replicas that have the id."""
    n = ids.shape[0]
    dim = values.shape[1]
    first, inv, _, k, _ = _dedupe(ids, np.iinfo(np.int64).max)   # first-occurrence order
    perm = np.argsort(first[:k])
    rank = np.empty(k, np.int64)
    for j in range(k):
        rank[perm[j]] = j
    uniq = np.empty(k, np.int64)
    acc = np.empty((k, dim), values.dtype)
    seen = np.zeros(k, np.int64)      # replicas that have the id
    last = np.full(k, -1, np.int64)   # the last of them so far
    for i in range(n):                # (replica, input) order
        u = rank[inv[i]]
        if seen[u] == 0:
            uniq[u] = ids[i]
            for j in range(dim):
                acc[u, j] = values[i, j]
        else:
            for j in range(dim):
                acc[u, j] += values[i, j]
        if replica[i] != last[u]:
            seen[u] += 1
            last[u] = replica[i]
    if average:
        count = np.empty(1, values.dtype)   # the divisor, in the values' dtype
        for u in range(k):
            count[0] = seen[u]
            for j in range(dim):
                acc[u, j] = acc[u, j] / count[0]
    return uniq, acc


# --------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_PAR_LOCK = threading.Lock()


class _NoLock:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


def _par_guard():
    """Serialise parallel kernels unless the active threading layer is known to be thread-safe."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return _NO_LOCK if layer in ("omp", "tbb") else _PAR_LOCK


def _table(a, name):
    if not isinstance(a, np.ndarray) or a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D numpy array")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return a


def _slot(a, name, like):
    _table(a, name)
    if a.shape != like.shape or a.dtype != like.dtype:
        raise ValueError(f"{name} must have shape {like.shape} and dtype {like.dtype}, "
                         f"got {a.shape} {a.dtype}")
    if not a.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return a


def _ids(ids):
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if ids.dtype != np.int64:
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
    return np.ascontiguousarray(ids)


def _grads(grads, n, dim, dtype, name="grads"):
    if not isinstance(grads, np.ndarray):
        raise TypeError(f"{name} must be a numpy array")
    if grads.dtype != dtype:
        raise TypeError(f"{name} dtype {grads.dtype} != table dtype {dtype}")
    if grads.shape != (n, dim):
        raise ValueError(f"{name} must have shape {(n, dim)}, got {grads.shape}")
    return np.ascontiguousarray(grads)


def _checked(var, slots, ids, grads):
    """(ids, grads) validated for a grouped row kernel on var and its slots ({name: table})."""
    _slot(var, "var", var)
    for name, a in slots.items():
        _slot(a, name, var)
    ids = _ids(ids)
    grads = _grads(grads, ids.shape[0], var.shape[1], var.dtype)
    if ids.shape[0] >= 2**30:
        raise ValueError("at most 2**30 ids per call")  # int32 positions in the hash table
    return ids, grads


def _raise_bad(ids, bad, n_rows):
    raise IndexError(f"row id {int(ids[bad])} (position {bad}) out of range [0, {n_rows})")


def unique_sum(ids, grads):
    """De-duplicate ``ids``: returns ``(uniq_ids int64[k], summed[k, dim])``.

    ``uniq_ids`` in first-occurrence order; ``summed[u]`` = 0 + g_first + g_second + ... in input
    order (the ``np.add.at`` / ``tf.math.unsorted_segment_sum`` order).
    """
    ids = _ids(ids)
    if not isinstance(grads, np.ndarray) or grads.ndim != 2 or grads.dtype not in _FLOATS:
        raise TypeError("grads must be a 2-D float32/float64 numpy array")
    if ids.shape[0] >= 2**30:
        raise ValueError("at most 2**30 ids per call")  # int32 positions in the hash table
    grads = _grads(grads, ids.shape[0], grads.shape[1], grads.dtype)
    uniq, summed, bad = _unique_sum_kernel(ids, grads, np.iinfo(np.int64).max)
    if bad >= 0:
        _raise_bad(ids, bad, "inf")
    return uniq, summed


def lazy_adam(var, m, v, ids, grads, lr, beta1, beta2, one_minus_beta1, one_minus_beta2,
              epsilon):
    """TF-Addons LazyAdam sparse step, in place on the rows in ``ids``; returns the unique-row count.

    ``lr`` is the bias-corrected step size ``lr_t * sqrt(1 - beta2^t) / (1 - beta1^t)`` computed
    by the caller in the table dtype. Per unique row r with summed gradient g::

        m_r = beta1 * m[r] + one_minus_beta1 * g
        v_r = beta2 * v[r] + one_minus_beta2 * (g * g)
        m[r] = m_r; v[r] = v_r
        var[r] = var[r] - (lr * m_r) / (sqrt(v_r) + epsilon)
    """
    ids, grads = _checked(var, {"m": m, "v": v}, ids, grads)
    if ids.shape[0] == 0:
        return 0
    dt = var.dtype.type
    args = (var, m, v, ids, grads, dt(0), dt(lr), dt(beta1), dt(beta2), dt(one_minus_beta1),
            dt(one_minus_beta2), dt(epsilon))
    return _run_rows(_lazy_adam_serial, _lazy_adam_parallel, args, ids, var.shape[0])


def _run_rows(serial, parallel, args, ids, n_rows):
    """The parallel kernel from PARALLEL_MIN_ROWS ids on (when numba has threads), else the serial
    one; an id out of range raises; returns the unique-row count."""
    nth = numba.get_num_threads()
    if ids.shape[0] >= PARALLEL_MIN_ROWS and nth > 1:
        with _par_guard():
            k, bad = parallel(*args, nth)
    else:
        k, bad = serial(*args)
    if k < 0:
        _raise_bad(ids, bad, n_rows)
    return int(k)


def sgd_sparse_add(var, ids, grads, neg_lr):
    """``var[ids[i]] += grads[i] * neg_lr`` for every raw row i, sequentially in input order.

    Keras legacy SGD without momentum (``scatter_add(var, ids, -grad * lr)``; ``neg_lr = -lr``).
    """
    _slot(var, "var", var)
    ids = _ids(ids)
    grads = _grads(grads, ids.shape[0], var.shape[1], var.dtype)
    if ids.shape[0] == 0:
        return
    bad = _sgd_sparse_add_kernel(var, ids, grads, var.dtype.type(neg_lr))
    if bad >= 0:
        _raise_bad(ids, bad, var.shape[0])


def keras_momentum_sparse(var, accum, uniq_ids, summed, lr, momentum, nesterov):
    """Keras SGD momentum on de-duplicated rows (``uniq_ids`` MUST be distinct, e.g. from
    :func:`unique_sum`; duplicates race in the parallel kernel)::

        a = accum[r] * momentum - g * lr; accum[r] = a
        var[r] += (a * momentum - g * lr) if nesterov else a
    """
    _slot(var, "var", var)
    _slot(accum, "accum", var)
    uniq_ids = _ids(uniq_ids)
    summed = _grads(summed, uniq_ids.shape[0], var.shape[1], var.dtype, "summed")
    k = uniq_ids.shape[0]
    if k == 0:
        return
    dt = var.dtype.type
    args = (var, accum, uniq_ids, summed, dt(lr), dt(momentum), bool(nesterov))
    nth = numba.get_num_threads()
    if k >= PARALLEL_MIN_ROWS and nth > 1:
        with _par_guard():
            bad = _momentum_parallel(*args, nth)
    else:
        bad = _momentum_serial(*args)
    if bad >= 0:
        _raise_bad(uniq_ids, bad, var.shape[0])


def _keras_sparse(kind, flags, var, slots, ids, grads, coefficients):
    """Validate, then run the serial or the parallel kernel; returns the unique-row count."""
    ids, grads = _checked(var, slots, ids, grads)
    if ids.shape[0] == 0:
        return 0
    tables = list(slots.values()) + [var] * (3 - len(slots))
    c = np.array(coefficients, dtype=var.dtype)
    args = (kind, flags, var, tables[0], tables[1], tables[2], ids, grads, c)
    return _run_rows(_keras_serial, _keras_parallel, args, ids, var.shape[0])


def adagrad(var, accum, ids, grads, lr, epsilon):
    """Keras legacy Adagrad (SparseApplyAdagradV2) on raw ids, in place; per unique row r with
    summed gradient g: ``accum[r] += g * g; var[r] -= (lr * g) / (sqrt(accum[r]) + epsilon)``."""
    return _keras_sparse(ADAGRAD, 0, var, {"accum": accum}, ids, grads, (lr, epsilon))


def ftrl(var, accum, linear, ids, grads, lr, l1, two_l2, two_l2_shrinkage, neg_lr_power, use_sqrt,
         scalar_loop=False):
    """Keras legacy Ftrl (SparseApplyFtrl, or SparseApplyFtrlV2 when ``two_l2_shrinkage`` is not
    None) on raw ids, in place; ``two_l2`` = 2 (l2 + beta / (2 lr)); p = sqrt when ``use_sqrt``
    (learning_rate_power == -0.5) else x ** neg_lr_power. Per unique row r, summed gradient g::

        g_s = g + two_l2_shrinkage * var[r];   new = accum[r] + g * g
        linear[r] += g_s - ((p(new) - p(accum[r])) / lr) * var[r]
        var[r] = (clip(linear[r], -l1, l1) - linear[r]) / (p(new) / lr + two_l2);  accum[r] = new

    ``scalar_loop``: the kernel's loop for 1-D variables, ``(linear + g_s) - sigma * var``."""
    flags = ((FTRL_SHRINK if two_l2_shrinkage is not None else 0) | (FTRL_SQRT if use_sqrt else 0)
             | (FTRL_SCALAR if scalar_loop else 0))
    return _keras_sparse(FTRL, flags, var, {"accum": accum, "linear": linear}, ids, grads,
                         (lr, l1, two_l2, two_l2_shrinkage or 0.0, neg_lr_power))


def rmsprop(var, rms, mg, mom, ids, grads, lr, rho, one_minus_rho, momentum, epsilon):
    """Keras legacy RMSprop's pushed rows on raw ids, in place (``mg``/``mom`` None when the
    optimizer is not centered / has no momentum). With ``mom`` (SparseApply[Centered]RMSProp)::

        rms[r] = rms[r] rho + g^2 (1 - rho);  mg[r] = mg[r] rho + g (1 - rho)
        mom[r] = mom[r] momentum + ((1 / sqrt((rms[r] + eps) - mg[r]^2)) lr) g;  var[r] -= mom[r]

    Without ``mom`` the caller has already multiplied the whole rms (and mg) by rho::

        rms[r] += g^2 (1 - rho);  mg[r] += g (1 - rho);  var[r] += (-lr g) / (sqrt(rms[r] - mg[r]^2) + eps)
    """
    slots = {"rms": rms}
    flags = 0
    if mg is not None:
        slots["mg"] = mg
        flags |= RMS_CENTERED
    if mom is not None:
        if mg is None:
            slots["mg"] = rms   # placeholder (unused)
        slots["mom"] = mom
        flags |= RMS_MOMENTUM
    return _keras_sparse(RMSPROP, flags, var, slots, ids, grads, (lr, -lr, rho, one_minus_rho, momentum, epsilon))


def gather_rows(table, ids, out=None):
    """``table[ids]`` (rows in ids order), gathered in parallel for large batches."""
    _table(table, "table")
    ids = _ids(ids)
    n = ids.shape[0]
    if out is None:
        out = np.empty((n, table.shape[1]), table.dtype)
    else:
        _table(out, "out")
        if out.shape != (n, table.shape[1]) or out.dtype != table.dtype:
            raise ValueError("out has the wrong shape or dtype")
    if n == 0:
        return out
    if n >= PARALLEL_MIN_ROWS and numba.get_num_threads() > 1:
        with _par_guard():
            bad = _gather_parallel(table, ids, out)
    else:
        bad = _gather_serial(table, ids, out)
    if bad >= 0:
        _raise_bad(ids, bad, table.shape[0])
    return out


def replica_sum(parts, average: bool):
    """The sync-mode aggregate of one step: ``parts`` = [(ids, rows)] of the replicas, in replica
    order; returns ``(uniq ascending int64[k], summed[k, dim])``.

    Bit for bit the numpy evaluation in server/sync.py: per id the first row, then each later row
    added in (replica, input) order (TF's SparseConditionalAccumulator); with ``average`` each row
    divided by the number of replicas whose part has that id (TF averages element-wise).
    """
    if not parts:
        raise ValueError("replica_sum needs at least one part")
    dt = parts[0][1].dtype
    if dt not in _FLOATS or any(v.dtype != dt or v.ndim != 2 for _, v in parts):
        raise TypeError("replica_sum: rows must be 2-D float32/float64 arrays of one dtype")
    ids = np.concatenate([_ids(i) for i, _ in parts])
    values = np.concatenate([v for _, v in parts])
    if values.shape[0] != ids.shape[0]:
        raise ValueError("replica_sum: one row per id")
    replica = np.repeat(np.arange(len(parts), dtype=np.int32), [len(i) for i, _ in parts])
    return _replica_sum_kernel(ids, values, replica, bool(average))


def warmup(dtypes=(np.float32, np.float64)):
    """Compile (or load from the on-disk cache) every kernel for ``dtypes``.

    Returns ``{kernel name: seconds}`` of the first calls, so callers can report compile/cache
    load time separately from steady-state timings.
    """
    times = {}
    saved = numba.get_num_threads()
    for dt in dtypes:
        dt = np.dtype(dt)
        rows, dim = 8, 4
        ids = np.array([1, 3, 1, 0], np.int64)
        g = np.ones((4, dim), dt)
        var = np.zeros((rows, dim), dt)
        m = np.zeros_like(var)
        v = np.zeros_like(var)
        o = dt.type(0)
        one = dt.type(1)
        for name, fn, a in (
            ("unique_sum", _unique_sum_kernel, (ids, g, np.iinfo(np.int64).max)),
            ("lazy_adam_serial", _lazy_adam_serial, (var, m, v, ids, g, o, one, one, one, one,
                                                     one, one)),
            ("lazy_adam_parallel", _lazy_adam_parallel, (var, m, v, ids, g, o, one, one, one,
                                                         one, one, one, 2)),
            ("sgd_sparse_add", _sgd_sparse_add_kernel, (var, ids, g, one)),
            ("momentum_serial", _momentum_serial, (var, m, ids[1:3], g[1:3], one, one, True)),
            ("momentum_parallel", _momentum_parallel, (var, m, ids[1:3], g[1:3], one, one,
                                                       True, 2)),
            ("gather_serial", _gather_serial, (var, ids, np.empty((4, dim), dt))),
            ("gather_parallel", _gather_parallel, (var, ids, np.empty((4, dim), dt))),
            ("replica_sum", _replica_sum_kernel, (ids, g, np.array([0, 0, 1, 1], np.int32), True)),
            ("pow_runs", _pow_runs_kernel, (g[0], g[0], np.empty_like(g[0]), 3)),
            ("keras_serial", _keras_serial, (FTRL, 3, var, m, v, var, ids, g, np.ones(6, dt))),
            ("keras_parallel", _keras_parallel, (FTRL, 3, var, m, v, var, ids, g, np.ones(6, dt), 2)),
        ):
            t0 = time.perf_counter()
            if "parallel" in name:
                with _par_guard():
                    fn(*a)
            else:
                fn(*a)
            times[f"{name}[{dt.name}]"] = time.perf_counter() - t0
    numba.set_num_threads(saved)
    return times
