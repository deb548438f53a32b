"""ndarray <-> wire Tensor: raw little-endian bytes with dtype and shape, no per-element fields."""
import numpy as np

from sparseps.errors import InvalidArgument
from sparseps.proto import sparseps_pb2 as pb

_TO_WIRE = {
    np.dtype("float32"): pb.FLOAT32,
    np.dtype("float64"): pb.FLOAT64,
    np.dtype("int32"): pb.INT32,
    np.dtype("int64"): pb.INT64,
}
_FROM_WIRE = {v: k.newbyteorder("<") for k, v in _TO_WIRE.items()}
DTYPE_NAMES = {pb.FLOAT32: "float32", pb.FLOAT64: "float64", pb.INT32: "int32", pb.INT64: "int64"}


def wire_dtype(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _TO_WIRE:
        raise InvalidArgument(f"dtype {dt} is not supported (use float32, float64, int32 or int64)")
    return _TO_WIRE[dt]


def to_tensor(array, out: "pb.Tensor | None" = None) -> "pb.Tensor":
    a = np.asarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    t = out if out is not None else pb.Tensor()
    t.dtype = wire_dtype(a.dtype)
    t.shape[:] = a.shape
    t.data = np.ascontiguousarray(a).tobytes()
    return t


def check_tensor(t: "pb.Tensor", what: str = "tensor") -> tuple:
    """(numpy dtype, shape) of a wire Tensor whose dtype and shape make sense; else InvalidArgument."""
    if t.dtype not in _FROM_WIRE:
        raise InvalidArgument(f"{what}: unknown dtype code {t.dtype} (expected float32, float64, int32 or int64)")
    shape = tuple(int(s) for s in t.shape)
    if len(shape) > 32:
        raise InvalidArgument(f"{what}: {len(shape)} dimensions, at most 32 are supported")
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {list(shape)}")
    return _FROM_WIRE[t.dtype], shape


def elements(shape, limit: int | None = None) -> int:
    """The product of shape, counted only until it passes `limit` (a hostile shape never builds a
    huge number): a result over limit means "more than limit"."""
    n = 1
    for s in shape:
        n *= s
        if limit is not None and n > limit:
            break
    return n


def from_tensor(t: "pb.Tensor", what: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """A read-only view of the tensor's bytes; every inconsistency is an InvalidArgument."""
    dt, shape = check_tensor(t, what)
    n = elements(shape, max_elements)
    if max_elements is not None and n > max_elements:
        raise InvalidArgument(f"{what}: shape {list(shape)} is larger than allowed")
    if n * dt.itemsize != len(t.data):
        raise InvalidArgument(
            f"{what}: shape {list(shape)} of {DTYPE_NAMES[t.dtype]} needs {n * dt.itemsize} bytes, got {len(t.data)}")
    try:
        return np.frombuffer(t.data, dtype=dt).reshape(shape)
    except ValueError as e:   # e.g. an empty tensor of shape [0, 2**63 - 1]: "array is too big"
        raise InvalidArgument(f"{what}: shape {list(shape)} is not supported ({e})") from None
