"""Keras initializers (serialize form) evaluated in numpy, the same on any number of shards.

Random values are drawn in blocks of rows from a generator seeded by (seed, block), so a row's
initial value depends only on its global id and the seed, never on how the table is sharded.
They follow Keras' distributions but not its random streams (which differ between TF versions
anyway); pass an `initial_value` for bit-identical starting points.
"""
import json
import math

import numpy as np

from sparseps.errors import InvalidArgument
from sparseps.partition import splitmix64

BLOCK = 4096


def _fans(shape):
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _draw(kind, cfg, shape, fans):
    """A function(rng, n_rows) -> array of n_rows rows of shape[1:] (float64)."""
    row = shape[1:]
    if kind == "RandomNormal":
        mean, std = float(cfg.get("mean", 0.0)), float(cfg.get("stddev", 0.05))
        return lambda rng, n: rng.normal(mean, std, (n,) + row)
    if kind == "RandomUniform":
        lo, hi = float(cfg.get("minval", -0.05)), float(cfg.get("maxval", 0.05))
        return lambda rng, n: rng.uniform(lo, hi, (n,) + row)
    if kind == "TruncatedNormal":
        mean, std = float(cfg.get("mean", 0.0)), float(cfg.get("stddev", 0.05))
        return lambda rng, n: mean + std * _truncated(rng, (n,) + row)
    fan_in, fan_out = fans
    scale, mode, dist = {
        "GlorotUniform": (1.0, "fan_avg", "uniform"), "GlorotNormal": (1.0, "fan_avg", "truncated_normal"),
        "HeUniform": (2.0, "fan_in", "uniform"), "HeNormal": (2.0, "fan_in", "truncated_normal"),
        "LecunUniform": (1.0, "fan_in", "uniform"), "LecunNormal": (1.0, "fan_in", "truncated_normal"),
        "VarianceScaling": (float(cfg.get("scale", 1.0)), cfg.get("mode", "fan_in"),
                            cfg.get("distribution", "truncated_normal")),
    }[kind]
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}.get(mode)
    if n is None:
        raise InvalidArgument(f"initializer {kind}: unknown mode {mode!r}")
    var = scale / max(1.0, n)
    if dist == "uniform":
        limit = math.sqrt(3.0 * var)
        return lambda rng, k: rng.uniform(-limit, limit, (k,) + row)
    if dist in ("truncated_normal", "normal"):
        std = math.sqrt(var) / (0.87962566103423978 if dist == "truncated_normal" else 1.0)
        if dist == "normal":
            return lambda rng, k: rng.normal(0.0, std, (k,) + row)
        return lambda rng, k: std * _truncated(rng, (k,) + row)
    if dist == "untruncated_normal":
        std = math.sqrt(var)
        return lambda rng, k: rng.normal(0.0, std, (k,) + row)
    raise InvalidArgument(f"initializer {kind}: unknown distribution {dist!r}")


def _truncated(rng, shape):
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2
    return out


KINDS = ("Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal", "GlorotUniform",
         "GlorotNormal", "HeUniform", "HeNormal", "LecunUniform", "LecunNormal", "VarianceScaling")


def make(initializer_json: str, shape, dtype, global_ids: np.ndarray, name: str) -> np.ndarray:
    """This shard's rows (global_ids, in local order) of the initialised variable."""
    local_shape = (len(global_ids),) + tuple(shape[1:])
    kind, cfg = parse(initializer_json, name)
    if kind == "Zeros":
        return np.zeros(local_shape, dtype)
    if kind == "Ones":
        return np.ones(local_shape, dtype)
    if kind == "Constant":
        value = cfg.get("value", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"variable {name!r}: Constant initializer value must be a number, got {value!r}")
        return np.full(local_shape, value, dtype)
    seed = cfg.get("seed")
    if seed is None:
        raise InvalidArgument(f"variable {name!r}: random initializer {kind} needs an integer seed "
                              "(the client fills one in so that every shard agrees)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgument(f"variable {name!r}: initializer seed must be a non-negative integer, got {seed!r}")
    draw = _draw(kind, cfg, tuple(shape), _fans(tuple(shape)))
    out = np.empty(local_shape, dtype)
    blocks = global_ids // BLOCK
    for b in np.unique(blocks):
        start = int(b) * BLOCK
        n = min(BLOCK, shape[0] - start)
        block = draw(np.random.default_rng([seed, int(b)]), n)
        sel = blocks == b
        out[sel] = block[global_ids[sel] - start]
    return out


# ---------------------------------------------------------------------------------------------
# Dynamic tables: a row's initial value is a pure function of (seed, key, initializer config).
#
# Element j of the row of `key` draws from the counter-based stream
#     x(key, i) = splitmix64(splitmix64(seed) ^ splitmix64(key) + i * 0x9E3779B97F4A7C15)
#     u(key, i) = (x >> 11) * 2**-53                       (uniform in [0, 1), 53 bits)
# uniform:  minval + (maxval - minval) * u(key, j)
# normal:   Box-Muller, z = sqrt(-2 ln(1 - u(key, 2j))) * cos(2 pi u(key, 2j + 1))
# truncated normal: the first of z(key, j), z(key, j + D), z(key, j + 2D), ... with |z| <= 2
# No table size, shard count, order of arrival or restart changes a key's value. The
# variance-scaling family takes fan_in = fan_out = the row width (a dynamic table has no row
# count to take a fan from).
# ---------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _uniform(base: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """u(key, i) for base (n, 1) uint64 and counters (m,) -> (n, m) float64 in [0, 1)."""
    x = splitmix64(base + counters.astype(np.uint64)[None, :] * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _normal(base, counters):
    return _box_muller(_uniform(base, 2 * counters), _uniform(base, 2 * counters + 1))


# Box-Muller in plain IEEE float64 operations: numpy's log1p and cos change with the CPU's SIMD
# dispatch (AVX-512 has its own), and a key's initial value must be the same on every machine
# (a replica, a restore elsewhere). Accurate to a few ulp; what matters is that it is one order of
# operations everywhere.
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10   # ln 2 = hi + lo, hi exact in 32 bits
_ATANH = [1.0 / k for k in range(23, 0, -2)]    # 2 atanh(s) = 2 (s + s^3/3 + ... + s^23/23)


def _log_unit(w):
    """log(w) for float64 w in (0, 1]."""
    m, e = np.frexp(w)
    low = m < 0.70710678118654752440
    m = np.where(low, m * 2.0, m)
    e = np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = np.full_like(s, _ATANH[0])
    for c in _ATANH[1:]:
        p = p * s2 + c
    return e * _LN2_HI + ((2.0 * s) * p + e * _LN2_LO)


_COS = [(-1.0) ** k / math.factorial(2 * k) for k in range(11, -1, -1)]
_SIN = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(11, -1, -1)]


def _cos_turns(u):
    """cos(2 pi u) for float64 u in [0, 1): quadrant from 4u (exact), then a Taylor polynomial on
    [0, pi/2)."""
    q4 = u * 4.0
    q = np.floor(q4)
    x = (q4 - q) * (math.pi / 2)
    x2 = x * x
    c = np.full_like(x, _COS[0])
    for k in _COS[1:]:
        c = c * x2 + k
    sn = np.full_like(x, _SIN[0])
    for k in _SIN[1:]:
        sn = sn * x2 + k
    sn = sn * x
    qi = q.astype(np.int64) & 3
    return np.select([qi == 0, qi == 1, qi == 2], [c, -sn, -c], sn)


def _box_muller(u1, u2):
    return np.sqrt(-2.0 * _log_unit(1.0 - u1)) * _cos_turns(u2)


def _truncated_keys(base, width):
    out = _normal(base, np.arange(width))
    attempt = 1
    bad = np.abs(out) > 2
    while bad.any():   # redraw only the rejected elements, each from its own next counter
        rows, cols = np.nonzero(bad)
        out[rows, cols] = _normal_pairs(base[rows, 0], cols + attempt * width)
        attempt += 1
        bad = np.abs(out) > 2
    return out


def _normal_pairs(base: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """z(key_i, counter_i) elementwise for 1-D base and counters."""
    c = counters.astype(np.uint64)
    u1 = (splitmix64(base + (2 * c) * _GOLDEN) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    u2 = (splitmix64(base + (2 * c + np.uint64(1)) * _GOLDEN) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return _box_muller(u1, u2)


def parse(initializer_json: str, name: str):
    """(kind, config) of an initializer, or ("Zeros", {}) when there is none."""
    if not initializer_json:
        return "Zeros", {}
    try:
        obj = json.loads(initializer_json)
    except ValueError as e:
        raise InvalidArgument(f"variable {name!r}: initializer is not valid JSON: {e}") from None
    if isinstance(obj, str):
        obj = {"class_name": obj, "config": {}}
    if not isinstance(obj, dict) or not isinstance(obj.get("class_name"), str):
        raise InvalidArgument(f"variable {name!r}: initializer must be {{'class_name': ..., 'config': {{...}}}}")
    kind = obj["class_name"].split(">")[-1]
    kind = {"zeros": "Zeros", "ones": "Ones", "random_normal": "RandomNormal", "random_uniform": "RandomUniform",
            "truncated_normal": "TruncatedNormal", "glorot_uniform": "GlorotUniform",
            "glorot_normal": "GlorotNormal", "he_normal": "HeNormal", "he_uniform": "HeUniform"}.get(kind, kind)
    cfg = obj.get("config") or {}
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"variable {name!r}: initializer config must be an object")
    if kind not in KINDS:
        raise InvalidArgument(f"variable {name!r}: unknown initializer {obj['class_name']!r}; supported: {list(KINDS)}")
    return kind, cfg


def for_keys(initializer_json: str, row_shape, dtype, keys: np.ndarray, name: str) -> np.ndarray:
    """Initial rows of a dynamic table's keys: (len(keys),) + row_shape, a pure function of each key."""
    kind, cfg = parse(initializer_json, name)
    row_shape = tuple(row_shape)
    shape = (len(keys),) + row_shape
    if kind in ("Zeros", "Ones", "Constant"):
        value = {"Zeros": 0.0, "Ones": 1.0}.get(kind, cfg.get("value", 0.0))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"variable {name!r}: Constant initializer value must be a number, got {value!r}")
        return np.full(shape, value, dtype)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgument(f"variable {name!r}: random initializer {kind} needs a non-negative integer seed "
                              f"(the client fills one in so that every shard agrees), got {seed!r}")
    width = int(np.prod(row_shape, dtype=np.int64))
    base = (splitmix64(np.uint64(seed % (1 << 64))) ^ splitmix64(np.asarray(keys, np.int64).view(np.uint64)))[:, None]
    counters = np.arange(width)
    if kind == "RandomUniform":
        lo, hi = float(cfg.get("minval", -0.05)), float(cfg.get("maxval", 0.05))
        out = lo + (hi - lo) * _uniform(base, counters)
    elif kind == "RandomNormal":
        out = float(cfg.get("mean", 0.0)) + float(cfg.get("stddev", 0.05)) * _normal(base, counters)
    elif kind == "TruncatedNormal":
        out = float(cfg.get("mean", 0.0)) + float(cfg.get("stddev", 0.05)) * _truncated_keys(base, width)
    else:
        scale, mode, dist = _SCALING[kind] if kind in _SCALING else (
            float(cfg.get("scale", 1.0)), cfg.get("mode", "fan_in"), cfg.get("distribution", "truncated_normal"))
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise InvalidArgument(f"initializer {kind}: unknown mode {mode!r}")
        var = scale / max(1.0, float(width))
        if dist == "uniform":
            limit = math.sqrt(3.0 * var)
            out = -limit + 2 * limit * _uniform(base, counters)
        elif dist == "truncated_normal":
            out = math.sqrt(var) / 0.87962566103423978 * _truncated_keys(base, width)
        elif dist in ("normal", "untruncated_normal"):
            out = math.sqrt(var) * _normal(base, counters)
        else:
            raise InvalidArgument(f"initializer {kind}: unknown distribution {dist!r}")
    with np.errstate(over="ignore"):
        return out.reshape(shape).astype(dtype)


_SCALING = {"GlorotUniform": (1.0, "fan_avg", "uniform"), "GlorotNormal": (1.0, "fan_avg", "truncated_normal"),
            "HeUniform": (2.0, "fan_in", "uniform"), "HeNormal": (2.0, "fan_in", "truncated_normal"),
            "LecunUniform": (1.0, "fan_in", "uniform"), "LecunNormal": (1.0, "fan_in", "truncated_normal")}
