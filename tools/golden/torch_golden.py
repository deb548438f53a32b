"""Golden trajectories of torch 2.13's sparse optimizers (CPU), written as tests/golden/torch/torch_*.npz.

Run in the project .venv (torch==2.13.0 from requirements-test.txt):

    .venv/bin/python tools/golden/torch_golden.py            # every torch_* case
    .venv/bin/python tools/golden/torch_golden.py adagrad    # the cases whose name contains it

One `torch.nn.Parameter` per table, gradients set as uncoalesced sparse COO tensors with the plan's
raw ids (unsorted, duplicated; an empty push is a sparse tensor with no entries), then
`optimizer.step()`. After every step the table, every state tensor (`exp_avg`, `exp_avg_sq`, `sum`)
and the parameter's step count are stored (FORMAT.md). torch has no get_weights(); `weights/<i>` is
what a sparseps server lists for the class: the step count, then the slots.

They live in their own folder because torch's float32/float64 sqrt is not correctly rounded (MKL):
tests/test_torch_conformance.py replays them with the bound docs/torch.md states for the values
that pass through a square root, and bit for bit (4 ulp) for everything else.

Plans: `table` (common.py: 24x3, empty pushes at steps 7 and 26, rows first touched at step 20,
row 22 never) and `dups` (24x3, 20 to 60 ids per push over few rows, so that ids occur three to
nine times in pushes longer than 16 ids: coalesce() then sums in the order of torch's unstable
introsort, which the server reproduces).
"""
import os
import platform
import sys

import numpy as np
import torch

from common import OUT_DIR, cast_plan, grad_kinds, plan_table_only, python_version, write_case

torch.set_num_threads(1)


def plan_dups(steps=30, seed=20261207):
    rng = np.random.RandomState(seed)
    init = {"emb": rng.normal(0.0, 0.1, size=(24, 3))}
    plan = []
    for k in range(steps):
        if k == 9:
            ids = np.zeros((0,), np.int64)
        else:
            hi = 8 if k < 15 else 24
            ids = rng.randint(0, hi, size=rng.randint(20, 61)).astype(np.int64)
        plan.append({"emb": ("sparse", ids, rng.normal(0.0, 0.1, size=(len(ids), 3)))})
    return init, plan


PLANS = {"table": plan_table_only, "dups": plan_dups}

# case -> (torch class, its kwargs, the server config, plan, dtypes)
CASES = {
    "torch_sparseadam": ("SparseAdam", {"lr": 0.01}, "table", ("float32", "float64")),
    "torch_sparseadam_custom": ("SparseAdam", {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-3}, "table", ("float32",)),
    "torch_sparseadam_dups": ("SparseAdam", {"lr": 0.01}, "dups", ("float32", "float64")),
    "torch_adagrad": ("Adagrad", {"lr": 0.1}, "table", ("float32", "float64")),
    "torch_adagrad_decay": ("Adagrad", {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.1, "eps": 1e-6},
                            "table", ("float32", "float64")),
    "torch_adagrad_dups": ("Adagrad", {"lr": 0.1}, "dups", ("float32",)),
    "torch_sgd": ("SGD", {"lr": 0.1}, "table", ("float32", "float64")),
    "torch_sgd_dups": ("SGD", {"lr": 0.1}, "dups", ("float32",)),
}
SERVER_CLASS = {"SparseAdam": "TorchSparseAdam", "Adagrad": "TorchAdagrad", "SGD": "TorchSGD"}
SLOTS = {"SparseAdam": ["exp_avg", "exp_avg_sq"], "Adagrad": ["sum"], "SGD": []}


def run_case(name, cls, kwargs, plan_name, dtype):
    init, plan = cast_plan(*PLANS[plan_name](), dtype)
    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    params = {v: torch.nn.Parameter(torch.from_numpy(init[v].copy()).to(tdt)) for v in init}
    opt = getattr(torch.optim, cls)(list(params.values()), **kwargs)
    arrays = {f"init/{v}": init[v] for v in init}
    for k, st in enumerate(plan):
        for v, p in params.items():
            if v in st:
                _, ids, rows = st[v]
                p.grad = torch.sparse_coo_tensor(torch.from_numpy(ids).reshape(1, -1), torch.from_numpy(rows),
                                                 tuple(p.shape))
            else:
                p.grad = None
        opt.step()
        for v, p in params.items():
            if v in st:
                arrays[f"step{k}/{v}/ids"] = st[v][1]
                arrays[f"step{k}/{v}/rows"] = st[v][2]
            arrays[f"step{k}/{v}/value"] = p.detach().numpy().copy()
            for s in SLOTS[cls]:
                arrays[f"step{k}/{v}/slot/{s}"] = opt.state[p][s].numpy().copy()
        p0 = next(iter(params.values()))
        step = opt.state[p0].get("step", k + 1) if cls != "SGD" else k + 1
        arrays[f"step{k}/iterations"] = np.array(int(float(step)), np.int64)
    order = [["iterations"]] + [[v, s] for s in SLOTS[cls] for v in params]
    arrays["weights/0"] = arrays[f"step{len(plan) - 1}/iterations"]
    for i, (v, s) in enumerate(order[1:], 1):
        arrays[f"weights/{i}"] = arrays[f"step{len(plan) - 1}/{v}/slot/{s}"]
    config = {k: (list(x) if isinstance(x, tuple) else x) for k, x in kwargs.items()}
    meta = {
        "reference": {"torch": torch.__version__, "python": python_version(), "machine": platform.machine(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "optimizer": {"class_name": SERVER_CLASS[cls], "config": config},
        "reference_class": f"torch.optim.{cls}",
        "reference_kwargs": config,
        "reference_get_config": None,
        "dtype": dtype,
        "variables": [{"name": v, "shape": list(init[v].shape)} for v in init],
        "slot_names": SLOTS[cls],
        "weights_order": order,
        "steps": len(plan),
        "grad_kinds": grad_kinds(plan),
        "tolerance_note": "torch's CPU sqrt (MKL VML) is up to 1 ulp from the correctly rounded one; values that "
                          "pass through it are within the golden tolerance, not bit-exact (docs/torch.md)",
    }
    return write_case(name, meta, arrays, out_dir=os.path.join(OUT_DIR, "torch"))


def main(argv):
    wanted = argv[1:]
    for case, (cls, kwargs, plan_name, dtypes) in CASES.items():
        for dtype in dtypes:
            name = f"{case}_{'f32' if dtype == 'float32' else 'f64'}"
            if wanted and not any(w in name for w in wanted):
                continue
            print("wrote", run_case(name, cls, kwargs, plan_name, dtype))


if __name__ == "__main__":
    main(sys.argv)
