"""Keras learning-rate schedules, evaluated in float32 with the reference's operation order.

Reference: keras-team/keras v2.15.0, keras/src/optimizers/schedules/learning_rate_schedule.py.

The reference calls a schedule with the 0-based `iterations` and casts the float32 result to the
variable's dtype. Its pow, cos and log run on 0-d float32 tensors, i.e. libm's powf/cosf/logf;
here they are the correctly rounded values (scalar_math), the same on every machine.
"""
import copy
import math

import numpy as np

from sparseps.errors import InvalidArgument

from . import scalar_math
from .config_values import as_bool, as_float

F = np.float32
_TINY = F(np.finfo(np.float32).tiny)


def _f(x):
    return F(x)


def _pow(a, b):
    return scalar_math.pow(F(a), F(b), F)


def _cos(x):
    return scalar_math.cos(F(x), F)


def _log(x):
    return scalar_math.log(F(x), F)


class Schedule:
    class_name = ""
    keys: dict = {}  # key -> (default or REQUIRED, parser)

    def __init__(self, config: dict, where: str):
        config = dict(config)
        config.pop("name", None)
        unknown = set(config) - set(self.keys)
        if unknown:
            raise InvalidArgument(f"{where}: {self.class_name} got unexpected key(s) {sorted(unknown)}")
        self.cfg = {}
        for key, (default, parse) in self.keys.items():
            if key not in config and default is REQUIRED:
                raise InvalidArgument(f"{where}: {self.class_name} needs {key!r}")
            value = config.get(key, default)
            self.cfg[key] = parse(f"{where}.{key}", value) if value is not None else None

    def __call__(self, step):
        """The float32 value at the 0-based `step`, a subnormal flushed to zero as the reference's
        threads (FTZ) flush it."""
        v = F(self.value(step))
        return F(0.0) * v if abs(v) < _TINY else v


REQUIRED = object()


def _float(k, v):
    return as_float(k, v)


def _floats(k, v):
    if not isinstance(v, (list, tuple)):
        raise InvalidArgument(f"{k}: expected a list of numbers, got {v!r}")
    return [as_float(k, x) for x in v]


class ExponentialDecay(Schedule):
    class_name = "ExponentialDecay"
    keys = {"initial_learning_rate": (REQUIRED, _float), "decay_steps": (REQUIRED, _float),
            "decay_rate": (REQUIRED, _float), "staircase": (False, as_bool)}

    def value(self, step):
        c = self.cfg
        p = _f(step) / _f(c["decay_steps"])
        if c["staircase"]:
            p = F(math.floor(p))
        return _f(c["initial_learning_rate"]) * _pow(_f(c["decay_rate"]), p)


class InverseTimeDecay(Schedule):
    class_name = "InverseTimeDecay"
    keys = ExponentialDecay.keys

    def value(self, step):
        c = self.cfg
        p = _f(step) / _f(c["decay_steps"])
        if c["staircase"]:
            p = F(math.floor(p))
        return _f(c["initial_learning_rate"]) / (F(1) + _f(c["decay_rate"]) * p)


class PiecewiseConstantDecay(Schedule):
    class_name = "PiecewiseConstantDecay"
    keys = {"boundaries": (REQUIRED, _floats), "values": (REQUIRED, _floats)}

    def __init__(self, config, where):
        super().__init__(config, where)
        if len(self.cfg["values"]) != len(self.cfg["boundaries"]) + 1:
            raise InvalidArgument(f"{where}: PiecewiseConstantDecay needs one more value than boundaries")

    def value(self, step):
        b, v = self.cfg["boundaries"], self.cfg["values"]
        for i, bound in enumerate(b):
            if step <= bound:
                return _f(v[i])
        return _f(v[-1])


class PolynomialDecay(Schedule):
    class_name = "PolynomialDecay"
    keys = {"initial_learning_rate": (REQUIRED, _float), "decay_steps": (REQUIRED, _float),
            "end_learning_rate": (0.0001, _float), "power": (1.0, _float), "cycle": (False, as_bool)}

    def value(self, step):
        c = self.cfg
        init, end, pw = _f(c["initial_learning_rate"]), _f(c["end_learning_rate"]), _f(c["power"])
        s, ds = _f(step), _f(c["decay_steps"])
        if c["cycle"]:
            mult = F(1.0) if s == 0 else F(math.ceil(s / ds))
            ds = ds * mult
        else:
            s = min(s, ds)
        p = s / ds
        return (init - end) * _pow(F(1) - p, pw) + end


class CosineDecay(Schedule):
    class_name = "CosineDecay"
    keys = {"initial_learning_rate": (REQUIRED, _float), "decay_steps": (REQUIRED, _float),
            "alpha": (0.0, _float), "warmup_target": (None, _float), "warmup_steps": (0, _float)}

    def _decay(self, step, decay_steps, from_lr):
        frac = step / decay_steps
        cos = _cos(F(math.pi) * frac)
        decayed_cos = F(0.5) * (F(1.0) + cos)
        alpha = self.cfg["alpha"]
        return from_lr * (F(1 - alpha) * decayed_cos + F(alpha))

    def value(self, step):
        c = self.cfg
        init, ds, s = _f(c["initial_learning_rate"]), _f(c["decay_steps"]), _f(step)
        if c["warmup_target"] is None:
            return self._decay(min(s, ds), ds, init)
        ws, target = _f(c["warmup_steps"]), _f(c["warmup_target"])
        if s < ws:
            return (target - init) * (s / ws) + init
        s = min(s, ds + ws)
        return self._decay(min(s - ws, ds), ds, target)


class CosineDecayRestarts(Schedule):
    class_name = "CosineDecayRestarts"
    keys = {"initial_learning_rate": (REQUIRED, _float), "first_decay_steps": (REQUIRED, _float),
            "t_mul": (2.0, _float), "m_mul": (1.0, _float), "alpha": (0.0, _float)}

    def value(self, step):
        c = self.cfg
        init, fds = _f(c["initial_learning_rate"]), _f(c["first_decay_steps"])
        alpha, t_mul, m_mul = _f(c["alpha"]), _f(c["t_mul"]), _f(c["m_mul"])
        frac = _f(step) / fds
        if t_mul == F(1.0):
            i_restart = F(math.floor(frac))
            frac = frac - i_restart
        else:
            num = _log(F(1.0) - frac * (F(1.0) - t_mul))
            i_restart = F(math.floor(num / _log(t_mul)))
            sum_r = (F(1.0) - _pow(t_mul, i_restart)) / (F(1.0) - t_mul)
            frac = (frac - sum_r) / _pow(t_mul, i_restart)
        m_fac = _pow(m_mul, i_restart)
        cos = _cos(F(math.pi) * frac)
        decayed_cos = F(0.5) * m_fac * (F(1.0) + cos)
        return init * ((F(1) - alpha) * decayed_cos + alpha)


SCHEDULES = {cls.class_name: cls for cls in (
    ExponentialDecay, InverseTimeDecay, PiecewiseConstantDecay, PolynomialDecay, CosineDecay,
    CosineDecayRestarts)}


def from_config(obj: dict, where: str) -> Schedule:
    """A schedule from its Keras serialize form ({"class_name": ..., "config": {...}, ...})."""
    name = obj.get("class_name")
    if not isinstance(name, str) or not isinstance(obj.get("config"), dict):
        raise InvalidArgument(f"{where}: a learning-rate schedule must be {{'class_name': ..., 'config': {{...}}}}")
    name = name.split(">")[-1]
    if name not in SCHEDULES:
        raise InvalidArgument(f"{where}: unknown learning-rate schedule {obj['class_name']!r}; "
                              f"supported: {sorted(SCHEDULES)}")
    schedule = SCHEDULES[name](obj["config"], where)
    schedule.serialized = copy.deepcopy(obj)
    return schedule


def to_config(s: Schedule) -> dict:
    """The schedule as it was given (Keras serialize form: module, class_name, config, ...)."""
    if getattr(s, "serialized", None) is not None:
        return copy.deepcopy(s.serialized)
    return {"class_name": s.class_name, "config": dict(s.cfg)}
