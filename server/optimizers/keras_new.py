"""The non-legacy Keras optimizer base classes: Keras 2.11-2.15 `tf.keras.optimizers.Optimizer`
("Keras-new", `is_legacy_optimizer: false`) and Keras 3 `keras.optimizers.Optimizer` (TF >= 2.16).

References: keras-team/keras v2.15.0, keras/src/optimizers/optimizer.py; keras-team/keras v3.15.1,
keras/src/optimizers/base_optimizer.py and keras/src/backend/tensorflow/optimizer.py.

They share class names with the legacy classes (`Adam`, `SGD`); `flavour(config)` tells them apart
by the keys their get_config() always writes (registry.py asks it for the families registered with
flavours). Differences from optimizer_v2 that matter here:

* only one clipping applies: clipnorm if set, else global_clipnorm, else clipvalue (Keras 2.15
  refuses clipnorm together with global_clipnorm; Keras 3 refuses any two);
* no `decay` and no `lr` alias; the learning rate is a float32 variable or a schedule evaluated at
  the 0-based iterations at the start of the step;
* decoupled weight decay: `var -= var * wd * lr` on every variable of the push (dense, after
  clipping and de-duplication, before the update step), wd cast from a Python float;
* Python-float constants such as `1 - beta_1` are computed in double and converted to the
  variable dtype, while `tf.cast(beta_1, dtype)` goes through float32.

Options sparseps does not implement are refused with an INVALID_ARGUMENT naming the key:
use_ema=True, loss_scale_factor and gradient_accumulation_steps (their default/null values are
accepted).
"""
import numpy as np

from sparseps.errors import InvalidArgument

from . import schedules
from .base import Optimizer, exact
from .config_values import as_bool, as_float, as_int

# keys only the non-legacy classes write (get_config), by flavour
KERAS2_KEYS = ("name", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "use_ema", "ema_momentum",
               "ema_overwrite_frequency", "jit_compile", "is_legacy_optimizer")
KERAS3_KEYS = ("name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "use_ema",
               "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps")
_NEW_ONLY = ("weight_decay", "use_ema", "ema_momentum", "ema_overwrite_frequency")


def flavour(config: dict) -> str:
    """"legacy" (optimizer_v2), "keras2" (Keras 2.11-2.15 non-legacy) or "keras3", from the keys.

    Keras 3 always serialises loss_scale_factor / gradient_accumulation_steps, Keras 2.11+ always
    jit_compile / is_legacy_optimizer: false; a hand-written config with only new-style keys
    (weight_decay, use_ema, ...) means the Keras 2.15 class, the reference generation. Anything else
    is the legacy class, as is anything with is_legacy_optimizer: true."""
    if config.get("is_legacy_optimizer") is True:
        return "legacy"
    if "loss_scale_factor" in config or "gradient_accumulation_steps" in config:
        return "keras3"
    if config.get("is_legacy_optimizer") is False or "jit_compile" in config:
        return "keras2"
    if any(k in config for k in _NEW_ONLY):
        return "keras2"
    return "legacy"


class KerasNewOptimizer(Optimizer):
    """Base-class keys and machinery of the Keras 2.11-2.15 optimizer (Keras 3 below)."""

    legacy_keras = False
    keras_module = "keras.optimizers"
    keras3 = False
    base_keys = KERAS2_KEYS + ("lr", "decay")   # refused in parse_base with a pointed message

    def parse_base(self, config):
        for key in ("lr", "decay"):
            if key in config and not (key == "decay" and self.keras3 and config[key] is None):
                raise InvalidArgument(
                    f"{self.class_names[0]} ({self.flavour_name()}): config key {key!r} is not accepted by this "
                    f"optimizer ({'use learning_rate' if key == 'lr' else 'use a learning-rate schedule'}; "
                    f"`{key}` belongs to the legacy optimizer)")
        config.pop("decay", None)
        if not self.keras3 and config.pop("is_legacy_optimizer", False) is not False:
            raise InvalidArgument(f"{self.class_names[0]}: is_legacy_optimizer must be false for this class "
                                  "(omit the new-style keys to get the legacy optimizer)")
        self.parse_name(config, default=self.default_name)
        self.decay = 0.0
        self.weight_decay = as_float("weight_decay", config.pop("weight_decay", None), allow_none=True)
        self.clipnorm = as_float("clipnorm", config.pop("clipnorm", None), allow_none=True)
        self.global_clipnorm = as_float("global_clipnorm", config.pop("global_clipnorm", None), allow_none=True)
        self.clipvalue = as_float("clipvalue", config.pop("clipvalue", None), allow_none=True)
        if self.keras3:
            given = [k for k in ("clipnorm", "clipvalue", "global_clipnorm") if getattr(self, k) is not None]
            if len(given) > 1:
                raise InvalidArgument(f"Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set; got {given}")
        elif self.clipnorm is not None and self.global_clipnorm is not None:
            raise InvalidArgument("At most one of `clipnorm` and `global_clipnorm` can be set.")
        self.use_ema = as_bool("use_ema", config.pop("use_ema", False))
        if self.use_ema:
            raise InvalidArgument("config key 'use_ema': use_ema=True (model-weight moving averages) is not "
                                  "implemented by sparseps; use_ema must be false")
        self.ema_momentum = as_float("ema_momentum", config.pop("ema_momentum", 0.99))
        freq = config.pop("ema_overwrite_frequency", None)
        self.ema_overwrite_frequency = None if freq is None else as_int("ema_overwrite_frequency", freq)
        if self.keras3:
            for key in ("loss_scale_factor", "gradient_accumulation_steps"):
                if config.pop(key, None) is not None:
                    raise InvalidArgument(f"config key {key!r} is not implemented by sparseps; it must be null")
        else:
            self.jit_compile = as_bool("jit_compile", config.pop("jit_compile", True))

    def flavour_name(self):
        return "Keras 3" if self.keras3 else "Keras 2.11+ non-legacy"

    def parse_learning_rate(self, key="learning_rate"):
        super().parse_learning_rate(key)

    # ---- machinery -------------------------------------------------------------------------
    def decayed_lr(self, iterations, dtype):
        """The current learning rate: the float32 variable or the schedule at `iterations`."""
        return self.learning_rate(iterations, dtype)

    def weight_decay_coefficient(self, dtype):
        """tf.cast(<python float>, dtype): through float32."""
        if self.weight_decay is None:
            return None
        return np.dtype(dtype).type(np.float32(self.weight_decay))

    def apply_weight_decay(self, bk, var, c):
        """`var -= var * wd * lr` (Keras 2.15: assign_sub; Keras 3: assign(var - ...), same rounding)."""
        if c.get("wd") is not None:
            bk.assign(var, bk.read(var) - (bk.read(var) * c["wd"]) * c["lr_t"])

    def clip(self, bk, grads):
        """Only one clipping: clipnorm > 0, else global_clipnorm > 0, else clipvalue > 0."""
        if self.clipnorm:
            return [g.replace(bk.clip_by_norm(g.values, exact(self.clipnorm, g.values.dtype))) for g in grads]
        if self.global_clipnorm:
            return bk.clip_by_global_norm(grads, self.global_clipnorm) if grads else grads
        if self.clipvalue:
            out = []
            for g in grads:
                c = exact(self.clipvalue, g.values.dtype)
                out.append(g.replace(bk.clip_by_value(g.values, -c, c)))
            return out
        return grads

    def get_config(self):
        lr = self.hp["learning_rate"]
        lr = schedules.to_config(lr) if isinstance(lr, schedules.Schedule) else self.current_learning_rate()
        if self.keras3:
            cfg = {"name": self.name, "learning_rate": lr, "weight_decay": self.weight_decay,
                   "clipnorm": self.clipnorm, "global_clipnorm": self.global_clipnorm, "clipvalue": self.clipvalue,
                   "use_ema": self.use_ema, "ema_momentum": self.ema_momentum,
                   "ema_overwrite_frequency": self.ema_overwrite_frequency,
                   "loss_scale_factor": None, "gradient_accumulation_steps": None}
        else:
            cfg = {"name": self.name, "weight_decay": self.weight_decay, "clipnorm": self.clipnorm,
                   "global_clipnorm": self.global_clipnorm, "clipvalue": self.clipvalue, "use_ema": self.use_ema,
                   "ema_momentum": self.ema_momentum, "ema_overwrite_frequency": self.ema_overwrite_frequency,
                   "jit_compile": self.jit_compile, "is_legacy_optimizer": False, "learning_rate": lr}
        for key in self.defaults:
            if key != "learning_rate":
                cfg[key] = self.hp[key]
        return cfg

    def current_learning_rate(self):
        """get_config(): the learning-rate variable's value (float32, reported as a Python float)."""
        return float(np.float32(self.hp["learning_rate"]))


class Keras3Mixin:
    """Keras 3 specifics: the learning rate is an optimizer variable, listed by get_weights()."""

    keras3 = True
    base_keys = KERAS3_KEYS + ("lr", "decay")

    def parse(self):
        super().parse()
        self._nonslot = None
        self.lr_is_variable = not isinstance(self.hp["learning_rate"], schedules.Schedule)
        self.nonslot_names = ("learning_rate",) if self.lr_is_variable else ()

    def initial_nonslot(self):
        # OptimizerState.nonslot is only updated in place (set_weights, restore), see lazy_adam_v1
        self._nonslot = {"learning_rate": float(np.float32(self.hp["learning_rate"]))} if self.lr_is_variable else {}
        return self._nonslot

    def finish(self, nonslot):
        self._nonslot = nonslot

    def _lr_value(self):
        if self._nonslot is not None and "learning_rate" in self._nonslot:
            return self._nonslot["learning_rate"]
        return self.hp["learning_rate"]

    def learning_rate(self, iterations, dtype):
        if not self.lr_is_variable:
            return super().learning_rate(iterations, dtype)
        return np.dtype(dtype).type(np.float32(self._lr_value()))

    def current_learning_rate(self):
        return float(np.float32(self._lr_value()))

    def clip(self, bk, grads):
        if self.clipnorm or not self.global_clipnorm:
            return super().clip(bk, grads)
        return self.clip_by_global_norm_densified(bk, grads)

    def clip_by_global_norm_densified(self, bk, grads):
        """Keras 3's clip_by_global_norm on the TF backend: `ops.sum(ops.square(v))` and `v * scale`
        both densify an IndexedSlices, so the norm sums the per-id sums of squared rows over the
        dense tensor, and every sparse gradient leaves as a dense one (summed rows times scale):
        the update that follows is the dense one, with g^2 = (sum of rows)^2."""
        dense, squares = [], []
        for g in grads:
            if g.ids is None:
                dense.append(g.values)
                squares.append(bk.reduce_sum(g.values * g.values))
                continue
            uniq, rows = bk.unique_sum(g.ids, g.values)
            _, sq_rows = bk.unique_sum(g.ids, g.values * g.values)
            d, d2 = bk.zeros_like(g.var.value), bk.zeros_like(g.var.value)
            bk.scatter_update(d, uniq, rows)
            bk.scatter_update(d2, uniq, sq_rows)
            dense.append(bk.read(d))
            squares.append(bk.reduce_sum(bk.read(d2)))
        if not grads:
            return grads
        T = grads[0].values.dtype.type
        norm = bk.sqrt(bk.reduce_sum(squares))
        inv_norm, inv_clip = T(1.0) / norm, T(1.0 / self.global_clipnorm)   # 1.0 / clip_norm in double
        scale = T(self.global_clipnorm) * bk.where(inv_norm < inv_clip, inv_norm, inv_clip) + (norm - norm)
        return [type(g)(g.var, None, d * scale) for g, d in zip(grads, dense)]

    def weights_entries(self, pairs):
        head = ["iterations", "learning_rate"] if self.lr_is_variable else ["iterations"]
        return head + [f"{v}/{s}" for v, s in pairs]


