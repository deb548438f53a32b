"""A cluster variable seen from TensorFlow: RemoteVariable, the handle that stands for it on the tape, export.

A remote layer owns one tiny local Keras weight, its *handle* (a scalar that never changes),
marked with the RemoteVariable it stands for; remote_name() finds the cluster variable behind a
handle, layer or RemoteVariable, which is how the optimizer tells remote gradients from local ones.
"""
import collections
import threading

import numpy as np
import tensorflow as tf
import keras

from .. import errors
from ..client import Variable as _ServerVariable
from .clients import client_and_optimizer, get_client

_ATTR = "_sparseps_remote"          # set on a handle (Keras variable and its tf.Variable): the RemoteVariable
_LATER = object()                   # handle= sentinel: the owning layer calls set_handle() itself


def _initializer_config(init):
    """A Keras initializer (name, dict or object) as the server's {"class_name", "config"} form."""
    if init is None:
        return None
    aliases = {"uniform": "RandomUniform", "normal": "RandomNormal", "random_uniform": "RandomUniform",
               "random_normal": "RandomNormal", "zeros": "Zeros", "ones": "Ones",
               "truncated_normal": "TruncatedNormal", "glorot_uniform": "GlorotUniform",
               "glorot_normal": "GlorotNormal", "he_uniform": "HeUniform", "he_normal": "HeNormal",
               "lecun_uniform": "LecunUniform", "lecun_normal": "LecunNormal"}
    if isinstance(init, str):
        return {"class_name": aliases.get(init, init), "config": {}}
    if isinstance(init, dict):
        return {"class_name": aliases.get(init["class_name"], init["class_name"]),
                "config": dict(init.get("config") or {})}
    cfg = dict(init.get_config())
    if cfg.get("seed") is not None and not isinstance(cfg["seed"], int):
        cfg["seed"] = None
    return {"class_name": type(init).__name__, "config": cfg}



class RemoteVariable:
    """A variable of the cluster seen from TensorFlow: read it as a tensor (differentiably), numpy or npz.

        kernel = spk.RemoteVariable.create("kernel", initial_value=np.zeros((32, 1), np.float32), optimizer=opt)
        y = tf.matmul(x, kernel.read())        # gradient reaches kernel.handle; opt pushes it
        kernel.numpy(); tf.convert_to_tensor(kernel)

    `handle` is the trainable local Keras weight standing for it in `trainable_variables`.
    """

    def __init__(self, variable, *, client=None, handle=None, name=None):
        if isinstance(variable, _ServerVariable):
            self.variable = variable
        else:
            self.variable = get_client(client).variable(str(variable))
        self.client = self.variable.client
        self.name = self.variable.name
        self.shape = tuple(self.variable.shape)
        self.dtype = tf.as_dtype(self.variable.dtype)
        if handle is None:
            handle = keras.Variable(0.0, dtype="float32", trainable=True, name=name or _safe(self.name) + "_handle")
        self.handle = None
        if handle is not _LATER:
            self.set_handle(handle)
        # prefetched rows: key -> (sorted unique ids, rows); filled by Prefetcher, consumed by lookups
        self._prefetched = collections.OrderedDict()
        self._prefetch_lock = threading.Lock()
        self.prefetch_hits = 0
        self.prefetch_misses = 0

    def set_handle(self, handle):
        """Make `handle` (a trainable scalar Keras weight) stand for this variable."""
        self.handle = handle
        _mark(handle, self)

    @classmethod
    def create(cls, name, initial_value=None, *, shape=None, dtype="float32", initializer=None, optimizer=None,
               client=None, partition=None, handle=None):
        """Create (or find, if identical) the variable on the cluster and wrap it."""
        client, optimizer = client_and_optimizer(client, optimizer)
        c = get_client(client)
        v = c.create_variable(name, initial_value, shape=shape, dtype=dtype,
                              initializer=_initializer_config(initializer), optimizer=optimizer, partition=partition)
        return cls(v, handle=handle)

    def __repr__(self):
        return f"<sparseps.keras.RemoteVariable {self.name!r} shape={self.shape} dtype={self.dtype.name}>"

    @property
    def trainable_variables(self):
        return [self.handle]

    # -- reading
    def numpy(self) -> np.ndarray:
        """The whole variable, pulled now."""
        return self.variable.numpy()

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def value(self) -> tf.Tensor:
        """The whole variable as a tf.Tensor (not differentiable; see read())."""
        if tf.executing_eagerly():
            return tf.constant(self.numpy())
        out = tf.numpy_function(self.numpy, [], self.dtype, stateful=True, name="sparseps_pull_all")
        out.set_shape(self.shape)
        return out

    def read(self) -> tf.Tensor:
        """The whole variable as a tensor whose gradient reaches `handle` (dense: for small variables)."""
        handle = self.handle

        @tf.custom_gradient
        def _read():
            _handle_read(handle)            # the tape sees the handle used here
            out = self.value()

            def grad(dy, variables=None):
                return [], [dy for _ in (variables or [])]
            return out, grad
        return _read()

    def lookup(self, ids) -> tf.Tensor:
        """Rows `ids` (any shape) as a tensor of shape ids.shape + row shape, differentiable.

        The ids are deduplicated here, only the unique rows are pulled (or taken from a prefetch),
        and the gradient reaches `handle` as IndexedSlices(values=per-id rows, indices=ids).
        """
        ids = tf.cast(tf.convert_to_tensor(ids), tf.int64)
        row_shape = list(self.shape[1:])
        flat = tf.reshape(ids, [-1])
        uniq, idx = tf.unique(flat)
        dense_shape = tf.constant(self.shape, tf.int64)
        handle = self.handle

        @tf.custom_gradient
        def _lookup():
            _handle_read(handle)            # the tape sees the handle used here
            rows = self._pull_unique(uniq)
            out = tf.gather(rows, idx)

            def grad(dy, variables=None):
                g = tf.IndexedSlices(tf.reshape(dy, [-1] + row_shape), flat, dense_shape)
                return [], [g for _ in (variables or [])]
            return out, grad
        out = _lookup()
        return tf.reshape(out, tf.concat([tf.shape(ids), tf.constant(row_shape, tf.int32)], 0))

    def _pull_unique(self, uniq):
        if tf.executing_eagerly():
            return tf.constant(self.pull_rows(uniq.numpy()))
        rows = tf.numpy_function(self.pull_rows, [uniq], self.dtype, stateful=True, name="sparseps_pull")
        rows.set_shape([None] + list(self.shape[1:]))
        return rows

    def pull_rows(self, ids) -> np.ndarray:
        """Rows `ids` (unique ids) as numpy: from a matching prefetch, else pulled now."""
        ids = np.asarray(ids, np.int64)
        if self._prefetched:
            key = _key(ids)
            with self._prefetch_lock:
                hit = self._prefetched.pop(key, None)
            if hit is not None and np.array_equal(hit[0], ids):
                self.prefetch_hits += 1
                return hit[1]
            self.prefetch_misses += 1
        return self.variable.pull(ids)

    def _offer(self, ids, rows, limit=8):
        """Rows prefetched for `ids`, in the order the lookup will ask for them (tf.unique's)."""
        with self._prefetch_lock:
            self._prefetched[_key(ids)] = (ids, rows)
            while len(self._prefetched) > limit:
                self._prefetched.popitem(last=False)

    # -- writing and export
    def assign(self, value, ids=None):
        """Overwrite the whole variable (or rows `ids`) without an optimizer step."""
        self.variable.assign(np.asarray(value), ids)

    def export_npz(self, path, **kw):
        return export_npz(self, path, **kw)

    def export_saved_model(self, path):
        return export_saved_model(self, path)


def _key(ids):
    return (len(ids), hash(ids.tobytes()))


def _safe(name):
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in name)


def _mark(handle, remote):
    setattr(handle, _ATTR, remote)
    inner = getattr(handle, "value", None)      # a Keras 3 variable wraps a tf.Variable
    if isinstance(inner, tf.Variable):
        try:
            setattr(inner, _ATTR, remote)
        except (AttributeError, TypeError):
            pass


def _handle_read(handle):
    """A read of the handle, so that the tape (and tf.custom_gradient) sees the variable used."""
    v = handle.value if isinstance(getattr(handle, "value", None), tf.Variable) else handle
    return tf.identity(v)


def remote_name(var):
    """The cluster variable a handle / layer / RemoteVariable stands for, or None for a local variable."""
    if isinstance(var, str):
        return var
    if isinstance(var, (_ServerVariable, RemoteVariable)):
        return var.name
    r = getattr(var, _ATTR, None)
    if r is None and isinstance(var, keras.layers.Layer) and isinstance(getattr(var, "remote", None), RemoteVariable):
        r = var.remote
    return r.name if r is not None else None


def is_remote(var) -> bool:
    return remote_name(var) is not None


def read(var) -> np.ndarray:
    """A remote variable (handle, layer, RemoteVariable, name) or a local one, as numpy."""
    r = getattr(var, _ATTR, None) or getattr(var, "remote", None)
    if isinstance(var, RemoteVariable):
        r = var
    if isinstance(r, RemoteVariable):
        return r.numpy()
    if isinstance(var, _ServerVariable):
        return var.numpy()
    return np.asarray(keras.ops.convert_to_numpy(var))


def _to_tensor(value, dtype=None, name=None, as_ref=False):
    return value.value() if dtype is None or tf.as_dtype(dtype) == value.dtype else tf.cast(value.value(), dtype)


tf.register_tensor_conversion_function(RemoteVariable, _to_tensor)


def _remote_of(obj) -> RemoteVariable:
    if isinstance(obj, RemoteVariable):
        return obj
    r = getattr(obj, "remote", None) or getattr(obj, _ATTR, None)
    if not isinstance(r, RemoteVariable):
        raise ValueError(f"{obj!r} is not a sparseps.keras layer or RemoteVariable")
    return r



def export_npz(table, path, *, slots: bool = False, optimizer=None) -> str:
    """Write a remote table to `path` (.npz): "values" (+ slots "slot/m"... when slots=True); a dynamic
    table's live rows with their "keys" (and each slot's rows with "slot_keys/m"...)."""
    remote = _remote_of(table) if not isinstance(table, _ServerVariable) else None
    var = remote.variable if remote is not None else table
    if var.dynamic:         # live rows with their keys; a slot's rows in the order of its own export
        keys, values = var.export()
        out = {"keys": keys, "values": values, "name": np.array(var.name)}
    else:
        out = {"values": var.numpy(), "name": np.array(var.name)}
    if slots:
        opt = var.optimizer
        if opt is not None:
            for s in opt.get_slot_names():
                try:
                    if var.dynamic:
                        out[f"slot_keys/{s}"], out[f"slot/{s}"] = var.export(slot=s)
                    else:
                        out[f"slot/{s}"] = opt.get_slot(var, s)
                except errors.Error:
                    pass
    np.savez(path, **out)
    return path if str(path).endswith(".npz") else str(path) + ".npz"


class _LookupModule(tf.Module):
    def __init__(self, values, name):
        super().__init__(name=_safe(name))
        self.table = tf.Variable(values, trainable=False, name="table")
        self.variable_name = tf.Variable(name, trainable=False, dtype=tf.string, name="variable_name")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def lookup(self, ids):
        return {"rows": tf.gather(self.table, ids)}


def export_saved_model(table, path) -> str:
    """A TensorFlow SavedModel serving lookups of the table's current values.

        spk.export_saved_model(users, "/tmp/users_sm")
        m = tf.saved_model.load("/tmp/users_sm"); m.signatures["lookup"](ids=tf.constant([3, 7]))["rows"]
    """
    remote = _remote_of(table) if not isinstance(table, _ServerVariable) else None
    var = remote.variable if remote is not None else table
    if var.dynamic:
        raise ValueError(f"export_saved_model: {var.name!r} is a dynamic variable; export its live rows with "
                         "export_npz or Variable.export() (keys, rows)")
    module = _LookupModule(var.numpy(), var.name)
    tf.saved_model.save(module, str(path), signatures={"lookup": module.lookup, "serving_default": module.lookup})
    return str(path)


def load_saved_model(path):
    """The module written by export_saved_model: .lookup(ids) -> {"rows": ...}, .table."""
    return tf.saved_model.load(str(path))
