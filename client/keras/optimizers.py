"""The optimizer bridge: a Keras / tfa optimizer's API for an optimizer that lives on the cluster.

apply_gradients sorts remote gradients (their variables are handles, see variables.py) from local
ones, turns every remote gradient into (ids, rows) or a dense array and sends them all in ONE push:
one step of the server's optimizer. Gradients of ordinary Keras variables go to local_optimizer.
"""
import numpy as np
import tensorflow as tf

from .. import errors
from ..client import Optimizer as _ServerOptimizer
from ..overlap import AsyncPusher
from .clients import OnCluster, get_client
from .variables import _ATTR, _safe, remote_name


class Optimizer(OnCluster):
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

