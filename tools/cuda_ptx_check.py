"""Compile every fused CUDA kernel to PTX for a real device and count FMA instructions (must be 0).

Needs libNVVM (CUDA_HOME pointing at a toolkit, e.g. the `nvidia-cuda-nvcc-cu12` wheel's
`nvidia/cuda_nvcc` directory), not a GPU. NVVM contracts `a * b + c` into `fma.rn` by default even
with fastmath=False; the kernels use libdevice's `*_rn` intrinsics so that nothing is fused. Prints
one line per kernel and exits 1 if any FMA appears.

    CUDA_HOME=.../nvidia/cuda_nvcc NUMBA_ENABLE_CUDASIM=0 python tools/cuda_ptx_check.py [--cc 9.0]
"""
import argparse
import re
import sys

import numpy as np


def signatures(nt):
    from numba.core import types as t
    A = t.Array(nt, 2, "C")
    i64, i32, b = t.Array(t.int64, 1, "C"), t.Array(t.int32, 1, "C"), t.boolean
    return {
        "gather": (A, i64, A), "scatter": (A, i64, A, t.int64), "scatter_add_grouped": (A, i64, i64, i64, A),
        "move_rows": (A, i64, i64), "mark": (i32, i64, b),
        "lazy_adam": (A, A, A, i64, A) + (nt,) * 7,
        "moments_sparse": (A, A, A, A, i32, A) + (nt,) * 5 + (b, b) + (nt,) * 6 + (b, b),
        "adam_dense": (A, A, A, A, A) + (nt,) * 4 + (b,),
        "radam_dense": (A, A, A, A, A) + (nt,) * 10 + (b,) * 3,
        "momentum_sparse": (A, A, i64, A, nt, nt, b),
        "sgd_dense": (A, A, A, nt, nt, b, b),
        "lookahead_sync": (A, A, nt),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cc", default="9.0", help="compute capability to compile for (default 9.0, H100/H200)")
    args = p.parse_args(argv)
    cc = tuple(int(x) for x in args.cc.split("."))
    from numba import cuda
    from numba.core import types as t

    from sparseps.server.backends import cuda_kernels as ck
    if ck.SIMULATOR:
        raise SystemExit("NUMBA_ENABLE_CUDASIM is set: the simulator compiles nothing (set it to 0)")
    fmas = 0
    for dt, nt in ((np.float32, t.float32), (np.float64, t.float64)):
        ks = ck.kernels(dt)
        for name, sig in signatures(nt).items():
            ptx, _ = cuda.compile_ptx(getattr(ks, name).py_func, sig, cc=cc, fastmath=False)
            n = len(re.findall(r"\bfma\.", ptx))
            fmas += n
            print(f"{np.dtype(dt).name:8s} {name:20s} fma {n}  mul.rn {len(re.findall(r'mul.rn', ptx)):3d}  "
                  f"add.rn {len(re.findall(r'add.rn', ptx)):3d}  div.rn {len(re.findall(r'div.rn', ptx)):3d}  "
                  f"sqrt.rn {len(re.findall(r'sqrt.rn', ptx)):3d}")
    print(f"fma instructions in all kernels: {fmas}")
    return 1 if fmas else 0


if __name__ == "__main__":
    sys.exit(main())
