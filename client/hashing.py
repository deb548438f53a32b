"""String features as int64 keys of a dynamic variable: one stable 64-bit hash, the same everywhere.

    keys = sparseps.hashing.hash_strings(np.array(["us", "de", "fr"]))      # numpy, no TensorFlow
    keys = sparseps.keras.hash_strings(tf.constant(["us", "de", "fr"]))     # the same values, in-graph

hash_strings(s) = SipHash-2-4(key (K0, K1), UTF-8 bytes of s) mod (2^63 - 1), a non-negative int64.
SipHash-2-4 is the keyed hash of Aumasson & Bernstein (2012); K0 and K1 below are fixed, so a
string's key does not depend on the process, the machine or the Python version (unlike Python's
salted hash()). It is exactly what TensorFlow's `tf.strings.to_hash_bucket_strong(s, 2**63 - 1,
[K0, K1])` computes, which is what sparseps.keras uses on tensors, so a feature hashed by a numpy
pipeline, by a tf.data pipeline or inside a tf.function reads the same row. Any language with a
SipHash-2-4 reproduces it. Distinct strings collide with probability about n^2 / 2^64.
"""
import numpy as np

K0 = 0x7370657372617073        # int.from_bytes(b"sparseps", "little")
K1 = 0x0073676E69727473        # int.from_bytes(b"strings\0", "little")
MOD = (1 << 63) - 1

_M = (1 << 64) - 1


def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & _M


def siphash24(k0: int, k1: int, data: bytes) -> int:
    """SipHash-2-4 of `data` under the 128-bit key (k0, k1), as an unsigned 64-bit int."""
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def sip_round(v0, v1, v2, v3):
        v0 = (v0 + v1) & _M
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _M
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _M
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _M
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
        return v0, v1, v2, v3

    n = len(data)
    end = n - n % 8
    for i in range(0, end, 8):
        m = int.from_bytes(data[i:i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = sip_round(*sip_round(v0, v1, v2, v3))
        v0 ^= m
    m = ((n & 0xFF) << 56) | int.from_bytes(data[end:], "little")
    v3 ^= m
    v0, v1, v2, v3 = sip_round(*sip_round(v0, v1, v2, v3))
    v0 ^= m
    v2 ^= 0xFF
    for _ in range(4):
        v0, v1, v2, v3 = sip_round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def hash_string(s) -> int:
    """The int64 key of one string (str: its UTF-8 bytes; bytes: as they are)."""
    return siphash24(K0, K1, s.encode("utf-8") if isinstance(s, str) else bytes(s)) % MOD


def hash_strings(values) -> np.ndarray:
    """int64 keys of strings (a str, bytes, list or ndarray of them), same shape; each distinct
    string is hashed once."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "USO":
        raise TypeError(f"hash_strings takes strings (str or bytes), got an array of {arr.dtype}; integer ids are "
                        "keys already")
    flat = arr.reshape(-1)
    bad = [s for s in flat[:1000] if not isinstance(s, (str, bytes))] if arr.dtype.kind == "O" else []
    if bad:
        raise TypeError(f"hash_strings takes strings (str or bytes), got {type(bad[0]).__name__} {bad[0]!r}")
    try:
        uniq, inverse = np.unique(flat, return_inverse=True)
    except TypeError:
        raise TypeError("hash_strings takes strings (str or bytes), got a mixture of other objects") from None
    keys = np.fromiter((hash_string(s) for s in uniq), np.int64, len(uniq))
    return keys[inverse.reshape(-1)].reshape(arr.shape)
