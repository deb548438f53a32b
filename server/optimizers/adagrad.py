"""Adagrad (Duchi et al. 2011). Reference: keras-team/keras 2.15, keras/src/optimizers/legacy/adagrad.py
(optimizer_v2) with tensorflow 2.15 core/kernels/training_ops.cc (ApplyAdagradV2, SparseApplyAdagrad);
Keras 3: keras-team/keras 3.x keras/src/optimizers/adagrad.py on the TensorFlow backend.

Legacy (ResourceApplyAdagradV2 / ResourceSparseApplyAdagradV2, the reference):
    accum starts at initial_accumulator_value (exact in the variable dtype)
    accum += g^2;   var -= (g lr) / (sqrt(accum) + eps)
    sparse: duplicates summed first, then the same per pushed row; untouched rows do not move.
Keras 3 (TF backend) puts epsilon inside the square root, and its IndexedSlices stay raw: every
pushed row adds its own g_i^2 to accum (in push order), then every row subtracts
(lr g_i) / sqrt(accum + eps) with the final accum of its id.
"""
from .base import Optimizer, exact, hyper
from .config_values import as_float
from .keras_new import Keras3Mixin, KerasNewOptimizer


def fill(bk, var, value):
    """A slot filled with `value` (a scalar of the variable dtype): zeros + value, exactly value."""
    arr = bk.zeros_like(var)
    bk.assign(arr, bk.read(arr) + value)
    return arr


class Adagrad(Optimizer):
    class_names = ("Adagrad",)
    defaults = {"learning_rate": 0.001, "decay": 0.0, "initial_accumulator_value": 0.1, "epsilon": 1e-7}
    slot_kinds = ("accumulator",)

    def parse(self):
        self.parse_learning_rate()
        self.hp["initial_accumulator_value"] = as_float(
            "initial_accumulator_value", self.hp["initial_accumulator_value"], minimum=0.0)
        # optimizer_v2 Adagrad: `self.epsilon = epsilon or backend_config.epsilon()`
        self.hp["epsilon"] = as_float("epsilon", self.hp["epsilon"], allow_none=True) or 1e-7

    def initial_slot(self, bk, var, slot):
        # constant_initializer(value, dtype): the Python float converted straight to the dtype
        return fill(bk, var, exact(self.hp["initial_accumulator_value"], _dtype(var)))

    def prepare(self, iterations, dtype):
        return {"lr_t": self.decayed_lr(iterations, dtype), "eps": exact(self.hp["epsilon"], dtype)}

    def apply_dense(self, bk, var, slots, grad, c):
        acc = slots["accumulator"]
        bk.assign(acc, bk.read(acc) + grad * grad)
        bk.assign(var, bk.read(var) - (grad * c["lr_t"]) / (bk.sqrt(bk.read(acc)) + c["eps"]))

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        fused = bk.kernel("adagrad")
        if fused is None:
            return super().apply_sparse_raw(bk, var, slots, ids, rows, c)
        fused(var, slots["accumulator"], ids, rows, c["lr_t"], c["eps"])

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        acc = slots["accumulator"]
        a = bk.gather(acc, ids) + rows * rows
        bk.scatter_update(acc, ids, a)
        bk.scatter_update(var, ids, bk.gather(var, ids) - (c["lr_t"] * rows) / (bk.sqrt(a) + c["eps"]))


class Keras3Adagrad(Keras3Mixin, KerasNewOptimizer):
    class_names = ("Adagrad",)
    default_name = "adagrad"
    defaults = {"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7}
    slot_kinds = ("accumulator",)

    def parse(self):
        self.parse_learning_rate()
        self.hp["initial_accumulator_value"] = as_float(
            "initial_accumulator_value", self.hp["initial_accumulator_value"], minimum=0.0)
        self.hp["epsilon"] = as_float("epsilon", self.hp["epsilon"])
        super().parse()

    def initial_slot(self, bk, var, slot):
        # initializers.Constant: ops.cast(<python float>, dtype) goes through float32
        return fill(bk, var, hyper(self.hp["initial_accumulator_value"], _dtype(var)))

    def prepare(self, iterations, dtype):
        return {"lr_t": self.decayed_lr(iterations, dtype), "wd": self.weight_decay_coefficient(dtype),
                "eps": exact(self.hp["epsilon"], dtype)}

    def apply_dense(self, bk, var, slots, grad, c):
        self.apply_weight_decay(bk, var, c)
        acc = slots["accumulator"]
        bk.assign(acc, bk.read(acc) + grad * grad)
        bk.assign(var, bk.read(var) - (c["lr_t"] * grad) / bk.sqrt(bk.read(acc) + c["eps"]))

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        self.apply_weight_decay(bk, var, c)
        acc = slots["accumulator"]
        bk.scatter_add_raw(acc, ids, rows * rows)
        step = (c["lr_t"] * rows) / bk.sqrt(bk.gather(acc, ids) + c["eps"])
        bk.scatter_add_raw(var, ids, -step)

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        self.apply_sparse_raw(bk, var, slots, ids, rows, c)


def _dtype(var):
    dt = var.dtype
    return getattr(dt, "as_numpy_dtype", dt)
