"""tfa.optimizers.Lookahead (tensorflow-addons 0.23), Zhang et al. 2019, "Lookahead Optimizer:
k steps forward, 1 step back" (arXiv:1907.08610).

Reference: tensorflow/addons v0.23.0, tensorflow_addons/optimizers/lookahead.py.

    fast weights: var updated by the inner optimizer on every push
    if (iterations + 1) % sync_period == 0:      (the shared counter, before it advances)
        slow = slow + slow_step_size * (var - slow);   var = slow       (whole tensor)

`slow` is initialised to the variable's value when the slots are created (tfa >= 0.13). The inner
optimizer runs on the wrapper's counter (tfa replaces its `iterations`), so its bias correction,
schedules and warmup see the same t. Only the wrapper's clip settings apply: tfa never calls the
inner `apply_gradients`, so clipnorm/clipvalue given to the inner optimizer are ignored. Sparse
gradients are de-duplicated by the wrapper and handed to the inner sparse update; the sync then
covers the whole tensor (rows the inner optimizer left alone have var == slow and stay put).

get_weights(): iterations, slow(A), slow(B), ... then the inner optimizer's slots in its own order.
"""
from sparseps.errors import InvalidArgument

from .base import Optimizer, cast_via_f32
from .config_values import as_float, as_int
from .registry import from_config


class Lookahead(Optimizer):
    class_names = ("Lookahead", "Addons>Lookahead")
    keras_module = "tensorflow_addons.optimizers.lookahead"
    registered_name = "Addons>Lookahead"
    defaults = {"optimizer": None, "sync_period": 6, "slow_step_size": 0.5}

    def parse_base(self, config):
        super().parse_base(config)
        # optimizer_v2 accepts these on the wrapper but nothing reads them: refuse rather than ignore
        if "learning_rate" in config:
            raise InvalidArgument("Lookahead: config key 'lr' has no effect on the wrapper in the reference; "
                                  "set learning_rate on the inner optimizer")
        if self.decay:
            raise InvalidArgument("Lookahead: config key 'decay' has no effect on the wrapper in the reference; "
                                  "set decay on the inner optimizer")

    def parse(self):
        inner = self.hp["optimizer"]
        if inner is None:
            raise InvalidArgument("Lookahead: config key 'optimizer' is required (the wrapped optimizer, "
                                  "as tf.keras.optimizers.serialize() writes it)")
        if isinstance(inner, str):
            inner = {"class_name": inner, "config": {}}
        if not isinstance(inner, dict):
            raise InvalidArgument(f"Lookahead: config key 'optimizer' must be an optimizer config object, got {inner!r}")
        self.inner = from_config(inner)
        if not self.inner.legacy_keras or isinstance(self.inner, Lookahead):
            raise InvalidArgument(
                f"Lookahead: config key 'optimizer': {type(self.inner).__name__} cannot be wrapped; tfa's Lookahead "
                "takes a legacy (optimizer_v2) Keras optimizer: LazyAdam, RectifiedAdam, legacy Adam or SGD")
        self.hp["sync_period"] = as_int("sync_period", self.hp["sync_period"], minimum=1)
        self.hp["slow_step_size"] = as_float("slow_step_size", self.hp["slow_step_size"])

    def slot_names(self):
        return ["slow"] + [s for s in self.inner.slot_names()]

    def slot_groups(self):
        return [["slow"]] + self.inner.slot_groups()

    def initial_slot(self, bk, var, slot):
        if slot == "slow":
            return bk.copy(var)
        return self.inner.initial_slot(bk, var, slot)

    def initial_nonslot(self):
        return self.inner.initial_nonslot()

    def prepare(self, iterations, dtype):
        c = dict(self.inner.prepare(iterations, dtype))
        # local_step = iterations + 1 (int64); sync when floordiv(step, k) * k == step
        c["lookahead_sync"] = (iterations + 1) % self.hp["sync_period"] == 0
        # a Python float cast to the variable dtype: through float32
        c["lookahead_alpha"] = cast_via_f32(self.hp["slow_step_size"], dtype)
        return c

    def apply_dense(self, bk, var, slots, grad, c):
        self.inner.apply_dense(bk, var, slots, grad, c)

    def apply_sparse(self, bk, var, slots, ids, rows, c):
        self.inner.apply_sparse(bk, var, slots, ids, rows, c)

    def apply_sparse_raw(self, bk, var, slots, ids, rows, c):
        # The wrapper de-duplicates, then calls the inner _resource_apply_sparse. Every inner class
        # that can be wrapped de-duplicates the same way in apply_sparse_raw (fused kernels included),
        # except plain SGD, whose raw scatter-add tfa would not reach (it fails without momentum).
        if not self.inner.slot_names():
            uniq, summed = bk.unique_sum(ids, rows)
            return self.inner.apply_sparse(bk, var, slots, uniq, summed, c)
        self.inner.apply_sparse_raw(bk, var, slots, ids, rows, c)

    def after_variable(self, bk, var, slots, c):
        self.inner.after_variable(bk, var, slots, c)
        if not c["lookahead_sync"]:
            return
        fused = bk.kernel("lookahead_sync")
        if fused is not None:
            return fused(var, slots["slow"], c["lookahead_alpha"])
        slow = bk.read(slots["slow"])
        step_back = slow + c["lookahead_alpha"] * (bk.read(var) - slow)
        bk.assign(slots["slow"], step_back)
        bk.assign(var, step_back)

    def finish(self, nonslot):
        self.inner.finish(nonslot)

    def get_config(self):
        cfg = {"name": self.name}
        for key in ("clipnorm", "global_clipnorm", "clipvalue"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        cfg["optimizer"] = self.inner.serialize()
        cfg["sync_period"] = self.hp["sync_period"]
        cfg["slow_step_size"] = self.hp["slow_step_size"]
        return cfg

