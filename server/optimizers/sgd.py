"""Keras legacy SGD (optimizer_v2 `gradient_descent`): plain, momentum, Nesterov.

Reference: keras-team/keras v2.15.0, keras/src/optimizers/legacy/gradient_descent.py.

    momentum == 0:  var -= lr g            (sparse: raw rows scatter-added, duplicates not summed)
    momentum > 0:   a = momentum a - lr g;  var += a   (nesterov: var += momentum a - lr g)
"""
from sparseps.errors import InvalidArgument

from .base import Optimizer, hyper
from .config_values import as_bool, as_float


class SGD(Optimizer):
    class_names = ("SGD",)
    defaults = {"learning_rate": 0.01, "decay": 0.0, "momentum": 0.0, "nesterov": False}

    def parse(self):
        self.parse_learning_rate()
        self.hp["momentum"] = as_float("momentum", self.hp["momentum"])
        if not 0 <= self.hp["momentum"] <= 1:
            raise InvalidArgument(f"optimizer config key 'momentum': must be between [0, 1], got {self.hp['momentum']!r}")
        self.hp["nesterov"] = as_bool("nesterov", self.hp["nesterov"])

    def slot_names(self):
        return ["momentum"] if self.hp["momentum"] > 0 else []

    def prepare(self, iterations, dtype):
        return {"lr_t": self.decayed_lr(iterations, dtype), "momentum": hyper(self.hp["momentum"], dtype)}

    def apply_dense(self, bk, var, slots, grad, c):
        fused = bk.kernel("sgd_dense")
        if fused is not None:
            return fused(var, slots.get("momentum"), grad, c["lr_t"], c["momentum"], self.hp["nesterov"])
        if not slots:  # ResourceApplyGradientDescent
            bk.assign(var, bk.read(var) - grad * c["lr_t"])
            return
        accum = bk.read(slots["momentum"]) * c["momentum"] - grad * c["lr_t"]
        bk.assign(slots["momentum"], accum)
        step = accum * c["momentum"] - grad * c["lr_t"] if self.hp["nesterov"] else accum
        bk.assign(var, bk.read(var) + step)

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        if slots:
            return super().apply_sparse_raw(bk, var, slots, ids, rows, c)
        # _resource_apply_sparse_duplicate_indices without momentum: scatter_add(-g * lr), raw rows
        bk.scatter_add_raw(var, ids, -rows * c["lr_t"])

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        """ResourceSparseApplyKerasMomentum on the de-duplicated rows."""
        if not slots:  # only reached through Lookahead (where the reference fails without momentum)
            bk.scatter_add(var, ids, -rows * c["lr_t"])
            return
        fused = bk.kernel("momentum_sparse")
        if fused is not None:
            return fused(var, slots["momentum"], ids, rows, c["lr_t"], c["momentum"], self.hp["nesterov"])
        a = bk.gather(slots["momentum"], ids) * c["momentum"] - rows * c["lr_t"]
        bk.scatter_update(slots["momentum"], ids, a)
        step = a * c["momentum"] - rows * c["lr_t"] if self.hp["nesterov"] else a
        bk.scatter_update(var, ids, bk.gather(var, ids) + step)
