"""The CUDA backend (server/backends/cuda_backend.py) and its fused kernels (cuda_kernels.py).

In CI there is no GPU: conftest.py sets NUMBA_ENABLE_CUDASIM=1 before numba is imported, and
numba's CUDA simulator executes every kernel for real (as Python on numpy scalars of the table
dtype). On a machine with a GPU, run with NUMBA_ENABLE_CUDASIM=0 (bench/gpu_check.sh) and the
same tests check the compiled kernels. The golden trajectories are replayed through a live cuda
shard in test_conformance.py; here the backend's every operation and every optimizer's whole
steps (duplicates, -0.0, dense and sparse parts, rank-3 tables) must give the numpy backend's
bits, and the device memory budget refuses what does not fit.
"""
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

import sparseps  # noqa: E402
from sparseps.errors import ResourceExhausted  # noqa: E402
from sparseps.local import LocalServer  # noqa: E402
from sparseps.server import backends  # noqa: E402
from sparseps.server.backends import cuda_kernels  # noqa: E402
from sparseps.server.backends.cuda_backend import CudaBackend  # noqa: E402
from sparseps.server.backends.numpy_backend import NumpyBackend  # noqa: E402
from sparseps.server.state import Shard  # noqa: E402

DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def bk():
    return CudaBackend()


def _wide(rng, shape, dtype):
    """Values over many binades, with exact zeros and negative zeros: every rounding matters."""
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 3, size=shape))).astype(dtype)
    x.flat[::7] = 0.0
    x.flat[3::11] = -0.0
    return x


def _same(got, want, what=""):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bad = ~((got == want) | (np.isnan(got) & np.isnan(want)))
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ, e.g. {got[bad][:3]} vs {want[bad][:3]}"
    # +0.0 and -0.0 compare equal: their signs must match too. A NaN's sign is not compared: a GPU
    # returns its canonical NaN where the CPU propagates an operand's (the reference's NaNs are
    # NaNs, as tests/golden.py compares them)
    num = ~np.isnan(want)
    assert np.array_equal(np.signbit(got[num]), np.signbit(want[num])), f"{what}: signs of zeros differ"


def test_device_reported_and_chosen_by_name(bk):
    assert bk.name == "cuda" and bk.device == "cuda:0"
    assert backends.create("cuda").name == "cuda"
    if cuda_kernels.SIMULATOR:   # the simulator is no CUDA machine: auto keeps the CPU choice
        assert backends.create("auto").name != "cuda"
    with pytest.raises(ValueError, match="cuda:N"):
        CudaBackend("tpu:x")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_storage_round_trip_grow_and_move_rows(bk, dtype):
    rng = np.random.default_rng(1)
    host = _wide(rng, (7, 2, 3), dtype)
    arr = bk.from_numpy(host)
    host[0] = 99   # no aliasing with the host array
    got = bk.to_numpy(arr)
    assert got.dtype == dtype and got.shape == (7, 2, 3) and got[0, 0, 0] != 99
    _same(bk.to_numpy(bk.copy(arr)), got)
    _same(bk.to_numpy(arr, np.array([6, 0, 6])), got[[6, 0, 6]])
    _same(bk.to_numpy(bk.zeros_like(arr)), np.zeros_like(got))
    for b in (bk, NumpyBackend()):
        a = b.from_numpy(got)
        grown = b.grow(a, 10)
        want = np.concatenate([got, np.zeros((3, 2, 3), dtype)])
        _same(b.to_numpy(grown), want, f"{b.name} grow")
        b.move_rows(grown, np.array([0, 4], np.int64), np.array([9, 7], np.int64))
        want[[9, 7]] = want[[0, 4]]
        _same(b.to_numpy(grown), want, f"{b.name} move_rows")
        with pytest.raises(ValueError):
            b.grow(a, 3)
        shrunk = b.grow(grown, 8, used=5)   # a table shrinking after evictions keeps its live rows
        _same(b.to_numpy(shrunk), np.concatenate([want[:5], np.zeros((3, 2, 3), dtype)]), f"{b.name} shrink")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_gather_scatter_and_sums_match_numpy(bk, dtype):
    rng = np.random.default_rng(2)
    nb = NumpyBackend()
    table = _wide(rng, (20, 5), dtype)
    uniq = rng.permutation(20)[:9].astype(np.int64)
    raw = rng.integers(0, 20, 60).astype(np.int64)
    vals, raw_vals = _wide(rng, (9, 5), dtype), _wide(rng, (60, 5), dtype)
    for op, ids, v in (("scatter_update", uniq, vals), ("scatter_add", uniq, vals), ("scatter_sub", uniq, vals),
                       ("scatter_add_raw", raw, raw_vals)):
        a, b = bk.from_numpy(table), nb.from_numpy(table)
        getattr(bk, op)(a, ids, v)
        getattr(nb, op)(b, ids, v)
        _same(bk.to_numpy(a), b, op)
    _same(bk.gather(bk.from_numpy(table), raw), nb.gather(table, raw), "gather")
    u1, s1 = bk.unique_sum(raw, raw_vals)
    u2, s2 = nb.unique_sum(raw, raw_vals)
    order = np.argsort(u1)
    assert np.array_equal(u1[order], u2)
    _same(s1[order], s2, "unique_sum")
    a = bk.from_numpy(table)
    bk.assign(a, table * dtype(2))
    _same(bk.read(a), table * dtype(2), "assign/read")


def test_every_fused_kernel_is_offered(bk):
    for name in ("lazy_adam", "adam_sparse", "adam_dense", "radam_sparse", "radam_dense", "momentum_sparse",
                 "sgd_dense", "lookahead_sync", "replica_sum"):
        assert callable(bk.kernel(name)), name
    assert bk.kernel("no_such_kernel") is None


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_fused_lazy_adam_matches_the_formula(bk, dtype):
    """The kernel against numpy evaluating tfa's formula on summed rows (np.add.at order)."""
    rng = np.random.default_rng(3)
    T = np.dtype(dtype).type
    var0, m0, v0 = _wide(rng, (30, 4), dtype), _wide(rng, (30, 4), dtype), np.abs(_wide(rng, (30, 4), dtype))
    ids = np.array([5, 2, 5, 5, 29, 2, 7, 0], np.int64)
    g = _wide(rng, (8, 4), dtype)
    g[6] = -0.0   # a lone -0.0 row: 0 + g makes it +0.0, as in the reference
    lr, b1, b2, eps = T(0.01), T(0.9), T(0.999), T(1e-7)
    var, m, v = bk.from_numpy(var0), bk.from_numpy(m0), bk.from_numpy(v0)
    assert bk.kernel("lazy_adam")(var, m, v, ids, g, lr, b1, b2, T(1) - b1, T(1) - b2, eps) == 5
    uniq, inv = np.unique(ids, return_inverse=True)
    s = np.zeros((len(uniq), 4), dtype)
    np.add.at(s, inv, g)
    wm, wv, wvar = m0.copy(), v0.copy(), var0.copy()
    wm[uniq] = b1 * m0[uniq] + (T(1) - b1) * s
    wv[uniq] = b2 * v0[uniq] + (T(1) - b2) * (s * s)
    wvar[uniq] = var0[uniq] - (lr * wm[uniq]) / (np.sqrt(wv[uniq]) + eps)
    for got, want, what in ((m, wm, "m"), (v, wv, "v"), (var, wvar, "var")):
        _same(bk.to_numpy(got), want, what)


CONFIGS = [
    ("LazyAdam", {"learning_rate": 0.01}),
    ("LazyAdam", {"learning_rate": 0.01, "amsgrad": True, "decay": 0.01}),
    ("Adam", {"learning_rate": 0.01}),
    ("Adam", {"learning_rate": 0.01, "amsgrad": True}),
    ("SGD", {"learning_rate": 0.1}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    ("RectifiedAdam", {"learning_rate": 0.01}),
    ("RectifiedAdam", {"learning_rate": 0.01, "weight_decay": 0.01, "amsgrad": True, "sma_threshold": 3.0}),
    ("RectifiedAdam", {"learning_rate": 0.01, "total_steps": 10, "warmup_proportion": 0.2}),
    ("Lookahead", {"optimizer": {"class_name": "LazyAdam", "config": {"learning_rate": 0.01}}, "sync_period": 2}),
    ("Lookahead", {"optimizer": {"class_name": "SGD", "config": {"momentum": 0.5}}, "sync_period": 3}),
    ("Lookahead", {"optimizer": {"class_name": "RectifiedAdam", "config": {}}, "sync_period": 2}),
    ("LazyAdamOptimizer", {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
    # no fused CUDA kernel: the generic (host) path
    ("Adam", {"learning_rate": 0.01, "weight_decay": 0.004, "amsgrad": True, "is_legacy_optimizer": False}),
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9, "loss_scale_factor": None}),
]


def _run_shard(backend, class_name, config, dtype, seed):
    rng = np.random.default_rng(seed)
    shard = Shard(backend)
    shard.create_optimizer("opt", json.dumps({"class_name": class_name, "config": config}))
    shard.create_variable("emb", (40, 3), dtype, "opt", initial_value=_wide(rng, (40, 3), dtype) * 1e-3)
    shard.create_variable("cube", (12, 2, 2), dtype, "opt", initial_value=_wide(rng, (12, 2, 2), dtype))
    shard.create_variable("dense", (3, 4), dtype, "opt", initial_value=rng.standard_normal((3, 4)).astype(dtype))
    for step in range(7):
        n = 200 if step == 3 else 25
        ids = rng.integers(0, 40 if step % 2 else 6, n).astype(np.int64)
        cube_ids = rng.integers(0, 12, 9).astype(np.int64)
        shard.push([("emb", ids, _wide(rng, (n, 3), dtype) * 1e-2),
                    ("cube", cube_ids, _wide(rng, (9, 2, 2), dtype)),
                    ("dense", None, rng.standard_normal((3, 4)).astype(dtype))])
    out = {}
    for name, var in shard.variables.items():
        out[name] = backend.to_numpy(var.value)
        for slot, arr in var.slots.items():
            out[f"{name}/{slot}"] = backend.to_numpy(arr)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("class_name,config", CONFIGS, ids=[f"{c}{i}" for i, (c, _) in enumerate(CONFIGS)])
def test_optimizer_steps_match_numpy_backend_bitwise(bk, class_name, config, dtype):
    want = _run_shard(NumpyBackend(), class_name, config, dtype, seed=11)
    got = _run_shard(bk, class_name, config, dtype, seed=11)
    assert sorted(got) == sorted(want)
    for key in want:
        _same(got[key], want[key], key)


# ------------------------------------------------------------------------------ device memory
def test_budget_refuses_a_variable_whose_value_and_slots_do_not_fit():
    b = CudaBackend(memory_budget_bytes=64 << 10)
    shard = Shard(b)
    shard.create_optimizer("opt", json.dumps({"class_name": "LazyAdam", "config": {}}))
    before = b.in_use
    # 1000 x 8 float32 = 32 KB of value, 96 KB with m and v, 100 KB with the backend's row map
    # (4 bytes per row): over the 64 KB budget
    with pytest.raises(ResourceExhausted) as e:
        shard.create_variable("big", (1000, 8), np.float32, "opt")
    msg = str(e.value)
    assert "cuda:0" in msg and "100000 bytes" in msg and "budget of 65536 bytes" in msg, msg
    assert "big" not in shard.variables and b.in_use == before   # nothing was allocated
    shard.create_variable("small", (100, 8), np.float32, "opt")   # 9.6 KB with slots: fits
    shard.push([("small", np.array([1, 2, 1]), np.ones((3, 8), np.float32))])
    held = b.in_use
    assert held >= 3 * 3200 and b.device_memory() == {"device": "cuda:0", "in_use": held + b.transfer_bytes,
                                                      "budget": 64 << 10}
    del shard, e   # (the exception's traceback holds the shard too)
    gc.collect()
    assert b.in_use < held   # freed arrays leave the count


def test_allocations_past_the_budget_are_refused_not_crashed():
    b = CudaBackend(memory_budget_bytes=4096)
    with pytest.raises(ResourceExhausted, match="cuda:0"):
        b.zeros((100, 100), np.float64)
    assert b.in_use == 0


def test_live_cuda_shard_refuses_with_resource_exhausted_and_reports_memory(unique):
    from test_metrics import free_port, scrape
    port = free_port()
    srv = LocalServer("--backend", "cuda", "--device-memory-budget-mb", "1", "--metrics-port", str(port))
    try:
        c = sparseps.connect(srv.address)
        assert c.server_info[0].backend == "cuda"
        c.create_optimizer(f"{unique}_o", {"class_name": "LazyAdam", "config": {}})
        with pytest.raises(sparseps.ResourceExhausted, match=r"cuda:0.*bytes"):
            c.create_variable(f"{unique}_big", shape=(100_000, 4), dtype="float32", optimizer=f"{unique}_o")
        c.create_variable(f"{unique}_ok", shape=(1000, 4), dtype="float32", optimizer=f"{unique}_o")
        c.push({f"{unique}_ok": (np.array([3, 3, 9]), np.ones((3, 4), np.float32))})
        samples = scrape(port)
        used = [v for (n, ls), v in samples.items() if n == "sparseps_device_memory_bytes"]
        cap = [v for (n, ls), v in samples.items() if n == "sparseps_device_memory_budget_bytes"]
        assert used and used[0] >= 3 * 16000 and cap == [float(1 << 20)], (used, cap)
        c.close()
    finally:
        srv.stop()


def test_kernels_compile_for_a_gpu_without_fma():
    """Every kernel compiled to sm_90 PTX by libNVVM (from the nvidia-cuda-nvcc-cu12 wheel of the
    dev extra; no GPU needed) has no FMA: NVVM would contract `a * b + c` by default, which rounds
    once where the reference rounds twice."""
    nvcc = pytest.importorskip("nvidia.cuda_nvcc", reason="the dev extra's nvidia-cuda-nvcc-cu12 brings libNVVM")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_HOME=list(nvcc.__path__)[0], NUMBA_ENABLE_CUDASIM="0")
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "cuda_ptx_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fma instructions in all kernels: 0" in out.stdout
    assert out.stdout.count("lazy_adam") == 2 and "mul.rn" in out.stdout
