"""Keras layers whose weights live on the cluster: Embedding and DynamicEmbedding (rows pulled by id or by
int64 key) and Dense (pulled whole)."""
import zlib

import numpy as np
import tensorflow as tf
import keras

from .. import errors
from ..client import Variable as _ServerVariable
from .clients import client_and_optimizer, get_client
from .hashing import hash_strings
from .variables import _LATER, RemoteVariable, _initializer_config, _safe, export_npz, export_saved_model, remote_name


class _Table(keras.layers.Layer):
    """What Embedding and DynamicEmbedding share: a cluster variable and the handle standing for it."""

    @staticmethod
    def _wrap(variable, client) -> RemoteVariable:
        return variable if isinstance(variable, RemoteVariable) else \
            RemoteVariable(variable, client=client, handle=_LATER)

    def _attach(self, remote: RemoteVariable):
        self.handle = self.add_weight(shape=(), initializer="zeros", trainable=True, name="remote_handle")
        remote.set_handle(self.handle)
        self._remote = remote
        self.built = True

    @property
    def remote(self) -> RemoteVariable:
        return self._remote

    @property
    def variable(self) -> _ServerVariable:
        return self._remote.variable

    def export_npz(self, path, **kw):
        return export_npz(self._remote, path, **kw)


class Embedding(_Table):
    """`keras.layers.Embedding` whose table lives on the cluster; the layer holds no rows.

        emb = spk.Embedding(100_000, 32, name="users", optimizer=opt)       # creates the table
        emb = spk.Embedding(variable="users", client=client)                 # an existing table
        vectors = emb(ids)                                                   # ids.shape + (32,)

    The cluster variable is called `name` (give one explicitly when several workers share it).
    """

    def __init__(self, input_dim=None, output_dim=None, *, variable=None, client=None, optimizer=None,
                 embeddings_initializer="uniform", initial_value=None, dtype="float32", partition=None,
                 name=None, **kwargs):
        if variable is None and name is None:
            raise ValueError("sparseps.keras.Embedding needs name= (the table's name on the cluster) or variable=")
        super().__init__(name=name or _safe(remote_name(variable)), **kwargs)
        client, optimizer = client_and_optimizer(client, optimizer)
        if variable is None:
            if initial_value is None and (input_dim is None or output_dim is None):
                raise ValueError("sparseps.keras.Embedding: give input_dim and output_dim, initial_value or variable")
            remote = RemoteVariable.create(name, initial_value, shape=None if initial_value is not None else
                                           (input_dim, output_dim), dtype=dtype, initializer=embeddings_initializer
                                           if initial_value is None else None, optimizer=optimizer, client=client,
                                           partition=partition, handle=_LATER)
        else:
            remote = self._wrap(variable, client)
        if remote.variable.dynamic:
            raise ValueError(f"{remote.name!r} is a dynamic variable (rows keyed by any int64): use "
                             "sparseps.keras.DynamicEmbedding")
        self.input_dim, self.output_dim = remote.shape[0], int(np.prod(remote.shape[1:]))
        self._attach(remote)

    def call(self, ids):
        return self._remote.lookup(ids)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + tuple(self._remote.shape[1:])

    def numpy(self) -> np.ndarray:
        return self._remote.numpy()

    def export_saved_model(self, path):
        return export_saved_model(self._remote, path)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(input_dim=self.input_dim, output_dim=self.output_dim, variable=self._remote.name)
        return cfg


class DynamicEmbedding(_Table):
    """An embedding table keyed by any int64 (or string) id, with no row count: a dynamic variable
    on the cluster (docs/dynamic.md). A row is created by the first push that touches its key; a
    key without a row reads as its initial value.

        users = spk.DynamicEmbedding(32, name="users", optimizer=opt, eviction={"max_age_steps": 10_000})
        vectors = users(tf.constant([-7, 2**62 + 3], tf.int64))                    # ids.shape + (32,)
        country = spk.DynamicEmbedding(8, name="country", optimizer=opt, input_type="string")
        vectors = country(tf.constant(["us", "de"]))          # keys: spk.hash_strings of the strings
        emb = spk.DynamicEmbedding(variable="users", client=client)                # an existing table

    Gradients reach the optimizer as IndexedSlices whose indices are the int64 keys, exactly as
    Embedding's carry row ids, so `opt.apply_gradients` pushes them in the same single step.
    admission / eviction / capacity / on_full: the table's policy, as Client.create_variable takes
    them. An initializer without a seed gets one from the table's name, so that every worker (and
    every restart) creating the table agrees on the initial value of every key.
    """

    def __init__(self, dim=None, *, variable=None, client=None, optimizer=None, embeddings_initializer="uniform",
                 dtype="float32", input_type="int64", admission=None, eviction=None, capacity=None, on_full=None,
                 name=None, **kwargs):
        if variable is None and name is None:
            raise ValueError("sparseps.keras.DynamicEmbedding needs name= (the table's name on the cluster) or "
                             "variable=")
        if input_type not in ("int64", "string"):
            raise ValueError(f"DynamicEmbedding input_type must be 'int64' or 'string', got {input_type!r}")
        super().__init__(name=name or _safe(remote_name(variable)), **kwargs)
        client, optimizer = client_and_optimizer(client, optimizer)
        if variable is None:
            if dim is None:
                raise ValueError("sparseps.keras.DynamicEmbedding: give dim (the row width) or variable=")
            c = get_client(client)
            try:
                var = c.create_variable(name, dim=dim, dynamic=True, dtype=dtype, optimizer=optimizer,
                                        initializer=_seeded(embeddings_initializer, name), admission=admission,
                                        eviction=eviction, capacity=capacity, on_full=on_full)
            except errors.AlreadyExists as e:        # say what differs when it is the kind or the width
                var = c.variable(name)
                if var.dynamic and var.shape[1] == dim:
                    raise
                raise errors.AlreadyExists(f"{e.message}: it is {var!r}, this layer asks for a dynamic variable "
                                           f"of dim={dim}", e.code) from None
            remote = RemoteVariable(var, handle=_LATER)
        else:
            remote = self._wrap(variable, client)
        if not remote.variable.dynamic:
            raise ValueError(f"{remote.name!r} is a fixed table of shape {remote.shape}: use sparseps.keras.Embedding")
        if dim is not None and int(dim) != remote.shape[1]:
            raise ValueError(f"dynamic variable {remote.name!r} has rows of width {remote.shape[1]}, not dim={dim}")
        self.dim = self.output_dim = remote.shape[1]
        self.input_type = input_type
        self._attach(remote)

    def keys(self, ids):
        """The int64 keys of `ids` (hashed when input_type="string"); refuses float ids."""
        if self.input_type == "string":
            return hash_strings(ids if tf.is_tensor(ids) else tf.constant(ids, tf.string))
        ids = ids if tf.is_tensor(ids) else tf.convert_to_tensor(np.asarray(ids) if isinstance(ids, list) else ids)
        if ids.dtype == tf.string:
            raise TypeError(f"DynamicEmbedding {self.name!r}: ids are strings; give input_type='string' or hash "
                            "them with sparseps.keras.hash_strings")
        if not ids.dtype.is_integer:
            raise TypeError(f"DynamicEmbedding {self.name!r}: ids must be integers (int64 keys), got "
                            f"{ids.dtype.name}; a float id would be rounded to another key")
        return tf.cast(ids, tf.int64)

    def call(self, ids):
        return self._remote.lookup(self.keys(ids))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.dim,)

    def pull(self, ids) -> np.ndarray:
        """Rows of `ids` (keys, or strings when input_type="string") as numpy, pulled now."""
        return self._remote.variable.pull(np.asarray(self.keys(ids)).reshape(-1)).reshape(np.shape(ids) + (self.dim,))

    def size(self) -> int:
        """Live rows, all shards."""
        return self._remote.variable.size()

    def export(self, since_step=0, slot=""):
        """(keys, rows) of every live row (since_step > 0: rows updated after that step)."""
        return self._remote.variable.export(since_step=since_step, slot=slot)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(dim=self.dim, variable=self._remote.name, input_type=self.input_type)
        return cfg


def _seeded(init, name):
    """An initializer config whose missing seed comes from `name`: the same in every worker."""
    init = _initializer_config(init)
    if init and init["class_name"] not in ("Zeros", "Ones", "Constant") and init["config"].get("seed") is None:
        init["config"]["seed"] = zlib.crc32(name.encode()) & 0x7FFFFFFF
    return init


class Dense(keras.layers.Layer):
    """`keras.layers.Dense` whose kernel and bias live on the cluster (pulled each call, pushed dense).

        head = spk.Dense(1, name="head", optimizer=opt, input_dim=32)
    """

    def __init__(self, units, *, input_dim, activation=None, use_bias=True, client=None, optimizer=None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", name=None, **kwargs):
        if name is None:
            raise ValueError("sparseps.keras.Dense needs name= (its variables are <name>/kernel, <name>/bias)")
        super().__init__(name=name, **kwargs)
        client, optimizer = client_and_optimizer(client, optimizer)
        self.units, self.use_bias = int(units), use_bias
        self.activation = keras.activations.get(activation)
        init = _seeded(kernel_initializer, name)
        self.kernel_handle = self.add_weight(shape=(), initializer="zeros", name="kernel_handle")
        self.kernel = RemoteVariable.create(f"{name}/kernel", shape=(input_dim, self.units), initializer=init,
                                            optimizer=optimizer, client=client, partition="whole",
                                            handle=self.kernel_handle)
        if use_bias:
            self.bias_handle = self.add_weight(shape=(), initializer="zeros", name="bias_handle")
            self.bias = RemoteVariable.create(f"{name}/bias", shape=(self.units,),
                                              initializer=_initializer_config(bias_initializer),
                                              optimizer=optimizer, client=client, handle=self.bias_handle)
        self.built = True

    def call(self, x):
        y = tf.matmul(x, self.kernel.read())
        if self.use_bias:
            y = y + self.bias.read()
        return self.activation(y) if self.activation is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

