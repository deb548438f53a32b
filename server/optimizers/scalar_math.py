"""Correctly rounded pow, log and cos of the coefficient path, the same bits on every machine.

The reference evaluates the optimizers' scalar transcendentals (beta ** t, the schedules' pow,
cos and log) on 0-d tensors, where Eigen falls back to libm's `powf`/`cosf`/`logf` (and their
double twins): nearly correctly rounded, but libm picks FMA or non-FMA code by CPU, and numpy's
and Python's `math` go through whatever libm and SIMD dispatch the machine has. Here each value
is computed exactly enough in decimal (60 significant digits, pure software) and rounded once to
the dtype, ties to even: the correctly rounded result, which is libm's in all but its rare
misroundings. These run once per step on the host, for every backend alike.
"""
from __future__ import annotations

import decimal
import functools
import math

import numpy as np

_CTX = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN, Emax=999999, Emin=-999999)
D = decimal.Decimal


def _d(x) -> decimal.Decimal:
    return D(float(x))   # exact: every binary float is a finite decimal


def _round(value: decimal.Decimal, dtype) -> np.generic:
    """The float of `dtype` nearest to `value`, ties to the even significand."""
    t = np.dtype(dtype).type
    g = float(value)                 # correctly rounded to double (via its decimal string)
    f = t(g)
    if t is np.float64 or not np.isfinite(f) or g == float(f):
        return f
    # g rounds to float32 as value does unless g sits exactly on a float32 midpoint
    other = np.nextafter(f, t(np.inf) if g > float(f) else t(-np.inf))
    if g != (float(f) + float(other)) / 2:
        return f
    side = value.compare(_d(g))
    if side == 0:
        return f   # an exact tie: numpy's conversion already rounded it to even
    return max(f, other) if side > 0 else min(f, other)


def pow(base, exponent, dtype=None) -> np.generic:
    """base ** exponent (IEEE pow's special cases), rounded once to `dtype` (default: base's)."""
    dtype = np.dtype(dtype or getattr(base, "dtype", np.float64))
    return _pow(float(base), float(exponent), dtype)


@functools.lru_cache(maxsize=1024)   # a step's variables share their beta powers
def _pow(b: float, e: float, dtype) -> np.generic:
    if not (math.isfinite(b) and math.isfinite(e)) or b <= 0.0 or e == 0.0:
        with np.errstate(all="ignore"):
            return np.power(dtype.type(b), dtype.type(e))   # special cases are exact in any libm
    if e == int(e) and abs(e) <= 1 << 16:
        value = _CTX.power(_d(b), int(e))   # exact up to the context's 60 digits
    else:
        value = _CTX.exp(_CTX.multiply(_CTX.ln(_d(b)), _d(e)))
    return _round(value, dtype)


def log(x, dtype=None) -> np.generic:
    """Natural log, rounded once to `dtype` (default: x's)."""
    dtype = np.dtype(dtype or getattr(x, "dtype", np.float64))
    v = float(x)
    if not math.isfinite(v) or v <= 0.0:
        with np.errstate(all="ignore"):
            return np.log(dtype.type(v))
    return _round(_CTX.ln(_d(v)), dtype)


_PI = D("3.14159265358979323846264338327950288419716939937510582097494459230781640628620899863")


def cos(x, dtype=None) -> np.generic:
    """cos(x) for a finite x (|x| up to 1e6: the schedules' arguments lie in [0, pi]), rounded
    once to `dtype` (default: x's). Taylor series after an exact-enough reduction by 2 pi."""
    dtype = np.dtype(dtype or getattr(x, "dtype", np.float64))
    v = float(x)
    if not math.isfinite(v):
        return dtype.type(np.nan)
    ctx = decimal.Context(prec=80)
    r = ctx.remainder_near(_d(abs(v)), ctx.multiply(2, _PI))
    r2 = ctx.multiply(r, r)
    term, total, k = D(1), D(1), 0
    while True:
        k += 2
        term = ctx.divide(ctx.multiply(-term, r2), (k - 1) * k)
        if term.is_zero() or abs(term) < D("1e-75"):
            break
        total = ctx.add(total, term)
    return _round(+total, dtype)
