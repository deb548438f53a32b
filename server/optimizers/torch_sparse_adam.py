"""torch.optim.SparseAdam (torch 2.13, CPU): Adam on the rows of a sparse gradient only.

Reference: pytorch/pytorch v2.13.0, torch/optim/sparse_adam.py and torch/optim/_functional.py
(`sparse_adam`). Shared torch details (step count, lr, coalesce, sqrt): torch_base.py.

    t = this table's step count (advances on every push that carries the table, empty or not)
    g = coalesce(grad)                            duplicates summed in torch.sort's order
    if g has no rows: nothing changes (t still advances)
    m_old, v_old = m[rows], v[rows]
    dm = (g - m_old) * f(1 - b1);   m[rows] = m_old + dm
    dv = (g*g - v_old) * f(1 - b2); v[rows] = v_old + dv
    denom = sqrt(v_old + dv) + f(eps)
    step_size = lr * sqrt(1 - b2**t) / (1 - b1**t)     Python float64, as torch computes it
    var[rows] = var[rows] + f(-step_size) * ((dm + m_old) / denom)

f(x) is a Python float rounded to the table's dtype (torch casts scalar operands to the tensor's
dtype). Every operation rounds separately: the adds of a coalesced sparse tensor are MKL axpy
with alpha 1 (a fused multiply-add by 1 is the plain sum). eps is not bias-corrected, unlike tfa
LazyAdam's order (`b1 m + (1 - b1) g`, float32 lr_t). Untouched rows keep var, m and v.
"""
import math

import numpy as np

from sparseps.errors import InvalidArgument

from . import scalar_math, torch_base as tb
from .config_values import as_float
from .torch_base import TorchOptimizer, coalesce, dtype_of


class TorchSparseAdam(TorchOptimizer):
    class_names = ("TorchSparseAdam",)
    defaults = {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "maximize": False}
    slot_kinds = ("exp_avg", "exp_avg_sq")
    lr_minimum_exclusive = True

    def parse(self):
        self.parse_lr()
        betas = self.hp["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise InvalidArgument(f"TorchSparseAdam: betas must be a pair of numbers, got {betas!r}")
        betas = [as_float(f"betas[{i}]", b) for i, b in enumerate(betas)]
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise InvalidArgument(f"TorchSparseAdam: Invalid beta parameter at index {i}: {b}")
        self.hp["betas"] = betas
        self.hp["eps"] = as_float("eps", self.hp["eps"])
        if not self.hp["eps"] > 0.0:
            raise InvalidArgument(f"TorchSparseAdam: Invalid epsilon value: {self.hp['eps']}")
        self.parse_maximize()

    def prepare(self, iterations, dtype):
        # Python floats: the backends keep them as they are (no device constants)
        b1, b2 = self.hp["betas"]
        step = iterations + 1
        lr = self.current_lr()
        # b ** step as torch's Python float ** (libm's pow), but correctly rounded (scalar_math):
        # libm's pow has FMA and non-FMA builds, and replicas on two machines must agree
        b1_t = float(scalar_math.pow(np.float64(b1), step, np.float64))
        b2_t = float(scalar_math.pow(np.float64(b2), step, np.float64))
        return {"step_size": lr * math.sqrt(1 - b2_t) / (1 - b1_t),
                "one_minus_b1": 1 - b1, "one_minus_b2": 1 - b2, "eps": self.hp["eps"]}

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        T = dtype_of(var).type
        ids, g = coalesce(ids, np.asarray(rows, dtype_of(var)))
        if len(ids) == 0:
            return
        m_old = bk.to_numpy(slots["exp_avg"], ids)
        v_old = bk.to_numpy(slots["exp_avg_sq"], ids)
        dm = (g - m_old) * T(c["one_minus_b1"])
        dv = (g * g - v_old) * T(c["one_minus_b2"])
        bk.scatter_update(slots["exp_avg"], ids, m_old + dm)
        bk.scatter_update(slots["exp_avg_sq"], ids, v_old + dv)
        denom = tb.sqrt(dv + v_old) + T(c["eps"])
        update = T(-c["step_size"]) * ((dm + m_old) / denom)
        bk.scatter_update(var, ids, bk.to_numpy(var, ids) + update)
