"""The non-legacy Keras `SGD` classes: Keras 2.11-2.15 `tf.keras.optimizers.SGD` and Keras 3
`keras.optimizers.SGD` (plain, momentum, Nesterov), with decoupled weight decay (keras_new).

References: keras-team/keras v2.15.0, keras/src/optimizers/sgd.py;
keras-team/keras v3.15.1, keras/src/optimizers/sgd.py.

    m = momentum m - lr g;   var += m          (nesterov: var += momentum m - lr g)
    momentum == 0 (Keras 3 only, no slot):    var -= lr g

Keras 2.15 always creates the slot `m` (also with momentum 0) and works on de-duplicated rows:
m = m momentum on every row, (-g lr) scatter-added; var += m on every row (nesterov: the rows
(-g lr) scatter-added, then var += m momentum on every row).
Keras 3 names the slot `momentum`, creates it only for momentum != 0, and densifies the raw rows
inside its elementwise ops: m = m momentum - sum_i(g_i lr); without momentum the raw rows g lr are
scatter-subtracted one by one (like the legacy class).

Not covered by a golden trajectory (docs/optimizers.md).
"""
from sparseps.errors import InvalidArgument

from .base import cast_via_f32
from .config_values import as_bool, as_float
from .keras_new import Keras3Mixin, KerasNewOptimizer


class KerasSGD(KerasNewOptimizer):
    class_names = ("SGD",)
    default_name = "SGD"
    defaults = {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False}

    def parse(self):
        self.parse_learning_rate()
        self.hp["momentum"] = as_float("momentum", self.hp["momentum"])
        if not 0 <= self.hp["momentum"] <= 1:
            raise InvalidArgument(f"optimizer config key 'momentum': must be between [0, 1], got {self.hp['momentum']!r}")
        self.hp["nesterov"] = as_bool("nesterov", self.hp["nesterov"])

    def slot_names(self):
        return ["m"]

    def prepare(self, iterations, dtype):
        lr = self.decayed_lr(iterations, dtype)
        return {"lr_t": lr, "wd": self.weight_decay_coefficient(dtype),
                "momentum": cast_via_f32(self.hp["momentum"], dtype)}

    def apply_dense(self, bk, var, slots, grad, c):
        self.apply_weight_decay(bk, var, c)
        m = (-grad) * c["lr_t"] + bk.read(slots["m"]) * c["momentum"]
        bk.assign(slots["m"], m)
        if self.hp["nesterov"]:
            bk.assign(var, bk.read(var) + ((-grad) * c["lr_t"] + bk.read(slots["m"]) * c["momentum"]))
        else:
            bk.assign(var, bk.read(var) + bk.read(slots["m"]))

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        self.apply_weight_decay(bk, var, c)
        m = slots["m"]
        add = (-rows) * c["lr_t"]
        bk.assign(m, bk.read(m) * c["momentum"])
        bk.scatter_add(m, ids, add)
        if self.hp["nesterov"]:
            bk.scatter_add(var, ids, add)
            bk.assign(var, bk.read(var) + bk.read(m) * c["momentum"])
        else:
            bk.assign(var, bk.read(var) + bk.read(m))


class Keras3SGD(Keras3Mixin, KerasSGD):
    default_name = "sgd"
    defaults = {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False}

    def slot_names(self):
        return ["momentum"] if self.hp["momentum"] != 0 else []

    def apply_dense(self, bk, var, slots, grad, c):
        self.apply_weight_decay(bk, var, c)
        if not slots:
            bk.assign(var, bk.read(var) - grad * c["lr_t"])
            return
        m = slots["momentum"]
        bk.assign(m, bk.read(m) * c["momentum"] - grad * c["lr_t"])
        if self.hp["nesterov"]:
            bk.assign(var, bk.read(var) + (bk.read(m) * c["momentum"] - grad * c["lr_t"]))
        else:
            bk.assign(var, bk.read(var) + bk.read(m))

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        self.apply_weight_decay(bk, var, c)
        scaled = rows * c["lr_t"]
        if not slots:   # assign_sub(IndexedSlices): raw rows, in order
            bk.scatter_add_raw(var, ids, -scaled)
            return
        m = slots["momentum"]
        uniq, s = bk.unique_sum(ids, scaled)   # densified g * lr: summed per id
        bk.assign(m, bk.read(m) * c["momentum"])            # m * momentum - 0 on untouched rows
        bk.scatter_update(m, uniq, bk.gather(m, uniq) - s)
        if self.hp["nesterov"]:
            old = bk.gather(var, uniq)
            bk.assign(var, bk.read(var) + bk.read(m) * c["momentum"])
            bk.scatter_update(var, uniq, old + (bk.gather(m, uniq) * c["momentum"] - s))
        else:
            bk.assign(var, bk.read(var) + bk.read(m))

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        self.apply_sparse_raw(bk, var, slots, ids, rows, c)
