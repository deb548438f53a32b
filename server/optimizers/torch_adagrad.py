"""torch.optim.Adagrad with sparse gradients (torch 2.13, CPU).

Reference: pytorch/pytorch v2.13.0, torch/optim/adagrad.py (`_single_tensor_adagrad`, which the
foreach path falls back to for sparse gradients). Shared torch details: torch_base.py.

    sum starts at f(initial_accumulator_value)    (torch.full_like(param, value))
    t = this table's step count, as torch's float32 step tensor holds it (stops at 2**24)
    clr = lr / (1 + (t - 1) * lr_decay)           Python float64
    g = coalesce(grad)
    sum[rows] += g*g
    std = sqrt(sum[rows]) + f(eps)                 eps outside the square root (Keras 3: inside)
    var[rows] = fma(f(-clr), g / std, var[rows])   add_(..., alpha=-clr): MKL axpy, fused

weight_decay with sparse gradients raises in torch ("not compatible with sparse gradients"); this
class has no such key. An empty gradient changes nothing but still counts a step.
"""
import numpy as np

from sparseps.errors import InvalidArgument

from . import torch_base as tb
from .config_values import as_float
from .torch_base import TorchOptimizer, coalesce, dtype_of, fma

F32_STEP_LIMIT = 2 ** 24   # a float32 counter at 2**24 stays there (2**24 + 1 rounds back)


class TorchAdagrad(TorchOptimizer):
    class_names = ("TorchAdagrad",)
    defaults = {"lr": 0.01, "lr_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10, "maximize": False}
    slot_kinds = ("sum",)

    def parse(self):
        self.parse_lr()
        for key in ("lr_decay", "initial_accumulator_value", "eps"):
            self.hp[key] = as_float(key, self.hp[key])
            if self.hp[key] < 0:
                raise InvalidArgument(f"TorchAdagrad: Invalid {key} value: {self.hp[key]}")
        self.parse_maximize()

    def initial_slot(self, bk, var, slot):
        arr = bk.zeros_like(var)
        bk.assign(arr, bk.read(arr) + dtype_of(var).type(self.hp["initial_accumulator_value"]))
        return arr

    def prepare(self, iterations, dtype):
        step = float(min(iterations + 1, F32_STEP_LIMIT))
        return {"clr": self.current_lr() / (1 + (step - 1) * self.hp["lr_decay"]), "eps": self.hp["eps"]}

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        T = dtype_of(var).type
        ids, g = coalesce(ids, np.asarray(rows, dtype_of(var)))
        if len(ids) == 0:
            return
        acc = bk.to_numpy(slots["sum"], ids) + g * g
        bk.scatter_update(slots["sum"], ids, acc)
        std = tb.sqrt(acc) + T(c["eps"])
        bk.scatter_update(var, ids, fma(T(-c["clr"]), g / std, bk.to_numpy(var, ids)))
