"""Record the reference's own function values (TF 2.15 CPU): tests/golden/functions/tf215.npz.

Run in .venv-golden (tensorflow-cpu 2.15.1):  .venv-golden/bin/python tools/golden/functions.py

What is recorded, and why (tests/test_same_numbers.py replays it on every backend):
* `packet/<dtype>/<y>`: tf.pow over one tensor of ~1 M inputs whose length is a multiple of the
  packet size, so every element takes Eigen's vectorised path. The full results are 4-8 MB per
  exponent, so the file keeps their SHA-256 and the first 4096 values (to show where a mismatch is).
* `scalar/<dtype>/<y>`: tf.pow on 0-d tensors (Eigen's scalar path: libm's pow) for 4096 inputs.
* `beta/<dtype>/<b>`: tf.pow(beta, t) on 0-d tensors for t = 1..10000 (legacy Adam's beta powers).
* `schedule/<name>`: Keras 2.15 learning-rate schedules called with steps 0..3000 (float32).
The inputs are made from integers (bit patterns), not a random stream, so any numpy rebuilds them.
"""
import hashlib
import json
import os
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
from function_inputs import BETAS, EXPONENTS, SCHEDULES, SCHEDULE_STEPS, pow_inputs  # noqa: E402

OUT = os.path.join(HERE, "..", "..", "tests", "golden", "functions", "tf215.npz")
KEEP = 4096


def main():
    import keras
    out, meta = {}, {"tensorflow": tf.__version__, "keras": keras.__version__}
    for dtype in (np.float32, np.float64):
        dn = np.dtype(dtype).name
        x = pow_inputs(dtype)
        assert x.size % 8 == 0
        for y in EXPONENTS:
            got = tf.pow(tf.constant(x), tf.constant(dtype(y))).numpy()
            out[f"packet/{dn}/{y}/sha256"] = np.frombuffer(hashlib.sha256(got.tobytes()).digest(), np.uint8)
            out[f"packet/{dn}/{y}/head"] = got[:KEEP]
            xs = x[::max(1, x.size // KEEP)][:KEEP]
            out[f"scalar/{dn}/{y}/x"] = xs
            out[f"scalar/{dn}/{y}/value"] = np.array([tf.pow(tf.constant(v), tf.constant(dtype(y))).numpy() for v in xs])
        for b in BETAS:
            bt = tf.constant(dtype(np.float32(b)))
            out[f"beta/{dn}/{b}"] = np.array([tf.pow(bt, tf.constant(dtype(t))).numpy() for t in range(1, 10001)])
    for name, cfg in SCHEDULES.items():
        sched = tf.keras.optimizers.schedules.deserialize({"class_name": cfg["class_name"], "config": cfg["config"]})
        out[f"schedule/{name}"] = np.array([sched(tf.constant(s, tf.int64)).numpy() for s in SCHEDULE_STEPS],
                                           np.float32)
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(OUT, **out)
    print("wrote", OUT, len(out), "arrays")


if __name__ == "__main__":
    main()
