"""The TensorFlow backend on its own (server/backends/tf_backend.py), in this process, no server.

Runs on whatever device TensorFlow finds (the CPU in CI): placement is what the backend reports,
every op gives the same bits as the numpy backend (which reproduces the reference), duplicate rows
are added in input order on both code paths (native CPU kernels and the GPU's ordered rounds), the
optimizers stepped through a `Shard` agree with the numpy backend bit for bit, and a sparse step
neither copies a table nor holds more memory than the tables themselves.
"""
import gc
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from sparseps.server.backends.numpy_backend import NumpyBackend  # noqa: E402
from sparseps.server.backends.tf_backend import CPU_SERIAL_SCATTER, TensorFlowBackend  # noqa: E402
from sparseps.server.optimizers import supported  # noqa: E402
from sparseps.server.state import Shard  # noqa: E402

DTYPES = [np.float32, np.float64]
HAS_GPU = bool(tf.config.list_physical_devices("GPU"))


_BACKENDS = {}


def backend(mode="fused"):
    """One backend per flavour for the whole module (each keeps its traced tf.functions)."""
    if mode not in _BACKENDS:
        _BACKENDS[mode] = {
            "fused": lambda: TensorFlowBackend(),                    # the defaults
            "generic": lambda: TensorFlowBackend(fused=False),       # the optimizers' generic op sequence
            "host": lambda: TensorFlowBackend(host_dedupe=True),
            "native": lambda: TensorFlowBackend(host_dedupe=False, ordered_sums=False),   # TF's CPU kernels
            "ordered": lambda: TensorFlowBackend(host_dedupe=False, ordered_sums=True),   # the GPU's way
        }[mode]()
    return _BACKENDS[mode]


@pytest.fixture(scope="module")
def bk():
    return backend()


@pytest.fixture(scope="module", params=["host", "native", "ordered"])
def bk_sums(request):
    """Every way of summing duplicates: on the host (default), TF's own kernels (rows already on
    a CPU device), ordered rounds (rows already on a GPU)."""
    return backend(request.param)


def _wide(rng, shape, dtype):
    """Values over many orders of magnitude, so that any change of summation order shows."""
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 4, (shape[0],) + (1,) * (len(shape) - 1))).astype(dtype)


def _device_of(t):
    return tf.DeviceSpec.from_string(t.device)


def _on(t, device):
    want = tf.DeviceSpec.from_string(device)
    got = _device_of(t)
    return got.device_type == want.device_type and (got.device_index or 0) == (want.device_index or 0)


# ------------------------------------------------------------------------------ placement
def test_device_reported_and_used(bk):
    assert bk.name == "tensorflow"
    assert bk.device == ("/GPU:0" if HAS_GPU else "/CPU:0")
    assert bk.on_gpu == HAS_GPU
    var = bk.from_numpy(np.ones((10, 4), np.float32))
    assert isinstance(var, tf.Variable) and _on(var, bk.device)
    assert _on(bk.zeros((3, 2), np.float64), bk.device)
    assert _on(bk.zeros_like(var), bk.device) and _on(bk.copy(var), bk.device)
    assert _on(bk.gather(var, np.array([1, 2])), bk.device)
    assert _on(bk.to_device(np.ones(3, np.float32)), bk.device)
    c = bk.coefficients({"lr": np.float32(0.1), "b1": np.float32(0.9), "eps": np.float64(1e-7), "sync": True, "k": 3})
    assert all(_on(c[k], bk.device) for k in ("lr", "b1", "eps"))
    uniq, summed = bk.unique_sum(np.array([3, 1, 3]), np.ones((3, 4), np.float32))
    assert _on(summed, bk.device)


def test_explicit_device_and_unknown_device():
    cpu = TensorFlowBackend("cpu:0")
    assert cpu.device == "/CPU:0" and not cpu.on_gpu
    assert _on(cpu.from_numpy(np.zeros((2, 2), np.float32)), "/CPU:0")
    with pytest.raises(ValueError, match="GPU"):
        TensorFlowBackend("/GPU:7")


def test_backends_create_picks_tensorflow_by_name():
    from sparseps.server import backends
    b = backends.create("tensorflow")
    assert b.name == "tensorflow" and b.device == ("/GPU:0" if HAS_GPU else "/CPU:0")
    if HAS_GPU:
        assert backends.create("auto").name == "tensorflow"


# ------------------------------------------------------------------------------ storage
def test_coefficients_keep_dtype_and_pass_other_values(bk):
    c = {"a": np.float32(0.1), "b": np.float64(0.1), "flag": False, "n": 7, "f": 0.5}
    out = bk.coefficients(c)
    assert out["a"].dtype == tf.float32 and out["a"].numpy() == np.float32(0.1)
    assert out["b"].dtype == tf.float64 and out["b"].numpy() == np.float64(0.1)
    assert out["flag"] is False and out["n"] == 7 and out["f"] == 0.5
    again = bk.coefficients(c)  # constants are cached by value
    assert again["a"] is out["a"]
    nan = bk.coefficients({"r": np.float32(np.nan)})["r"]
    assert np.isnan(nan.numpy()) and nan.dtype == tf.float32


def test_storage_round_trip_and_no_aliasing(bk):
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    var = bk.from_numpy(a)
    bk.scatter_update(var, np.array([0]), np.full((1, 4), -1, np.float32))
    bk.assign(var, bk.to_device(a * 2))
    assert np.array_equal(a, np.arange(24, dtype=np.float32).reshape(6, 4)), "the variable aliases its source"
    pulled = bk.to_numpy(var)
    bk.scatter_add(var, np.array([1]), np.ones((1, 4), np.float32))
    assert np.array_equal(pulled, a * 2), "a pulled array changed with the variable"
    assert np.array_equal(bk.to_numpy(var, np.array([5, 1])), np.stack([a[5] * 2, a[1] * 2 + 1]))
    cp = bk.copy(var)
    bk.scatter_update(var, np.array([2]), np.zeros((1, 4), np.float32))
    assert np.array_equal(bk.to_numpy(cp)[2], a[2] * 2)
    assert bk.nbytes(var) == a.nbytes and bk.nbytes(bk.zeros((5, 3), np.float64)) == 120
    z = bk.zeros_like(bk.from_numpy(np.ones((3, 2, 2), np.float64)))
    assert z.dtype == tf.float64 and tuple(z.shape) == (3, 2, 2) and not bk.to_numpy(z).any()
    f64 = bk.from_numpy(np.ones((2, 2), np.float32), np.float64)
    assert f64.dtype == tf.float64


# ------------------------------------------------------------------------------ ops vs numpy
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_and_scatter_match_numpy(bk, dtype):
    rng = np.random.default_rng(1)
    table = _wide(rng, (500, 6), dtype)
    ids = rng.choice(500, 300, replace=False).astype(np.int64)
    vals = _wide(rng, (300, 6), dtype)
    nb = NumpyBackend()
    for op in ("scatter_update", "scatter_add", "scatter_sub"):
        a, t = table.copy(), bk.from_numpy(table)
        getattr(nb, op)(a, ids, vals)
        getattr(bk, op)(t, ids, vals)
        assert np.array_equal(a, bk.to_numpy(t)), op
        assert np.array_equal(nb.gather(a, ids[::-1]), bk.to_numpy(bk.gather(t, ids[::-1])))
    # math helpers
    x, y = _wide(rng, (50, 6), dtype), _wide(rng, (50, 6), dtype)
    assert np.array_equal(np.sqrt(np.abs(x)), bk.sqrt(np.abs(x)).numpy())
    assert np.array_equal(np.maximum(x, y), bk.maximum(x, y).numpy())
    assert np.array_equal(np.where(x > y, x, y), bk.where(x > y, x, y).numpy())
    c = dtype(0.5)
    assert np.array_equal(nb.clip_by_value(x, -c, c), np.asarray(bk.clip_by_value(x, -c, c)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 600, 5000])
def test_scatter_add_raw_adds_duplicates_in_input_order(bk_sums, dtype, n):
    """SGD's raw scatter-add: var + g1 + g2 + ... per row in input order, as np.add.at."""
    rng = np.random.default_rng(n)
    table = _wide(rng, (40, 8), dtype)
    for trial in range(3):
        ids = rng.integers(0, 40, n).astype(np.int64)
        vals = _wide(rng, (n, 8), dtype)
        expected = table.copy()
        np.add.at(expected, ids, vals)
        var = bk_sums.from_numpy(table)
        bk_sums.scatter_add_raw(var, ids, vals)
        assert np.array_equal(expected, bk_sums.to_numpy(var)), f"trial {trial}"
    assert n <= CPU_SERIAL_SCATTER or n > 1024  # both sides of the CPU kernel's parallel threshold


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 600, 5000])
def test_unique_sum_sums_in_input_order(bk_sums, dtype, n):
    rng = np.random.default_rng(n + 1)
    ids = rng.integers(0, 30 if n > 1 else 5, n).astype(np.int64)
    rows = _wide(rng, (n, 3, 2), dtype)   # rows of any rank
    want_ids, want = NumpyBackend().unique_sum(ids, rows)
    uniq, summed = bk_sums.unique_sum(ids, rows)
    uniq, summed = np.asarray(uniq), np.asarray(summed)
    order = np.argsort(uniq)
    assert np.array_equal(uniq[order], want_ids)
    assert summed.dtype == dtype and np.array_equal(summed[order], want)


def test_empty_push_rows(bk_sums):
    var = bk_sums.from_numpy(np.ones((4, 2), np.float32))
    bk_sums.scatter_add_raw(var, np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    uniq, summed = bk_sums.unique_sum(np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    assert np.asarray(uniq).size == 0 and np.asarray(summed).shape == (0, 2)
    assert np.array_equal(bk_sums.to_numpy(var), np.ones((4, 2), np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_clipping_matches_numpy(bk, dtype):
    from sparseps.server.state import Grad
    rng = np.random.default_rng(5)
    nb = NumpyBackend()
    vals = [_wide(rng, (17, 5), dtype), _wide(rng, (3, 5), dtype)]
    for v in vals:
        want = nb.clip_by_norm(v, dtype(0.5))
        got = np.asarray(bk.clip_by_norm(v, dtype(0.5)))
        np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps)
    grads = [Grad(None, None, v) for v in vals]
    for want, got in zip(nb.clip_by_global_norm(grads, 0.25), bk.clip_by_global_norm(grads, 0.25)):
        np.testing.assert_allclose(np.asarray(got.values), want.values, rtol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_sum_matches_numpy(bk, dtype):
    nb = NumpyBackend()
    if not hasattr(nb, "reduce_sum"):
        pytest.skip("the numpy backend has no reduce_sum")
    rng = np.random.default_rng(9)
    for shape in [(5,), (37, 3), (1000, 7)]:
        x = _wide(rng, shape, dtype)
        got = np.asarray(bk.reduce_sum(x))
        assert got.shape == () and got.dtype == dtype
        np.testing.assert_allclose(got, nb.reduce_sum(x), rtol=8 * np.finfo(dtype).eps)
        assert got == np.asarray(bk.reduce_sum(bk.from_numpy(x)))   # a variable sums the same
    parts = [dtype(1.5), dtype(-0.25), dtype(1e-3)]
    assert np.asarray(bk.reduce_sum(parts)) == nb.reduce_sum(parts)


# ------------------------------------------------------------------------------ whole steps
CONFIGS = [
    ("LazyAdam", {"learning_rate": 0.01}),
    ("LazyAdam", {"learning_rate": 0.01, "amsgrad": True, "decay": 0.01}),
    ("Adam", {"learning_rate": 0.01}),
    ("Adam", {"learning_rate": 0.01, "amsgrad": True}),
    ("SGD", {"learning_rate": 0.1}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    ("LazyAdam", {"learning_rate": 0.01, "clipvalue": 0.5}),
    ("RectifiedAdam", {"learning_rate": 0.01, "weight_decay": 0.01, "amsgrad": True}),
    ("Lookahead", {"optimizer": {"class_name": "LazyAdam", "config": {"learning_rate": 0.01}}, "sync_period": 2}),
    ("Lookahead", {"optimizer": {"class_name": "SGD", "config": {"momentum": 0.5}}, "sync_period": 3}),
    ("LazyAdam", {"learning_rate": 0.01, "clipnorm": 0.01}),
    ("Adam", {"learning_rate": 0.01, "global_clipnorm": 0.01}),
    ("LazyAdamOptimizer", {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
    ("Adam", {"learning_rate": 0.01, "weight_decay": 0.004, "amsgrad": True, "is_legacy_optimizer": False}),
    ("Adam", {"learning_rate": 0.01, "global_clipnorm": 0.01, "loss_scale_factor": None}),   # Keras 3
    ("Adagrad", {"learning_rate": 0.1}),
    ("Ftrl", {"learning_rate": 0.1, "l1_regularization_strength": 0.01, "l2_shrinkage_regularization_strength": 0.01,
              "beta": 0.1}),
    ("RMSprop", {"learning_rate": 0.01, "centered": True}),
    ("RMSprop", {"learning_rate": 0.01, "momentum": 0.9, "centered": True}),
    ("Adagrad", {"learning_rate": 0.1, "weight_decay": 0.004, "loss_scale_factor": None}),   # Keras 3
    ("RMSprop", {"learning_rate": 0.01, "momentum": 0.5, "loss_scale_factor": None}),        # Keras 3
]


def _run_shard(backend, class_name, config, dtype, seed):
    rng = np.random.default_rng(seed)
    shard = Shard(backend)
    shard.create_optimizer("opt", __import__("json").dumps({"class_name": class_name, "config": config}))
    shard.create_variable("emb", (50, 4), dtype, "opt", initial_value=_wide(rng, (50, 4), dtype) * 1e-3)
    shard.create_variable("dense", (3, 4), dtype, "opt", initial_value=rng.standard_normal((3, 4)).astype(dtype))
    for step in range(6):
        n = 1500 if step == 3 else 40      # one push over the CPU scatter's parallel threshold
        ids = rng.integers(0, 50 if step % 2 else 8, n).astype(np.int64)
        shard.push([("emb", ids, _wide(rng, (n, 4), dtype) * 1e-2),
                    ("dense", None, rng.standard_normal((3, 4)).astype(dtype))])
    out = {}
    for name, var in shard.variables.items():
        out[name] = backend.to_numpy(var.value)
        for slot, arr in var.slots.items():
            out[f"{name}/{slot}"] = backend.to_numpy(arr)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("class_name,config", CONFIGS, ids=[f"{c}{i}" for i, (c, _) in enumerate(CONFIGS)])
@pytest.mark.parametrize("mode", ["fused", "generic", "native", "ordered"])
def test_optimizer_steps_match_numpy_backend_bitwise(class_name, config, dtype, mode):
    if class_name not in supported() and class_name.split(">")[-1] not in supported():
        pytest.skip(f"{class_name} is not implemented")
    tb = backend(mode)
    want = _run_shard(NumpyBackend(), class_name, config, dtype, seed=11)
    got = _run_shard(tb, class_name, config, dtype, seed=11)
    assert sorted(got) == sorted(want)
    # A norm is a sum: the TF backend takes TF's own (Eigen) reduction, the numpy backend an
    # emulation of it that is not bit-exact for every size; clipped runs agree to a few ulp.
    clipped = "clipnorm" in config or "global_clipnorm" in config
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        if clipped:
            eps = np.finfo(dtype).eps   # relative to the slot's scale: m cancels to near zero
            np.testing.assert_allclose(got[key], want[key], rtol=64 * eps,
                                       atol=64 * eps * float(np.abs(want[key]).max()), err_msg=key)
            continue
        bad = ~((got[key] == want[key]) | (np.isnan(got[key]) & np.isnan(want[key])))
        assert not bad.any(), f"{key}: {int(bad.sum())} elements differ, e.g. {got[key][bad][:3]} vs {want[key][bad][:3]}"


def test_fused_lazy_adam_reports_unique_rows(bk):
    var = bk.from_numpy(np.zeros((10, 2), np.float32))
    m, v = bk.zeros_like(var), bk.zeros_like(var)
    c = bk.coefficients({k: np.float32(x) for k, x in
                         dict(lr=0.1, b1=0.9, b2=0.999, omb1=0.1, omb2=0.001, eps=1e-7).items()})
    for b in (bk, backend("native"), backend("ordered")):
        n = b.kernel("lazy_adam")(var, m, v, np.array([3, 1, 3, 3]), np.ones((4, 2), np.float32),
                                  c["lr"], c["b1"], c["b2"], c["omb1"], c["omb2"], c["eps"])
        assert int(n) == 2
    assert TensorFlowBackend(fused=False).kernel("lazy_adam") is None
    assert bk.kernel("no_such_kernel") is None


# ------------------------------------------------------------------------------ memory
def _rss():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _device_memory(bk):
    """(current, peak) bytes held on the backend's device, or None where TF cannot tell."""
    if bk.on_gpu:
        info = tf.config.experimental.get_memory_info(bk.device.lstrip("/"))
        return info["current"], info["peak"]
    return None


def _memory_probe(fused):
    """Run in a fresh process (the allocator keeps what earlier tests freed): MiB figures."""
    bk = TensorFlowBackend(fused=fused)
    rows, dim = 1_000_000, 16
    table_bytes = rows * dim * 4
    gc.collect()
    before = _device_memory(bk)[0] if bk.on_gpu else _rss()["VmRSS"]
    shard = Shard(bk)
    shard.create_optimizer("opt", '{"class_name": "LazyAdam", "config": {}}')
    init = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    shard.create_variable("emb", (rows, dim), np.float32, "opt", initial_value=init)
    del init
    rng = np.random.default_rng(1)
    pushes = [(rng.integers(0, rows, 4096).astype(np.int64), rng.standard_normal((4096, dim), dtype=np.float32))
              for _ in range(4)]
    shard.push([("emb",) + pushes[0]])   # creates m and v
    var = shard.variables["emb"]
    gc.collect()
    if bk.on_gpu:
        held = _device_memory(bk)[0]
        tf.config.experimental.reset_memory_stats(bk.device.lstrip("/"))
    else:
        held = _rss()["VmRSS"]
        _reset_peak()
    for ids, grads in pushes[1:]:
        shard.push([("emb", ids, grads)])
        values, _, _ = shard.pull("emb", ids=ids[:100])
        assert values.shape == (100, dim)
    peak = _device_memory(bk)[1] if bk.on_gpu else _rss()["VmHWM"]
    return {"where": "gpu" if bk.on_gpu else "rss", "table": table_bytes, "nbytes": bk.nbytes(var.value),
            "bytes_held": shard.bytes_held(var), "grown": held - before, "peak_over_held": peak - held}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "generic"])
def test_tables_live_on_the_device_and_sparse_steps_copy_nothing(fused):
    """A 1M x 16 float32 table and its two slots take 3 x 64 MB where the backend keeps them
    (process RSS on CPU, TF's allocator on a GPU); LazyAdam pushes of 4096 rows and pulls of rows
    add nothing close to a table on top: no full-table copy, not even a transient one (the peak
    is measured). Measured in a fresh process."""
    here = pathlib.Path(__file__).resolve().parent
    code = (f"import sys, json; sys.path.insert(0, {str(here)!r}); import test_tf_backend as t; "
            f"print('PROBE', json.dumps(t._memory_probe({fused})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    r = json.loads(line[0][6:])
    table = r["table"]
    assert r["nbytes"] == table and r["bytes_held"] == 3 * table
    assert r["grown"] >= 3 * table * 0.9, f"{r['where']}: memory grew by {r['grown'] >> 20} MiB for 3 x {table >> 20} MiB"
    assert r["grown"] <= 3 * table * 1.5, f"{r['where']}: memory grew by {r['grown'] >> 20} MiB for 3 x {table >> 20} MiB"
    assert r["peak_over_held"] < table // 2, \
        f"{r['where']}: sparse steps peaked {r['peak_over_held'] >> 20} MiB above the tables ({table >> 20} MiB each)"


def test_grow_and_move_rows(bk):
    """The dynamic tables' storage operations: a larger copy with zero rows after, and row moves."""
    host = np.arange(12, dtype=np.float32).reshape(4, 3)
    grown = bk.grow(bk.from_numpy(host), 6)
    want = np.concatenate([host, np.zeros((2, 3), np.float32)])
    np.testing.assert_array_equal(bk.to_numpy(grown), want)
    bk.move_rows(grown, np.array([0, 2], np.int64), np.array([5, 4], np.int64))
    want[[5, 4]] = want[[0, 2]]
    np.testing.assert_array_equal(bk.to_numpy(grown), want)
    with pytest.raises(ValueError):
        bk.grow(grown, 2)
