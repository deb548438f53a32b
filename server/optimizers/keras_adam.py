"""The non-legacy Keras `Adam` classes (Kingma & Ba 2014): Keras 2.11-2.15
`tf.keras.optimizers.Adam` ("Keras-new") and Keras 3 `keras.optimizers.Adam`.

References: keras-team/keras v2.15.0, keras/src/optimizers/adam.py;
keras-team/keras v3.15.1, keras/src/optimizers/adam.py.

    alpha = lr * sqrt(1 - b2^t) / (1 - b1^t),   t = iterations + 1
    (weight decay first: var -= var * wd * lr)
    m += (g - m)(1 - b1);   v += (g^2 - v)(1 - b2);   (amsgrad: vhat = max(vhat, v))
    var -= (m alpha) / (sqrt(v or vhat) + eps)          every element, dense and sparse

b1, b2 are cast through float32 for the powers while `1 - b1` is a Python double converted to the
variable dtype. Sparse gradients are dense-equivalent, rounded differently per flavour:

* Keras 2.15: duplicates summed first; m += -m (1 - b1) on every row, then the rows
  g (1 - b1) are scatter-added (v likewise with g^2); var moves on every row.
* Keras 3 (TF backend): the IndexedSlices is densified inside the elementwise ops, so m uses the
  summed rows, but v is fed with the squares of the raw rows summed per id (sum of g_i^2, not
  (sum of g_i)^2): the update is the dense formula with those two dense tensors.

Slots are created per variable (m(A), v(A), m(B), v(B), then the vhats); Keras 3's get_weights()
(`variables`) also lists the learning-rate variable after `iterations`.
"""
import numpy as np

from .adam import Adam
from .base import cast_via_f32, exact, power
from .config_values import as_bool, as_float
from .keras_new import Keras3Mixin, KerasNewOptimizer


class KerasAdam(KerasNewOptimizer):
    class_names = ("Adam",)
    default_name = "Adam"
    defaults = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "amsgrad": False}

    def parse(self):
        self.parse_learning_rate()
        for key in ("beta_1", "beta_2", "epsilon"):
            self.hp[key] = as_float(key, self.hp[key])
        self.hp["amsgrad"] = as_bool("amsgrad", self.hp["amsgrad"])

    def slot_names(self):
        return ["m", "v", "vhat"] if self.hp["amsgrad"] else ["m", "v"]

    def slot_groups(self):
        return [["m", "v"], ["vhat"]] if self.hp["amsgrad"] else [["m", "v"]]

    def prepare(self, iterations, dtype):
        T = np.dtype(dtype).type
        one = T(1)
        lr = self.decayed_lr(iterations, dtype)
        b1_power = power(cast_via_f32(self.hp["beta_1"], dtype), iterations + 1)
        b2_power = power(cast_via_f32(self.hp["beta_2"], dtype), iterations + 1)
        return {
            "lr_t": lr, "wd": self.weight_decay_coefficient(dtype),
            "alpha": lr * np.sqrt(one - b2_power) / (one - b1_power),
            "one_minus_b1": exact(1 - self.hp["beta_1"], dtype),   # Python double -> dtype
            "one_minus_b2": exact(1 - self.hp["beta_2"], dtype),
            "eps": exact(self.hp["epsilon"], dtype),
        }

    def apply_dense(self, bk, var, slots, grad, c):
        self.apply_weight_decay(bk, var, c)
        Adam.apply_dense(self, bk, var, slots, grad, c)   # the same incremental form and var update

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        """update_step on IndexedSlices (de-duplicated): decay everything, scatter-add, move all rows."""
        self.apply_weight_decay(bk, var, c)
        m, v = slots["m"], slots["v"]
        bk.assign(m, bk.read(m) + (-bk.read(m)) * c["one_minus_b1"])
        bk.scatter_add(m, ids, rows * c["one_minus_b1"])
        bk.assign(v, bk.read(v) + (-bk.read(v)) * c["one_minus_b2"])
        bk.scatter_add(v, ids, (rows * rows) * c["one_minus_b2"])
        self._move(bk, var, slots, c)

    def _move(self, bk, var, slots, c):
        v_t = bk.read(slots["v"])
        if self.hp["amsgrad"]:
            v_t = bk.maximum(bk.read(slots["vhat"]), v_t)
            bk.assign(slots["vhat"], v_t)
        bk.assign(var, bk.read(var) - (bk.read(slots["m"]) * c["alpha"]) / (bk.sqrt(v_t) + c["eps"]))


class Keras3Adam(Keras3Mixin, KerasAdam):
    default_name = "adam"
    defaults = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "amsgrad": False}

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        """Dense formula with densified g = sum of rows per id and g^2 = sum of squared rows per id.

        Untouched rows get g = 0, where m + (0 - m)(1 - b1) equals m + (-m)(1 - b1) bit for bit, so
        the whole tensor is decayed first and the touched rows are then recomputed from their old
        values (no dense gradient tensor is materialised)."""
        self.apply_weight_decay(bk, var, c)
        uniq, g = bk.unique_sum(ids, rows)
        _, g2 = bk.unique_sum(ids, rows * rows)
        for slot, grad, coef in (("m", g, c["one_minus_b1"]), ("v", g2, c["one_minus_b2"])):
            arr = slots[slot]
            old = bk.gather(arr, uniq)
            bk.assign(arr, bk.read(arr) + (-bk.read(arr)) * coef)
            bk.scatter_update(arr, uniq, old + (grad - old) * coef)
        self._move(bk, var, slots, c)

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        # only reached with already-unique ids: sum of squares == square of the (single) row
        self.apply_sparse_raw(bk, var, slots, ids, rows, c)
