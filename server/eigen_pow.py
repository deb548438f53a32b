"""x ** y exactly as TensorFlow 2.15's CPU kernels compute it, in plain IEEE operations.

Plain module: numpy only (numba builds its own copy from the same source, server/backends/fused.py).

Why. The reference evaluates `pow` two ways inside one tensor expression: Eigen's vectorised
`generic_pow` (Eigen/src/Core/arch/Default/GenericPacketMathFunctions.h, as the TF 2.15 pip wheel
compiles it: AVX packets of 8 floats / 4 doubles, no FMA) on every full packet, and `std::pow` --
glibc's `powf` -- on the elements after the last full packet and on 0-d tensors (beta ** t), all
in threads that flush subnormals to zero. The two differ by an ulp in a few percent of float32
cases, and Ftrl's `(clip(linear) - linear) / (pow(new) / lr + 2 l2)` magnifies that into tens of
ulp. numpy's `np.power`, numba's `x ** y` and libm itself change with the CPU's SIMD dispatch
(AVX2 vs AVX-512), so none of them can stand in for either path.

What. `build(ops)` is one transcription of `generic_pow`, and a restatement of glibc's powf (its
FMA build, which every x86-64 CPU with AVX2 runs: its log2 and exp2 tables, polynomials and fused
multiply-adds), written against a handful of element-wise operations (`ops`): numpy ufuncs on
arrays, numba scalars in the fused CPU kernels, Python floats for single values on the host.
Every product and sum is its own IEEE operation (Dekker's product and Veltkamp's split where Eigen
uses them without FMA; an exactly rounded FMA -- Boldo & Melquiond's emulation, or exact integers
-- where glibc fuses), so the bits depend on nothing but IEEE 754. float64 tails use
`generic_pow` too: within 1 ulp of glibc's pow.

`eigen_layout_pow(x, y, row)` evaluates an array laid out as the reference's evaluator does: in
each run of `row` elements (a whole tensor for the dense kernels, one row for the sparse
kernels' per-row chips, 1 for a scalar loop), the first `row - row % P` elements take the packet
path, the rest the scalar path (P = 8 for float32, 4 for float64). Checked bit for bit against
TF 2.15's own values by tests/test_same_numbers.py.
"""
from __future__ import annotations

import types

import numpy as np

PACKET = {np.dtype(np.float32): 8, np.dtype(np.float64): 4}
_h = float.fromhex


def build(ops):
    """The algorithm for one set of element-wise operations.

    `ops` supplies: jit (a decorator for every function here; None: plain Python), lnot (logical
    not), mul, add, sub, div (each one IEEE rounding), where(c, a, b), trunc, floor,
    frexp(x) -> (m in [0.5, 1) as float, e as float), ldexp2(b) -> 2.0 ** b for an integral float
    b in [-150, 150], signbit(x), isnan(x), F (the float type: np.float32 or np.float64) and is32;
    for the float64 build also bits(x) (the int64 pattern), fbits32(x) (the float32 pattern of a
    float32 value), nextafter, idx (a float index to int) and optionally fma (exact, else emulated).
    Returns a namespace with `pow(x, y)` (generic_pow), for float64 also `scalar_powf(x, y)`
    (glibc's powf on float32 values held in doubles, before the final rounding), and the pieces.
    """
    mul, add, sub, div, where = ops.mul, ops.add, ops.sub, ops.div, ops.where
    trunc, floor, frexp, ldexp2, signbit, isnan = ops.trunc, ops.floor, ops.frexp, ops.ldexp2, ops.signbit, ops.isnan
    F, is32, lnot = ops.F, ops.is32, ops.lnot
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
        x_is_neg = x_signbit & lnot(abs_x_is_zero)
        x_is_neg_zero = x_signbit & abs_x_is_zero
        abs_x_is_inf = abs_x == inf
        abs_x_is_one = abs_x == one
        abs_x_gt_one = one < abs_x
        abs_x_lt_one = abs_x < one
        x_is_one = abs_x_is_one & lnot(x_is_neg)
        x_is_neg_one = abs_x_is_one & x_is_neg
        x_is_nan = isnan(x)
        abs_y = abs(y)
        y_is_one = y == one
        abs_y_is_zero = abs_y == zero
        y_is_neg = y < zero
        y_is_nan = isnan(y)
        y_is_pos = lnot(abs_y_is_zero | y_is_neg)      # NaN y counts as positive, as in Eigen
        abs_y_is_inf = abs_y == inf
        abs_y_is_huge = huge <= abs_y
        y_is_int = floor(y) == y
        y_div_2 = mul(y, F(0.5))
        y_is_even = pround(y_div_2) == y_div_2
        invalid_neg_x = x_is_neg & lnot(abs_x_is_inf) & lnot(y_is_int) & lnot(abs_y_is_inf)
        is_nan = invalid_neg_x | x_is_nan | y_is_nan
        is_one = x_is_one | abs_y_is_zero | (x_is_neg_one & (abs_y_is_inf | (y_is_even & lnot(invalid_neg_x))))
        is_zero = ((abs_x_is_zero & y_is_pos) | (abs_x_is_inf & y_is_neg) | (abs_x_lt_one & abs_y_is_huge & y_is_pos)
                   | (abs_x_gt_one & abs_y_is_huge & y_is_neg))
        is_inf = ((abs_x_is_zero & y_is_neg) | (abs_x_is_inf & y_is_pos) | (abs_x_lt_one & abs_y_is_huge & y_is_neg)
                  | (abs_x_gt_one & abs_y_is_huge & y_is_pos))
        is_neg_zero = (y_is_int & lnot(y_is_even)) & ((y_is_neg & abs_x_is_inf & x_is_neg) | (y_is_pos & x_is_neg_zero))
        inf_val = where(((abs_x_is_inf & x_is_neg) | (x_is_neg_zero & y_is_neg)) & y_is_int & lnot(y_is_even), -inf, inf)
        negate = x_is_neg & lnot(y_is_even)
        # lanes that are not finite and positive go through pow_impl with 1 (and are selected away)
        ordinary = lnot(abs_x_is_zero | abs_x_is_inf | x_is_nan | y_is_nan | abs_y_is_inf)
        p = pow_impl(where(ordinary, abs_x, one), where(ordinary, y, one))
        return where(y_is_one, x, where(is_one, one, where(is_nan, nan, where(is_inf, inf_val, where(
            is_neg_zero, -zero, where(is_zero, zero, where(negate, -p, p)))))))

    if is32:
        return types.SimpleNamespace(pow=gpow, pow_impl=pow_impl, accurate_log2=accurate_log2, exp2=exp2,
                                     twoprod=twoprod, pround=pround, pldexp=pldexp)

    # ---- the scalar path of float32: glibc's powf (2.28+, its FMA build, which every x86-64 CPU
    # with AVX2 runs), restated. Doubles in, the double result before the final rounding out.
    bits, fbits32, nextafter, idx = ops.bits, ops.fbits32, ops.nextafter, ops.idx
    shift = F(_h("0x1.8p47"))                 # adding it rounds to a multiple of 1/32
    overflow = F(_h("0x1.fffffffd1d571p+6"))  # log2 of the largest float32, rounded up

    @jit
    def knuth_twosum(a, b):     # a + b = s + e exactly, any magnitudes
        s = add(a, b)
        bb = sub(s, a)
        return s, add(sub(a, sub(s, bb)), sub(b, bb))

    @jit
    def fma_emulated(a, b, c):  # a * b + c rounded once (Boldo & Melquiond: RN(th + RO(tl + ul)))
        uh, ul = twoprod(a, b)
        th, tl = knuth_twosum(c, uh)
        v, ve = knuth_twosum(tl, ul)
        even = (bits(v) & 1) == 0
        v = where((ve != zero) & even, nextafter(v, where(ve > zero, inf, -inf)), v)
        return add(th, v)

    fma = getattr(ops, "fma", None) or fma_emulated   # an exact FMA of the ops' own, where they have one

    @jit
    def powf_log2(z, k):         # log2(z 2^k), z a float32 value in [0.69921875, 1.3984375)
        i = ((fbits32(z) - 0x3f330000) >> 19) & 15
        invc, logc = LOG2_INVC[i], LOG2_LOGC[i]
        r = fma(z, invc, F(-1.0))
        y0 = add(logc, k)
        r2 = mul(r, r)
        y = fma(F(LOG2_POLY[0]), r, F(LOG2_POLY[1]))
        p = fma(F(LOG2_POLY[2]), r, F(LOG2_POLY[3]))
        r4 = mul(r2, r2)
        q = fma(F(LOG2_POLY[4]), r, y0)
        q = fma(p, r2, q)
        return fma(y, r4, q)

    @jit
    def powf_exp2(xd):           # 2^xd, |xd| < 150
        kd = sub(add(xd, shift), shift)        # xd rounded to a multiple of 1/32
        r = sub(xd, kd)
        k = mul(kd, F(32.0))
        j = sub(k, mul(floor(mul(k, F(1.0 / 32))), F(32.0)))
        s = mul(EXP2_TAB[idx(j)], ldexp2(mul(sub(k, j), F(1.0 / 32))))
        z = fma(F(EXP2_POLY[0]), r, F(EXP2_POLY[1]))
        r2 = mul(r, r)
        y = fma(F(EXP2_POLY[2]), r, F(1.0))
        y = fma(z, r2, y)
        return mul(y, s)

    @jit
    def powf(x, y):
        """glibc powf(x, y) for float32 values x > 0 (normal) and y, as a double before rounding."""
        m, e = frexp(x)
        z = mul(m, F(2.0))
        k = sub(e, F(1.0))
        big = z >= F(1.3984375)
        z = where(big, mul(z, F(0.5)), z)
        k = where(big, add(k, F(1.0)), k)
        ylogx = mul(y, powf_log2(z, k))
        over = ylogx > overflow
        under = ylogx <= F(-150.0)
        ok = lnot(over | under)
        out = powf_exp2(where(ok, ylogx, zero))
        return where(over, inf, where(under, zero, out))

    @jit
    def scalar_powf(x, y):
        """powf(x, y) for any float32 values x, y held in doubles: the double before rounding."""
        y_int = floor(y) == y
        ordinary = (x != zero) & (abs(x) < inf) & (abs(y) < inf) & (y != zero) & (abs(x) != one) & (
            (x > zero) | y_int)
        p = powf(where(ordinary, abs(x), F(2.0)), where(ordinary, y, one))
        odd = y_int & (floor(mul(y, F(0.5))) != mul(y, F(0.5)))
        return where(ordinary, where((x < zero) & odd, -p, p), gpow(x, y))   # gpow: IEEE's special values

    return types.SimpleNamespace(pow=gpow, pow_impl=pow_impl, accurate_log2=accurate_log2, exp2=exp2,
                                 twoprod=twoprod, pround=pround, pldexp=pldexp, fma=fma, powf=powf,
                                 scalar_powf=scalar_powf)


# glibc powf's log2 table (16 subintervals of [0.69921875, 1.3984375): 1/c and log2(c) for each
# subinterval's c) and its two polynomials: numbers its results depend on, not code.
LOG2_INVC = np.array([_h(v) for v in (
    "0x1.661ec79f8f3bep+0", "0x1.571ed4aaf883dp+0", "0x1.49539f0f010bp+0", "0x1.3c995b0b80385p+0",
    "0x1.30d190c8864a5p+0", "0x1.25e227b0b8eap+0", "0x1.1bb4a4a1a343fp+0", "0x1.12358f08ae5bap+0",
    "0x1.0953f419900a7p+0", "0x1p+0", "0x1.e608cfd9a47acp-1", "0x1.ca4b31f026aap-1",
    "0x1.b2036576afce6p-1", "0x1.9c2d163a1aa2dp-1", "0x1.886e6037841edp-1", "0x1.767dcf5534862p-1",
)])
LOG2_LOGC = np.array([_h(v) for v in (
    "-0x1.efec65b963019p-2", "-0x1.b0b6832d4fca4p-2", "-0x1.7418b0a1fb77bp-2", "-0x1.39de91a6dcf7bp-2",
    "-0x1.01d9bf3f2b631p-2", "-0x1.97c1d1b3b7afp-3", "-0x1.2f9e393af3c9fp-3", "-0x1.960cbbf788d5cp-4",
    "-0x1.a6f9db6475fcep-5", "0x0p+0", "0x1.338ca9f24f53dp-4", "0x1.476a9543891bap-3",
    "0x1.e840b4ac4e4d2p-3", "0x1.40645f0c6651cp-2", "0x1.88e9c2c1b9ff8p-2", "0x1.ce0a44eb17bccp-2",
)])
LOG2_POLY = tuple(_h(v) for v in (
    "0x1.27616c9496e0bp-2", "-0x1.71969a075c67ap-2", "0x1.ec70a6ca7baddp-2",
    "-0x1.7154748bef6c8p-1", "0x1.71547652ab82bp0",
))
EXP2_POLY = tuple(_h(v) for v in ("0x1.c6af84b912394p-5", "0x1.ebfce50fac4f3p-3", "0x1.62e42ff0c52d6p-1"))


def _exp2_table():
    """2^(j/32) correctly rounded to double, j = 0..31 (glibc's exp2f table holds the same)."""
    import decimal
    ctx = decimal.Context(prec=50)
    return np.array([float(ctx.power(decimal.Decimal(2), ctx.divide(j, 32))) for j in range(32)])


EXP2_TAB = _exp2_table()


def _numpy_ops(dtype):
    F = np.dtype(dtype).type
    itype = np.int32 if F is np.float32 else np.int64

    def frexp(x):
        m, e = np.frexp(x)
        return m.astype(F, copy=False), e.astype(F)

    def ldexp2(b):
        return np.ldexp(F(1.0), b.astype(itype)).astype(F, copy=False)

    def bits(x):
        return np.asarray(x).view(np.int64 if F is np.float64 else np.int32)

    def fbits32(x):
        return np.asarray(x).astype(np.float32).view(np.int32).astype(np.int64)

    return types.SimpleNamespace(
        mul=np.multiply, add=np.add, sub=np.subtract, div=np.divide, where=np.where, trunc=np.trunc,
        floor=np.floor, frexp=frexp, ldexp2=ldexp2, signbit=np.signbit, isnan=np.isnan, F=F,
        is32=F is np.float32, bits=bits, fbits32=fbits32, nextafter=np.nextafter, lnot=np.logical_not,
        idx=lambda v: np.asarray(v).astype(np.int64))


def _python_fma(a, b, c):
    """a * b + c rounded once, in integers: the exact sum, then one correctly rounded conversion."""
    import math
    if not (a and b and c and math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return a * b + c
    ma, ea = math.frexp(a)
    mb, eb = math.frexp(b)
    mc, ec = math.frexp(c)
    ia, ib, ic = int(ma * 9007199254740992.0), int(mb * 9007199254740992.0), int(mc * 9007199254740992.0)
    ep, ec = ea + eb - 106, ec - 53           # a * b = ia * ib * 2^ep, c = ic * 2^ec, exactly
    e = min(ep, ec)
    n = (ia * ib << (ep - e)) + (ic << (ec - e))
    if n == 0:
        return 0.0
    mag = abs(n)
    shift = max(mag.bit_length() - 64, 0)    # keep 64 bits and a sticky bit, then round once
    top = mag >> shift
    if mag & ((1 << shift) - 1):
        top |= 1
    return math.ldexp(float(top) if n > 0 else -float(top), e + shift)


def _python_ops():
    """Python floats (IEEE doubles, never contracted): the host's one-value path."""
    import math
    import struct

    return types.SimpleNamespace(
        mul=lambda a, b: a * b, add=lambda a, b: a + b, sub=lambda a, b: a - b, div=lambda a, b: a / b,
        where=lambda c, a, b: a if c else b, trunc=lambda v: float(math.trunc(v)),
        floor=lambda v: float(math.floor(v)), frexp=lambda v: (lambda m, e: (m, float(e)))(*math.frexp(v)),
        ldexp2=lambda b: math.ldexp(1.0, int(b)), signbit=lambda v: math.copysign(1.0, v) < 0.0,
        isnan=math.isnan, F=float, is32=False, lnot=lambda c: not c,
        bits=lambda v: struct.unpack("<q", struct.pack("<d", v))[0],
        fbits32=lambda v: struct.unpack("<i", struct.pack("<f", v))[0],
        nextafter=math.nextafter, idx=int, fma=_python_fma)


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


def _flush(a):
    """TF's CPU threads run with FTZ and DAZ: subnormal inputs read as 0, subnormal results are 0."""
    tiny = np.finfo(a.dtype).tiny
    return np.where(np.abs(a) < tiny, np.copysign(a.dtype.type(0), a), a)


def packet_pow(x, y):
    """Eigen's vectorised generic_pow on every element (TF 2.15's packet path)."""
    x, y = _arrays(x, y)
    with np.errstate(all="ignore"):
        out = _numpy(x.dtype).pow(_flush(x), _flush(y))
        return _flush(np.asarray(out, dtype=x.dtype))


def scalar_pow(x, y):
    """std::pow on the reference's 0-d and tail elements: glibc's powf (restated, bit for bit) for
    float32; for float64 Eigen's generic_pow, within an ulp of glibc's pow."""
    x, y = _arrays(x, y)
    if x.dtype == np.float64:
        return packet_pow(x, y)
    with np.errstate(all="ignore"):
        p = _numpy(np.float64).scalar_powf(_flush(x).astype(np.float64), _flush(y).astype(np.float64))
        return _flush(np.asarray(p).astype(np.float32))


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


#: the algorithms on Python floats, for values computed one at a time on the host
PYTHON = build(_python_ops())


def fma64(a, b, c):
    """a * b + c rounded once, float64 arrays (the emulation glibc's restatement uses)."""
    a, b, c = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, c)))
    return _numpy(np.float64).fma(a, b, c)
