"""Generate golden optimizer trajectories with the real reference implementations.

Run inside .venv-golden (tensorflow-cpu 2.15.1, keras 2.15, tensorflow-addons 0.23.0):

    .venv-golden/bin/python tools/golden/generate.py [--only SUBSTRING ...] [--list]

Eager TF2: every step builds `tf.IndexedSlices` (sparse) / tensors (dense) from the stored
numpy gradients and calls `optimizer.apply_gradients` once, exactly as a user would.
Output format: tools/golden/FORMAT.md.
"""
import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
warnings.filterwarnings("ignore")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import common  # noqa: E402
from common import sanitize, reduce_serialized  # noqa: E402

import tensorflow as tf  # noqa: E402
import tensorflow_addons as tfa  # noqa: E402

tf.get_logger().setLevel("ERROR")

try:
    import keras  # noqa: E402
    KERAS_VERSION = keras.__version__
except Exception:  # pragma: no cover
    KERAS_VERSION = tf.keras.__version__

REFERENCE = {
    "tensorflow": tf.__version__,
    "keras": KERAS_VERSION,
    "tensorflow_addons": tfa.__version__,
    "numpy": np.__version__,
    "python": common.python_version(),
    "mode": "eager TF2, one apply_gradients call per step",
}

legacy = tf.keras.optimizers.legacy
sched = tf.keras.optimizers.schedules


# --------------------------------------------------------------------------------------------
# Optimizer introspection
# --------------------------------------------------------------------------------------------

def is_new_keras(opt):
    return not isinstance(opt, legacy.Optimizer)


def new_slot_lists(opt):
    """Keras 2.11+ optimizer: slot name -> list attribute."""
    out = {}
    for slot, attr in (("m", "_momentums"), ("v", "_velocities"), ("vhat", "_velocity_hats")):
        lst = getattr(opt, attr, None)
        if lst:
            out[slot] = lst
    return out


def get_slots(opt, var):
    """Return ordered dict slot_name -> tf.Variable for var (incl. Lookahead's inner slots)."""
    res = {}
    if is_new_keras(opt):
        idx = opt._index_dict[opt._var_key(var)]
        for slot, lst in new_slot_lists(opt).items():
            res[slot] = lst[idx]
        return res
    for name in opt.get_slot_names():
        res[name] = opt.get_slot(var, name)
    inner = getattr(opt, "_optimizer", None)
    if inner is not None and isinstance(inner, legacy.Optimizer):
        for name in inner.get_slot_names():
            res[name] = inner.get_slot(var, name)
    return res


def slot_names(opt):
    if is_new_keras(opt):
        return list(new_slot_lists(opt).keys())
    names = list(opt.get_slot_names())
    inner = getattr(opt, "_optimizer", None)
    if inner is not None and isinstance(inner, legacy.Optimizer):
        names += [n for n in inner.get_slot_names() if n not in names]
    return names


def weights_list(opt):
    if is_new_keras(opt):
        v = opt.variables
        return list(v() if callable(v) else v)
    return list(opt.weights)


def weights_order(opt, tvars):
    """Identify each entry of the optimizer's weight list."""
    ids = {}
    ids[id(opt.iterations)] = ["iterations"]
    for vname, var in tvars.items():
        for slot, sv in get_slots(opt, var).items():
            ids[id(sv)] = [vname, slot]
    order = []
    for w in weights_list(opt):
        if id(w) in ids:
            order.append(ids[id(w)])
        else:
            order.append(["unknown", w.name])
    return order


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------

def to_grad(g, var):
    if g[0] == "sparse":
        ids, rows = g[1], g[2]
        return tf.IndexedSlices(
            values=tf.constant(rows, dtype=var.dtype),
            indices=tf.constant(ids, dtype=tf.int64),
            dense_shape=tf.constant(var.shape.as_list(), dtype=tf.int64),
        )
    return tf.constant(g[1], dtype=var.dtype)


def run_case(name, make_opt, dtype="float32", plan="standard", steps=30, optimizer_meta=None,
             extra_meta=None):
    """optimizer_meta: None -> reduce_serialized(serialize(opt)) before the first step;
    a dict -> used verbatim (short hand-written form)."""
    np_dtype = np.dtype(dtype)
    init, gplan = common.PLANS[plan](steps=steps)
    init, gplan = common.cast_plan(init, gplan, np_dtype)
    names = common.VAR_ORDER[plan]
    tvars = {}
    for vname in names:
        tvars[vname] = tf.Variable(init[vname], dtype=np_dtype, name=vname)

    opt = make_opt()
    full_ser = sanitize(tf.keras.optimizers.serialize(opt))
    if optimizer_meta is None:
        optimizer_meta = reduce_serialized(full_ser)

    arrays = {}
    for vname in names:
        arrays["init/" + vname] = init[vname].copy()
    nan_seen_at = None
    for k, st in enumerate(gplan):
        pairs = []
        for vname in names:  # creation order
            if vname in st:
                g = st[vname]
                pairs.append((to_grad(g, tvars[vname]), tvars[vname]))
                if g[0] == "sparse":
                    arrays["step%d/%s/ids" % (k, vname)] = g[1]
                    arrays["step%d/%s/rows" % (k, vname)] = g[2]
                else:
                    arrays["step%d/%s/dense" % (k, vname)] = g[1]
        opt.apply_gradients(pairs)
        for vname in names:
            val = tvars[vname].numpy()
            assert val.dtype == np_dtype
            arrays["step%d/%s/value" % (k, vname)] = val
            if nan_seen_at is None and not np.all(np.isfinite(val)):
                nan_seen_at = k
            for slot, sv in get_slots(opt, tvars[vname]).items():
                arrays["step%d/%s/slot/%s" % (k, vname, slot)] = sv.numpy()
        arrays["step%d/iterations" % k] = np.array(int(opt.iterations.numpy()), np.int64)

    wl = weights_list(opt)
    for i, w in enumerate(wl):
        arrays["weights/%d" % i] = w.numpy()
    meta = {
        "case": name,
        "reference": REFERENCE,
        "reference_class": type(opt).__module__ + "." + type(opt).__name__,
        "optimizer": optimizer_meta,
        "optimizer_serialized": full_ser,
        "reference_get_config": sanitize(opt.get_config()),
        "dtype": dtype,
        "variables": [{"name": v, "shape": list(init[v].shape)} for v in names],
        "slot_names": slot_names(opt),
        "weights_order": weights_order(opt, tvars),
        "steps": steps,
        "grad_kinds": common.grad_kinds(gplan),
        "plan": plan,
        "plan_doc": " ".join(common.PLANS[plan].__doc__.split()),
    }
    if getattr(opt, "_optimizer", None) is not None:
        meta["slot_names_note"] = ("Lookahead: the wrapper's own get_slot_names() (['slow']) "
                                   "followed by the inner optimizer's; inner slots are read with "
                                   "the inner optimizer's get_slot(var, name)")
    if nan_seen_at is not None:
        meta["first_nan_step"] = nan_seen_at
    if extra_meta:
        meta.update(extra_meta)
    path = common.write_case(name, meta, arrays)
    return path, nan_seen_at


# --------------------------------------------------------------------------------------------
# compat.v1 re-statement of tf.contrib.opt.LazyAdamOptimizer (contrib commit 6fca0304)
# --------------------------------------------------------------------------------------------

class ContribLazyAdamV1(tf.compat.v1.train.AdamOptimizer):
    """`tf.contrib.opt.LazyAdamOptimizer._resource_apply_sparse` re-stated verbatim on TF 2.15's
    `tf.compat.v1.train.AdamOptimizer` (dense path, non-slot beta powers and _finish inherited)."""

    def _resource_apply_sparse(self, grad, var, indices):
        from tensorflow.python.ops import resource_variable_ops
        beta1_power, beta2_power = self._get_beta_accumulators()
        beta1_power = tf.cast(beta1_power, var.dtype.base_dtype)
        beta2_power = tf.cast(beta2_power, var.dtype.base_dtype)
        lr_t = tf.cast(self._lr_t, var.dtype.base_dtype)
        beta1_t = tf.cast(self._beta1_t, var.dtype.base_dtype)
        beta2_t = tf.cast(self._beta2_t, var.dtype.base_dtype)
        epsilon_t = tf.cast(self._epsilon_t, var.dtype.base_dtype)
        lr = (lr_t * tf.sqrt(1 - beta2_power) / (1 - beta1_power))

        m = self.get_slot(var, "m")
        m_t_slice = beta1_t * tf.gather(m, indices) + (1 - beta1_t) * grad
        m_update_op = resource_variable_ops.resource_scatter_update(m.handle, indices, m_t_slice)

        v = self.get_slot(var, "v")
        v_t_slice = (beta2_t * tf.gather(v, indices) + (1 - beta2_t) * tf.square(grad))
        v_update_op = resource_variable_ops.resource_scatter_update(v.handle, indices, v_t_slice)

        var_slice = lr * m_t_slice / (tf.sqrt(v_t_slice) + epsilon_t)
        var_update_op = resource_variable_ops.resource_scatter_sub(var.handle, indices, var_slice)
        return tf.group(var_update_op, m_update_op, v_update_op)


def run_contrib_v1(name, dtype="float32", steps=30, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8):
    np_dtype = np.dtype(dtype)
    init, gplan = common.PLANS["standard"](steps=steps)
    init, gplan = common.cast_plan(init, gplan, np_dtype)
    names = common.VAR_ORDER["standard"]
    tvars = {v: tf.Variable(init[v], dtype=np_dtype, name=v) for v in names}
    gstep = tf.Variable(0, dtype=tf.int64, name="global_step")
    opt = ContribLazyAdamV1(learning_rate=lr, beta1=beta1, beta2=beta2, epsilon=eps)
    arrays = {"init/" + v: init[v].copy() for v in names}
    for k, st in enumerate(gplan):
        pairs = []
        for vname in names:
            if vname in st:
                g = st[vname]
                pairs.append((to_grad(g, tvars[vname]), tvars[vname]))
                if g[0] == "sparse":
                    arrays["step%d/%s/ids" % (k, vname)] = g[1]
                    arrays["step%d/%s/rows" % (k, vname)] = g[2]
                else:
                    arrays["step%d/%s/dense" % (k, vname)] = g[1]
        opt.apply_gradients(pairs, global_step=gstep)
        for vname in names:
            arrays["step%d/%s/value" % (k, vname)] = tvars[vname].numpy()
            for slot in opt.get_slot_names():
                arrays["step%d/%s/slot/%s" % (k, vname, slot)] = opt.get_slot(tvars[vname], slot).numpy()
        b1p, b2p = opt._get_beta_accumulators()
        arrays["step%d/nonslot/beta1_power" % k] = np.asarray(b1p.numpy())
        arrays["step%d/nonslot/beta2_power" % k] = np.asarray(b2p.numpy())
        arrays["step%d/iterations" % k] = np.array(int(gstep.numpy()), np.int64)
    # weights: optimizer.variables() order, identified
    ids = {}
    b1p, b2p = opt._get_beta_accumulators()
    ids[id(b1p)] = ["nonslot", "beta1_power"]
    ids[id(b2p)] = ["nonslot", "beta2_power"]
    for vname in names:
        for slot in opt.get_slot_names():
            ids[id(opt.get_slot(tvars[vname], slot))] = [vname, slot]
    order = []
    for i, w in enumerate(opt.variables()):
        arrays["weights/%d" % i] = w.numpy()
        order.append(ids.get(id(w), ["unknown", w.name]))
    meta = {
        "case": name,
        "reference": dict(REFERENCE, contrib_lazyadam=(
            "re-statement: tf.contrib.opt.LazyAdamOptimizer._resource_apply_sparse (contrib commit "
            "6fca0304) on TF %s tf.compat.v1.train.AdamOptimizer, eager resource variables; "
            "see tf1contrib_lazyadam_* for the real TF 1.15 class" % tf.__version__)),
        "reference_class": "generate.ContribLazyAdamV1(tf.compat.v1.train.AdamOptimizer)",
        "optimizer": {"class_name": "LazyAdamOptimizer",
                      "config": {"learning_rate": lr, "beta1": beta1, "beta2": beta2, "epsilon": eps}},
        "reference_get_config": None,
        "dtype": dtype,
        "variables": [{"name": v, "shape": list(init[v].shape)} for v in names],
        "slot_names": list(opt.get_slot_names()),
        "weights_order": order,
        "steps": steps,
        "grad_kinds": common.grad_kinds(gplan),
        "plan": "standard",
        "plan_doc": " ".join(common.PLANS["standard"].__doc__.split()),
        "iterations_note": "TF1 optimizers have no iterations counter; step<k>/iterations is a "
                           "global_step variable passed to apply_gradients (it does not influence "
                           "the update; bias correction uses the beta1_power/beta2_power non-slots)",
    }
    return common.write_case(name, meta, arrays), None


# --------------------------------------------------------------------------------------------
# Case table
# --------------------------------------------------------------------------------------------

def short(cls, **cfg):
    return {"class_name": cls, "config": cfg}


def cases():
    """Yield (name, callable returning (path, nan_step), expect_nan)."""
    C = []
    LA = tfa.optimizers.LazyAdam
    RA = tfa.optimizers.RectifiedAdam
    LH = tfa.optimizers.Lookahead

    def add(name, make_opt, dtypes=("float32", "float64"), **kw):
        expect_nan = kw.pop("expect_nan", False)
        for dt in dtypes:
            suffix = "_f32" if dt == "float32" else "_f64"
            extra = dict(kw.get("extra_meta") or {})
            if expect_nan:
                extra["expect_nan"] = True
            kw2 = dict(kw)
            kw2["extra_meta"] = extra
            C.append((name + suffix, make_opt, dt, kw2, expect_nan))

    # ---------------- Issue A: core ----------------
    add("lazyadam", lambda: LA(learning_rate=0.001),
        optimizer_meta=short("LazyAdam", learning_rate=0.001))
    add("lazyadam_custom", lambda: LA(learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-3),
        dtypes=("float32",),
        optimizer_meta=short("LazyAdam", learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-3))
    add("lazyadam_custom", lambda: LA(learning_rate=0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-3),
        dtypes=("float64",))
    add("lazyadam_amsgrad", lambda: LA(amsgrad=True))
    add("lazyadam_mixed", lambda: LA(learning_rate=0.01), plan="mixed",
        optimizer_meta=short("LazyAdam", learning_rate=0.01))
    add("adam", lambda: legacy.Adam())
    add("adam_amsgrad", lambda: legacy.Adam(amsgrad=True))
    add("adam_table", lambda: legacy.Adam(learning_rate=0.01), plan="table",
        extra_meta={"note": "sparse path only: every row with non-zero m keeps moving "
                            "when untouched (also on empty pushes)"})
    add("adam_mixed", lambda: legacy.Adam(learning_rate=0.01), plan="mixed", dtypes=("float32",))
    add("sgd", lambda: legacy.SGD(learning_rate=0.1))
    add("sgd_momentum", lambda: legacy.SGD(learning_rate=0.1, momentum=0.9))
    add("sgd_nesterov", lambda: legacy.SGD(learning_rate=0.1, momentum=0.9, nesterov=True))
    add("sgd_momentum_mixed", lambda: legacy.SGD(learning_rate=0.1, momentum=0.9), plan="mixed",
        dtypes=("float32",))

    # ---------------- Issue B: family ----------------
    add("radam", lambda: RA())
    add("radam_amsgrad", lambda: RA(amsgrad=True))
    add("radam_warmup", lambda: RA(total_steps=30, warmup_proportion=0.2, min_lr=1e-5))
    add("radam_wd", lambda: RA(weight_decay=0.01))
    add("radam_sma_threshold_below4", lambda: RA(sma_threshold=3.0), expect_nan=True)
    add("radam_mixed", lambda: RA(learning_rate=0.01), plan="mixed", dtypes=("float32",))
    add("radam_expdecay", lambda: RA(learning_rate=sched.ExponentialDecay(0.01, 5, 0.5)),
        dtypes=("float32",))

    add("lookahead_lazyadam", lambda: LH(LA(), sync_period=6, slow_step_size=0.5), steps=40)
    add("lookahead_radam", lambda: LH(RA(), sync_period=6, slow_step_size=0.5))
    add("lookahead_sgd_momentum",
        lambda: LH(legacy.SGD(learning_rate=0.1, momentum=0.9), sync_period=6, slow_step_size=0.5))
    add("lookahead_lazyadam_inner_clipnorm",
        lambda: LH(LA(clipnorm=0.1), sync_period=6, slow_step_size=0.5), steps=40,
        extra_meta={"note": "the inner optimizer's clipnorm is ignored by the reference "
                            "(bit-identical to lookahead_lazyadam)"})
    add("lookahead_lazyadam_clipnorm",
        lambda: LH(LA(), sync_period=6, slow_step_size=0.5, clipnorm=0.1),
        extra_meta={"tolerance_note": "clipnorm: L2-norm reduction order may differ by a few ulp"})

    # schedules (float32; expdecay also float64)
    scheds = {
        "expdecay": lambda: sched.ExponentialDecay(0.01, decay_steps=5, decay_rate=0.5),
        "piecewise": lambda: sched.PiecewiseConstantDecay(boundaries=[10, 20],
                                                          values=[0.01, 0.005, 0.001]),
        "polynomial": lambda: sched.PolynomialDecay(0.01, decay_steps=25,
                                                    end_learning_rate=0.001, power=2.0),
        "inversetime": lambda: sched.InverseTimeDecay(0.01, decay_steps=5, decay_rate=0.5),
        "cosine": lambda: sched.CosineDecay(0.01, decay_steps=25, alpha=0.1),
        "cosinerestarts": lambda: sched.CosineDecayRestarts(0.01, first_decay_steps=8, t_mul=2.0,
                                                            m_mul=0.8, alpha=0.05),
    }
    for sname, mk in scheds.items():
        dts = ("float32", "float64") if sname == "expdecay" else ("float32",)
        add("lazyadam_" + sname, (lambda mk=mk: LA(learning_rate=mk())), dtypes=dts)

    add("lazyadam_lr_alias", lambda: LA(lr=0.01),
        optimizer_meta=short("LazyAdam", lr=0.01),
        extra_meta={"note": "optimizer built with the legacy `lr` kwarg; meta optimizer uses "
                            "`lr` as a user would pass it"})
    add("lazyadam_decay", lambda: LA(learning_rate=0.01, decay=0.05))
    add("adam_decay", lambda: legacy.Adam(learning_rate=0.01, decay=0.05))

    tol = {"tolerance_note": "clipnorm/global_clipnorm: L2-norm reduction order may differ "
                             "by a few ulp"}
    add("lazyadam_clipvalue", lambda: LA(learning_rate=0.01, clipvalue=0.05),
        extra_meta={"note": "step 5 pushes row 9 four times; clipping acts on raw rows"})
    add("lazyadam_clipnorm", lambda: LA(learning_rate=0.01, clipnorm=0.1), extra_meta=tol)
    add("lazyadam_global_clipnorm", lambda: LA(learning_rate=0.01, global_clipnorm=0.1),
        extra_meta=tol)
    add("adam_clipvalue", lambda: legacy.Adam(learning_rate=0.01, clipvalue=0.05),
        extra_meta={"note": "step 5 pushes row 9 four times; clipping acts on raw rows"})
    add("adam_clipnorm", lambda: legacy.Adam(learning_rate=0.01, clipnorm=0.1), extra_meta=tol)
    add("adam_global_clipnorm", lambda: legacy.Adam(learning_rate=0.01, global_clipnorm=0.1),
        extra_meta=tol)
    add("sgd_clipvalue", lambda: legacy.SGD(learning_rate=0.1, clipvalue=0.05))

    # Keras 2.15 "new" optimizer (tf.keras.optimizers.Adam in TF 2.11-2.15)
    KA = tf.keras.optimizers.Adam
    add("kerasnew_adam", lambda: KA(jit_compile=False))
    add("kerasnew_adam_amsgrad", lambda: KA(amsgrad=True, jit_compile=False))
    add("kerasnew_adam_wd", lambda: KA(weight_decay=0.004, jit_compile=False))

    # ---------------- Issue 14: Adagrad, Ftrl, RMSprop (Keras 2.15 legacy) ----------------
    AG, FT, RP = legacy.Adagrad, legacy.Ftrl, legacy.RMSprop
    add("adagrad", lambda: AG(learning_rate=0.1))
    add("adagrad_custom", lambda: AG(learning_rate=0.05, initial_accumulator_value=0.0, epsilon=1e-3))
    add("adagrad_mixed", lambda: AG(learning_rate=0.1), plan="mixed", dtypes=("float32",))
    add("adagrad_decay", lambda: AG(learning_rate=0.1, decay=0.05), dtypes=("float32",))
    add("ftrl", lambda: FT(learning_rate=0.1))
    add("ftrl_l1l2", lambda: FT(learning_rate=0.1, l1_regularization_strength=0.05,
                                l2_regularization_strength=0.01, beta=0.5),
        extra_meta={"note": "l1 large enough to zero rows (|linear| <= l1); beta adjusts l2"})
    add("ftrl_shrinkage", lambda: FT(learning_rate=0.1, l1_regularization_strength=0.01,
                                     l2_shrinkage_regularization_strength=0.02),
        extra_meta={"note": "l2_shrinkage > 0: the FtrlV2 kernels"})
    add("ftrl_power", lambda: FT(learning_rate=0.1, learning_rate_power=-0.25,
                                 initial_accumulator_value=0.5),
        extra_meta={"note": "learning_rate_power != -0.5: pow instead of sqrt in the kernels"})
    add("ftrl_mixed", lambda: FT(learning_rate=0.1, l1_regularization_strength=0.01), plan="mixed",
        dtypes=("float32",),
        extra_meta={"note": "the dense kernel rewrites every row of var (untouched rows too)"})
    add("rmsprop", lambda: RP(learning_rate=0.01),
        extra_meta={"note": "momentum 0: rms decays on every row at every push, empty ones too"})
    add("rmsprop_centered", lambda: RP(learning_rate=0.01, centered=True))
    add("rmsprop_momentum", lambda: RP(learning_rate=0.01, momentum=0.9))
    add("rmsprop_momentum_centered", lambda: RP(learning_rate=0.01, momentum=0.9, centered=True))
    add("rmsprop_mixed", lambda: RP(learning_rate=0.01, centered=True), plan="mixed",
        dtypes=("float32",))
    add("rmsprop_momentum_mixed", lambda: RP(learning_rate=0.01, momentum=0.5), plan="mixed",
        dtypes=("float32",))
    add("rmsprop_expdecay", lambda: RP(learning_rate=sched.ExponentialDecay(0.01, 5, 0.5)),
        dtypes=("float32",))

    out = []
    for name, mk, dt, kw, expect_nan in C:
        out.append((name, (lambda name=name, mk=mk, dt=dt, kw=kw:
                           run_case(name, mk, dtype=dt, **kw)), expect_nan))
    for dt, sfx in (("float32", "_f32"), ("float64", "_f64")):
        out.append(("contrib_lazyadam_v1" + sfx,
                    (lambda dt=dt, sfx=sfx: run_contrib_v1("contrib_lazyadam_v1" + sfx, dtype=dt)),
                    False))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="substrings of case names")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    todo = cases()
    names = [c[0] for c in todo]
    assert len(names) == len(set(names)), "duplicate case names"
    if args.list:
        print("\n".join(names))
        return
    n = 0
    for name, fn, expect_nan in todo:
        if args.only and not any(s in name for s in args.only):
            continue
        path, nan_at = fn()
        n += 1
        flag = ""
        if expect_nan and nan_at is None:
            flag = "  !! expected NaN, none seen"
        elif nan_at is not None:
            flag = "  (NaN from step %d%s)" % (nan_at, "" if expect_nan else " UNEXPECTED")
        print("wrote %-45s %7d bytes%s" % (os.path.relpath(path, common.ROOT),
                                           os.path.getsize(path), flag), flush=True)
    print("%d cases written" % n)


if __name__ == "__main__":
    main()
