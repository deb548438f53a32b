"""tfa.optimizers.LazyAdam (tensorflow-addons 0.23): Adam that touches only the pushed rows.

Reference: tensorflow/addons v0.23.0, tensorflow_addons/optimizers/lazy_adam.py.

    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)      t = the optimizer's global iterations + 1
    for each pushed row r (duplicates summed first):
        m[r] = b1 m[r] + (1 - b1) g[r];  v[r] = b2 v[r] + (1 - b2) g[r]^2
        var[r] -= lr_t m[r] / (sqrt(v[r]) + eps)
Rows not pushed keep var, m and v unchanged. Dense gradients are plain (fused-kernel) Adam.
`amsgrad=True` creates the `vhat` slot, which only the dense path uses: tfa's sparse update
ignores it (the class docstring says amsgrad "can only be False"; nothing enforces it).
"""
import numpy as np

from .adam import Adam


class LazyAdam(Adam):
    class_names = ("LazyAdam", "Addons>LazyAdam")
    keras_module = "tensorflow_addons.optimizers.lazy_adam"
    registered_name = "Addons>LazyAdam"

    def prepare(self, iterations, dtype):
        c = super().prepare(iterations, dtype)
        one = np.dtype(dtype).type(1)
        # tfa: lr_t * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power), left to right
        c["lr"] = c["lr_t"] * np.sqrt(one - c["b2_power"]) / (one - c["b1_power"])
        return c

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        fused = bk.kernel("lazy_adam")
        if fused is None:
            return super().apply_sparse_raw(bk, var, slots, ids, rows, c)
        fused(var, slots["m"], slots["v"], ids, rows, c["lr"], c["b1"], c["b2"],
              c["one_minus_b1"], c["one_minus_b2"], c["eps"])

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        m, v = slots["m"], slots["v"]
        m_rows = c["b1"] * bk.gather(m, ids) + c["one_minus_b1"] * rows
        v_rows = c["b2"] * bk.gather(v, ids) + c["one_minus_b2"] * (rows * rows)
        bk.scatter_update(m, ids, m_rows)
        bk.scatter_update(v, ids, v_rows)
        bk.scatter_sub(var, ids, (c["lr"] * m_rows) / (bk.sqrt(v_rows) + c["eps"]))
