"""RMSprop (Hinton, Coursera lecture 6e). Reference: keras-team/keras 2.15,
keras/src/optimizers/legacy/rmsprop.py (optimizer_v2) with tensorflow 2.15 core/kernels/training_ops.cc
(ApplyRMSProp, ApplyCenteredRMSProp, SparseApply[Centered]RMSPropOp); Keras 3:
keras/src/optimizers/rmsprop.py (TF backend).

Legacy, momentum == 0 (Python ops in Keras; slots `rms`, centered also `mg`):
    rms = rho rms + (1 - rho) g^2;  (centered: mg = rho mg + (1 - rho) g;  d = rms - mg^2)
    var -= (lr g) / (sqrt(d) + eps)
    sparse: rms *= rho (and mg *= rho) on EVERY row, also on an empty push, then the rows'
    (g^2)(1 - rho) (and g (1 - rho)) are scatter-added; only the pushed rows of var move.
Legacy, momentum > 0 (the ApplyRMSProp / ApplyCenteredRMSProp kernels; slot `momentum` too):
    dense:  rms += (g^2 - rms)(1 - rho);  mg += (g - mg)(1 - rho);  d = (rms - mg^2) + eps
            mom = mom momentum + (g lr) / sqrt(d);  var -= mom
    sparse (the pushed rows only): rms = rms rho + g^2 (1 - rho);  mg = mg rho + g (1 - rho)
            d = (rms + eps) - mg^2;  mom = mom momentum + (rsqrt(d) lr) g;  var -= mom
    epsilon inside the square root here, outside it without momentum.
Keras 3 (slots `velocity`, `momentum`, `average_gradient`): eps inside the square root,
    velocity = rho velocity + (1 - rho) g^2, increment = (lr g) / sqrt(d), on every row; the
    IndexedSlices rows stay raw where Keras keeps them sparse (the increment, scatter-subtracted
    row by row without momentum) and are summed per id where they meet a dense tensor.
"""
import numpy as np

from sparseps.errors import InvalidArgument

from .base import Optimizer, exact, hyper
from .config_values import as_bool, as_float
from .keras_new import Keras3Mixin, KerasNewOptimizer


def _parse(opt, eps_default):
    opt.parse_learning_rate()
    opt.hp["rho"] = as_float("rho", opt.hp["rho"])
    m = opt.hp["momentum"] = as_float("momentum", opt.hp["momentum"])
    if not 0 <= m <= 1:
        raise InvalidArgument(f"optimizer config key 'momentum': must be between [0, 1], got {m!r}")
    eps = as_float("epsilon", opt.hp["epsilon"], allow_none=eps_default is not None)
    opt.hp["epsilon"] = (eps or eps_default) if eps_default is not None else eps
    opt.hp["centered"] = as_bool("centered", opt.hp["centered"])


class RMSprop(Optimizer):
    class_names = ("RMSprop",)
    defaults = {"learning_rate": 0.001, "decay": 0.0, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7,
                "centered": False}

    def parse(self):
        _parse(self, 1e-7)   # optimizer_v2: `epsilon or backend_config.epsilon()`

    def slot_names(self):
        return ["rms"] + (["momentum"] if self.hp["momentum"] > 0 else []) + (["mg"] if self.hp["centered"] else [])

    def prepare(self, iterations, dtype):
        T = np.dtype(dtype).type
        lr, rho = self.decayed_lr(iterations, dtype), hyper(self.hp["rho"], dtype)
        return {"lr_t": lr, "neg_lr_t": -lr, "rho": rho, "one_minus_rho": T(1) - rho,
                "momentum": hyper(self.hp["momentum"], dtype), "eps": exact(self.hp["epsilon"], dtype)}

    def apply_dense(self, bk, var, slots, grad, c):
        rms, omr = slots["rms"], c["one_minus_rho"]
        centered = self.hp["centered"]
        if self.hp["momentum"] > 0:   # ApplyRMSProp / ApplyCenteredRMSProp
            bk.assign(rms, bk.read(rms) + (grad * grad - bk.read(rms)) * omr)
            d = bk.read(rms)
            if centered:
                mg = slots["mg"]
                bk.assign(mg, bk.read(mg) + (grad - bk.read(mg)) * omr)
                d = d - bk.read(mg) * bk.read(mg)
            mom = slots["momentum"]
            bk.assign(mom, bk.read(mom) * c["momentum"] + (grad * c["lr_t"]) / bk.sqrt(d + c["eps"]))
            bk.assign(var, bk.read(var) - bk.read(mom))
            return
        bk.assign(rms, c["rho"] * bk.read(rms) + omr * (grad * grad))
        d = bk.read(rms)
        if centered:
            mg = slots["mg"]
            bk.assign(mg, c["rho"] * bk.read(mg) + omr * grad)
            d = d - bk.read(mg) * bk.read(mg)
        bk.assign(var, bk.read(var) - (c["lr_t"] * grad) / (bk.sqrt(d) + c["eps"]))

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        momentum = self.hp["momentum"] > 0
        if not momentum:   # the slots decay on every row, whatever was pushed
            bk.assign(slots["rms"], bk.read(slots["rms"]) * c["rho"])
            if self.hp["centered"]:
                bk.assign(slots["mg"], bk.read(slots["mg"]) * c["rho"])
        fused = bk.kernel("rmsprop")
        if fused is None:
            uniq, summed = bk.unique_sum(ids, rows)
            return self._rows(bk, var, slots, uniq, summed, c)
        fused(var, slots["rms"], slots.get("mg"), slots.get("momentum"), ids, rows, c["lr_t"], c["rho"],
              c["one_minus_rho"], c["momentum"], c["eps"])

    def apply_sparse(self, bk, var, slots, ids, rows, c):   # reached through Lookahead
        if self.hp["momentum"] <= 0:
            bk.assign(slots["rms"], bk.read(slots["rms"]) * c["rho"])
            if self.hp["centered"]:
                bk.assign(slots["mg"], bk.read(slots["mg"]) * c["rho"])
        self._rows(bk, var, slots, ids, rows, c)

    def _rows(self, bk, var, slots, ids, rows, c):
        """The pushed (unique) rows; without momentum the slots have already decayed."""
        rms, omr = slots["rms"], c["one_minus_rho"]
        centered = self.hp["centered"]
        if self.hp["momentum"] > 0:   # SparseApplyRMSProp / SparseApplyCenteredRMSProp
            ms = bk.gather(rms, ids) * c["rho"] + (rows * rows) * omr
            bk.scatter_update(rms, ids, ms)
            d = ms + c["eps"]
            if centered:
                mg = bk.gather(slots["mg"], ids) * c["rho"] + rows * omr
                bk.scatter_update(slots["mg"], ids, mg)
                d = d - mg * mg
            mom = bk.gather(slots["momentum"], ids) * c["momentum"] + ((1 / bk.sqrt(d)) * c["lr_t"]) * rows
            bk.scatter_update(slots["momentum"], ids, mom)
            bk.scatter_update(var, ids, bk.gather(var, ids) - mom)
            return
        ms = bk.gather(rms, ids) + (rows * rows) * omr
        bk.scatter_update(rms, ids, ms)
        d = ms
        if centered:
            mg = bk.gather(slots["mg"], ids) + rows * omr
            bk.scatter_update(slots["mg"], ids, mg)
            d = d - mg * mg
        bk.scatter_update(var, ids, bk.gather(var, ids) + (c["neg_lr_t"] * rows) / (bk.sqrt(d) + c["eps"]))


class Keras3RMSprop(Keras3Mixin, KerasNewOptimizer):
    class_names = ("RMSprop",)
    default_name = "rmsprop"
    defaults = {"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False}

    def parse(self):
        _parse(self, None)
        super().parse()

    def slot_names(self):
        return (["velocity"] + (["momentum"] if self.hp["momentum"] > 0 else [])
                + (["average_gradient"] if self.hp["centered"] else []))

    def prepare(self, iterations, dtype):
        T = np.dtype(dtype).type
        hp = self.hp
        return {"lr_t": self.decayed_lr(iterations, dtype), "wd": self.weight_decay_coefficient(dtype),
                "rho": T(hp["rho"]), "one_minus_rho": T(1 - hp["rho"]), "momentum": T(hp["momentum"]),
                "eps": T(hp["epsilon"])}

    def _denominator(self, bk, slots, c):
        vel = bk.read(slots["velocity"])
        if self.hp["centered"]:
            avg = bk.read(slots["average_gradient"])
            return (vel - avg * avg) + c["eps"]
        return vel + c["eps"]

    def apply_dense(self, bk, var, slots, grad, c):
        self.apply_weight_decay(bk, var, c)
        vel = slots["velocity"]
        bk.assign(vel, c["rho"] * bk.read(vel) + c["one_minus_rho"] * (grad * grad))
        if self.hp["centered"]:
            avg = slots["average_gradient"]
            bk.assign(avg, c["rho"] * bk.read(avg) + c["one_minus_rho"] * grad)
        increment = (c["lr_t"] * grad) / bk.sqrt(self._denominator(bk, slots, c))
        if self.hp["momentum"] > 0:
            mom = slots["momentum"]
            bk.assign(mom, c["momentum"] * bk.read(mom) + increment)
            increment = bk.read(mom)
        bk.assign(var, bk.read(var) - increment)

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        """rho * slot is dense; the rows' terms join it summed per id (IndexedSlices densified)."""
        self.apply_weight_decay(bk, var, c)
        for slot, values in (("velocity", (rows * rows)), ("average_gradient", rows)):
            if slot in slots:
                uniq, summed = bk.unique_sum(ids, c["one_minus_rho"] * values)
                bk.assign(slots[slot], c["rho"] * bk.read(slots[slot]))
                bk.scatter_add(slots[slot], uniq, summed)
        increment = (c["lr_t"] * rows) / bk.gather(bk.sqrt(self._denominator(bk, slots, c)), ids)
        if self.hp["momentum"] > 0:
            mom = slots["momentum"]
            uniq, summed = bk.unique_sum(ids, increment)
            bk.assign(mom, c["momentum"] * bk.read(mom))
            bk.scatter_add(mom, uniq, summed)
            bk.assign(var, bk.read(var) - bk.read(mom))
        else:
            bk.scatter_add_raw(var, ids, -increment)

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        self.apply_sparse_raw(bk, var, slots, ids, rows, c)
