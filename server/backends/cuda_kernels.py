"""Fused CUDA kernels (numba.cuda) for the optimizers' sparse and dense applies on device tables.

Plain module: numpy + numba.cuda only, nothing from the project is imported.

Rounding. NVVM contracts `a * b + c` into an FMA by default (libNVVM's `-fma=1`), also with
`fastmath=False`, and numba's `cuda.jit` has no switch for it. An FMA rounds once where the
reference (TensorFlow's CPU kernels, numpy) rounds twice, so every product, sum, quotient and
square root here goes through libdevice's explicitly rounded intrinsics (`__nv_fmul_rn`,
`__nv_fadd_rn`, ... and their double twins): PTX `mul.rn` / `add.rn` are never contracted, so
each element goes through exactly the IEEE operations written below, in that order, as in
server/backends/fused.py. Under the CUDA simulator (`NUMBA_ENABLE_CUDASIM=1`, set before numba
is imported) the same kernels run as Python on numpy scalars of the table dtype, where no
contraction exists: the simulator checks each kernel's formula and operation order, the real
device the intrinsics (bench/gpu_check.sh).

Every kernel is a grid-stride loop over the elements it touches (row-major inside a row, so a
warp reads consecutive elements of one row), correct for any launch size: `launch()` picks one
that fills the device, or a handful of threads in the simulator.

Tables: 2-D `(rows, dim)` C-contiguous device arrays (any other rank is viewed as 2-D by the
caller); `ids` / `uniq` are int64 LOCAL row indices into them (any rows, any order, `uniq`
distinct), so a hash-keyed table that resolves keys to row indices on the host uses the same
kernels. Scalars arrive as numpy scalars of the table dtype.
"""
from __future__ import annotations

import types

import numpy as np
from numba import cuda
from numba.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)

#: threads per block on a device; blocks are capped at BLOCKS_PER_SM per multiprocessor
THREADS = 256
BLOCKS_PER_SM = 32


def _device_ops(dtype):
    """(mul, add, div, sqrt) that round each operation once, never fused. There is no sub: a - b
    is written add(a, -b), which IEEE 754 defines it to be (libdevice has no __nv_dsub_rn)."""
    if SIMULATOR:
        return (lambda a, b: a * b, lambda a, b: a + b, lambda a, b: a / b, np.sqrt)
    from numba.cuda import libdevice as ld
    if np.dtype(dtype) == np.float32:
        return ld.fmul_rn, ld.fadd_rn, ld.fdiv_rn, ld.fsqrt_rn
    return ld.dmul_rn, ld.dadd_rn, ld.ddiv_rn, ld.dsqrt_rn


def _build(dtype):
    """The kernels for one table dtype (the intrinsics differ between float32 and float64)."""
    mul, add, div, sqrt = _device_ops(dtype)
    jit = cuda.jit if SIMULATOR else cuda.jit(fastmath=False)
    k = types.SimpleNamespace()

    # ---------------------------------------------------------------- storage
    @jit
    def gather(table, ids, out):
        dim = table.shape[1]
        for e in range(cuda.grid(1), ids.shape[0] * dim, cuda.gridsize(1)):
            u = e // dim
            j = e - u * dim
            out[u, j] = table[ids[u], j]

    @jit
    def scatter(arr, ids, vals, mode):
        """mode 0: arr[ids] = vals; 1: arr[ids] + vals; 2: arr[ids] - vals (ids distinct)."""
        dim = arr.shape[1]
        for e in range(cuda.grid(1), ids.shape[0] * dim, cuda.gridsize(1)):
            u = e // dim
            j = e - u * dim
            r = ids[u]
            if mode == 0:
                arr[r, j] = vals[u, j]
            elif mode == 1:
                arr[r, j] = add(arr[r, j], vals[u, j])
            else:
                arr[r, j] = add(arr[r, j], -vals[u, j])

    @jit
    def scatter_add_grouped(arr, uniq, offs, order, vals):
        """arr[uniq[u]] + vals[order[offs[u]]] + vals[order[offs[u] + 1]] + ... (input order)."""
        dim = arr.shape[1]
        for e in range(cuda.grid(1), uniq.shape[0] * dim, cuda.gridsize(1)):
            u = e // dim
            j = e - u * dim
            r = uniq[u]
            acc = arr[r, j]
            for p in range(offs[u], offs[u + 1]):
                acc = add(acc, vals[order[p], j])
            arr[r, j] = acc

    @jit
    def move_rows(arr, src, dst):
        dim = arr.shape[1]
        for e in range(cuda.grid(1), src.shape[0] * dim, cuda.gridsize(1)):
            u = e // dim
            j = e - u * dim
            arr[dst[u], j] = arr[src[u], j]

    @jit
    def mark(pos, uniq, clear):
        """pos[uniq[u]] = u (clear: -1), the row -> position map of the dense-equivalent applies."""
        for u in range(cuda.grid(1), uniq.shape[0], cuda.gridsize(1)):
            pos[uniq[u]] = -1 if clear else u

    # ---------------------------------------------------------------- LazyAdam (tfa, TF1)
    @jit
    def lazy_adam(var, m, v, uniq, g, zero, lr, b1, b2, omb1, omb2, eps):
        """Unique rows with summed gradients: m, v and var of those rows only."""
        dim = var.shape[1]
        for e in range(cuda.grid(1), uniq.shape[0] * dim, cuda.gridsize(1)):
            u = e // dim
            j = e - u * dim
            r = uniq[u]
            gj = add(zero, g[u, j])   # a lone -0.0 gradient becomes +0.0, as 0 + g in the reference
            mj = add(mul(b1, m[r, j]), mul(omb1, gj))
            vj = add(mul(b2, v[r, j]), mul(omb2, mul(gj, gj)))
            m[r, j] = mj
            v[r, j] = vj
            var[r, j] = add(var[r, j], -div(mul(lr, mj), add(sqrt(vj), eps)))

    # ---------------------------------------------------------------- Keras legacy Adam, tfa RectifiedAdam
    @jit
    def adam_dense(var, m, v, vhat, g, alpha, omb1, omb2, eps, amsgrad):
        """TF's ApplyAdam kernel: m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2)."""
        dim = var.shape[1]
        for e in range(cuda.grid(1), var.shape[0] * dim, cuda.gridsize(1)):
            r = e // dim
            j = e - r * dim
            gj = g[r, j]
            mj = add(m[r, j], mul(add(gj, -m[r, j]), omb1))
            vj = add(v[r, j], mul(add(mul(gj, gj), -v[r, j]), omb2))
            m[r, j] = mj
            v[r, j] = vj
            if amsgrad:   # np.maximum(vhat, v): (a >= b or a is NaN) ? a : b
                h = vhat[r, j]
                if h >= vj or h != h:
                    vj = h
                vhat[r, j] = vj
            var[r, j] = add(var[r, j], -div(mul(mj, alpha), add(sqrt(vj), eps)))

    # ---------------------------------------------------------------- RectifiedAdam (tfa)
    @jit
    def moments_sparse(var, m, v, vhat, pos, g, b1, b2, omb1, omb2, eps, amsgrad, radam, lr,
                       recip_1, recip_2, r_t, neg_lr_t, wd_t, rectify, has_wd):
        """The dense-equivalent sparse applies: every row's m and v decay, touched rows (pos >= 0)
        get their summed gradient (m b1 + g (1 - b1), v b2 + g^2 (1 - b2)), amsgrad's vhat follows.
        Keras legacy Adam (not radam): every row of var moves by lr m / (sqrt(v) + eps).
        tfa RectifiedAdam (radam): only touched rows move, by var + (-lr_t) * step."""
        dim = var.shape[1]
        for e in range(cuda.grid(1), var.shape[0] * dim, cuda.gridsize(1)):
            r = e // dim
            j = e - r * dim
            u = pos[r]
            mj = mul(m[r, j], b1)
            vj = mul(v[r, j], b2)
            if u >= 0:
                gj = g[u, j]
                mj = add(mj, mul(gj, omb1))
                vj = add(vj, mul(mul(gj, gj), omb2))
            m[r, j] = mj
            v[r, j] = vj
            if amsgrad:   # np.maximum(vhat, v): (a >= b or a is NaN) ? a : b
                h = vhat[r, j]
                if h >= vj or h != h:
                    vj = h
                vhat[r, j] = vj
            if not radam:
                var[r, j] = add(var[r, j], -div(mul(lr, mj), add(sqrt(vj), eps)))
            elif u >= 0:
                st = mul(mj, recip_1)   # m_hat; rectified: r_t m_hat / (sqrt(v recip_2) + eps)
                if rectify:
                    st = div(mul(r_t, st), add(sqrt(mul(vj, recip_2)), eps))
                if has_wd:
                    st = add(st, mul(wd_t, var[r, j]))
                var[r, j] = add(var[r, j], mul(neg_lr_t, st))

    @jit
    def radam_dense(var, m, v, vhat, g, b1, b2, omb1, omb2, recip_1, recip_2, r_t, eps, lr_t,
                    wd_t, rectify, has_wd, amsgrad):
        dim = var.shape[1]
        for e in range(cuda.grid(1), var.shape[0] * dim, cuda.gridsize(1)):
            r = e // dim
            j = e - r * dim
            gj = g[r, j]
            mj = add(mul(b1, m[r, j]), mul(omb1, gj))
            vj = add(mul(b2, v[r, j]), mul(omb2, mul(gj, gj)))
            m[r, j] = mj
            v[r, j] = vj
            if amsgrad:   # np.maximum(vhat, v): (a >= b or a is NaN) ? a : b
                h = vhat[r, j]
                if h >= vj or h != h:
                    vj = h
                vhat[r, j] = vj
            st = mul(mj, recip_1)
            if rectify:
                st = div(mul(r_t, st), add(sqrt(mul(vj, recip_2)), eps))
            if has_wd:
                st = add(st, mul(wd_t, var[r, j]))
            var[r, j] = add(var[r, j], -mul(lr_t, st))

    # ---------------------------------------------------------------- Keras legacy SGD
    @jit
    def momentum_sparse(var, accum, uniq, g, lr, momentum, nesterov):
        """ResourceSparseApplyKerasMomentum on unique rows (summed gradients)."""
        dim = var.shape[1]
        for e in range(cuda.grid(1), uniq.shape[0] * dim, cuda.gridsize(1)):
            u = e // dim
            j = e - u * dim
            r = uniq[u]
            gl = mul(g[u, j], lr)
            a = add(mul(accum[r, j], momentum), -gl)
            accum[r, j] = a
            if nesterov:
                a = add(mul(a, momentum), -gl)
            var[r, j] = add(var[r, j], a)

    @jit
    def sgd_dense(var, accum, g, lr, momentum, nesterov, has_momentum):
        dim = var.shape[1]
        for e in range(cuda.grid(1), var.shape[0] * dim, cuda.gridsize(1)):
            r = e // dim
            j = e - r * dim
            gl = mul(g[r, j], lr)
            if has_momentum:
                a = add(mul(accum[r, j], momentum), -gl)
                accum[r, j] = a
                if nesterov:
                    a = add(mul(a, momentum), -gl)
                var[r, j] = add(var[r, j], a)
            else:
                var[r, j] = add(var[r, j], -gl)

    # ---------------------------------------------------------------- Lookahead (tfa)
    @jit
    def lookahead_sync(var, slow, alpha):
        """slow = slow + alpha (var - slow); var = slow, on every element."""
        dim = var.shape[1]
        for e in range(cuda.grid(1), var.shape[0] * dim, cuda.gridsize(1)):
            r = e // dim
            j = e - r * dim
            s = add(slow[r, j], mul(alpha, add(var[r, j], -slow[r, j])))
            slow[r, j] = s
            var[r, j] = s

    for name, fn in list(locals().items()):
        if name not in ("k", "jit", "mul", "add", "div", "sqrt", "dtype"):
            setattr(k, name, fn)
    return k


_KERNELS: dict = {}


def kernels(dtype):
    """The kernel set of a table dtype (float32 or float64), built on first use."""
    dt = np.dtype(dtype)
    ks = _KERNELS.get(dt)
    if ks is None:
        ks = _KERNELS[dt] = _build(dt)
    return ks


def launch(kernel, elements: int, sm_count: int, *args):
    """Run a grid-stride kernel over `elements` items (nothing to do for 0)."""
    if elements <= 0:
        return
    if SIMULATOR:   # each simulated thread is a Python thread: a few exercise the stride logic
        kernel[1, min(4, elements)](*args)
        return
    blocks = max(1, min((elements + THREADS - 1) // THREADS, sm_count * BLOCKS_PER_SM))
    kernel[blocks, THREADS](*args)
