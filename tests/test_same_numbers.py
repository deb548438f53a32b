"""The same numbers on every machine: each backend's transcendentals against the reference's own
function values (tests/golden/functions/tf215.npz, recorded with TF 2.15 by
tools/golden/functions.py), bit for bit.

The reference's values do not depend on the CPU (TF's pip wheel is built for AVX without FMA,
glibc's float functions pick their FMA build on every CPU with AVX2), so a backend that matches
them here on one machine matches them on all; scripts/test.sh runs this file again with numpy's
and numba's SIMD dispatch restricted to make any dependence on it fail on any machine.
"""
import hashlib

import numpy as np
import pytest

from function_inputs import BETAS, EXPONENTS, SCHEDULE_STEPS, SCHEDULES, pow_inputs
from golden import GOLDEN
from sparseps.server import backends, eigen_pow
from sparseps.server.optimizers import scalar_math, schedules

TABLE = np.load(GOLDEN / "functions" / "tf215.npz")
DTYPES = (np.float32, np.float64)


def _same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    ints = np.int32 if got.dtype == np.float32 else np.int64
    return got.view(ints) == want.view(ints)


@pytest.fixture(scope="module", params=["numpy", "numba", "tensorflow", "cuda"])
def backend(request):
    """Each backend as a shard creates it (cuda under numba's CUDA simulator where there is no GPU)."""
    return backends.create(request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_packet_path_is_tf_pow_bit_for_bit(backend, dtype):
    """tf.pow over one ~1 M element tensor (Eigen's packet path on every element), per exponent:
    the SHA-256 of all results, with the first 4096 values to show where a mismatch starts."""
    name = np.dtype(dtype).name
    x = pow_inputs(dtype)
    assert x.size > 1_000_000 and x.size % 8 == 0
    for y in EXPONENTS:
        got = np.asarray(backend.pow(x, dtype(y), None))
        head = TABLE[f"packet/{name}/{y}/head"]
        bad = np.nonzero(~_same_bits(got[:head.size], head))[0]
        assert bad.size == 0, (f"{backend.name} {name} x ** {y}: first mismatch at x={x[bad[0]]!r}: "
                               f"got {got[bad[0]]!r}, TF 2.15 {head[bad[0]]!r}")
        digest = hashlib.sha256(got.tobytes()).digest()
        assert digest == TABLE[f"packet/{name}/{y}/sha256"].tobytes(), (
            f"{backend.name} {name} x ** {y}: the first {head.size} values agree, a later one does not")


def test_scalar_path_is_glibc_powf_bit_for_bit(backend):
    """tf.pow on 0-d tensors (the elements after a row's last full packet): glibc's powf, restated."""
    for y in EXPONENTS:
        x = TABLE[f"scalar/float32/{y}/x"]
        want = TABLE[f"scalar/float32/{y}/value"]
        got = np.asarray(backend.pow(x, np.float32(y), 1))
        bad = np.nonzero(~_same_bits(got, want))[0]
        assert bad.size == 0, f"{backend.name} powf({x[bad[0]]!r}, {y}) = {got[bad[0]]!r}, TF 2.15 {want[bad[0]]!r}"


def test_scalar_path_float64_is_within_an_ulp(backend):
    """float64 tails use Eigen's generic_pow, not glibc's pow: within 1 ulp, and how often they differ."""
    for y in EXPONENTS:
        x = TABLE[f"scalar/float64/{y}/x"]
        want = TABLE[f"scalar/float64/{y}/value"]
        got = np.asarray(backend.pow(x, np.float64(y), 1))
        ulps = np.abs(got.view(np.int64) - want.view(np.int64))
        assert ulps.max() <= 1, f"{backend.name} pow({x[ulps.argmax()]!r}, {y}) is {ulps.max()} ulp off"
        assert (ulps > 0).mean() < 0.06


def test_row_layout_mixes_the_two_paths():
    """A 2-D sparse Ftrl row of 12: 8 elements on the packet path, 4 on the scalar path; a 1-D
    variable's loop: all scalar. Every backend's pow agrees with eigen_layout_pow."""
    x = pow_inputs(np.float32)[1000:1000 + 12 * 500].reshape(500, 12)
    y = np.float32(0.25)
    packet, scalar = eigen_pow.packet_pow(x, y), eigen_pow.scalar_pow(x, y)
    laid = eigen_pow.eigen_layout_pow(x, y, 12)
    assert np.array_equal(laid[:, :8], packet[:, :8]) and np.array_equal(laid[:, 8:], scalar[:, 8:])
    assert (packet != scalar).any(), "the inputs should show the two paths differing somewhere"
    assert np.array_equal(eigen_pow.eigen_layout_pow(x, y, 1), scalar)
    for name in ("numpy", "numba"):
        assert np.array_equal(backends.create(name).pow(x, y, 12), laid)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_beta_powers(dtype):
    """Legacy Adam's beta ** t (0-d tf.pow) for t = 1..10000: float32 bit for bit (glibc's powf,
    flushing subnormal results as TF's threads do); float64 correctly rounded, within an ulp of
    glibc's pow, which misrounds about one case in a thousand."""
    name = np.dtype(dtype).name
    for b in BETAS:
        want = TABLE[f"beta/{name}/{b}"]
        got = np.array([scalar_math.pow(dtype(np.float32(b)), t, dtype) for t in range(1, want.size + 1)])
        if dtype == np.float32:
            bad = np.nonzero(~_same_bits(got, want))[0]
            assert bad.size == 0, f"{b} ** {bad[0] + 1}: {got[bad[0]]!r}, TF 2.15 {want[bad[0]]!r}"
        else:
            ulps = np.abs(got.view(np.int64) - want.view(np.int64))
            assert ulps.max() <= 1 and (ulps > 0).mean() < 0.003, (b, ulps.max(), (ulps > 0).sum())


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_are_keras_bit_for_bit(name):
    """Every learning-rate schedule over 3001 steps (their pow, cos and log are glibc's powf, cosf
    and logf, restated)."""
    sched = schedules.from_config(SCHEDULES[name], "test")
    got = np.array([sched(s) for s in SCHEDULE_STEPS], np.float32)
    want = TABLE[f"schedule/{name}"]
    bad = np.nonzero(~_same_bits(got, want))[0]
    assert bad.size == 0, f"{name} at step {SCHEDULE_STEPS[bad[0]]}: {got[bad[0]]!r}, Keras 2.15 {want[bad[0]]!r}"


def _initializer_digests():
    from sparseps.server import initializers
    out = {}
    keys = np.arange(-2000, 2000, dtype=np.int64) * 7919
    for cls in ("RandomNormal", "TruncatedNormal", "GlorotNormal", "RandomUniform"):
        spec = f'{{"class_name": "{cls}", "config": {{"seed": 7}}}}'
        dynamic = initializers.for_keys(spec, (16,), np.float64, keys, "t")
        fixed = initializers.make(spec, (6000, 16), np.float64, np.arange(6000), "t")
        for kind, values in (("dynamic", dynamic), ("fixed", fixed)):
            out[f"{kind}/{cls}"] = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()[:16]
    return out


def test_initial_values_are_the_same_on_every_machine():
    """Random initial values in float64 (the widest a table gets): a dynamic table's are sparseps'
    own Box-Muller in plain IEEE operations (numpy's log1p and cos have SIMD variants per CPU);
    a fixed table's come from numpy's PCG64 Generator. Their bytes are pinned, so a machine (or
    a numpy) whose numbers differ fails here, and a replica or restore there would diverge."""
    assert _initializer_digests() == PINNED_INITIALIZER_DIGESTS


PINNED_INITIALIZER_DIGESTS = {
    "dynamic/RandomNormal": "1b0c19509094271c", "fixed/RandomNormal": "32e2d70217eb801c",
    "dynamic/TruncatedNormal": "83248923f034ce5a", "fixed/TruncatedNormal": "91222d002c69f726",
    "dynamic/GlorotNormal": "315c06c4f2f82e8d", "fixed/GlorotNormal": "1b101e3929a503e1",
    "dynamic/RandomUniform": "4563f0bc4690be1f", "fixed/RandomUniform": "b65d04c2601c98c2",
}
