"""pow, log and cos of the coefficient path, as the reference's libm computes them, on any machine.

The reference evaluates the optimizers' scalar transcendentals (beta ** t, the schedules' pow,
cos and log) on 0-d tensors, where Eigen calls libm: glibc's `powf`/`logf`/`cosf` (2.28 and later,
in the FMA build that every x86-64 CPU with AVX2 runs) for float32, and `pow` for float64, in
threads that flush subnormals to zero. Python's `math` and numpy go through whatever libm and
SIMD dispatch the machine has, so they cannot stand in for them.

* float32 `pow`: glibc's powf restated in plain IEEE operations (server/eigen_pow.py, shared with
  the kernels' scalar path).
* float32 `log`, `cos`: glibc's logf and cosf restated here for finite arguments below 120
  (the schedules' range), in Python floats (IEEE doubles, never contracted) with an exactly
  rounded fused multiply-add where the FMA build fuses.
* float64 `pow`: the correctly rounded value (decimal, 60 digits), which glibc's pow gives in all
  but about one case in a thousand (an ulp off there, far inside the float64 tolerance).
Checked against the reference's own values by tests/test_same_numbers.py.
"""
from __future__ import annotations

import decimal
import functools
import math

import numpy as np

from sparseps.server import eigen_pow

_CTX = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN, Emax=999999, Emin=-999999)
_h = float.fromhex
_F32_TINY = float(np.finfo(np.float32).tiny)


_fma = eigen_pow._python_fma   # a * b + c rounded once


def _f32(y: float) -> np.float32:
    """The double's float32 rounding, flushed to zero below the smallest normal (FTZ)."""
    out = np.float32(y)
    return np.float32(math.copysign(0.0, y)) if abs(out) < _F32_TINY else out


def pow(base, exponent, dtype=None) -> np.generic:
    """base ** exponent as the reference's 0-d tf.pow gives it, in `dtype` (default: base's)."""
    dtype = np.dtype(dtype or getattr(base, "dtype", np.float64))
    return _pow(float(base), float(exponent), dtype)


@functools.lru_cache(maxsize=1024)   # a step's variables share their beta powers
def _pow(b: float, e: float, dtype) -> np.generic:
    if dtype == np.float32:
        b, e = float(np.float32(b)), float(np.float32(e))
        if b > 0.0 and b != 1.0 and abs(b) >= _F32_TINY and math.isfinite(b) and math.isfinite(e) and e != 0.0:
            return _f32(eigen_pow.PYTHON.powf(b, e))   # glibc's powf, restated (ordinary values)
        return eigen_pow.scalar_pow(np.float32(b), np.float32(e))[()]   # special values, DAZ
    if not (math.isfinite(b) and math.isfinite(e)) or b <= 0.0 or e == 0.0:
        with np.errstate(all="ignore"):
            return np.power(np.float64(b), np.float64(e))   # special values: exact in any libm
    d = decimal.Decimal(b)
    value = _CTX.power(d, int(e)) if e == int(e) and abs(e) <= 1 << 16 else _CTX.exp(_CTX.multiply(_CTX.ln(d), decimal.Decimal(e)))
    out = np.float64(float(value))   # float(Decimal) rounds correctly
    return np.float64(0.0) if abs(out) < np.finfo(np.float64).tiny else out


# ---- glibc logf: log(x) = log1p(z/c - 1) + log(c) + k ln2, z = x / 2^k in [0.6992, 1.3984)
_LOGF_INVC = eigen_pow.LOG2_INVC          # the same 16 subintervals and 1/c as powf's log2
_LOGF_LOGC = [_h(v) for v in (
    "-0x1.57bf7808caadep-2", "-0x1.2bef0a7c06ddbp-2", "-0x1.01eae7f513a67p-2", "-0x1.b31d8a68224e9p-3",
    "-0x1.6574f0ac07758p-3", "-0x1.1aa2bc79c81p-3", "-0x1.a4e76ce8c0e5ep-4", "-0x1.1973c5a611cccp-4",
    "-0x1.252f438e10c1ep-5", "0x0p+0", "0x1.aa5aa5df25984p-5", "0x1.c5e53aa362eb4p-4",
    "0x1.526e57720db08p-3", "0x1.bc2860d22477p-3", "0x1.1058bc8a07ee1p-2", "0x1.4043057b6ee09p-2")]
_LOGF_LN2 = _h("0x1.62e42fefa39efp-1")
_LOGF_POLY = [_h(v) for v in ("-0x1.00ea348b88334p-2", "0x1.5575b0be00b6ap-2", "-0x1.ffffef20a4123p-2")]


def log(x, dtype=np.float32) -> np.float32:
    """logf(x) for a float32 x (float32 schedules only)."""
    if np.dtype(dtype) != np.float32:
        raise TypeError("log: the reference evaluates it in float32 only")
    x = float(np.float32(x))
    if x == 1.0:
        return np.float32(0.0)
    if not math.isfinite(x) or x <= 0.0 or x < _F32_TINY:      # DAZ: a subnormal is 0
        with np.errstate(all="ignore"):
            return np.log(np.float32(x if x >= _F32_TINY or x <= 0 else 0.0))
    m, e = math.frexp(x)
    z, k = m * 2.0, e - 1
    if z >= 1.3984375:
        z, k = z * 0.5, k + 1
    i = ((int(np.float32(z).view(np.int32)) - 0x3f330000) >> 19) & 15
    r = _fma(z, float(_LOGF_INVC[i]), -1.0)
    y0 = _fma(float(k), _LOGF_LN2, _LOGF_LOGC[i])
    r2 = r * r
    y = _fma(_LOGF_POLY[1], r, _LOGF_POLY[2])
    y = _fma(_LOGF_POLY[0], r2, y)
    return _f32(_fma(y, r2, y0 + r))


# ---- glibc cosf: one-step reduction by pi/2 for |x| < 120, then sin/cos polynomials in double
_PI4 = _h("0x1.921FB54442D18p-1")
_HPI_INV = _h("0x1.45F306DC9C883p+23")    # 2/pi * 2^24
_HPI = _h("0x1.921FB54442D18p0")
_COS_POLY = [_h(v) for v in ("0x1p0", "-0x1.ffffffd0c621cp-2", "0x1.55553e1068f19p-5",
                             "-0x1.6c087e89a359dp-10", "0x1.99343027bf8c3p-16")]
_SIN_POLY = [_h(v) for v in ("-0x1.555545995a603p-3", "0x1.1107605230bc4p-7", "-0x1.994eb3774cf24p-13")]


def _sincos_poly(x: float, x2: float, n: int, negate_cos: bool) -> float:
    if n & 1 == 0:
        x3 = x * x2
        s1 = _fma(x2, _SIN_POLY[2], _SIN_POLY[1])
        x7 = x3 * x2
        s = _fma(x3, _SIN_POLY[0], x)
        return _fma(x7, s1, s)
    c0, c1, c2, c3, c4 = (-c for c in _COS_POLY) if negate_cos else _COS_POLY
    x4 = x2 * x2
    cc2 = _fma(x2, c4, c3)
    cc1 = _fma(x2, c1, c0)
    x6 = x4 * x2
    c = _fma(x4, c2, cc1)
    return _fma(x6, cc2, c)


def cos(x, dtype=np.float32) -> np.float32:
    """cosf(x) for a float32 x with |x| < 120 (float32 schedules only)."""
    if np.dtype(dtype) != np.float32:
        raise TypeError("cos: the reference evaluates it in float32 only")
    xf = np.float32(x)
    top = (int(xf.view(np.int32)) >> 20) & 0x7ff
    x = float(xf)
    if top < (int(np.float32(_PI4).view(np.int32)) >> 20) & 0x7ff:
        if top < (int(np.float32(2.0 ** -12).view(np.int32)) >> 20) & 0x7ff:
            return np.float32(1.0)
        return _f32(_sincos_poly(x, x * x, 1, False))
    if top >= (int(np.float32(120.0).view(np.int32)) >> 20) & 0x7ff:
        raise ValueError("cos: arguments of 120 and more are outside the schedules' range")
    r = x * _HPI_INV
    n = (int(r) + 0x800000) >> 24     # the nearest quadrant: r truncated, then an arithmetic shift
    x = _fma(-float(n), _HPI, x)
    s = (1.0, -1.0, -1.0, 1.0)[n & 3]
    return _f32(_sincos_poly(x * s, x * x, n ^ 1, bool(n & 2)))
