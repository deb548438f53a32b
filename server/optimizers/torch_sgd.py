"""torch.optim.SGD with sparse gradients and no momentum (torch 2.13, CPU).

Reference: pytorch/pytorch v2.13.0, torch/optim/sgd.py (`_single_tensor_sgd`) and
aten/src/ATen/native/sparse/SparseTensorMath.cpp (`add_out_dense_sparse_cpu`). Shared torch
details: torch_base.py.

    for each pushed row, in push order, duplicates NOT summed:
        var[id] = fma(f(-lr), g_row, var[id])       p.add_(grad, alpha=-lr): MKL axpy per row

torch does not coalesce here: an uncoalesced gradient is added row by row (the rows of one id in
the order they were pushed). Momentum, dampening, nesterov and weight_decay are not offered:
torch refuses weight_decay with sparse gradients, and its sparse momentum buffer keeps moving rows
that no longer appear (not a lazy update a sparse push can express).
"""
import numpy as np

from .torch_base import TorchOptimizer, dtype_of, fma


class TorchSGD(TorchOptimizer):
    class_names = ("TorchSGD",)
    defaults = {"lr": 0.001, "maximize": False}
    slot_kinds = ()

    def parse(self):
        self.parse_lr()
        self.parse_maximize()

    def prepare(self, iterations, dtype):
        return {"lr": self.current_lr()}

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0:
            return
        rows = np.asarray(rows, dtype_of(var))
        alpha = dtype_of(var).type(-c["lr"])
        uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        if counts.max() == 1:
            bk.scatter_update(var, ids, fma(alpha, rows, bk.to_numpy(var, ids)))
            return
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")         # push order within each id
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        rank = np.empty(len(ids), np.int64)
        rank[order] = np.arange(len(ids)) - starts[inverse[order]]
        acc = bk.to_numpy(var, uniq)
        for r in range(int(counts.max())):                 # the r-th row of every id, one fma each
            m = rank == r
            acc[inverse[m]] = fma(alpha, rows[m], acc[inverse[m]])
        bk.scatter_update(var, uniq, acc)
