"""FTRL-Proximal (McMahan et al. 2013). Reference: keras-team/keras 2.15,
keras/src/optimizers/legacy/ftrl.py (optimizer_v2) with tensorflow 2.15 core/kernels/training_ops.cc
(ApplyFtrl[V2], SparseApplyFtrl, ComputeFtrl); Keras 3: keras/src/optimizers/ftrl.py (TF backend).

Legacy (ResourceApplyFtrl[V2] / ResourceSparseApplyFtrl[V2] CPU kernels, the reference), with
p(x) = sqrt(x) when learning_rate_power == -0.5, else pow(x, -learning_rate_power):
    l2' = l2 + beta / (2 lr)                        (the "adjusted" l2 Keras hands the kernel)
    g_s = g + 2 l2_shrinkage var                    (only when l2_shrinkage > 0: the V2 kernel)
    new = accum + g^2
    linear += g_s - ((p(new) - p(accum)) / lr) var
    var = (clip(linear, -l1, l1) - linear) / (p(new) / lr + 2 l2')
    accum = new
The sparse kernel (duplicates summed first) touches only the pushed rows. The dense kernel writes
`var` on every row, selecting 0 where |linear| <= l1: rows that never had a gradient are set to 0
by the first dense step. A 1-D variable's sparse kernel computes (linear + g_s) - sigma var with
sigma = (pow(new, -lrp) - pow(accum, -lrp)) / lr (pow even for -0.5).
Keras 3 (TF backend) evaluates the same formula with tf.pow (also for -0.5) on every row, the
IndexedSlices densified (g summed per id, g^2 as the per-id sum of squared rows).
"""
import numpy as np

from .adagrad import _dtype, fill
from .base import Optimizer, cast_via_f32, exact, hyper
from .config_values import as_float
from .keras_new import Keras3Mixin, KerasNewOptimizer

_NONNEGATIVE = ("initial_accumulator_value", "l1_regularization_strength", "l2_regularization_strength",
                "l2_shrinkage_regularization_strength")


def _parse(opt):
    opt.parse_learning_rate()
    for key in _NONNEGATIVE:
        opt.hp[key] = as_float(key, opt.hp[key], minimum=0.0)
    opt.hp["beta"] = as_float("beta", opt.hp["beta"])
    lrp = opt.hp["learning_rate_power"] = as_float("learning_rate_power", opt.hp["learning_rate_power"])
    if lrp > 0:
        from sparseps.errors import InvalidArgument
        raise InvalidArgument(f"optimizer config key 'learning_rate_power': must be negative or zero, got {lrp!r}")


class Ftrl(Optimizer):
    class_names = ("Ftrl",)
    defaults = {"learning_rate": 0.001, "decay": 0.0, "initial_accumulator_value": 0.1, "learning_rate_power": -0.5,
                "l1_regularization_strength": 0.0, "l2_regularization_strength": 0.0, "beta": 0.0,
                "l2_shrinkage_regularization_strength": 0.0}
    slot_kinds = ("accumulator", "linear")

    def parse(self):
        _parse(self)

    def slot_groups(self):
        return [["accumulator", "linear"]]   # _create_slots: accumulator(A), linear(A), accumulator(B), ...

    def initial_slot(self, bk, var, slot):
        if slot == "accumulator":
            return fill(bk, var, exact(self.hp["initial_accumulator_value"], _dtype(var)))
        return bk.zeros_like(var)

    def prepare(self, iterations, dtype):
        T = np.dtype(dtype).type
        lr = self.decayed_lr(iterations, dtype)
        lrp = hyper(self.hp["learning_rate_power"], dtype)
        l2 = hyper(self.hp["l2_regularization_strength"], dtype) + hyper(self.hp["beta"], dtype) / (T(2) * lr)
        return {"lr_t": lr, "l1": hyper(self.hp["l1_regularization_strength"], dtype), "neg_l1": -hyper(
                    self.hp["l1_regularization_strength"], dtype), "two_l2": T(2) * l2, "neg_lrp": -lrp,
                "two_l2s": T(2) * cast_via_f32(self.hp["l2_shrinkage_regularization_strength"], dtype),
                "shrink": self.hp["l2_shrinkage_regularization_strength"] > 0, "sqrt": bool(lrp == T(-0.5)),
                "zero": T(0)}

    def _p(self, bk, x, c, run):
        """p(x); `run`: the elements the reference's Eigen expression covers at once (the whole
        tensor for ApplyFtrl, one row for SparseApplyFtrl's chips), which decides which of them
        take Eigen's packet pow and which libm's (server/eigen_pow.py)."""
        return bk.sqrt(x) if c["sqrt"] else bk.pow(x, c["neg_lrp"], run)

    def _linear(self, bk, acc, new, lin, v, g, c, run):
        gs = g + c["two_l2s"] * v if c["shrink"] else g
        return lin + (gs - ((self._p(bk, new, c, run) - self._p(bk, acc, c, run)) / c["lr_t"]) * v)

    def _clipped(self, bk, lin, c):
        return bk.maximum(bk.minimum(lin, c["l1"]), c["neg_l1"])

    def apply_dense(self, bk, var, slots, grad, c):
        """ApplyFtrl / ApplyFtrlV2: every element, 0 where |linear| <= l1."""
        acc, linear = slots["accumulator"], slots["linear"]
        a, v = bk.read(acc), bk.read(var)
        new = a + grad * grad
        lin = self._linear(bk, a, new, bk.read(linear), v, grad, c, None)
        bk.assign(linear, lin)
        with np.errstate(divide="ignore", invalid="ignore"):
            pre = (self._clipped(bk, lin, c) - lin) / (self._p(bk, new, c, None) / c["lr_t"] + c["two_l2"])
            bk.assign(var, bk.where(bk.maximum(lin, -lin) > c["l1"], pre, c["zero"]))
        bk.assign(acc, new)

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        fused = bk.kernel("ftrl")
        if fused is None:
            return super().apply_sparse_raw(bk, var, slots, ids, rows, c)
        fused(var, slots["accumulator"], slots["linear"], ids, rows, c["lr_t"], c["l1"], c["two_l2"],
              c["two_l2s"] if c["shrink"] else None, c["neg_lrp"], c["sqrt"])

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        """SparseApplyFtrl[V2] on the de-duplicated rows."""
        acc, linear = slots["accumulator"], slots["linear"]
        a, v, lin = bk.gather(acc, ids), bk.gather(var, ids), bk.gather(linear, ids)
        new = a + rows * rows
        run = int(np.prod(var.shape[1:], dtype=np.int64)) if len(var.shape) > 1 else 1
        if len(var.shape) == 1:   # the kernel's scalar loop: std::pow, also for -0.5
            gs = rows + c["two_l2s"] * v if c["shrink"] else rows
            sigma = (bk.pow(new, c["neg_lrp"], 1) - bk.pow(a, c["neg_lrp"], 1)) / c["lr_t"]
            lin = (lin + gs) - sigma * v
        else:
            lin = self._linear(bk, a, new, lin, v, rows, c, run)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = (self._clipped(bk, lin, c) - lin) / (self._p(bk, new, c, run) / c["lr_t"] + c["two_l2"])
        bk.scatter_update(linear, ids, lin)
        bk.scatter_update(var, ids, v)
        bk.scatter_update(acc, ids, new)


class Keras3Ftrl(Keras3Mixin, KerasNewOptimizer):
    class_names = ("Ftrl",)
    default_name = "ftrl"
    defaults = {"learning_rate": 0.001, "learning_rate_power": -0.5, "initial_accumulator_value": 0.1,
                "l1_regularization_strength": 0.0, "l2_regularization_strength": 0.0,
                "l2_shrinkage_regularization_strength": 0.0, "beta": 0.0}
    slot_kinds = ("accumulator", "linear")

    def parse(self):
        _parse(self)
        super().parse()

    def slot_groups(self):
        return [["accumulator", "linear"]]   # add_optimizer_variables(var_list, [accumulator, linear])

    def initial_slot(self, bk, var, slot):
        if slot == "accumulator":   # initializers.Constant: ops.cast(<python float>, dtype), via float32
            return fill(bk, var, hyper(self.hp["initial_accumulator_value"], _dtype(var)))
        return bk.zeros_like(var)

    def prepare(self, iterations, dtype):
        T = np.dtype(dtype).type
        lr = self.decayed_lr(iterations, dtype)
        hp = self.hp
        # l2 + beta / (2.0 * lr): Python floats converted straight to the dtype
        l2 = T(hp["l2_regularization_strength"]) + T(hp["beta"]) / (T(2.0) * lr)
        return {"lr_t": lr, "wd": self.weight_decay_coefficient(dtype), "two_l2": T(2) * l2,
                "two_l2s": T(2 * hp["l2_shrinkage_regularization_strength"]),
                "neg_lrp": T(-hp["learning_rate_power"]),
                "l1": T(hp["l1_regularization_strength"]), "neg_l1": T(-hp["l1_regularization_strength"])}

    def _update(self, bk, var, slots, g, g2, c):
        acc, linear = slots["accumulator"], slots["linear"]
        a, v = bk.read(acc), bk.read(var)
        new = a + g2
        p_new = bk.pow(new, c["neg_lrp"], None)   # tf.pow over the whole variable
        bk.assign(linear, bk.read(linear) + ((g + c["two_l2s"] * v) - ((p_new - bk.pow(a, c["neg_lrp"], None)) / c["lr_t"]) * v))
        lin = bk.read(linear)
        with np.errstate(divide="ignore", invalid="ignore"):
            bk.assign(var, (bk.maximum(bk.minimum(lin, c["l1"]), c["neg_l1"]) - lin) / (p_new / c["lr_t"] + c["two_l2"]))
        bk.assign(acc, new)

    def apply_dense(self, bk, var, slots, grad, c):
        self.apply_weight_decay(bk, var, c)
        self._update(bk, var, slots, grad, grad * grad, c)

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        """The IndexedSlices densified by each elementwise op: g and the squares summed per id."""
        self.apply_weight_decay(bk, var, c)
        uniq, g = bk.unique_sum(ids, rows)
        _, g2 = bk.unique_sum(ids, rows * rows)
        dense = []
        for part in (g, g2):
            d = bk.zeros_like(var)
            bk.scatter_update(d, uniq, part)
            dense.append(bk.read(d))
        self._update(bk, var, slots, dense[0], dense[1], c)

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        self.apply_sparse_raw(bk, var, slots, ids, rows, c)
