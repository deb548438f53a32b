"""Keras layers whose weights live on the cluster: Embedding (rows pulled by id) and Dense (pulled whole)."""
import zlib

import numpy as np
import tensorflow as tf
import keras

from ..client import Variable as _ServerVariable
from .clients import client_and_optimizer
from .variables import _LATER, RemoteVariable, _initializer_config, _safe, export_npz, export_saved_model, remote_name


class Embedding(keras.layers.Layer):
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
            remote = variable if isinstance(variable, RemoteVariable) else \
                RemoteVariable(variable, client=client, handle=_LATER)
        self.handle = self.add_weight(shape=(), initializer="zeros", trainable=True, name="remote_handle")
        remote.set_handle(self.handle)
        self._remote = remote
        self.input_dim, self.output_dim = remote.shape[0], int(np.prod(remote.shape[1:]))
        self.built = True

    @property
    def remote(self) -> RemoteVariable:
        return self._remote

    @property
    def variable(self) -> _ServerVariable:
        return self._remote.variable

    def call(self, ids):
        return self._remote.lookup(ids)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + tuple(self._remote.shape[1:])

    def numpy(self) -> np.ndarray:
        return self._remote.numpy()

    def export_npz(self, path, **kw):
        return export_npz(self._remote, path, **kw)

    def export_saved_model(self, path):
        return export_saved_model(self._remote, path)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(input_dim=self.input_dim, output_dim=self.output_dim, variable=self._remote.name)
        return cfg


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
        init = _initializer_config(kernel_initializer)
        if init and init["class_name"] not in ("Zeros", "Ones", "Constant") and init["config"].get("seed") is None:
            init["config"]["seed"] = zlib.crc32(name.encode()) & 0x7FFFFFFF   # the same in every worker
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

