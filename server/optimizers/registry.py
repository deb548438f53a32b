"""Which class a Keras optimizer config names: the families registered by optimizers/__init__.py.

A family is the class its Keras class name(s) select (`class_names`) and, where Keras has
non-legacy classes of the same name, those flavours: "keras2" (Keras 2.11-2.15
`tf.keras.optimizers.X`) and "keras3" (Keras 3 `keras.optimizers.X`), which keras_new.flavour(config)
tells apart by the config's keys. Lookahead resolves its inner optimizer here too, which is why the
registry is a module of its own and not the package's __init__.
"""
from sparseps.errors import InvalidArgument

from . import keras_new

FAMILIES: dict = {}   # class -> {"keras2": class, "keras3": class} (possibly empty), in registration order
FLAVOUR_NAMES = {"keras2": "Keras 2.11+ non-legacy", "keras3": "Keras 3"}


def register(cls: type, **flavours: type) -> type:
    """Register an optimizer class and its non-legacy flavours (keras2=..., keras3=...)."""
    unknown = set(flavours) - set(FLAVOUR_NAMES)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown flavour(s) {sorted(unknown)}; known: {sorted(FLAVOUR_NAMES)}")
    FAMILIES[cls] = dict(flavours)
    return cls


def supported() -> list:
    return sorted({cls.class_names[0] for cls in FAMILIES})


def _flavoured(cls: type, config: dict) -> type:
    flavours = FAMILIES[cls]
    if not flavours:
        return cls
    kind = keras_new.flavour(config)
    if kind == "legacy":
        return cls
    if kind not in flavours:
        raise InvalidArgument(f"{cls.class_names[0]}: the config is a {FLAVOUR_NAMES[kind]} optimizer's, which "
                              "sparseps does not implement for this class; give the legacy optimizer's config")
    return flavours[kind]


def resolve(class_name: str, config: dict) -> type:
    """The implementation for a class name, taking the config's flavour into account."""
    for cls in FAMILIES:
        if class_name in cls.class_names:
            return _flavoured(cls, config)
    short = class_name.split(">")[-1]
    for cls in FAMILIES:
        if short in (n.split(">")[-1] for n in cls.class_names):
            return _flavoured(cls, config)
    raise InvalidArgument(f"unknown optimizer class {class_name!r}; supported: {supported()}")


def from_config(obj):
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
