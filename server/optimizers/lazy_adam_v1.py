"""TF1 `tf.contrib.opt.LazyAdamOptimizer` (TensorFlow 1.15, contrib commit 6fca0304), the lazy
variant of `tf.train.AdamOptimizer` (Kingma & Ba 2014).

Reference: tensorflow/tensorflow v1.15.5, tensorflow/contrib/opt/python/training/lazy_adam_optimizer.py.

    lr_t = lr * sqrt(1 - beta2_power) / (1 - beta1_power)
    sparse, for each pushed row r (duplicates summed first), untouched rows frozen:
        m[r] = beta1 m[r] + (1 - beta1) g[r];  v[r] = beta2 v[r] + (1 - beta2) g[r]^2
        var[r] -= lr_t m[r] / (sqrt(v[r]) + epsilon)
    dense: the fused ApplyAdam kernel (m += (g - m)(1 - beta1), ...), every element
    after every push: beta1_power *= beta1;  beta2_power *= beta2

The bias correction does not come from a step counter: `beta1_power` / `beta2_power` are non-slot
float32 variables that start at beta1 / beta2 and are multiplied once per push after all updates,
so step t uses the float32 product of t betas (not pow(beta, t)). They are kept in
`OptimizerState.nonslot` (settable through set_weights). learning_rate, beta1, beta2 and epsilon
are float32 tensors cast to the variable dtype (float64 runs see float32-rounded values, epsilon
included). There is no clipping, decay or schedule, and epsilon defaults to 1e-8.

get_weights() is TF1's `Optimizer.variables()`: sorted by TF variable name, i.e. beta1_power,
beta2_power, then `<var>/Adam` (m) and `<var>/Adam_1` (v) per variable; there is no iterations
entry (the server still counts pushes, like a `global_step` passed to apply_gradients).
"""
import numpy as np

from .base import F32, hyper
from .config_values import as_bool, as_float
from .lazy_adam import LazyAdam

TF1_SLOT_NAMES = {"m": "Adam", "v": "Adam_1"}


class LazyAdamV1(LazyAdam):
    class_names = ("LazyAdamOptimizer",)
    defaults = {"learning_rate": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}
    base_keys = ("name", "use_locking")
    nonslot_names = ("beta1_power", "beta2_power")
    legacy_keras = False
    keras_module = None

    def parse_base(self, config):
        self.parse_name(config, default="Adam")  # AdamOptimizer's default name
        self.use_locking = as_bool("use_locking", config.pop("use_locking", False))
        self.clipnorm = self.clipvalue = self.global_clipnorm = None
        self.decay = 0.0

    def parse(self):
        for key in ("learning_rate", "beta1", "beta2", "epsilon"):
            self.hp[key] = as_float(key, self.hp[key])
        self.hp["amsgrad"] = False   # for the inherited Adam/LazyAdam applies
        self._nonslot = None

    def slot_names(self):
        return ["m", "v"]

    def slot_groups(self):
        return [["m", "v"]]

    def weights_entries(self, pairs):
        named = [(f"{n}:0", n) for n in self.nonslot_names]
        named += [(f"{v}/{TF1_SLOT_NAMES[s]}:0", f"{v}/{s}") for v, s in pairs]
        return [entry for _, entry in sorted(named)]

    def initial_nonslot(self):
        # The dict becomes OptimizerState.nonslot, which is only ever updated in place (pushes,
        # set_weights, checkpoint restore): keeping a reference lets prepare() read the powers.
        self._nonslot = {"beta1_power": float(F32(self.hp["beta1"])), "beta2_power": float(F32(self.hp["beta2"]))}
        return self._nonslot

    def prepare(self, iterations, dtype):
        T = np.dtype(dtype).type
        one = T(1)
        b1_power = T(F32(self._nonslot["beta1_power"]))
        b2_power = T(F32(self._nonslot["beta2_power"]))
        lr_t = hyper(self.hp["learning_rate"], dtype)
        b1, b2 = hyper(self.hp["beta1"], dtype), hyper(self.hp["beta2"], dtype)
        # both the sparse rule and the ApplyAdam kernel: (lr * sqrt(1 - b2p)) / (1 - b1p)
        lr = lr_t * np.sqrt(one - b2_power) / (one - b1_power)
        return {"lr_t": lr_t, "b1": b1, "b2": b2, "b1_power": b1_power, "b2_power": b2_power,
                "one_minus_b1": one - b1, "one_minus_b2": one - b2,
                "eps": hyper(self.hp["epsilon"], dtype), "lr": lr, "alpha": lr}

    def finish(self, nonslot):
        """AdamOptimizer._finish: both powers times their beta, in float32, once per push."""
        self._nonslot = nonslot
        nonslot["beta1_power"] = float(F32(nonslot["beta1_power"]) * F32(self.hp["beta1"]))
        nonslot["beta2_power"] = float(F32(nonslot["beta2_power"]) * F32(self.hp["beta2"]))

    def get_config(self):
        cfg = {key: self.hp[key] for key in self.defaults}
        cfg["use_locking"] = self.use_locking
        cfg["name"] = self.name
        return cfg
