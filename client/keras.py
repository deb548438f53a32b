"""sparseps.keras: train a Keras model whose tables live on a sparseps cluster, as if the optimizer were local.

    import sparseps, sparseps.keras as spk
    client = sparseps.connect("127.0.0.1:50051")
    opt = spk.Optimizer(client, "LazyAdam", learning_rate=0.01, name="opt")       # lives on the cluster
    users = spk.Embedding(100_000, 32, client=client, name="users", optimizer=opt)
    items = spk.Embedding(20_000, 32, client=client, name="items", optimizer=opt)

    with tf.GradientTape() as tape:
        logits = tf.reduce_sum(users(u) * items(i), -1)
        loss = keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)
    variables = users.trainable_variables + items.trainable_variables
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))        # one push = one step

How it works. A remote layer owns one tiny local Keras weight, its *handle* (a scalar that never
changes). The forward pass reads the handle and, under a `tf.custom_gradient`, deduplicates the
batch's ids (`tf.unique`), pulls only the unique rows (directly when eager, through
`tf.numpy_function` inside `tf.function`) and gathers them back into batch order. The custom
gradient hands the tape, for the handle, a `tf.IndexedSlices` whose indices are the *table's row
ids* and whose values are the per-example gradient rows -- exactly the IndexedSlices that a local
`tf.keras.layers.Embedding` produces, so several lookups of one table in a step concatenate the
usual way. `Optimizer.apply_gradients` recognises handles, turns every remote gradient into
(ids, rows) or a dense array and sends them all in ONE push: one step of the server's optimizer
(iterations advance once), applied with the reference's semantics (duplicates summed, LazyAdam
touching only those rows). Gradients of ordinary Keras variables go to `local_optimizer`.

Overlap: `Optimizer(..., max_in_flight=N)` sends pushes from a background thread (at most N
queued or on the wire; `apply_gradients` returns at once), and `Prefetcher` pulls the next batch's
unique rows while the current step computes; the lookup uses them when the ids match. Both trade
exactness for speed the way any asynchronous parameter server does: a step may read rows that are
missing up to `max_in_flight` + 1 of this worker's latest updates. `max_in_flight=0` and no
prefetcher reproduce the reference step for step.

This module is the only place sparseps imports TensorFlow; `import sparseps` stays TensorFlow-free.
"""
import collections
import os
import threading
import zlib

import numpy as np
import tensorflow as tf
import keras

from . import errors
from .client import Client
from .client import Optimizer as _ServerOptimizer
from .client import Variable as _ServerVariable
from .client import connect
from .overlap import AsyncPusher
from .overlap import Prefetcher as _BasePrefetcher
from .overlap import first_occurrence_unique

__all__ = ["Embedding", "Dense", "RemoteVariable", "Optimizer", "LazyAdam", "Adam", "SGD", "Adagrad", "Ftrl",
           "RMSprop", "AsyncPusher",
           "Prefetcher", "set_client", "get_client", "remote_name", "is_remote", "read", "export_npz",
           "export_saved_model", "load_saved_model"]

_ATTR = "_sparseps_remote"          # set on a handle (Keras variable and its tf.Variable): the RemoteVariable
_LATER = object()                   # handle= sentinel: the owning layer calls set_handle() itself
_default_client = [None]


# ---------------------------------------------------------------------------------------------- client
def set_client(client_or_addresses) -> Client:
    """Make a client the default for layers and optimizers created without client=."""
    c = client_or_addresses if isinstance(client_or_addresses, Client) else connect(client_or_addresses)
    _default_client[0] = c
    return c


def get_client(client=None) -> Client:
    if client is None:
        client = _default_client[0]
        if client is None:
            addresses = os.environ.get("SPARSEPS_ADDRESS")
            if not addresses:
                raise ValueError("no sparseps client: pass client=, call sparseps.keras.set_client(...) or set "
                                 "SPARSEPS_ADDRESS")
            client = set_client(addresses)
        return client
    if isinstance(client, str) or isinstance(client, (list, tuple)):
        return connect(client)
    return client


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


# ---------------------------------------------------------------------------------------------- variables
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
        if isinstance(optimizer, Optimizer):
            client = client or optimizer.client
            optimizer = optimizer.name
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


# ---------------------------------------------------------------------------------------------- layers
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
        if isinstance(optimizer, Optimizer):
            client = client or optimizer.client
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
        if isinstance(optimizer, Optimizer):
            client = client or optimizer.client
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


# ---------------------------------------------------------------------------------------------- optimizer
class Optimizer:
    """The API of a Keras / tfa optimizer, for an optimizer that lives on the cluster.

        opt = spk.Optimizer(client, "LazyAdam", learning_rate=1e-3, name="opt")
        opt = spk.LazyAdam(learning_rate=1e-3, client=client, name="opt")
        opt.apply_gradients(zip(grads, model.trainable_variables))   # remote handles + local variables
        opt.minimize(loss, var_list, tape=tape)

    config: a class name (with hyper-parameters as keyword arguments), a {"class_name", "config"}
    dict or a live reference optimizer. Workers that create the same optimizer share it.
    local_optimizer: a Keras optimizer for the gradients of ordinary (local) Keras variables.
    max_in_flight: 0 (default) pushes synchronously; N > 0 pushes in the background, N at most
    in flight (see AsyncPusher). consistency: as Client.create_optimizer.
    """

    _class_name = None

    def __init__(self, client=None, config=None, /, *, name="optimizer", local_optimizer=None, max_in_flight=0,
                 consistency=None, worker_id="", **hyper):
        if isinstance(client, (str, dict)) and config is None:    # spk.Optimizer("LazyAdam", ...)
            client, config = None, client
        if config is None:
            config = self._class_name or "LazyAdam"
        self.client = get_client(client)
        self.name = name
        if isinstance(config, str):
            config = {"class_name": config, "config": dict(hyper)}
            hyper = {}
        if isinstance(config, dict):        # the Keras name defaults to the cluster name
            config = {**config, "config": {"name": name, **dict(config.get("config") or {})}}
        server = self.client.create_optimizer(name, config, consistency=consistency, **hyper)
        self._server: _ServerOptimizer = server
        self.local_optimizer = local_optimizer
        self.pusher = AsyncPusher(self.client, max_in_flight, worker_id=worker_id)
        self._iterations = None

    @classmethod
    def attach(cls, name, client=None, **kw):
        """A handle to an optimizer that already exists on the cluster."""
        self = cls.__new__(cls)
        self.client = get_client(client)
        self.name = name
        self._server = self.client.optimizer(name)
        self.local_optimizer = kw.get("local_optimizer")
        self.pusher = AsyncPusher(self.client, kw.get("max_in_flight", 0), worker_id=kw.get("worker_id", ""))
        self._iterations = None
        return self

    def __repr__(self):
        return f"<sparseps.keras.Optimizer {self.name!r} on {','.join(self.client.addresses)}>"

    # -- the step
    def apply_gradients(self, grads_and_vars, name=None, **kwargs):
        """One step: push the gradients of every remote variable at once; local ones go to local_optimizer.

        Gradients may be tf.IndexedSlices (sparse push: ids, rows), dense tensors or numpy arrays.
        Works eagerly and inside tf.function. Returns the iterations after the step (a tf.Variable
        mirror of the server's counter, read back from the server when eager and synchronous).
        """
        remote, local = [], []
        for grad, var in grads_and_vars:
            if grad is None:
                continue
            rname = remote_name(var)
            (local if rname is None else remote).append((grad, var if rname is None else rname))
        if local:
            if self.local_optimizer is None:
                names = [getattr(v, "path", None) or getattr(v, "name", "?") for _, v in local]
                raise ValueError(f"apply_gradients: {names} are local variables; give Optimizer(local_optimizer=...) "
                                 "or apply their gradients with a Keras optimizer")
            self.local_optimizer.apply_gradients(local)
        if not remote:
            return self.iterations
        if tf.executing_eagerly():
            grads = {}
            for g, rname in remote:
                _merge(grads, rname, _numpy_grad(g))
            it = self._push(grads)
            if it is not None:
                self._mirror().assign(it)
            return self._mirror()
        return self._apply_in_graph(remote)

    def _apply_in_graph(self, remote):
        names, kinds, flat = [], [], []
        for g, rname in remote:
            names.append(rname)
            if isinstance(g, tf.IndexedSlices):
                kinds.append("sparse")
                flat += [tf.cast(g.indices, tf.int64), g.values]
            else:
                kinds.append("dense")
                flat.append(tf.convert_to_tensor(g))

        def push_np(*arrays):
            grads, k = {}, 0
            for rname, kind in zip(names, kinds):
                if kind == "sparse":
                    _merge(grads, rname, (arrays[k], arrays[k + 1]))
                    k += 2
                else:
                    _merge(grads, rname, arrays[k])
                    k += 1
            it = self._push(grads)
            return np.int64(-1 if it is None else it)
        it = tf.numpy_function(push_np, flat, tf.int64, stateful=True, name="sparseps_push")
        mirror = self._mirror()
        return mirror.assign(tf.where(it >= 0, it, mirror.read_value()))   # -1: still in flight

    def _push(self, grads):
        it = self.pusher.push(grads)
        if isinstance(it, dict):
            it = it.get(self.name, max(it.values()))
        return it

    def minimize(self, loss, var_list, tape=None, grad_loss=None, name=None):
        """Compute gradients of `loss` for `var_list` and apply them (Keras 2 semantics).

        loss: a tensor (then tape= is required) or a zero-argument callable; var_list: a list or a
        callable returning one.
        """
        if tape is None:
            if not callable(loss):
                raise ValueError("minimize: `tape` is required when a tensor loss is passed")
            with tf.GradientTape() as tape:
                if callable(var_list):
                    var_list = var_list()
                tape.watch([v for v in var_list if not hasattr(v, _ATTR)])
                loss = loss()
        elif callable(loss):
            with tape:
                loss = loss()
        if callable(var_list):
            var_list = var_list()
        var_list = list(var_list)
        grads = tape.gradient(loss, var_list, output_gradients=grad_loss)
        return self.apply_gradients(zip(grads, var_list))

    def flush(self):
        """Wait for the pushes still in flight (max_in_flight > 0); returns the last iterations."""
        return self.pusher.flush()

    def close(self):
        self.pusher.close()

    # -- state, as the reference optimizer exposes it
    def _mirror(self):
        if self._iterations is None:
            with tf.init_scope():
                self._iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{_safe(self.name)}_iter")
        return self._iterations

    @property
    def iterations(self):
        """The step counter (a tf.int64 variable): read from the server when eager."""
        mirror = self._mirror()
        if tf.executing_eagerly():
            mirror.assign(self._server.iterations)
        return mirror

    @property
    def server(self) -> _ServerOptimizer:
        """The plain (TensorFlow-free) sparseps.Optimizer handle."""
        return self._server

    @property
    def class_name(self) -> str:
        return self._server.class_name

    def get_config(self) -> dict:
        """The server optimizer's config, with the reference's keys (name, learning_rate, ...)."""
        return self._server.get_config()

    @classmethod
    def from_config(cls, config, custom_objects=None, *, client=None, class_name=None, **kw):
        """An optimizer on the cluster from get_config() output (created, or found if identical).

            opt2 = spk.LazyAdam.from_config(opt.get_config(), client=client)
            opt2 = spk.Optimizer.from_config(cfg, client=client, class_name="Adam")
        """
        config = dict(config)
        class_name = class_name or config.pop("class_name", None) or cls._class_name or "LazyAdam"
        name = config.get("name") or class_name
        self = Optimizer.__new__(cls)
        try:
            Optimizer.__init__(self, get_client(client), {"class_name": class_name, "config": config}, name=name,
                               **kw)
        except errors.AlreadyExists:
            # an optimizer of that name exists: it is this one if its get_config() is the given config
            found = Optimizer.attach.__func__(cls, name, client, **kw)
            if found.get_config() != {k: v for k, v in config.items()}:
                raise
            return found
        return self

    def get_slot_names(self) -> list:
        return self._server.get_slot_names()

    def get_slot(self, var, slot_name) -> tf.Tensor:
        """The whole slot of a remote variable (handle, layer, RemoteVariable or name), as a tf.Tensor."""
        rname = remote_name(var)
        if rname is None:
            raise ValueError(f"get_slot: {var!r} is not a remote variable")
        return tf.constant(self._server.get_slot(rname, slot_name))

    def get_weights(self) -> list:
        """[iterations, slots in creation order] as numpy arrays, like the reference."""
        return self._server.get_weights()

    def set_weights(self, weights):
        self._server.set_weights([np.asarray(w) for w in weights])
        if tf.executing_eagerly():
            self._mirror().assign(int(np.asarray(weights[0])))

    def variables(self) -> list:
        """The optimizer's state as tensors: iterations, then the slots (as the reference lists them)."""
        return [tf.constant(w) for w in self.get_weights()]

    @property
    def weights(self):
        return self.variables()

    @property
    def learning_rate(self):
        return self.get_config().get("learning_rate")


class LazyAdam(Optimizer):
    """tfa.optimizers.LazyAdam on the cluster: LazyAdam(learning_rate=1e-3, client=..., name="opt")."""
    _class_name = "LazyAdam"

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, *,
                 client=None, name="LazyAdam", **kw):
        Optimizer.__init__(self, client, "LazyAdam", name=name, learning_rate=learning_rate, beta_1=beta_1,
                           beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad, **kw)


class Adam(Optimizer):
    """Keras (legacy) Adam on the cluster: dense slot decay on every step."""
    _class_name = "Adam"

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False, *,
                 client=None, name="Adam", **kw):
        Optimizer.__init__(self, client, "Adam", name=name, learning_rate=learning_rate, beta_1=beta_1,
                           beta_2=beta_2, epsilon=epsilon, amsgrad=amsgrad, **kw)


class SGD(Optimizer):
    """Keras SGD on the cluster."""
    _class_name = "SGD"

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, *, client=None, name="SGD", **kw):
        Optimizer.__init__(self, client, "SGD", name=name, learning_rate=learning_rate, momentum=momentum,
                           nesterov=nesterov, **kw)


class Adagrad(Optimizer):
    """Keras (legacy) Adagrad on the cluster: only the pushed rows move."""
    _class_name = "Adagrad"

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7, *, client=None,
                 name="Adagrad", **kw):
        Optimizer.__init__(self, client, "Adagrad", name=name, learning_rate=learning_rate,
                           initial_accumulator_value=initial_accumulator_value, epsilon=epsilon, **kw)


class Ftrl(Optimizer):
    """Keras (legacy) Ftrl on the cluster: sparse pushes move only their rows, dense ones every row."""
    _class_name = "Ftrl"

    def __init__(self, learning_rate=0.001, learning_rate_power=-0.5, initial_accumulator_value=0.1,
                 l1_regularization_strength=0.0, l2_regularization_strength=0.0,
                 l2_shrinkage_regularization_strength=0.0, beta=0.0, *, client=None, name="Ftrl", **kw):
        Optimizer.__init__(self, client, "Ftrl", name=name, learning_rate=learning_rate,
                           learning_rate_power=learning_rate_power, initial_accumulator_value=initial_accumulator_value,
                           l1_regularization_strength=l1_regularization_strength,
                           l2_regularization_strength=l2_regularization_strength,
                           l2_shrinkage_regularization_strength=l2_shrinkage_regularization_strength, beta=beta, **kw)


class RMSprop(Optimizer):
    """Keras (legacy) RMSprop on the cluster: without momentum the rms slot decays on every row."""
    _class_name = "RMSprop"

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False, *, client=None,
                 name="RMSprop", **kw):
        Optimizer.__init__(self, client, "RMSprop", name=name, learning_rate=learning_rate, rho=rho,
                           momentum=momentum, epsilon=epsilon, centered=centered, **kw)


def _numpy_grad(g):
    if isinstance(g, tf.IndexedSlices):
        return np.asarray(g.indices.numpy(), np.int64), g.values.numpy()
    if isinstance(g, tuple) and len(g) == 2:
        return np.asarray(g[0], np.int64), np.asarray(g[1])
    return np.asarray(g)


def _merge(grads, name, g):
    """Two gradients for one variable in one step: concatenate sparse ones, add dense ones."""
    if name not in grads:
        grads[name] = g
        return
    a = grads[name]
    if isinstance(a, tuple) and isinstance(g, tuple):
        grads[name] = (np.concatenate([a[0], g[0]]), np.concatenate([a[1], g[1]]))
    else:
        raise ValueError(f"apply_gradients: variable {name!r} appears twice with a dense gradient")


# ---------------------------------------------------------------------------------------------- prefetch
class Prefetcher(_BasePrefetcher):
    """Iterate over batches while the NEXT batch's unique rows are pulled in the background.

        lookups = {users: lambda b: b[0], items: lambda b: b[1]}     # layer -> the batch's ids for it
        for batch in spk.Prefetcher(batches, lookups):
            train_step(*batch)           # the layers find their rows already pulled

    Rows for batch k+1 are pulled while step k runs (depth=1), so they miss step k's own update
    (and any push still in flight): bounded staleness, as with any asynchronous parameter server.
    A lookup whose ids do not match the prefetched ones simply pulls.
    """

    def __init__(self, batches, lookups: dict, depth: int = 1):
        remotes = {}
        for layer, fn in lookups.items():
            r = _remote_of(layer)
            remotes[r.name] = (r, fn)
        self._remotes = {name: r for name, (r, _) in remotes.items()}
        super().__init__(batches, {name: (r.variable, fn) for name, (r, fn) in remotes.items()}, depth, gather=False)

    def _deliver(self, batch, pulled):
        for name, rows in pulled.items():
            self._remotes[name]._offer(rows.unique_ids, rows.values)
        return batch

    @staticmethod
    def _dedupe(ids):
        # the order tf.unique gives inside the layer, so that a lookup finds its rows without a search
        return first_occurrence_unique(np.asarray(ids, np.int64).reshape(-1))


def _remote_of(obj) -> RemoteVariable:
    if isinstance(obj, RemoteVariable):
        return obj
    r = getattr(obj, "remote", None) or getattr(obj, _ATTR, None)
    if not isinstance(r, RemoteVariable):
        raise ValueError(f"{obj!r} is not a sparseps.keras layer or RemoteVariable")
    return r


# ---------------------------------------------------------------------------------------------- export
def export_npz(table, path, *, slots: bool = False, optimizer=None) -> str:
    """Write a remote table to `path` (.npz): key "values" (+ "ids" range, + slots m/v... when slots=True)."""
    remote = _remote_of(table) if not isinstance(table, _ServerVariable) else None
    var = remote.variable if remote is not None else table
    out = {"values": var.numpy(), "name": np.array(var.name)}
    if slots:
        opt = var.optimizer
        if opt is not None:
            for s in opt.get_slot_names():
                try:
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
    module = _LookupModule(var.numpy(), var.name)
    tf.saved_model.save(module, str(path), signatures={"lookup": module.lookup, "serving_default": module.lookup})
    return str(path)


def load_saved_model(path):
    """The module written by export_saved_model: .lookup(ids) -> {"rows": ...}, .table."""
    return tf.saved_model.load(str(path))
