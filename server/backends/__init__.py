"""Where variables and slots live and how the optimizers' array math runs.

`numba` (default on CPU): numpy arrays with fused per-row kernels for the hot sparse paths.
`numpy`: the same arrays with plain numpy math only (the readable baseline).
`tensorflow`: tf.Variables on a TensorFlow device, on the GPU when there is one.
`cuda`: numba.cuda device arrays with fused CUDA kernels (`auto` picks it when numba sees a
CUDA device; the CUDA simulator never counts as one).
"""


def _cuda_visible() -> bool:
    try:
        from numba import cuda
        from numba.core import config
        return not config.ENABLE_CUDASIM and cuda.is_available()
    except Exception:   # no numba, no driver, a broken toolkit: not a CUDA machine for us
        return False


def create(name: str = "auto", device: str | None = None, device_memory_budget: int | None = None):
    """device_memory_budget: bytes of device memory the cuda backend may hold (None: its default)."""
    if name == "auto" and _cuda_visible():
        name = "cuda"
    if name == "auto":
        try:
            import tensorflow as tf  # noqa: F401  (only to ask for a GPU)
            if tf.config.list_physical_devices("GPU"):
                name = "tensorflow"
        except ImportError:
            pass
        if name == "auto":
            try:
                import numba  # noqa: F401
                name = "numba"
            except ImportError:
                name = "numpy"
    if name == "numpy":
        from .numpy_backend import NumpyBackend
        return NumpyBackend()
    if name == "numba":
        from .numpy_backend import NumbaBackend
        return NumbaBackend()
    if name == "cuda":
        from .cuda_backend import CudaBackend
        return CudaBackend(device, device_memory_budget)
    if name in ("tensorflow", "tf"):
        from .tf_backend import TensorFlowBackend
        return TensorFlowBackend(device)
    raise ValueError(f"unknown backend {name!r} (numba, numpy, tensorflow, cuda or auto)")


def compile_kernels() -> float:
    """Compile every CPU kernel a shard runs (or load it from numba's on-disk cache); returns the
    seconds it took. A cold compile is about a minute on two cores, a cache load about a second:
    setup and the image build run this once (`sparseps-server --compile-kernels`), so no shard's
    first start -- and no test's server -- waits on the compiler."""
    import time
    t0 = time.perf_counter()
    try:
        import numba  # noqa: F401
    except ImportError:
        return 0.0
    from .. import keyindex
    from .numpy_backend import NumbaBackend
    NumbaBackend()
    keyindex.warmup()
    return time.perf_counter() - t0
