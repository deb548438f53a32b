"""x ** y exactly as TensorFlow 2.15's CPU kernels compute it, in plain IEEE operations.

Plain module: numpy only (numba and numba.cuda build their own copies from the same source).

Why. The reference evaluates `pow` two ways inside one tensor expression: Eigen's vectorised
`generic_pow` (Eigen/src/Core/arch/Default/GenericPacketMathFunctions.h, as the TF 2.15 pip wheel
compiles it: AVX packets of 8 floats / 4 doubles, no FMA) on every full packet, and `std::pow`
(libm) on the elements after the last full packet. The two differ by an ulp in a few percent of
float32 cases, and Ftrl's `(clip(linear) - linear) / (pow(new) / lr + 2 l2)` magnifies that into
tens of ulp. numpy's `np.power`, numba's `x ** y` and libm itself change with the CPU's SIMD
dispatch (AVX2 vs AVX-512), so none of them can stand in for either path.

What. `build(ops)` is one transcription of `generic_pow` written against a handful of
element-wise operations (`ops`): numpy ufuncs on arrays here, numba scalars in the fused CPU
kernels, libdevice's explicitly rounded intrinsics in the CUDA kernels. Every product and sum is
its own IEEE operation (Dekker's product and Veltkamp's split where Eigen uses them without FMA),
so the bits depend on nothing but IEEE 754. The scalar path (`std::pow`) is glibc's nearly
correctly rounded pow; it is reproduced by evaluating the same algorithm in float64 and rounding
once to float32 (correct rounding unless x ** y lies within 2^-29 ulp of a float32 midpoint;
for float64 tails `generic_pow` itself, within 1 ulp of libm).

`eigen_layout_pow(x, y, row)` evaluates an array laid out as the reference's evaluator does: in
each run of `row` elements (a whole tensor for the dense kernels, one row for the sparse
kernels' per-row chips), the first `row - row % P` elements take the packet path, the rest
the scalar path (P = 8 for float32, 4 for float64).
"""
from __future__ import annotations

import types

import numpy as np

PACKET = {np.dtype(np.float32): 8, np.dtype(np.float64): 4}


def build(ops):
    """The algorithm for one set of element-wise operations.

    `ops` supplies: jit (a decorator for every function here; None: plain Python), mul, add, sub, div (each one IEEE rounding), where(c, a, b), trunc, floor,
    frexp(x) -> (m in [0.5, 1) as float, e as float), ldexp2(b) -> 2.0 ** b for an integral float
    b in [-70, 70], signbit(x), isnan(x), F (the float type: np.float32 or np.float64) and is32.
    Returns a namespace with `pow(x, y)` (generic_pow) and its pieces.
    """
    mul, add, sub, div, where = ops.mul, ops.add, ops.sub, ops.div, ops.where
    trunc, floor, frexp, ldexp2, signbit, isnan = ops.trunc, ops.floor, ops.frexp, ops.ldexp2, ops.signbit, ops.isnan
    F, is32 = ops.F, ops.is32
    jit = getattr(ops, "jit", None) or (lambda f: f)

    @jit
    def pmadd(a, b, c):           # no FMA in the reference build: two roundings
        return add(mul(a, b), c)

    @jit
    def fast_twosum(x, y):
        s_hi = add(x, y)
        return s_hi, sub(y, sub(s_hi, x))

    split_c = F(4097.0) if is32 else F(134217729.0)   # 2^12 + 1, 2^27 + 1 (Veltkamp)

    @jit
    def split(x):
        gamma = mul(split_c, x)
        hi = add(sub(x, gamma), gamma)
        return hi, sub(x, hi)

    @jit
    def twoprod(x, y):            # Dekker: x * y = hi + lo exactly
        hi = mul(x, y)
        xh, xl = split(x)
        yh, yl = split(y)
        lo = pmadd(xh, yh, -hi)
        lo = pmadd(xh, yl, lo)
        lo = pmadd(xl, yh, lo)
        lo = pmadd(xl, yl, lo)
        return hi, lo

    @jit
    def twoprod_dw(x_hi, x_lo, y):     # (x_hi + x_lo) * y, Muller's algorithm 7
        c_hi, c_lo1 = twoprod(x_hi, y)
        c_lo2 = mul(x_lo, y)
        t_hi, t_lo1 = fast_twosum(c_hi, c_lo2)
        return fast_twosum(t_hi, add(t_lo1, c_lo1))

    @jit
    def twoprod_dwdw(x_hi, x_lo, y_hi, y_lo):
        a_hi, a_lo = twoprod_dw(x_hi, x_lo, y_hi)
        b_hi, b_lo = twoprod_dw(x_hi, x_lo, y_lo)
        return fast_twosum_dwdw(a_hi, a_lo, b_hi, b_lo)

    @jit
    def fast_twosum_dwdw(x_hi, x_lo, y_hi, y_lo):
        r_hi, r_lo = fast_twosum(x_hi, y_hi)
        return fast_twosum(r_hi, add(add(y_lo, r_lo), x_lo))

    @jit
    def fast_twosum_fdw(x, y_hi, y_lo):
        r_hi, r_lo = fast_twosum(x, y_hi)
        return fast_twosum(r_hi, add(y_lo, r_lo))

    @jit
    def twosum(x_hi, x_lo, y_hi, y_lo):
        x_greater = abs(y_hi) < abs(x_hi)
        r_hi_1, r_lo_1 = fast_twosum(x_hi, y_hi)
        r_hi_2, r_lo_2 = fast_twosum(y_hi, x_hi)
        r_hi = where(x_greater, r_hi_1, r_hi_2)
        s = where(x_greater, add(add(y_lo, r_lo_1), x_lo), add(add(x_lo, r_lo_2), y_lo))
        return fast_twosum(r_hi, s)

    @jit
    def dw_div_f(x_hi, x_lo, y):       # Joldes, Muller & Popescu, algorithm 15
        t_hi = div(x_hi, y)
        pi_hi, pi_lo = twoprod(t_hi, y)
        delta = add(sub(sub(x_hi, pi_hi), pi_lo), x_lo)
        return fast_twosum(t_hi, div(delta, y))

    if is32:
        @jit
        def accurate_log2(z):          # log2(z), z in [1/sqrt(2), sqrt(2)], as a double word
            x = sub(z, F(1.0))
            x2 = mul(x, x)
            p_even = pmadd(F(9.703654795885e-2), x2, F(0.1720575392246))
            p_even = pmadd(p_even, x2, F(0.2050433009862))
            p_even = pmadd(p_even, x2, F(0.2885761857032))
            p_odd = pmadd(F(-0.1690667718648), x2, F(-0.1789081543684))
            p_odd = pmadd(p_odd, x2, F(-0.2404672354459))
            p = pmadd(p_odd, x, p_even)
            t_hi, t_lo = twoprod(p, x)
            q_hi, q_lo = fast_twosum_dwdw(F(-0.360674142838), F(-6.13283912543e-09), t_hi, t_lo)
            t_hi, t_lo = twoprod_dw(q_hi, q_lo, x)
            q_hi, q_lo = fast_twosum_dwdw(F(0.480897903442), F(-1.44861207474e-08), t_hi, t_lo)
            t_hi, t_lo = twoprod_dw(q_hi, q_lo, x)
            q_hi, q_lo = fast_twosum_dwdw(F(-0.721347510815), F(-4.84483164698e-09), t_hi, t_lo)
            t_hi, t_lo = twoprod_dw(q_hi, q_lo, x)
            q_hi, q_lo = fast_twosum_dwdw(F(1.44269502163), F(2.01711713999e-08), t_hi, t_lo)
            return twoprod_dw(q_hi, q_lo, x)

        @jit
        def exp2(x):                   # 2 ** x, x in [-0.5, 0.5]
            x2 = mul(x, x)
            p_even = pmadd(F(1.539513905e-4), x2, F(9.618283249e-3))
            p_odd = pmadd(F(1.340007293e-3), x2, F(5.550328270e-2))
            p_even = pmadd(p_even, x2, F(0.2402264923))
            p = pmadd(p_odd, x, p_even)
            p_hi, p_lo = twoprod(p, x)
            q1_hi, q1_lo = twosum(p_hi, p_lo, F(0.6931471825), F(2.36836577e-08))
            q2_hi, q2_lo = twoprod_dw(q1_hi, q1_lo, x)
            q3_hi, q3_lo = fast_twosum(F(1.0), q2_hi)
            return add(q3_hi, add(q2_lo, q3_lo))
    else:
        @jit
        def accurate_log2(x):
            t_hi, t_lo = twoprod_dw(F(2.88539008177792677), F(4.07660016854549667e-17), sub(x, F(1.0)))
            r_hi, r_lo = dw_div_f(t_hi, t_lo, add(x, F(1.0)))
            r2_hi, r2_lo = twoprod_dwdw(r_hi, r_lo, r_hi, r_lo)
            r4_hi, r4_lo = twoprod_dwdw(r2_hi, r2_lo, r2_hi, r2_lo)
            q_even = pmadd(F(2.87074255468000586e-9), r4_hi, F(2.31032094540014656e-7))
            q_odd = pmadd(F(2.38957980901884082e-8), r4_hi, F(2.27279857398537278e-6))
            q_even = pmadd(q_even, r4_hi, F(2.31271023278625638e-5))
            q_odd = pmadd(q_odd, r4_hi, F(2.47556738444535513e-4))
            q_even = pmadd(q_even, r4_hi, F(2.88543873228900172e-3))
            q = pmadd(q_odd, r2_hi, q_even)
            p_hi, p_lo = twoprod_dw(r2_hi, r2_lo, q)
            p1_hi, p1_lo = fast_twosum_dwdw(F(0.0400377511598501157), F(-4.77726582251425391e-19), p_hi, p_lo)
            p2_hi, p2_lo = twoprod_dwdw(r2_hi, r2_lo, p1_hi, p1_lo)
            p3_hi, p3_lo = fast_twosum_fdw(F(1.0), p2_hi, p2_lo)
            return twoprod_dwdw(p3_hi, p3_lo, r_hi, r_lo)

        @jit
        def exp2(x):
            x2 = mul(x, x)
            p_even = pmadd(F(7.073829923303358410e-9), x2, F(1.321543498017646657e-6))
            p_odd = pmadd(F(4.431642109085495276e-10), x2, F(1.017822306737031311e-7))
            p_even = pmadd(p_even, x2, F(1.540353045780084423e-4))
            p_odd = pmadd(p_odd, x2, F(1.525273342728892877e-5))
            p_even = pmadd(p_even, x2, F(9.618129107593478832e-3))
            p_odd = pmadd(p_odd, x2, F(1.333355814685869807e-3))
            p_even = pmadd(p_even, x2, F(0.240226506959101332))
            p_odd = pmadd(p_odd, x2, F(5.550410866481961247e-2))
            p = pmadd(p_odd, x, p_even)
            p_hi, p_lo = twoprod(p, x)
            q1_hi, q1_lo = twosum(p_hi, p_lo, F(0.693147180559945286), F(4.81927865669806721e-17))
            q2_hi, q2_lo = twoprod_dw(q1_hi, q1_lo, x)
            q3_hi, q3_lo = fast_twosum(F(1.0), q2_hi)
            return add(q3_hi, add(q2_lo, q3_lo))

    half_bits = F(0.49999997) if is32 else F(0.49999999999999994)   # 0x3EFFFFFF, 0x3FDFFFFFFFFFFFFF

    @jit
    def pround(a):                # AVX pround: truncate(a + copysign(prev(0.5), a))
        return trunc(add(a, where(signbit(a), -half_bits, half_bits)))

    max_e = F(278.0) if is32 else F(2098.0)

    @jit
    def pldexp(a, e):             # a * 2^e in four exact-where-possible steps (pldexp_generic)
        e = where(e < -max_e, -max_e, where(e > max_e, max_e, e))
        b = floor(mul(e, F(0.25)))
        c = ldexp2(b)
        return mul(mul(mul(mul(a, c), c), c), ldexp2(sub(e, mul(F(3.0), b))))

    sqrt_half = F(0.70710678118654752440)

    @jit
    def pow_impl(x, y):           # x > 0 finite (other lanes are selected away afterwards)
        m_x, e_x = frexp(x)
        small = m_x < sqrt_half
        m_x = where(small, mul(F(2.0), m_x), m_x)
        e_x = where(small, sub(e_x, F(1.0)), e_x)
        rx_hi, rx_lo = accurate_log2(m_x)
        f1_hi, f1_lo = twoprod(e_x, y)
        f2_hi, f2_lo = twoprod_dw(rx_hi, rx_lo, y)
        f_hi, f_lo = fast_twosum_dwdw(f1_hi, f1_lo, f2_hi, f2_lo)
        n_z = pround(f_hi)
        r_z = add(sub(f_hi, n_z), f_lo)
        n_r = pround(r_z)
        r_z = sub(r_z, n_r)
        n_z = add(n_z, n_r)
        return pldexp(exp2(r_z), n_z)

    huge = div(mul(F(128.0 if is32 else 1024.0), F(0.693147180559945309417232121458176568)),
               F(np.finfo(np.float32 if is32 else np.float64).eps))
    inf, nan, zero, one = F(np.inf), F(np.nan), F(0.0), F(1.0)

    @jit
    def gpow(x, y):
        """generic_pow(x, y): special cases as Eigen selects them, then pow_impl(|x|, y)."""
        abs_x = abs(x)
        abs_x_is_zero = abs_x == zero
        x_signbit = signbit(x)
        x_is_neg = x_signbit & ~abs_x_is_zero
        x_is_neg_zero = x_signbit & abs_x_is_zero
        abs_x_is_inf = abs_x == inf
        abs_x_is_one = abs_x == one
        abs_x_gt_one = one < abs_x
        abs_x_lt_one = abs_x < one
        x_is_one = abs_x_is_one & ~x_is_neg
        x_is_neg_one = abs_x_is_one & x_is_neg
        x_is_nan = isnan(x)
        abs_y = abs(y)
        y_is_one = y == one
        abs_y_is_zero = abs_y == zero
        y_is_neg = y < zero
        y_is_nan = isnan(y)
        y_is_pos = ~(abs_y_is_zero | y_is_neg)      # NaN y counts as positive, as in Eigen
        abs_y_is_inf = abs_y == inf
        abs_y_is_huge = huge <= abs_y
        y_is_int = floor(y) == y
        y_div_2 = mul(y, F(0.5))
        y_is_even = pround(y_div_2) == y_div_2
        invalid_neg_x = x_is_neg & ~abs_x_is_inf & ~y_is_int & ~abs_y_is_inf
        is_nan = invalid_neg_x | x_is_nan | y_is_nan
        is_one = x_is_one | abs_y_is_zero | (x_is_neg_one & (abs_y_is_inf | (y_is_even & ~invalid_neg_x)))
        is_zero = ((abs_x_is_zero & y_is_pos) | (abs_x_is_inf & y_is_neg) | (abs_x_lt_one & abs_y_is_huge & y_is_pos)
                   | (abs_x_gt_one & abs_y_is_huge & y_is_neg))
        is_inf = ((abs_x_is_zero & y_is_neg) | (abs_x_is_inf & y_is_pos) | (abs_x_lt_one & abs_y_is_huge & y_is_neg)
                  | (abs_x_gt_one & abs_y_is_huge & y_is_pos))
        is_neg_zero = (y_is_int & ~y_is_even) & ((y_is_neg & abs_x_is_inf & x_is_neg) | (y_is_pos & x_is_neg_zero))
        inf_val = where(((abs_x_is_inf & x_is_neg) | (x_is_neg_zero & y_is_neg)) & y_is_int & ~y_is_even, -inf, inf)
        negate = x_is_neg & ~y_is_even
        # lanes that are not finite and positive go through pow_impl with 1 (and are selected away)
        ordinary = ~(abs_x_is_zero | abs_x_is_inf | x_is_nan | y_is_nan | abs_y_is_inf)
        p = pow_impl(where(ordinary, abs_x, one), where(ordinary, y, one))
        return where(y_is_one, x, where(is_one, one, where(is_nan, nan, where(is_inf, inf_val, where(
            is_neg_zero, -zero, where(is_zero, zero, where(negate, -p, p)))))))

    return types.SimpleNamespace(pow=gpow, pow_impl=pow_impl, accurate_log2=accurate_log2, exp2=exp2,
                                 twoprod=twoprod, pround=pround, pldexp=pldexp)


def _numpy_ops(dtype):
    F = np.dtype(dtype).type
    itype = np.int32 if F is np.float32 else np.int64

    def frexp(x):
        m, e = np.frexp(x)
        return m.astype(F, copy=False), e.astype(F)

    def ldexp2(b):
        return np.ldexp(F(1.0), b.astype(itype)).astype(F, copy=False)

    return types.SimpleNamespace(
        mul=np.multiply, add=np.add, sub=np.subtract, div=np.divide, where=np.where, trunc=np.trunc,
        floor=np.floor, frexp=frexp, ldexp2=ldexp2, signbit=np.signbit, isnan=np.isnan, F=F,
        is32=F is np.float32)


_NUMPY = {}


def _numpy(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _NUMPY:
        _NUMPY[dtype] = build(_numpy_ops(dtype))
    return _NUMPY[dtype]


def _arrays(x, y):
    x = np.asarray(x)
    if x.dtype not in PACKET:
        raise TypeError(f"pow: float32 or float64 arrays only, got {x.dtype}")
    y = np.asarray(y, dtype=x.dtype)
    shape = np.broadcast_shapes(x.shape, y.shape)
    return np.broadcast_to(x, shape), np.broadcast_to(y, shape)


def packet_pow(x, y):
    """Eigen's vectorised generic_pow on every element (TF 2.15's packet path)."""
    x, y = _arrays(x, y)
    with np.errstate(all="ignore"):
        out = _numpy(x.dtype).pow(x, y)
    return np.asarray(out, dtype=x.dtype)


def scalar_pow(x, y):
    """std::pow as the reference's libm gives it: float32 through float64 generic_pow, rounded once."""
    x, y = _arrays(x, y)
    if x.dtype == np.float32:
        return packet_pow(x.astype(np.float64), y.astype(np.float64)).astype(np.float32)
    return packet_pow(x, y)


def eigen_layout_pow(x, y, row: int | None = None):
    """x ** y with the packet path on each run's full packets and the scalar path on its tail.

    `row`: the length of the runs the reference evaluates one by one (None: the whole array is one
    run, as a dense kernel or `tf.pow` over one tensor). `x` is read in C order."""
    x, y = _arrays(x, y)
    n = x.size
    row = n if row is None else int(row)
    if n == 0 or row <= 0:
        return np.array(x, copy=True)
    tail = row % PACKET[x.dtype]
    out = packet_pow(x, y)
    if tail:
        flat = out.reshape(-1)
        pos = np.arange(n) % row >= row - tail
        xs, ys = x.reshape(-1)[pos], y.reshape(-1)[pos]
        flat[pos] = scalar_pow(xs, ys)
    return out
