"""The optimizer classes sparseps reproduces, one file each, looked up by Keras class name."""
from sparseps.errors import InvalidArgument

from .adagrad import Adagrad
from .adam import Adam
from .base import Optimizer
from .ftrl import Ftrl
from .keras_adam import Keras3Adam, KerasAdam
from .keras_sgd import Keras3SGD, KerasSGD
from .lazy_adam import LazyAdam
from .lazy_adam_v1 import LazyAdamV1
from .lookahead import Lookahead
from .rectified_adam import RectifiedAdam
from .rmsprop import RMSprop
from .sgd import SGD

# Registered by class name. `Adam` / `SGD` also stand for the non-legacy Keras classes, which
# their `flavour(config)` picks from the config's keys (keras_adam, keras_sgd).
CLASSES = [LazyAdam, Adam, SGD, RectifiedAdam, Lookahead, LazyAdamV1, Adagrad, Ftrl, RMSprop]


def _registry():
    reg = {}
    for cls in CLASSES:
        for name in cls.class_names:
            reg[name] = cls
    return reg


def supported() -> list:
    return sorted({cls.class_names[0] for cls in CLASSES})


def resolve(class_name: str, config: dict) -> type:
    """The implementation for a class name, taking the config's flavour into account."""
    reg = _registry()
    if class_name in reg:
        cls = reg[class_name]
        return getattr(cls, "flavour", lambda c: cls)(config)
    short = class_name.split(">")[-1]
    for cls in CLASSES:
        if short in (n.split(">")[-1] for n in cls.class_names):
            return getattr(cls, "flavour", lambda c: cls)(config)
    raise InvalidArgument(f"unknown optimizer class {class_name!r}; supported: {supported()}")


def from_config(obj) -> Optimizer:
    """An optimizer from Keras serialize form: {"class_name": ..., "config": {...}}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("class_name"), str):
        raise InvalidArgument('optimizer config must be {"class_name": <name>, "config": {...}}')
    config = obj.get("config", {})
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InvalidArgument(f"optimizer config: 'config' must be an object, got {type(config).__name__}")
    extra = set(obj) - {"class_name", "config", "module", "registered_name"}
    if extra:
        raise InvalidArgument(f"optimizer config: unexpected top-level key(s) {sorted(extra)}")
    return resolve(obj["class_name"], config)(config)
