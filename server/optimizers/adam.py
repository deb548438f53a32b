"""Keras legacy Adam (optimizer_v2, `tf.keras.optimizers.legacy.Adam`), Kingma & Ba 2014.

Reference: keras-team/keras v2.15.0, keras/src/optimizers/legacy/adam.py.

    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t),   t = iterations + 1
    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   var -= lr_t m / (sqrt(v) + eps)
    amsgrad: vhat = max(vhat, v) replaces v in the denominator.

Dense gradients go through TF's fused ApplyAdam kernel, whose incremental form
m += (g - m)(1 - b1) rounds differently from the textbook one. Sparse gradients are
dense-equivalent: m and v decay on every row and every row with non-zero m moves.
"""
import numpy as np

from .base import Optimizer, exact, hyper, power
from .config_values import as_bool, as_float


class Adam(Optimizer):
    class_names = ("Adam",)
    defaults = {"learning_rate": 0.001, "decay": 0.0, "beta_1": 0.9, "beta_2": 0.999,
                "epsilon": 1e-7, "amsgrad": False}

    def parse(self):
        self.parse_learning_rate()
        for key in ("beta_1", "beta_2"):
            self.hp[key] = as_float(key, self.hp[key])
        # optimizer_v2 Adam: `self.epsilon = epsilon or backend.epsilon()`
        self.hp["epsilon"] = as_float("epsilon", self.hp["epsilon"], allow_none=True) or 1e-7
        self.hp["amsgrad"] = as_bool("amsgrad", self.hp["amsgrad"])

    def slot_names(self):
        return ["m", "v", "vhat"] if self.hp["amsgrad"] else ["m", "v"]

    def prepare(self, iterations, dtype):
        one = np.dtype(dtype).type(1)
        b1, b2 = hyper(self.hp["beta_1"], dtype), hyper(self.hp["beta_2"], dtype)
        b1_power, b2_power = power(b1, iterations + 1), power(b2, iterations + 1)
        lr_t = self.decayed_lr(iterations, dtype)
        return {
            "lr_t": lr_t, "b1": b1, "b2": b2, "b1_power": b1_power, "b2_power": b2_power,
            "one_minus_b1": one - b1, "one_minus_b2": one - b2,
            "eps": exact(self.hp["epsilon"], dtype),
            # _prepare_local: lr_t * (sqrt(1 - b2^t) / (1 - b1^t))
            "lr": lr_t * (np.sqrt(one - b2_power) / (one - b1_power)),
            # the fused kernels: lr_t * sqrt(1 - b2^t) / (1 - b1^t), left to right
            "alpha": lr_t * np.sqrt(one - b2_power) / (one - b1_power),
        }

    def apply_dense(self, bk, var, slots, grad, c):
        """ApplyAdam / ApplyAdamWithAmsgrad (CPU kernels)."""
        m, v = slots["m"], slots["v"]
        fused = bk.kernel("adam_dense")
        if fused is not None:
            return fused(var, m, v, slots["vhat"] if self.hp["amsgrad"] else None, grad, c["alpha"],
                         c["one_minus_b1"], c["one_minus_b2"], c["eps"])
        m_t = bk.read(m) + (grad - bk.read(m)) * c["one_minus_b1"]
        v_t = bk.read(v) + (grad * grad - bk.read(v)) * c["one_minus_b2"]
        bk.assign(m, m_t)
        bk.assign(v, v_t)
        if self.hp["amsgrad"]:
            v_t = bk.maximum(bk.read(slots["vhat"]), v_t)
            bk.assign(slots["vhat"], v_t)
        bk.assign(var, bk.read(var) - (m_t * c["alpha"]) / (bk.sqrt(v_t) + c["eps"]))

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        """Legacy Adam._resource_apply_sparse: decay everything, scatter-add the new rows."""
        m, v = slots["m"], slots["v"]
        fused = bk.kernel("adam_sparse")
        if fused is not None:
            return fused(var, m, v, slots["vhat"] if self.hp["amsgrad"] else None, ids, rows, c["lr"], c["b1"],
                         c["b2"], c["one_minus_b1"], c["one_minus_b2"], c["eps"])
        bk.assign(m, bk.read(m) * c["b1"])
        bk.scatter_add(m, ids, rows * c["one_minus_b1"])
        bk.assign(v, bk.read(v) * c["b2"])
        bk.scatter_add(v, ids, (rows * rows) * c["one_minus_b2"])
        v_t = bk.read(v)
        if self.hp["amsgrad"]:
            v_t = bk.maximum(bk.read(slots["vhat"]), v_t)
            bk.assign(slots["vhat"], v_t)
        bk.assign(var, bk.read(var) - (c["lr"] * bk.read(m)) / (bk.sqrt(v_t) + c["eps"]))
