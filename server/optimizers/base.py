"""What every optimizer shares: config parsing, learning-rate decay, clipping, coefficient dtypes.

Reference: keras-team/keras v2.15.0, keras/src/optimizers/legacy/optimizer_v2.py.

The reference is Keras 2.15's optimizer_v2 ("legacy") machinery that tensorflow-addons 0.23 builds
on. One `apply` of a push follows its order exactly: coefficients are prepared once from the
pre-step `iterations`; raw gradient rows are clipped (clipvalue, clipnorm, global_clipnorm) before
duplicate ids are summed; every variable is updated; then `iterations` advances by one.

Hyper-parameters given as Python floats live in float32 variables in the reference, so a float64
variable sees float32-rounded betas and learning rates; `hyper()` reproduces that.
"""

import numpy as np

from sparseps.errors import InvalidArgument
from sparseps.reductions import eigen_sum

from . import scalar_math, schedules
from .config_values import as_float, type_error

F32 = np.float32

# Keys every legacy optimizer accepts besides its own (optimizer_v2 `allowed_kwargs`).
BASE_KEYS = ("name", "clipnorm", "clipvalue", "global_clipnorm", "lr", "decay", "is_legacy_optimizer")


def hyper(value: float, dtype) -> np.generic:
    """A float hyper-parameter as the reference sees it: a float32 variable cast to `dtype`."""
    return np.dtype(dtype).type(F32(value))


def exact(value: float, dtype) -> np.generic:
    """A Python float converted straight to `dtype` (e.g. epsilon, clip thresholds)."""
    return np.dtype(dtype).type(value)


def cast_via_f32(value: float, dtype) -> np.generic:
    """`tf.cast(<python float>, dtype)`: the constant is made as float32 first."""
    return np.dtype(dtype).type(F32(value))


def power(base: np.generic, t: int) -> np.generic:
    """`tf.pow(base, t)` on 0-d tensors (libm's pow) in base's dtype, correctly rounded."""
    return scalar_math.pow(base, t, base.dtype)


class Optimizer:
    """One optimizer class of the reference. Subclasses fill in the slots and the two applies.

    `config` is the reference's constructor keyword arguments (what `get_config()` returns).
    """

    class_names: tuple = ()       # names accepted in {"class_name": ...}; first is canonical
    defaults: dict = {}           # own keys -> default, in the reference's get_config() order
    slot_kinds: tuple = ()        # slot names, in the reference's creation order
    nonslot_names: tuple = ()
    base_keys: tuple = BASE_KEYS  # keys the reference's base class accepts besides `defaults`
    legacy_keras = True           # a Keras optimizer_v2 class (what tfa's Lookahead can wrap)
    keras_module = "keras.optimizers.legacy"   # `module` / `registered_name` of Keras serialize()
    registered_name = None

    def __init__(self, config: dict):
        config = dict(config)
        unknown = set(config) - set(self.defaults) - set(self.base_keys)
        if unknown:
            raise InvalidArgument(
                f"{self.class_names[0]} got unexpected config key(s) {sorted(unknown)}; "
                f"accepted: {sorted(set(self.defaults) | set(self.base_keys) - {'is_legacy_optimizer'})}")
        self.parse_base(config)
        self.hp = {}
        for key, default in self.defaults.items():
            self.hp[key] = config.pop(key, default)
        self.parse()

    def parse_base(self, config: dict):
        """Pop and validate the base-class keys (optimizer_v2: name, clipping, lr, decay)."""
        if config.pop("is_legacy_optimizer", True) is not True:
            raise InvalidArgument(f"{self.class_names[0]}: is_legacy_optimizer must be true for this class")
        if "lr" in config:  # the legacy alias wins, as in optimizer_v2
            config["learning_rate"] = config.pop("lr")
        self.parse_name(config)
        self.clipnorm = as_float("clipnorm", config.pop("clipnorm", None), allow_none=True, minimum=0)
        self.clipvalue = as_float("clipvalue", config.pop("clipvalue", None), allow_none=True, minimum=0)
        self.global_clipnorm = as_float("global_clipnorm", config.pop("global_clipnorm", None),
                                        allow_none=True, minimum=0)
        if self.clipnorm is not None and self.global_clipnorm is not None:
            raise InvalidArgument("Cannot accept both `clipnorm` and `global_clipnorm`; pass one of them.")
        self.decay = as_float("decay", config.pop("decay", 0.0), minimum=0)

    def parse_name(self, config: dict, default=None):
        name = config.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise type_error("name", name, "a string")
        self.name = name or default or self.class_names[0]

    # ---- to be provided by each optimizer -------------------------------------------------
    def parse(self):
        """Validate self.hp (types and ranges); raise InvalidArgument naming the key."""

    def slot_names(self) -> list:
        return list(self.slot_kinds)

    def slot_groups(self) -> list:
        """Slot names grouped as get_weights() lists them.

        Within a group the slots are listed variable by variable (m(A), v(A), m(B), v(B)); the groups
        follow each other. optimizer_v2 classes create one slot kind at a time for all variables
        (one group per kind, the default); the Keras 2.11+ optimizers interleave m and v per variable;
        Lookahead puts its own `slow` group first."""
        return [[s] for s in self.slot_names()]

    def weights_entries(self, pairs: list) -> list:
        """The wire form of get_weights(): "var/slot" for each (var, slot) pair in slot order.

        When get_weights() does not start with `iterations` (TF1 non-slots, Keras 3's learning
        rate), the list names every entry: entries without a "/" are "iterations" or a name in
        `nonslot`, and the client adds no implicit leading `iterations`."""
        return [f"{v}/{s}" for v, s in pairs]

    def initial_slot(self, bk, var, slot):
        return bk.zeros_like(var)

    def prepare(self, iterations: int, dtype) -> dict:
        """Scalar coefficients for one step, computed once before any variable changes."""
        return {"lr_t": self.decayed_lr(iterations, dtype)}

    def apply_dense(self, bk, var, slots, grad, c):
        raise NotImplementedError

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        """ids are unique local rows, rows their summed gradients."""
        raise NotImplementedError

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        """ids as pushed (clipped, not yet de-duplicated): sum duplicates, then apply_sparse."""
        uniq, summed = bk.unique_sum(ids, rows)
        self.apply_sparse(bk, var, slots, uniq, summed, c)

    def after_variable(self, bk, var, slots, c):
        """Per-variable work after its update (Lookahead's synchronisation)."""

    def finish(self, nonslot: dict):
        """Non-slot state updates once per step, after all variables (TF1 beta powers)."""

    def initial_nonslot(self) -> dict:
        return {}

    # ---- shared machinery ---------------------------------------------------------------
    def learning_rate(self, iterations: int, dtype):
        lr = self.hp["learning_rate"]
        if isinstance(lr, schedules.Schedule):
            return np.dtype(dtype).type(lr(iterations))
        return hyper(lr, dtype)

    def decayed_lr(self, iterations: int, dtype):
        """optimizer_v2._decayed_lr: schedule at the 0-based iterations, then 1/(1+decay*it)."""
        lr_t = self.learning_rate(iterations, dtype)
        if self.decay > 0.0:
            t = np.dtype(dtype).type(iterations)
            lr_t = lr_t / (np.dtype(dtype).type(1.0) + cast_via_f32(self.decay, dtype) * t)
        return lr_t

    def parse_learning_rate(self, key="learning_rate"):
        value = self.hp[key]
        if isinstance(value, dict):
            self.hp[key] = schedules.from_config(value, key)
        else:
            self.hp[key] = as_float(key, value)

    def clip(self, bk, grads: list) -> list:
        """Clip raw gradients: clipvalue, then clipnorm, then global_clipnorm (optimizer_v2)."""
        if self.clipvalue is None and self.clipnorm is None and self.global_clipnorm is None:
            return grads
        out = []
        for g in grads:
            values = g.values
            if self.clipvalue is not None:
                c = exact(self.clipvalue, values.dtype)
                values = bk.clip_by_value(values, -c, c)
            if self.clipnorm is not None:
                c = exact(self.clipnorm, values.dtype)
                if g.l2sum is None:
                    values = bk.clip_by_norm(values, c)
                else:  # a shard's part of a split gradient: the norm of the whole one
                    l2sum = values.dtype.type(g.l2sum)
                    norm = np.sqrt(l2sum) if l2sum > 0 else l2sum
                    values = (values * c) / np.maximum(norm, c)
            out.append(g.replace(values))
        if self.global_clipnorm is not None and out:
            if all(g.l2sum is None for g in out):
                out = bk.clip_by_global_norm(out, self.global_clipnorm)
            else:
                out = self._clip_split_global(out)
        return out

    def _clip_split_global(self, grads):
        """clip_by_global_norm from the client's whole-gradient sums (l2_loss = l2sum / 2, exactly)."""
        dtype = grads[0].values.dtype
        half = np.array([dtype.type(g.l2sum) * dtype.type(0.5) for g in grads], dtype=dtype)
        norm = np.sqrt(eigen_sum(half) * dtype.type(2))
        c, one = dtype.type(self.global_clipnorm), dtype.type(1.0)
        scale = c * np.minimum(one / norm, one / c) if np.isfinite(norm) else dtype.type(np.nan)
        return [g.replace(g.values * scale) for g in grads]

    def serialize(self) -> dict:
        """tf.keras.optimizers.serialize(self) (how Lookahead nests its inner optimizer)."""
        return {"module": self.keras_module, "class_name": self.class_names[0].split(">")[-1],
                "config": self.get_config(), "registered_name": self.registered_name}

    def get_config(self) -> dict:
        cfg = {"name": self.name}
        for key in ("clipnorm", "global_clipnorm", "clipvalue"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        for key in self.defaults:
            value = self.hp[key]
            if key == "decay":
                value = self.decay
            cfg[key] = schedules.to_config(value) if isinstance(value, schedules.Schedule) else value
        return cfg
