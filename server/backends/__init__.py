"""Where variables and slots live and how the optimizers' array math runs.

`numba` (default on CPU): numpy arrays with fused per-row kernels for the hot sparse paths.
`numpy`: the same arrays with plain numpy math only (the readable baseline).
`tensorflow`: tf.Variables on a TensorFlow device, on the GPU when there is one.
`cuda`: numba.cuda device arrays with fused CUDA kernels (`auto` picks it when numba sees a
CUDA device; the CUDA simulator never counts as one).
"""


def gpu_present(proc: str = "/proc") -> bool:
    """Whether this machine shows an NVIDIA GPU to this process, asked without TensorFlow (whose
    import costs seconds and ~700 MB only to answer no): CUDA_VISIBLE_DEVICES hiding every device,
    then the driver's /proc entries, then `nvidia-smi -L`."""
    import os
    import shutil
    import subprocess
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    gpus = os.path.join(proc, "driver", "nvidia", "gpus")
    if os.path.isdir(gpus) and os.listdir(gpus):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _cuda_visible() -> bool:
    try:
        from numba import cuda
        from numba.core import config
        return not config.ENABLE_CUDASIM and cuda.is_available()
    except Exception:   # no numba, no driver, a broken toolkit: not a CUDA machine for us
        return False


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def resolve(name: str = "auto") -> str:
    """The backend `auto` stands for here: cuda on a GPU that numba's CUDA target can drive,
    else tensorflow on a GPU; on a machine without one, numba (or numpy), and TensorFlow is never
    imported to find that out (`--backend tensorflow` still runs it on the CPU, one flag away)."""
    if name != "auto":
        return name
    if gpu_present():
        if _cuda_visible():
            return "cuda"
        if _importable("tensorflow"):
            import tensorflow as tf
            if tf.config.list_physical_devices("GPU"):
                return "tensorflow"
    return "numba" if _importable("numba") else "numpy"


def create(name: str = "auto", device: str | None = None, device_memory_budget: int | None = None):
    """device_memory_budget: bytes of device memory the cuda backend may hold (None: its default)."""
    name = resolve(name)
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
