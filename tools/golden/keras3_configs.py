"""Keras 3 (TF 2.21) optimizer configs and Adam trajectories.

Run with the project venv (tensorflow 2.21 / Keras 3):

    .venv/bin/python tools/golden/keras3_configs.py

Writes
  tests/golden/keras3_configs.json      real get_config() / keras.optimizers.serialize() output
  tests/golden/keras3_adam_f32.npz      keras.optimizers.Adam(), sparse table + dense var, 30 steps
  tests/golden/keras3_adam_wd_f32.npz   keras.optimizers.Adam(weight_decay=0.004), same plan
  tests/golden/keras3_{adagrad,ftrl,rmsprop}*_f{32,64}.npz   Adagrad, Ftrl, RMSprop, same plan
(format: tools/golden/FORMAT.md; same `standard` gradient plan as generate.py).
"""
import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
warnings.filterwarnings("ignore")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import common  # noqa: E402
from common import sanitize  # noqa: E402

import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

REFERENCE = {
    "tensorflow": tf.__version__,
    "keras": keras.__version__,
    "keras_backend": keras.backend.backend(),
    "numpy": np.__version__,
    "python": common.python_version(),
    "note": "TF 2.21 / Keras 3 (not the tfa 0.23 / Keras 2.15 reference)",
    "mode": "eager, one optimizer.apply_gradients call per step on keras.Variable objects",
}


def configs():
    K = keras.optimizers
    entries = {
        "adam_default": K.Adam(),
        "adam_amsgrad_wd": K.Adam(amsgrad=True, weight_decay=0.01),
        "sgd_momentum_nesterov": K.SGD(momentum=0.9, nesterov=True),
        "adam_use_ema": K.Adam(use_ema=True),
        "adam_expdecay": K.Adam(learning_rate=K.schedules.ExponentialDecay(
            initial_learning_rate=0.01, decay_steps=5, decay_rate=0.5)),
        "adagrad_default": K.Adagrad(),
        "ftrl_l1l2": K.Ftrl(l1_regularization_strength=0.01, l2_regularization_strength=0.01),
        "rmsprop_momentum_centered": K.RMSprop(momentum=0.9, centered=True),
    }
    out = {"reference": REFERENCE, "optimizers": {}}
    code = {
        "adam_default": "keras.optimizers.Adam()",
        "adam_amsgrad_wd": "keras.optimizers.Adam(amsgrad=True, weight_decay=0.01)",
        "sgd_momentum_nesterov": "keras.optimizers.SGD(momentum=0.9, nesterov=True)",
        "adam_use_ema": "keras.optimizers.Adam(use_ema=True)",
        "adam_expdecay": "keras.optimizers.Adam(learning_rate=keras.optimizers.schedules."
                         "ExponentialDecay(initial_learning_rate=0.01, decay_steps=5, "
                         "decay_rate=0.5))",
        "adagrad_default": "keras.optimizers.Adagrad()",
        "ftrl_l1l2": "keras.optimizers.Ftrl(l1_regularization_strength=0.01, "
                     "l2_regularization_strength=0.01)",
        "rmsprop_momentum_centered": "keras.optimizers.RMSprop(momentum=0.9, centered=True)",
    }
    for key, opt in entries.items():
        out["optimizers"][key] = {
            "code": code[key],
            "get_config": sanitize(opt.get_config()),
            "serialize": sanitize(keras.optimizers.serialize(opt)),
        }
    return out


# slot name (as add_optimizer_variables names it) -> list attribute, per class
SLOT_ATTRS = {
    "Adagrad": (("accumulator", "_accumulators"),),
    "Ftrl": (("accumulator", "_accumulators"), ("linear", "_linears")),
    "RMSprop": (("velocity", "_velocities"), ("momentum", "_momentums"),
                ("average_gradient", "_average_gradients")),
}


def slot_lists(opt):
    out = {}
    attrs = SLOT_ATTRS.get(type(opt).__name__,
                           (("m", "_momentums"), ("v", "_velocities"), ("vhat", "_velocity_hats")))
    for slot, attr in attrs:
        lst = getattr(opt, attr, None)
        if lst:
            out[slot] = lst
    return out


def get_slots(opt, var):
    idx = opt._get_variable_index(var)
    return {s: lst[idx] for s, lst in slot_lists(opt).items()}


def to_grad(g, var):
    if g[0] == "sparse":
        return tf.IndexedSlices(values=tf.constant(g[2], dtype=var.dtype),
                                indices=tf.constant(g[1], dtype=tf.int64),
                                dense_shape=tf.constant(list(var.shape), dtype=tf.int64))
    return tf.constant(g[1], dtype=var.dtype)


def run_case(name, make_opt, dtype="float32", steps=30):
    np_dtype = np.dtype(dtype)
    init, gplan = common.PLANS["standard"](steps=steps)
    init, gplan = common.cast_plan(init, gplan, np_dtype)
    names = common.VAR_ORDER["standard"]
    tvars = {v: keras.Variable(init[v], dtype=dtype, name=v) for v in names}
    opt = make_opt()
    ser = sanitize(keras.optimizers.serialize(opt))
    optimizer_meta = {"class_name": ser.get("registered_name") or ser["class_name"],
                      "config": ser["config"]}
    opt.build([tvars[v] for v in names])
    arrays = {"init/" + v: init[v].copy() for v in names}
    for k, st in enumerate(gplan):
        pairs = []
        for v in names:
            if v in st:
                g = st[v]
                pairs.append((to_grad(g, tvars[v]), tvars[v]))
                if g[0] == "sparse":
                    arrays["step%d/%s/ids" % (k, v)] = g[1]
                    arrays["step%d/%s/rows" % (k, v)] = g[2]
                else:
                    arrays["step%d/%s/dense" % (k, v)] = g[1]
        opt.apply_gradients(pairs)
        for v in names:
            val = np.asarray(tvars[v].numpy())
            assert val.dtype == np_dtype
            arrays["step%d/%s/value" % (k, v)] = val
            for s, sv in get_slots(opt, tvars[v]).items():
                arrays["step%d/%s/slot/%s" % (k, v, s)] = np.asarray(sv.numpy())
        arrays["step%d/iterations" % k] = np.array(int(np.asarray(opt.iterations.numpy())),
                                                   np.int64)
    ids = {id(opt.iterations): ["iterations"]}
    lr_var = getattr(opt, "_learning_rate", None)
    if lr_var is not None and hasattr(lr_var, "numpy"):
        ids[id(lr_var)] = ["learning_rate"]
    for v in names:
        for s, sv in get_slots(opt, tvars[v]).items():
            ids[id(sv)] = [v, s]
    order = []
    for i, w in enumerate(opt.variables):
        val = np.asarray(w.numpy())
        if ids.get(id(w)) == ["iterations"]:
            val = val.astype(np.int64)
        arrays["weights/%d" % i] = val
        order.append(ids.get(id(w), ["unknown", w.path if hasattr(w, "path") else w.name]))
    meta = {
        "reference": REFERENCE,
        "reference_class": type(opt).__module__ + "." + type(opt).__name__,
        "optimizer": optimizer_meta,
        "optimizer_serialized": ser,
        "reference_get_config": sanitize(opt.get_config()),
        "dtype": dtype,
        "variables": [{"name": v, "shape": list(init[v].shape)} for v in names],
        "slot_names": list(slot_lists(opt).keys()),
        "weights_order": order,
        "weights_note": "Keras 3 optimizer.variables order; includes the learning-rate "
                        "variable (and `iterations` stored as int64)",
        "steps": steps,
        "grad_kinds": common.grad_kinds(gplan),
        "plan": "standard",
        "plan_doc": " ".join(common.PLANS["standard"].__doc__.split()),
    }
    return common.write_case(name, meta, arrays)


ONLY = sys.argv[1:]   # optional substrings of trajectory names


def main():
    cfg = configs()
    path = os.path.join(common.OUT_DIR, "keras3_configs.json")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=False)
        f.write("\n")
    print("wrote", os.path.relpath(path, common.ROOT))
    K = keras.optimizers
    for name, mk in (("keras3_adam_f32", lambda: K.Adam()),
                     ("keras3_adam_wd_f32", lambda: K.Adam(weight_decay=0.004)),
                     ("keras3_adagrad_f32", lambda: K.Adagrad(learning_rate=0.1)),
                     ("keras3_adagrad_f64", lambda: K.Adagrad(learning_rate=0.1)),
                     ("keras3_adagrad_wd_f32", lambda: K.Adagrad(learning_rate=0.1, weight_decay=0.004)),
                     # Ftrl in float64 only: Keras 3 takes tf.pow, whose float32 result is not
                     # correctly rounded (1 ulp off for ~30 % of inputs), and p(new) - p(accum)
                     # amplifies that past the float32 tolerance (docs/optimizers.md)
                     ("keras3_ftrl_l1l2_f64", lambda: K.Ftrl(
                         learning_rate=0.1, l1_regularization_strength=0.05,
                         l2_regularization_strength=0.01, beta=0.5,
                         l2_shrinkage_regularization_strength=0.02)),
                     ("keras3_ftrl_f64", lambda: K.Ftrl(learning_rate=0.1)),
                     ("keras3_rmsprop_f32", lambda: K.RMSprop(learning_rate=0.01)),
                     ("keras3_rmsprop_f64", lambda: K.RMSprop(learning_rate=0.01)),
                     ("keras3_rmsprop_centered_f32", lambda: K.RMSprop(learning_rate=0.01, centered=True)),
                     ("keras3_rmsprop_momentum_centered_f32",
                      lambda: K.RMSprop(learning_rate=0.01, momentum=0.9, centered=True)),
                     ("keras3_rmsprop_momentum_f64", lambda: K.RMSprop(learning_rate=0.01, momentum=0.9))):
        if ONLY and not any(o in name for o in ONLY):
            continue
        p = run_case(name, mk, dtype="float64" if name.endswith("_f64") else "float32")
        print("wrote %-45s %7d bytes" % (os.path.relpath(p, common.ROOT), os.path.getsize(p)))


if __name__ == "__main__":
    main()
