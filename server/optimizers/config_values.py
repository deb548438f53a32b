"""One optimizer or schedule config value at a time: the right type and range, or an
INVALID_ARGUMENT that names the key. Shared by base.py and schedules.py."""
import math

from sparseps.errors import InvalidArgument


def type_error(key, value, want):
    return InvalidArgument(f"optimizer config key {key!r}: expected {want}, got {value!r} ({type(value).__name__})")


def as_float(key, value, *, allow_none=False, minimum=None):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error(key, value, "a number")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidArgument(f"optimizer config key {key!r}: {value!r} is not a finite number")
    if minimum is not None and v < minimum:
        raise InvalidArgument(f"optimizer config key {key!r}: {value!r} must be >= {minimum}")
    return v


def as_bool(key, value):
    if not isinstance(value, bool):
        raise type_error(key, value, "true or false")
    return value


def as_int(key, value, minimum=None):
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise type_error(key, value, "an integer")
    v = int(value)
    if minimum is not None and v < minimum:
        raise InvalidArgument(f"optimizer config key {key!r}: {value!r} must be >= {minimum}")
    return v
