"""tfa.optimizers.RectifiedAdam (tensorflow-addons 0.23), Liu et al. 2019, "On the Variance of the
Adaptive Learning Rate and Beyond" (arXiv:1908.03265).

Reference: tensorflow/addons v0.23.0, tensorflow_addons/optimizers/rectified_adam.py.

    t = iterations + 1;   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t);   v_hat = sqrt(v / (1 - b2^t))       (amsgrad: vhat = max(vhat, v))
    sma_inf = 2 / (1 - b2) - 1;   sma_t = sma_inf - 2 t b2^t / (1 - b2^t)
    r_t = sqrt((sma_t - 4)/(sma_inf - 4) * (sma_t - 2)/(sma_inf - 2) * sma_inf/sma_t)
    step = r_t m_hat / (v_hat + eps)  if sma_t >= sma_threshold  else  m_hat
    step += wd var   (if weight_decay != 0; decoupled, scaled by the learning rate below)
    var -= lr_t step

lr_t is the (scheduled, `decay`ed) learning rate, then, with total_steps > 0, linear warmup over
total_steps * warmup_proportion steps and linear decay to min_lr. Coefficients follow tfa 0.23's
`_prepare_local` operation by operation (reciprocals multiplied, in the variable dtype).

Sparse gradients are a hybrid: m, v (and vhat) decay on every row and the summed gradient rows are
scatter-added; the step is evaluated for the touched rows only and only those rows of var are
written. Untouched rows keep var (no weight decay either) while their moments decay.

`sma_threshold < 4` lets a step with threshold <= sma_t < 4 through, where r_t is the square root
of a negative number: the touched rows become NaN, exactly like the reference.
"""
import numpy as np

from . import schedules
from .base import Optimizer, exact, hyper, power
from .config_values import as_bool, as_float, as_int


class RectifiedAdam(Optimizer):
    class_names = ("RectifiedAdam", "Addons>RectifiedAdam")
    keras_module = "tensorflow_addons.optimizers.rectified_adam"
    registered_name = "Addons>RectifiedAdam"
    defaults = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "decay": 0.0, "weight_decay": 0.0,
                "sma_threshold": 5.0, "epsilon": 1e-7, "amsgrad": False, "total_steps": 0,
                "warmup_proportion": 0.1, "min_lr": 0.0}

    def parse(self):
        self.parse_learning_rate()
        for key in ("beta_1", "beta_2", "sma_threshold", "warmup_proportion", "min_lr"):
            self.hp[key] = as_float(key, self.hp[key])
        wd = self.hp["weight_decay"]
        self.hp["weight_decay"] = (schedules.from_config(wd, "weight_decay") if isinstance(wd, dict)
                                   else as_float("weight_decay", wd))
        # tfa: `self.epsilon = epsilon or tf.keras.backend.epsilon()`
        self.hp["epsilon"] = as_float("epsilon", self.hp["epsilon"], allow_none=True) or 1e-7
        self.hp["amsgrad"] = as_bool("amsgrad", self.hp["amsgrad"])
        self.hp["total_steps"] = as_int("total_steps", self.hp["total_steps"], minimum=0)
        # tfa: `self._has_weight_decay = weight_decay != 0.0` (a schedule always counts)
        self.has_weight_decay = isinstance(self.hp["weight_decay"], schedules.Schedule) or self.hp["weight_decay"] != 0

    def slot_names(self):
        return ["m", "v", "vhat"] if self.hp["amsgrad"] else ["m", "v"]

    def decayed_wd(self, iterations, dtype):
        wd = self.hp["weight_decay"]
        if isinstance(wd, schedules.Schedule):
            return np.dtype(dtype).type(wd(iterations))
        return hyper(wd, dtype)

    def prepare(self, iterations, dtype):
        """RectifiedAdam._prepare_local, in the variable dtype, in tfa's operation order."""
        T = np.dtype(dtype).type
        one, two = T(1), T(2)
        lr_t = self.decayed_lr(iterations, dtype)
        wd_t = self.decayed_wd(iterations, dtype)
        b1, b2 = hyper(self.hp["beta_1"], dtype), hyper(self.hp["beta_2"], dtype)
        local_step = T(iterations + 1)
        b1_power, b2_power = power(b1, iterations + 1), power(b2, iterations + 1)
        one_minus_b1 = one - b1
        recip_1 = one / (one - b1_power)
        one_minus_b2 = one - b2
        recip_2 = one / (one - b2_power)
        sma_inf = two / one_minus_b2 - one
        sma_t = sma_inf - two * local_step * b2_power * recip_2
        with np.errstate(invalid="ignore", divide="ignore"):
            r_t = np.sqrt((sma_t - T(4)) / (sma_inf - T(4)) * (sma_t - two) / (sma_inf - two) * sma_inf / sma_t)
        rectify = bool(sma_t >= hyper(self.hp["sma_threshold"], dtype))
        if self.hp["total_steps"] > 0:  # a Python-level check on the constructor value in tfa
            total_steps = hyper(float(self.hp["total_steps"]), dtype)
            warmup_steps = total_steps * hyper(self.hp["warmup_proportion"], dtype)
            min_lr = hyper(self.hp["min_lr"], dtype)
            decay_steps = max(total_steps - warmup_steps, one)
            decay_rate = (min_lr - lr_t) / decay_steps
            if local_step <= warmup_steps:
                lr_t = lr_t * (local_step / warmup_steps)
            else:
                lr_t = lr_t + decay_rate * min(local_step - warmup_steps, decay_steps)
        return {
            "lr_t": lr_t, "neg_lr_t": -lr_t, "wd_t": wd_t, "b1": b1, "b2": b2,
            "one_minus_b1": one_minus_b1, "one_minus_b2": one_minus_b2,
            "recip_1": recip_1, "recip_2": recip_2, "r_t": r_t, "rectify": rectify,
            "eps": exact(self.hp["epsilon"], dtype),
        }

    def _step(self, bk, m, v, c):
        """The update direction from (already updated) m and v (or vhat) values."""
        m_corr = m * c["recip_1"]
        v_corr = bk.sqrt(v * c["recip_2"])
        if c["rectify"]:
            return (c["r_t"] * m_corr) / (v_corr + c["eps"])
        return m_corr

    def apply_dense(self, bk, var, slots, grad, c):
        m, v = slots["m"], slots["v"]
        fused = bk.kernel("radam_dense")
        if fused is not None:
            return fused(var, m, v, slots["vhat"] if self.hp["amsgrad"] else None, grad, c, self.has_weight_decay)
        m_t = c["b1"] * bk.read(m) + c["one_minus_b1"] * grad
        bk.assign(m, m_t)
        v_t = c["b2"] * bk.read(v) + c["one_minus_b2"] * (grad * grad)
        bk.assign(v, v_t)
        if self.hp["amsgrad"]:
            v_t = bk.maximum(bk.read(slots["vhat"]), v_t)
            bk.assign(slots["vhat"], v_t)
        var_t = self._step(bk, m_t, v_t, c)
        if self.has_weight_decay:
            var_t = var_t + c["wd_t"] * bk.read(var)
        bk.assign(var, bk.read(var) - c["lr_t"] * var_t)

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        m, v = slots["m"], slots["v"]
        fused = bk.kernel("radam_sparse")
        if fused is not None:
            return fused(var, m, v, slots["vhat"] if self.hp["amsgrad"] else None, ids, rows, c,
                         self.has_weight_decay)
        bk.assign(m, bk.read(m) * c["b1"])
        bk.scatter_add(m, ids, rows * c["one_minus_b1"])
        bk.assign(v, bk.read(v) * c["b2"])
        bk.scatter_add(v, ids, (rows * rows) * c["one_minus_b2"])
        if self.hp["amsgrad"]:
            bk.assign(slots["vhat"], bk.maximum(bk.read(slots["vhat"]), bk.read(v)))
            v = slots["vhat"]
        # tfa evaluates the step for the whole tensor and gathers the touched rows; elementwise
        # math commutes with the gather, so evaluating it on the gathered rows is bit-identical.
        var_t = self._step(bk, bk.gather(m, ids), bk.gather(v, ids), c)
        if self.has_weight_decay:
            var_t = var_t + c["wd_t"] * bk.gather(var, ids)
        bk.scatter_add(var, ids, c["neg_lr_t"] * var_t)

    def get_config(self):
        cfg = super().get_config()
        cfg["total_steps"] = int(self.hp["total_steps"])
        return cfg

