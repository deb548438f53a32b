"""The pieces of torch's arithmetic the server's torch optimizers rebuild, checked against exact
rationals and against torch 2.13 itself (in-process; the golden replays are in test_conformance)."""
from fractions import Fraction

import numpy as np
import pytest

from sparseps.server.optimizers.torch_base import coalesce, fma, sort_permutation

torch = pytest.importorskip("torch")


def torch_fuses_axpy() -> bool:
    """Whether this CPU's torch computes a 2-D table's sparse `add_(g, alpha=a)` as one fused
    multiply-add (MKL axpy on a CPU with FMA) or rounds twice (a CPU without FMA). The server always
    gives the fused result; comparisons with a live torch are bit-exact only where torch fuses too.
    -1 + (1 + 2**-12)**2: rounded twice 2**-11, fused 2**-11 + 2**-24."""
    a = 1 + 2.0 ** -12
    p = torch.full((1, 2), -1.0)
    g = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.full((1, 2), a), (1, 2), check_invariants=False)
    p.add_(g.coalesce(), alpha=a)
    return float(p[0, 0]) == 2.0 ** -11 + 2.0 ** -24


def test_which_rounding_this_cpus_torch_uses():
    """Documents the CPU (both answers are torch; the server's fused one matches FMA CPUs)."""
    assert torch_fuses_axpy() in (True, False)
    got = fma(np.float32(1 + 2.0 ** -12), np.full(2, 1 + 2.0 ** -12, np.float32), np.full(2, -1.0, np.float32))
    assert got[0] == np.float32(2.0 ** -11 + 2.0 ** -24)


def exact_fma(a, b, c, dtype):
    return np.array([dtype(float(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))))
                     for x, y, z in zip(np.broadcast_to(a, c.shape).ravel(), b.ravel(), c.ravel())],
                    dtype).reshape(c.shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_is_correctly_rounded(dtype):
    """Random operands, and operands built so that a*b nearly cancels c (where a twice-rounded
    a*b + c and a float64 shortcut go wrong): the emulation equals the exact rational result."""
    rng = np.random.default_rng(7)
    n = 4000
    a = rng.normal(0, 1, n).astype(dtype) * dtype(10.0) ** rng.integers(-8, 8, n).astype(dtype)
    b = rng.normal(0, 1, n).astype(dtype)
    c = rng.normal(0, 1, n).astype(dtype) * dtype(10.0) ** rng.integers(-8, 8, n).astype(dtype)
    near = (-(a[:n // 2].astype(np.float64) * b[:n // 2])).astype(dtype)   # c ~ -a*b: cancellation
    near = near * (1 + rng.integers(-3, 4, n // 2).astype(dtype) * np.finfo(dtype).eps)
    c[:n // 2] = near
    got = fma(a, b, c)
    want = exact_fma(a, b, c, dtype)
    assert got.dtype == dtype
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {n} differ"
    # a scalar multiplier, as the optimizers call it
    got = fma(dtype(-0.0123456789), b, c)
    assert np.array_equal(got, exact_fma(dtype(-0.0123456789), b, c, dtype))


def test_sort_permutation_is_torch_sort():
    """torch.sort (not stable) of int64 ids on the CPU: libstdc++ introsort below 32768 ids."""
    rng = np.random.default_rng(3)
    for n in [1, 2, 16, 17, 18, 31, 64, 100, 257, 1000, 4097]:
        for hi in (3, n // 4 + 1, 10 * n):
            ids = rng.integers(0, hi, n)
            want = torch.sort(torch.from_numpy(ids)).indices.numpy()
            assert np.array_equal(sort_permutation(ids), want), (n, hi)
    ids = np.repeat(np.arange(40), 3)[::-1].copy()   # reversed runs
    assert np.array_equal(sort_permutation(ids), torch.sort(torch.from_numpy(ids)).indices.numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coalesce_sums_duplicates_as_torch(dtype):
    rng = np.random.default_rng(5)
    for n, hi in [(12, 4), (40, 6), (300, 20), (2000, 50)]:
        ids = rng.integers(0, hi, n)
        rows = rng.normal(0, 1, (n, 3)).astype(dtype)
        t = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], torch.from_numpy(rows), (hi, 3)).coalesce()
        uniq, summed = coalesce(ids, rows)
        assert np.array_equal(uniq, t.indices().numpy()[0])
        assert np.array_equal(summed, t.values().numpy()), (n, hi)
