"""hash_strings for tensors: string features as int64 keys, in-graph (the algorithm: sparseps/hashing.py)."""
import numpy as np
import tensorflow as tf

from .. import hashing


def hash_strings(values):
    """int64 keys of string features: SipHash-2-4 with sparseps' fixed key, mod 2^63 - 1.

        keys = spk.hash_strings(tf.constant([["us", "mobile"], ["de", "web"]]))   # tf.int64, same shape
        keys = spk.hash_strings(np.array(["us", "de"]))                           # np.int64, no TF op

    A tf.Tensor (eager or inside tf.function / tf.data) goes through TensorFlow's own
    `tf.strings.to_hash_bucket_strong`; anything else through the numpy implementation in
    `sparseps.hashing`, which gives the same values (and needs no TensorFlow).
    """
    if isinstance(values, (tf.Tensor, tf.Variable)) or tf.is_tensor(values):
        if values.dtype != tf.string:
            raise TypeError(f"hash_strings takes a tf.string tensor, got {values.dtype.name}; integer ids are keys "
                            "already")
        return tf.strings.to_hash_bucket_strong(values, hashing.MOD, [hashing.K0, hashing.K1])
    return np.asarray(hashing.hash_strings(values), np.int64)
