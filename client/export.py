"""Files of a dynamic variable's live rows, (keys, values), for online serving (`sparseps export`).

    sparseps export 127.0.0.1:50051 --variable emb --out emb.npz                  # every live row
    sparseps export 127.0.0.1:50051 --variable emb --since-step 1200 --out d.npz  # changed after step 1200
    sparseps export 127.0.0.1:50051 --variable emb --tf-checkpoint ckpt/          # ckpt/rows-1.{index,data-*}

Both formats hold three arrays: `keys` (int64, n), `values` (n x dim, the variable's dtype; a
slot's rows with --slot) and `step` (int64 scalar). `step` is the smallest optimizer iteration
count of the shards when the export began: an export with `--since-step STEP` then holds every
row changed since this one (a row changed while this one ran may be in both; serving upserts).

In the TensorFlow checkpoint they are the variables of `tf.train.Checkpoint(keys=, values=, step=)`:

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint("ckpt/"))
    keys = reader.get_tensor("keys/.ATTRIBUTES/VARIABLE_VALUE")
    values = reader.get_tensor("values/.ATTRIBUTES/VARIABLE_VALUE")

(or `tf.train.Checkpoint(keys=tf.Variable(...), values=..., step=...).read(path)` into variables of
the same shape, e.g. to fill a TFRA / `tf.lookup` table). TensorFlow is imported only for that.
"""
import os

import numpy as np

# the TensorFlow checkpoint's tensor names (object-based layout of tf.train.Checkpoint)
KEYS_TENSOR = "keys/.ATTRIBUTES/VARIABLE_VALUE"
VALUES_TENSOR = "values/.ATTRIBUTES/VARIABLE_VALUE"
STEP_TENSOR = "step/.ATTRIBUTES/VARIABLE_VALUE"


def export_rows(client, name: str, since_step: int = 0, slot: str = "") -> tuple:
    """(keys, values, step) of a dynamic variable's live rows (see the module docstring for step)."""
    variable = client.variable(name)
    opt = variable.optimizer
    step = min(opt._info(k).iterations for k in range(client.num_shards)) if opt is not None else 0
    keys, values = variable.export(since_step=since_step, slot=slot)
    return keys, values, step


def write_npz(path: str, keys, values, step: int) -> str:
    """keys, values and step into `path` (exactly that name), replaced whole: a reader never sees
    half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, keys=np.asarray(keys, np.int64), values=np.asarray(values), step=np.int64(step))
    os.replace(tmp, path)
    return path


def write_tf_checkpoint(directory: str, keys, values, step: int, prefix: str = "rows") -> str:
    """keys, values and step as a TensorFlow checkpoint `<directory>/<prefix>-N` (N one more than
    the newest there), made the directory's latest (tf.train.latest_checkpoint); returns its path."""
    from .tf_checkpoint import _next_number, _tf, _write_state

    tf = _tf()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{prefix}-{_next_number(directory, prefix)}")
    ckpt = tf.train.Checkpoint(keys=tf.Variable(np.asarray(keys, np.int64)), values=tf.Variable(np.asarray(values)),
                               step=tf.Variable(np.int64(step)))
    written = ckpt.write(path)
    _write_state(directory, os.path.basename(path))
    return written
