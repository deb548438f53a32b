"""Handles to what lives on the cluster: a Variable (rows by id) and an Optimizer (the reference's API).

Cheap objects holding a client and a name, no data: every method is a call to the shards.
"""
import json

import numpy as np

from . import errors
from .proto import sparseps_pb2 as pb


class Variable:
    """A handle to one variable of the cluster (cheap; holds no data)."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name
        layout, dtype, shape, _ = client._placements.get(name)
        self.shape, self.dtype, self.partition = shape, dtype, layout.strategy
        self.dynamic = layout.strategy == "hash"

    def __repr__(self):
        if self.dynamic:
            return f"<sparseps.Variable {self.name!r} dynamic dim={self.shape[1]} dtype={self.dtype.name}>"
        return f"<sparseps.Variable {self.name!r} shape={self.shape} dtype={self.dtype.name}>"

    def size(self) -> int:
        """Rows held: a dynamic variable's live rows over every shard, a fixed table's row count.

            ids = client.create_variable("ids", dim=16, dynamic=True, optimizer="opt")
            client.push({"ids": (np.array([-3, 2**40]), np.ones((2, 16), np.float32))})
            ids.size()                                # 2
        """
        if not self.dynamic:
            return self.shape[0]
        infos = self.client._shards.all("DescribeVariable", pb.DescribeVariableRequest(name=self.name))
        return sum(i.local_rows for i in infos.values())

    def export(self, since_step: int = 0, slot: str = "") -> tuple:
        """A dynamic variable's live rows as (keys, rows); since_step > 0: only rows updated after
        that optimizer step (the incremental dump online serving takes).

            keys, rows = emb.export()                 # every live row
            keys, rows = emb.export(since_step=1000)  # changed after step 1000
            keys, m = emb.export(slot="m")            # a slot's rows
        """
        return self.client._pulls.export(self.name, slot, since_step)

    def pull(self, ids=None) -> np.ndarray:
        """Rows by id (duplicates allowed); every row when ids is None.

            emb = client.variable("emb")
            rows = emb.pull(np.array([3, 7, 7]))      # ndarray (3, 64)
            table = emb.pull()                        # every row
        """
        return self.client.pull(self.name, ids)

    def numpy(self) -> np.ndarray:
        """The whole variable as an ndarray.

            emb = client.variable("emb")
            table = emb.numpy()                       # shape emb.shape
            np.save("emb.npy", table)
        """
        if self.dynamic:
            raise errors.InvalidArgument(f"{self.name!r} is a dynamic variable: it has no whole array; "
                                         "export() gives its live rows with their keys")
        return self.client.pull(self.name)

    def push(self, grad):
        """One step with a gradient for this variable only: ndarray or (ids, rows).

            emb = client.variable("emb")
            it = emb.push((np.array([3, 7]), grad_rows))   # a sparse step
            it = kernel.push(dense_grad)                   # a dense one
        """
        return self.client.push({self.name: grad})

    def assign(self, value, ids=None):
        """Overwrite the whole variable (or rows `ids`) without an optimizer step.

            emb = client.variable("emb")
            emb.assign(np.zeros(emb.shape, np.float32))
            emb.assign(np.ones((2, 64), np.float32), ids=[3, 7])
        """
        self.client.set_weights([(self.name, "", ids, np.asarray(value, self.dtype))])

    @property
    def optimizer(self) -> "Optimizer | None":
        name = self.client._placements.get(self.name).optimizer
        return Optimizer(self.client, name) if name else None


class Optimizer:
    """A handle to a server-side optimizer, with the reference optimizer's API."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name

    def __repr__(self):
        return f"<sparseps.Optimizer {self.name!r}>"

    def _info(self, shard=0) -> "pb.OptimizerInfo":
        return self.client._shards.read(shard, "GetOptimizer", pb.GetOptimizerRequest(name=self.name))

    @property
    def iterations(self) -> int:
        """Steps applied so far (one per push that touched this optimizer's variables).

            opt = client.optimizer("opt")
            client.push({"emb": (ids, rows)})
            assert opt.iterations == 1
        """
        return max(self._info(k).iterations for k in range(self.client.num_shards))

    def get_config(self) -> dict:
        """The optimizer's Keras config, as the reference's get_config() gives it.

            opt = client.optimizer("opt")
            cfg = opt.get_config()
            cfg["learning_rate"], cfg["beta_1"]        # 0.001, 0.9 for a default LazyAdam
        """
        return json.loads(self._info().config_json)["config"]

    @property
    def class_name(self) -> str:
        return self._info().class_name

    def get_slot_names(self) -> list:
        return list(self._info().slot_names)

    def get_slot(self, var, slot_name: str) -> np.ndarray:
        """The whole slot tensor of one variable.

            opt = client.optimizer("opt")
            m = opt.get_slot("emb", "m")               # or opt.get_slot(emb_handle, "m")
            v = opt.get_slot("emb", "v")
        """
        return self.client.pull(var.name if isinstance(var, Variable) else var, slot=slot_name)

    def variables(self) -> list:
        """The optimizer's state, as the reference lists it: iterations, then the slots."""
        return self.get_weights()

    def nonslot(self) -> dict:
        return dict(self._info().nonslot)

    def _weight_entries(self, info) -> list:
        """get_weights() layout: "var/slot" entries, "iterations", or a non-slot name (no "/").

        The server lists only the slots when get_weights() starts with iterations (most classes);
        otherwise (TF1 beta powers, Keras 3 learning rate) it names every entry itself."""
        entries = list(info.weights)
        return entries if any("/" not in e for e in entries) else ["iterations"] + entries

    def get_weights(self) -> list:
        """The optimizer's state exactly like the reference's get_weights(): [iterations, slot arrays
        in creation order] for Keras optimizers, non-slot values (float32 scalars) where it has them.

            opt = client.optimizer("opt")
            saved = opt.get_weights()                  # [iterations, emb/m, emb/v, ...]
            opt.set_weights(saved)                     # restore later
        """
        info = self._info()
        out = []
        for entry in self._weight_entries(info):
            if entry == "iterations":
                out.append(np.array(self.iterations, dtype=np.int64))
            elif "/" not in entry:
                out.append(np.array(info.nonslot[entry], dtype=np.float32))
            else:
                var, slot = entry.rsplit("/", 1)
                out.append(self.get_slot(var, slot))
        return out

    def set_weights(self, weights: list):
        """Restore get_weights() output (iterations, non-slot values and every slot) in one call.

            opt = client.optimizer("opt")
            saved = opt.get_weights()
            opt.set_weights(saved)                     # iterations and slots back as they were
        """
        entries = self._weight_entries(self._info())
        if len(weights) != len(entries):
            raise errors.InvalidArgument(f"set_weights: optimizer {self.name!r} has {len(entries)} weights "
                                         f"({entries}), got {len(weights)}")
        writes, iterations, nonslot = [], None, {}
        for e, w in zip(entries, weights):
            if e == "iterations":
                iterations = int(np.asarray(w))
            elif "/" not in e:
                nonslot[e] = float(np.asarray(w))
            else:
                writes.append((e.rsplit("/", 1)[0], e.rsplit("/", 1)[1], None, w))
        self.client.set_weights(writes, optimizer=self.name, iterations=iterations, nonslot=nonslot)

    def apply_gradients(self, grads_and_vars):
        """One step: [(grad, var), ...]; grad an ndarray, an (ids, rows) tuple or an IndexedSlices.

            opt = client.optimizer("opt")
            opt.apply_gradients([((ids, rows), emb), (dense_grad, "kernel")])
            # the same as client.push({"emb": (ids, rows), "kernel": dense_grad})
        """
        grads = {}
        for grad, var in grads_and_vars:
            if grad is None:
                continue
            grads[var.name if isinstance(var, Variable) else (var if isinstance(var, str) else var.name)] = grad
        return self.client.push(grads)
