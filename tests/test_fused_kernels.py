"""Bit-exactness tests of the fused numba kernels (server/backends/fused.py).

Each kernel is compared with a straightforward numpy evaluation of the same formula (np.add.at for
the duplicate sum, scalars of the array dtype) with ``np.array_equal``; the LazyAdam / SGD kernels
are also replayed against the TF-Addons / Keras golden trajectories in tests/golden.
"""
import importlib
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
_MODNAME = "sparseps.server.backends.fused"


def _load_fused():
    try:
        return importlib.import_module(_MODNAME)
    except ImportError:
        pass
    # Not installed yet: load the file directly, registered under its canonical name. numba's
    # on-disk cache records the module name of the code it compiled, so every process must load
    # fused.py under the same name for cached kernels to be reusable.
    spec = importlib.util.spec_from_file_location(_MODNAME, ROOT / "server" / "backends" / "fused.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_MODNAME] = mod
    spec.loader.exec_module(mod)
    return mod


fused = _load_fused()

DTYPES = [np.float32, np.float64]
ROWS = 1000


@pytest.fixture(params=["serial", "parallel"])
def mode(request, monkeypatch):
    """Force the serial or the parallel flavour of the kernels."""
    monkeypatch.setattr(fused, "PARALLEL_MIN_ROWS", 10**9 if request.param == "serial" else 1)
    return request.param


def _ids(kind, rng):
    if kind == "uniform":
        return rng.integers(0, ROWS, size=700).astype(np.int64)
    if kind == "dup":  # heavily duplicated: 700 ids over 5 rows
        return rng.choice(np.array([3, 999, 0, 17, 512]), size=700).astype(np.int64)
    if kind == "small":
        return np.array([5, 2, 5, 5, 900, 2, 7], np.int64)
    if kind == "empty":
        return np.zeros(0, np.int64)
    raise AssertionError(kind)


ID_KINDS = ["uniform", "dup", "small", "empty"]


def _grads(n, dim, dtype, rng):
    # wide dynamic range so that every rounding matters; some exact zeros and negative zeros
    g = rng.standard_normal((n, dim)) * np.exp(rng.uniform(-8, 3, size=(n, dim)))
    g = g.astype(dtype)
    if n:
        g.flat[:: 7] = 0.0
        g.flat[3:: 11] = -0.0
    return g


def _table(dim, dtype, rng, positive=False):
    t = rng.standard_normal((ROWS, dim)).astype(dtype)
    return np.abs(t) if positive else t


# ------------------------------------------------------------------------------ numpy references
def ref_unique_sum(ids, grads):
    uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # first-occurrence order
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    summed = np.zeros((uniq.size, grads.shape[1]), grads.dtype)
    np.add.at(summed, rank[inv.ravel()], grads)
    return uniq[order].astype(np.int64), summed


def ref_lazy_adam(var, m, v, ids, grads, lr, beta1, beta2, omb1, omb2, eps):
    dt = var.dtype.type
    lr, beta1, beta2, omb1, omb2, eps = map(dt, (lr, beta1, beta2, omb1, omb2, eps))
    uniq, g = ref_unique_sum(ids, grads)
    m_t = beta1 * m[uniq] + omb1 * g
    v_t = beta2 * v[uniq] + omb2 * (g * g)
    m[uniq] = m_t
    v[uniq] = v_t
    var[uniq] = var[uniq] - (lr * m_t) / (np.sqrt(v_t) + eps)


def ref_sgd(var, ids, grads, neg_lr):
    np.add.at(var, ids, grads * var.dtype.type(neg_lr))


def ref_momentum(var, accum, uniq, summed, lr, momentum, nesterov):
    dt = var.dtype.type
    lr, momentum = dt(lr), dt(momentum)
    a = accum[uniq] * momentum - summed * lr
    accum[uniq] = a
    var[uniq] = var[uniq] + ((a * momentum - summed * lr) if nesterov else a)


def _eq(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    # array_equal plus sign-of-zero / NaN payload: compare the bits
    assert np.array_equal(a, b)
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


ADAM = dict(lr=0.0123456789, beta1=0.9, beta2=0.999, omb1=0.1, omb2=0.001, eps=1e-7)


def _adam_scalars(dtype):
    dt = np.dtype(dtype).type
    b1, b2 = dt(ADAM["beta1"]), dt(ADAM["beta2"])
    return dict(lr=dt(ADAM["lr"]), beta1=b1, beta2=b2, one_minus_beta1=dt(1) - b1,
                one_minus_beta2=dt(1) - b2, epsilon=dt(ADAM["eps"]))


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ID_KINDS)
@pytest.mark.parametrize("dim", [64, 7])
def test_unique_sum(dtype, kind, dim):
    rng = np.random.default_rng(1)
    ids = _ids(kind, rng)
    g = _grads(ids.size, dim, dtype, rng)
    u, s = fused.unique_sum(ids, g)
    ru, rs = ref_unique_sum(ids, g)
    assert u.dtype == np.int64
    _eq(u, ru)
    _eq(s, rs)


def test_unique_sum_first_occurrence_order():
    ids = np.array([7, 3, 7, 1, 3, 9], np.int64)
    g = np.arange(12, dtype=np.float32).reshape(6, 2)
    u, s = fused.unique_sum(ids, g)
    assert u.tolist() == [7, 3, 1, 9]
    assert s.tolist() == [[4, 6], [10, 12], [6, 7], [10, 11]]


def test_unique_sum_negative_zero():
    # 0 + (-0) == +0: a lone -0.0 gradient must come out as +0.0, like np.add.at from zeros
    u, s = fused.unique_sum(np.array([4], np.int64), np.array([[-0.0, 1.0]], np.float32))
    assert not np.signbit(s[0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ID_KINDS)
@pytest.mark.parametrize("dim", [64, 7])
def test_lazy_adam(dtype, kind, dim, mode):
    rng = np.random.default_rng(2)
    var = _table(dim, dtype, rng)
    m = _table(dim, dtype, rng) * dtype(0.01)
    v = _table(dim, dtype, rng, positive=True) * dtype(0.001)
    m.flat[::13] = -0.0
    var.flat[::17] = -0.0
    rvar, rm, rv = var.copy(), m.copy(), v.copy()
    sc = _adam_scalars(dtype)
    for step in range(4):
        ids = _ids(kind, rng)
        g = _grads(ids.size, dim, dtype, rng)
        k = fused.lazy_adam(var, m, v, ids, g, **sc)
        ref_lazy_adam(rvar, rm, rv, ids, g, *sc.values())
        assert k == np.unique(ids).size
        _eq(var, rvar)
        _eq(m, rm)
        _eq(v, rv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lazy_adam_untouched_rows(dtype, mode):
    rng = np.random.default_rng(3)
    var = _table(64, dtype, rng)
    m = _table(64, dtype, rng)
    v = _table(64, dtype, rng, positive=True)
    before = [a.copy() for a in (var, m, v)]
    ids = rng.choice(np.arange(0, ROWS, 3), size=500).astype(np.int64)  # multiples of 3 only
    fused.lazy_adam(var, m, v, ids, _grads(ids.size, 64, dtype, rng), **_adam_scalars(dtype))
    untouched = np.setdiff1d(np.arange(ROWS), ids)
    touched = np.unique(ids)
    for a, b in zip((var, m, v), before):
        _eq(a[untouched], b[untouched])
        assert not np.array_equal(a[touched], b[touched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ID_KINDS)
def test_sgd_sparse_add(dtype, kind):
    rng = np.random.default_rng(4)
    var = _table(64, dtype, rng)
    var.flat[::19] = -0.0
    rvar = var.copy()
    neg_lr = -dtype(0.0731)
    for _ in range(3):
        ids = _ids(kind, rng)
        g = _grads(ids.size, 64, dtype, rng)
        fused.sgd_sparse_add(var, ids, g, neg_lr)
        ref_sgd(rvar, ids, g, neg_lr)
        _eq(var, rvar)
    # (-g) * lr == g * (-lr) bit for bit: the Keras form
    _eq(np.negative(g) * dtype(0.0731), g * neg_lr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ID_KINDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_keras_momentum_sparse(dtype, kind, nesterov, mode):
    rng = np.random.default_rng(5)
    var = _table(64, dtype, rng)
    accum = _table(64, dtype, rng) * dtype(0.1)
    rvar, racc = var.copy(), accum.copy()
    for _ in range(3):
        ids = _ids(kind, rng)
        u, s = fused.unique_sum(ids, _grads(ids.size, 64, dtype, rng))
        fused.keras_momentum_sparse(var, accum, u, s, dtype(0.05), dtype(0.9), nesterov)
        ref_momentum(rvar, racc, u, s, 0.05, 0.9, nesterov)
        _eq(var, rvar)
        _eq(accum, racc)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ID_KINDS)
def test_gather_rows(dtype, kind, mode):
    rng = np.random.default_rng(6)
    table = _table(64, dtype, rng)
    ids = _ids(kind, rng)
    _eq(fused.gather_rows(table, ids), np.take(table, ids, axis=0))


def test_out_of_range_ids_raise_before_any_write(mode):
    rng = np.random.default_rng(7)
    var = _table(8, np.float32, rng)
    m, v = np.zeros_like(var), np.ones_like(var)
    before = var.copy()
    for bad in (ROWS, -1):
        ids = np.array([1, 2, bad, 3] * 100, np.int64)
        g = np.ones((ids.size, 8), np.float32)
        with pytest.raises(IndexError):
            fused.lazy_adam(var, m, v, ids, g, **_adam_scalars(np.float32))
        with pytest.raises(IndexError):
            fused.sgd_sparse_add(var, ids, g, -1.0)
        with pytest.raises(IndexError):
            fused.gather_rows(var, ids)
        with pytest.raises(IndexError):
            fused.keras_momentum_sparse(var, m, np.array([1, bad]), g[:2], 0.1, 0.9, False)
        _eq(var, before)
    with pytest.raises(IndexError):
        fused.unique_sum(np.array([1, -5]), np.ones((2, 8), np.float32))


def test_dtype_mismatch_rejected():
    var = np.zeros((10, 4), np.float32)
    with pytest.raises(TypeError):
        fused.lazy_adam(var, var.copy(), var.copy(), np.array([1]), np.ones((1, 4)),
                        **_adam_scalars(np.float32))


def test_readonly_inputs():
    # gRPC payloads arrive as read-only np.frombuffer views
    var = np.zeros((10, 4), np.float32)
    ids = np.frombuffer(np.array([1, 2, 1], np.int64).tobytes(), np.int64)
    g = np.frombuffer(np.ones((3, 4), np.float32).tobytes(), np.float32).reshape(3, 4)
    fused.sgd_sparse_add(var, ids, g, -1.0)
    assert var[1].tolist() == [-2.0] * 4 and var[2].tolist() == [-1.0] * 4


# ----------------------------------------------------------- golden trajectories (TF reference)
def _golden(case):
    path = GOLDEN / f"{case}.npz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    return z, meta


def _emb_steps(z, meta):
    for k in range(meta["steps"]):
        if f"step{k}/emb/ids" in z.files:
            yield k, z[f"step{k}/emb/ids"], z[f"step{k}/emb/rows"]
        else:
            yield k, None, None


@pytest.mark.parametrize("case", ["lazyadam_f32", "lazyadam_f64"])
def test_golden_lazyadam(case):
    """Replay TF-Addons LazyAdam (the `emb` table) with the kernel.

    The bias-corrected ``lr`` is a scalar the caller computes; TF computes ``beta ** t`` with
    Eigen's ``generic_pow``, which is not correctly rounded and differs from libm's ``powf``/``pow``
    (numpy) by 1 ulp at some steps (f32 steps 3, 8, 19; f64 steps 22, 27 here), which moves ``var``
    by 1 ulp. The powers are therefore taken from ``tf.math.pow``; everything else is numpy.
    """
    tf = pytest.importorskip("tensorflow")
    z, meta = _golden(case)
    cfg = meta["reference_get_config"]
    dt = np.dtype(meta["dtype"]).type
    var = z["init/emb"].copy()
    m, v = np.zeros_like(var), np.zeros_like(var)
    lr_t, b1, b2, eps = dt(cfg["learning_rate"]), dt(cfg["beta_1"]), dt(cfg["beta_2"]), dt(cfg["epsilon"])
    for k, ids, rows in _emb_steps(z, meta):
        if ids is not None:
            t = dt(k + 1)  # local_step = iterations + 1
            b1p = dt(tf.math.pow(tf.constant(b1), tf.constant(t)).numpy())
            b2p = dt(tf.math.pow(tf.constant(b2), tf.constant(t)).numpy())
            lr = lr_t * np.sqrt(dt(1) - b2p) / (dt(1) - b1p)
            fused.lazy_adam(var, m, v, ids, rows, lr, b1, b2, dt(1) - b1, dt(1) - b2, eps)
        _eq(var, z[f"step{k}/emb/value"])
        _eq(m, z[f"step{k}/emb/slot/m"])
        _eq(v, z[f"step{k}/emb/slot/v"])


@pytest.mark.parametrize("case", ["sgd_f32", "sgd_f64"])
def test_golden_sgd(case):
    z, meta = _golden(case)
    dt = np.dtype(meta["dtype"]).type
    lr = dt(meta["reference_get_config"]["learning_rate"])
    var = z["init/emb"].copy()
    for k, ids, rows in _emb_steps(z, meta):
        if ids is not None:
            fused.sgd_sparse_add(var, ids, rows, -lr)
        _eq(var, z[f"step{k}/emb/value"])


@pytest.mark.parametrize("case", ["sgd_momentum_f32", "sgd_momentum_f64",
                                  "sgd_nesterov_f32", "sgd_nesterov_f64"])
def test_golden_momentum(case):
    z, meta = _golden(case)
    cfg = meta["reference_get_config"]
    dt = np.dtype(meta["dtype"]).type
    var = z["init/emb"].copy()
    accum = np.zeros_like(var)
    for k, ids, rows in _emb_steps(z, meta):
        if ids is not None:
            u, s = fused.unique_sum(ids, rows)
            fused.keras_momentum_sparse(var, accum, u, s, dt(cfg["learning_rate"]),
                                        dt(cfg["momentum"]), cfg["nesterov"])
        _eq(var, z[f"step{k}/emb/value"])
        _eq(accum, z[f"step{k}/emb/slot/momentum"])


# --------------------------------------------------------------------------------------------
# sync mode's aggregate: the numba kernel against sync.py's numpy evaluation, through real shards
# --------------------------------------------------------------------------------------------
def _aggregate(backend_name, dtype, row, parts, average):
    """SyncManager.aggregate of one step's replica parts on a fresh shard of the given backend."""
    import types
    from sparseps.proto import sparseps_pb2 as pb
    from sparseps.server import backends
    from sparseps.server.state import Shard
    from sparseps.server.sync import SyncManager, _Prepared
    from sparseps.tensors import to_tensor
    shard = Shard(backends.create(backend_name), 0, 1)
    opt = shard.create_optimizer("o", json.dumps({"class_name": "SGD", "config": {"learning_rate": 1.0}}),
                                 {"mode": "sync", "replicas_to_aggregate": len(parts),
                                  "total_num_replicas": len(parts), "average": average})
    shard.create_variable("e", [50, *row], np.dtype(dtype).name, "o")
    entries = [_Prepared(0, pb.PushRequest(gradients=[pb.Gradient(variable="e", ids=to_tensor(i),
                                                                  values=to_tensor(v))]))
               for i, v in parts]
    agg = SyncManager.aggregate(types.SimpleNamespace(shard=shard), opt, 0, entries)
    (g,) = agg.gradients
    from sparseps.tensors import from_tensor
    return from_tensor(g.ids), from_tensor(g.values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("row", [(64,), (7,), (3, 2)])
@pytest.mark.parametrize("replicas", [1, 2, 5])
def test_replica_sum_matches_sync_numpy_aggregate(dtype, average, row, replicas):
    """The numba kernel and sync.py's numpy evaluation agree bit for bit."""
    rng = np.random.default_rng(replicas * 100 + len(row) * 10 + int(average))
    parts = []
    for r in range(replicas):
        n = 0 if (r == 1 and replicas == 5) else int(rng.integers(1, 60))   # one replica with no rows
        ids = rng.integers(0, 50, n)                                          # duplicates within and across
        vals = rng.standard_normal((n, *row)).astype(dtype) * dtype(10) ** rng.integers(-6, 6, (n, *row))
        vals[rng.random((n, *row)) < 0.05] = dtype(-0.0)
        parts.append((ids, vals))
    want_ids, want = _aggregate("numpy", dtype, row, parts, average)
    got_ids, got = _aggregate("numba", dtype, row, parts, average)
    assert np.array_equal(got_ids, want_ids)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))   # bit for bit, -0.0 included


def test_replica_sum_order_and_divisor():
    """Per id: the replicas' rows summed in replica order (((r0 + r1) + r2), as TF's accumulator
    adds each replica to its running sum), divided by how many replicas have the id."""
    big = np.float32(1e8)
    parts = [(np.array([5]), np.array([[1.0]], np.float32)), (np.array([5]), np.array([[big]], np.float32)),
             (np.array([5]), np.array([[-big]], np.float32))]
    uniq, acc = fused.replica_sum(parts, average=False)
    assert acc[0, 0] == np.float32(np.float32(1.0 + big) - big) == 0.0   # not 1 + (1e8 - 1e8) = 1
    assert _aggregate("numpy", np.float32, (1,), parts, False)[1][0, 0] == 0.0
    a = (np.array([3, 1, 3]), np.array([[1.0], [2.0], [4.0]], np.float32))
    b = (np.array([3, 7]), np.array([[8.0], [16.0]], np.float32))
    uniq, acc = fused.replica_sum([a, b], average=True)
    assert uniq.tolist() == [1, 3, 7]
    assert acc[:, 0].tolist() == [2.0, (1.0 + 4.0 + 8.0) / 2, 16.0]
    uniq, acc = fused.replica_sum([a, b], average=False)
    assert acc[:, 0].tolist() == [2.0, 13.0, 16.0]
