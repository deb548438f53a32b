"""What torch.optim's sparse optimizers share on the server: config, the learning rate a trainer
sets, torch's duplicate-row sums and its fused multiply-add, all in CPU-independent IEEE arithmetic.

Reference: pytorch/pytorch v2.13.0 (CPU), torch/optim/sparse_adam.py, adagrad.py, sgd.py,
_functional.py; aten/src/ATen/native/sparse/SparseTensor.cpp (`_coalesce_sparse_cpu`),
SparseTensorMath.cpp (`add_out_dense_sparse_cpu`), native/cpu/SortingKernel.cpp (`sort_kernel`).

* **Step count.** torch counts steps per parameter tensor. sparseps.torch gives every table its
  own server optimizer, so the optimizer's `iterations` is that count (an optimizer steps only in
  the pushes that carry its table, also when the table's gradient has no rows).
* **Learning rate.** A torch param group's `lr` changes between steps (LR schedulers). It lives in
  the non-slot state `lr` (a float64, exactly torch's Python float), set through set_weights; the
  config's `lr` is only its first value.
* **Duplicate ids** (`coalesce()`): rows are summed in the order `torch.sort(indices)` leaves them,
  the first row copied and the others added one at a time. torch's CPU sort is libstdc++'s
  `std::sort` (introsort, not stable) below 32768 ids and fbgemm's stable radix sort from there;
  `sort_permutation` reproduces both (for at most 16 ids, or when no id occurs three times, any
  order gives the same sums).
* **`add_(sparse, alpha=a)`** on a 2-D table is MKL's `axpy` per row, which computes
  `fma(a, x, y)` on every x86-64 CPU with FMA (and ARM); `fma` below computes the correctly rounded
  fused result with plain IEEE operations (no FMA instruction, no libm), so the server gives the
  same bits on any CPU. On a CPU without FMA torch itself rounds twice (then the two differ by at
  most 1 ulp per step).
* **sqrt.** torch's CPU `sqrt` goes through MKL's vector math (VML, high-accuracy mode), which is
  not correctly rounded: about 16 % of float32 and 1 % of float64 results are 1 ulp off, and which
  ones depends on MKL's code path for the CPU. The server's sqrt is the correctly rounded IEEE one,
  so results that pass through a square root (SparseAdam's and Adagrad's parameters; never their
  moment or accumulator slots) are within the golden tolerance of torch's, not bit-exact
  (docs/torch.md gives the measured bound).

The rules run on the host in numpy (rows gathered from, and scattered back to, the backend's
arrays), so every backend gives the same bits; only IEEE add, subtract, multiply, divide and sqrt
are used, which are correctly rounded on every CPU.
"""
import numpy as np

from sparseps.errors import InvalidArgument
from sparseps.server import eigen_pow

from .base import Optimizer
from .config_values import as_bool, as_float

#: below this many ids torch sorts with std::sort, from it on with fbgemm's (stable) radix sort
RADIX_SORT_FROM = 32768
_INSERTION_THRESHOLD = 16   # libstdc++ _S_threshold


def sqrt(x):
    """The correctly rounded IEEE square root (the one place torch's MKL result may differ by 1 ulp;
    tests substitute torch's own sqrt here to show that everything else is bit-exact)."""
    return np.sqrt(x)


def dtype_of(var) -> np.dtype:
    dt = var.dtype
    return np.dtype(getattr(dt, "as_numpy_dtype", dt))


# ---------------------------------------------------------------- fused multiply-add, exactly
def _round_to_odd_sum(x, y):
    """x + y rounded to odd (float64 arrays): the nearest float64 if exact, else the neighbour of
    the rounded-to-nearest sum whose last mantissa bit is 1 (TwoSum gives the exact error)."""
    s = np.asarray(x + y)
    bb = s - x
    err = (x - (s - bb)) + (y - bb)
    fix = (err != 0) & np.isfinite(s) & ((s.view(np.int64) & 1) == 0)
    if fix.any():
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s


def fma(a, b, c):
    """Correctly rounded a*b + c in the dtype of c (float32 or float64), from IEEE +, -, * only.

    float32: a*b is exact in float64, the float64 sum rounded to odd and then to float32 is the
    correctly rounded result (53 >= 2*24 + 2). float64: Boldo & Melquiond's emulated FMA, the one
    server/eigen_pow.py uses for glibc's fused operations. Exact unless a*b overflows or its low
    part underflows (|a*b| < 2**-969); non-finite inputs give the plain a*b + c."""
    c = np.asarray(c)
    T = c.dtype
    if T == np.float32:
        s = _round_to_odd_sum(np.float64(a) * np.asarray(b, np.float64), c.astype(np.float64))
        return s.astype(np.float32)
    a, b = np.float64(a), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.asarray(eigen_pow.fma64(a, b, c))
        plain = ~np.isfinite(out) | ~np.isfinite(a * b)
        if plain.any():
            out = np.where(plain, a * b + c, out)
    return out


# ---------------------------------------------------------------- coalesce() in torch's order
def _introsort_permutation(keys: list) -> list:
    """The positions in the order libstdc++'s std::sort leaves (key, position) pairs compared by key
    (std::__introsort_loop with median-of-three and unguarded partition, heapsort past 2*lg(n)
    levels, then the final insertion sort)."""
    a = [(k, i) for i, k in enumerate(keys)]

    def adjust_heap(first, hole, length, value):
        top, second = hole, hole
        while second < (length - 1) // 2:
            second = 2 * (second + 1)
            if a[first + second][0] < a[first + second - 1][0]:
                second -= 1
            a[first + hole] = a[first + second]
            hole = second
        if (length & 1) == 0 and second == (length - 2) // 2:
            second = 2 * (second + 1)
            a[first + hole] = a[first + second - 1]
            hole = second - 1
        parent = (hole - 1) // 2
        while hole > top and a[first + parent][0] < value[0]:
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value

    def heap_sort(first, last):
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, a[first + parent])
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:
            last -= 1
            value = a[last]
            a[last] = a[first]
            adjust_heap(first, 0, last - first, value)

    def median_to_first(result, x, y, z):
        kx, ky, kz = a[x][0], a[y][0], a[z][0]
        if kx < ky:
            m = y if ky < kz else (z if kx < kz else x)
        elif kx < kz:
            m = x
        elif ky < kz:
            m = z
        else:
            m = y
        a[result], a[m] = a[m], a[result]

    def partition(first, last, pivot):
        p = a[pivot][0]
        while True:
            while a[first][0] < p:
                first += 1
            last -= 1
            while p < a[last][0]:
                last -= 1
            if not first < last:
                return first
            a[first], a[last] = a[last], a[first]
            first += 1

    def introsort(first, last, depth):
        while last - first > _INSERTION_THRESHOLD:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            mid = first + (last - first) // 2
            median_to_first(first, first + 1, mid, last - 1)
            cut = partition(first + 1, last, first)
            introsort(cut, last, depth)
            last = cut

    def linear_insert(i):
        value = a[i]
        j = i - 1
        while value[0] < a[j][0]:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = value

    def insertion_sort(first, last):
        for i in range(first + 1, last):
            if a[i][0] < a[first][0]:
                value = a[i]
                a[first + 1:i + 1] = a[first:i]
                a[first] = value
            else:
                linear_insert(i)

    n = len(a)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        if n > _INSERTION_THRESHOLD:
            insertion_sort(0, _INSERTION_THRESHOLD)
            for i in range(_INSERTION_THRESHOLD, n):
                linear_insert(i)
        else:
            insertion_sort(0, n)
    return [i for _, i in a]


def sort_permutation(ids: np.ndarray) -> np.ndarray:
    """`torch.sort(ids).indices` of a 1-D int64 tensor on the CPU (torch 2.13)."""
    ids = np.asarray(ids, np.int64)
    if len(ids) <= _INSERTION_THRESHOLD or len(ids) >= RADIX_SORT_FROM:
        return np.argsort(ids, kind="stable")   # insertion sort / radix sort: both stable
    return np.array(_introsort_permutation(ids.tolist()), np.int64)


def coalesce(ids: np.ndarray, rows: np.ndarray):
    """(unique sorted ids, summed rows) exactly as `torch.Tensor.coalesce()` sums duplicates."""
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        return ids, rows
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) == len(ids):
        order = np.argsort(ids, kind="stable")
        return ids[order], rows[order]
    # the order among equal ids matters only where an id occurs three or more times
    order = sort_permutation(ids) if counts.max() >= 3 else np.argsort(ids, kind="stable")
    s_ids, s_rows = ids[order], rows[order]
    starts = np.flatnonzero(np.r_[True, s_ids[1:] != s_ids[:-1]])
    group = np.cumsum(np.r_[True, s_ids[1:] != s_ids[:-1]]) - 1
    rank = np.arange(len(s_ids)) - starts[group]
    summed = s_rows[starts].copy()
    for r in range(1, int(counts.max())):   # the r-th duplicate of every id, one add each
        m = rank == r
        summed[group[m]] = summed[group[m]] + s_rows[m]
    return uniq, summed


# ---------------------------------------------------------------- the shared class
class TorchOptimizer(Optimizer):
    """A torch.optim optimizer: torch's argument names as config keys, no Keras base keys."""

    base_keys = ("name",)
    legacy_keras = False
    keras_module = None
    nonslot_names = ("lr",)
    #: dense gradients are refused before any change (torch's sparse optimizers raise on them)
    sparse_only = True
    lr_minimum_exclusive = False

    def parse_base(self, config):
        self.parse_name(config)
        self.clipnorm = self.clipvalue = self.global_clipnorm = None
        self.decay = 0.0
        self._nonslot = None

    def parse_lr(self):
        lr = as_float("lr", self.hp["lr"])
        if lr < 0 or (self.lr_minimum_exclusive and lr == 0):
            raise InvalidArgument(f"{self.class_names[0]}: Invalid learning rate: {lr}")
        self.hp["lr"] = lr

    def parse_maximize(self):
        if as_bool("maximize", self.hp["maximize"]):
            raise InvalidArgument(f"{self.class_names[0]}: maximize=True is not supported (negate the loss instead)")

    def initial_nonslot(self):
        # OptimizerState.nonslot is only updated in place (set_weights, checkpoint restore)
        self._nonslot = {"lr": float(self.hp["lr"])}
        return self._nonslot

    def finish(self, nonslot):
        self._nonslot = nonslot

    def current_lr(self) -> float:
        if self._nonslot is not None and "lr" in self._nonslot:
            return float(self._nonslot["lr"])
        return float(self.hp["lr"])

    def apply_dense(self, bk, var, slots, grad, c):
        raise InvalidArgument(f"{self.class_names[0]} takes sparse gradients only")

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        raise NotImplementedError   # every torch class implements apply_sparse_raw

    def get_config(self):
        cfg = {"name": self.name}
        for key in self.defaults:
            cfg[key] = self.hp[key]
        cfg["lr"] = self.current_lr()
        return cfg
