"""PyTorch on sparseps: embedding modules whose rows live on the cluster, and optimizers that apply
torch.optim's numbers there (docs/torch.md).

    import sparseps, sparseps.torch as spt
    client = sparseps.connect("127.0.0.1:50051")
    emb = spt.Embedding(1000, 16, client=client, name="emb")
    opt = spt.SparseAdam(emb.parameters(), lr=1e-3)      # or spt.Adagrad, spt.SGD, spt.Optimizer
    loss = model(emb(ids)).sum(); opt.zero_grad(); loss.backward(); opt.step()
    table = client.variable("emb").numpy()

`forward(ids)` pulls the rows of the unique ids and returns them through `F.embedding(...,
sparse=True)`, so autograd gives each pulled row its gradient exactly as `nn.Embedding(sparse=True)`
does. `step()` coalesces each touched table's gradient with torch (the same sums as torch's own
optimizers) and pushes all of them as ONE atomic step. Tables of the torch classes each get their
own server optimizer, so a table's step count is torch's per-parameter count (a table unused in a
step pushes nothing and does not count it). `module.prefetch(next_ids)` reads the next batch's rows
in the step's own round trip; `Linear` keeps a dense layer on the cluster (with `Optimizer`).
Imported only on demand: `import sparseps` needs no torch.
"""
import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import errors

__all__ = ["Embedding", "DynamicEmbedding", "EmbeddingBag", "Linear", "SparseAdam", "Adagrad", "SGD", "Optimizer",
           "cluster_parameters", "local_parameters"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_INT_IDS = (torch.int64, torch.int32)


def _initializer(initializer, name):
    """A Keras initializer config; nn.Embedding's N(0, 1) by default. Without a seed, one derived from
    the table's name, so that every worker asks for the same table."""
    init = initializer or {"class_name": "RandomNormal", "config": {"mean": 0.0, "stddev": 1.0}}
    if isinstance(init, str):
        init = {"class_name": init, "config": {}}
    init = {**init, "config": dict(init.get("config") or {})}
    if init["class_name"] not in ("Zeros", "Ones", "Constant", "zeros", "ones"):
        init["config"].setdefault("seed", zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return init


class _Table(nn.Module):
    """What every sparseps module shares: the cluster variable, its pending lookups, the placeholder
    parameter that carries the module into a torch optimizer."""

    def __init__(self, *, client, name, embedding_dim, dtype, dynamic, spec):
        super().__init__()
        if dtype not in _DTYPES:
            raise TypeError(f"sparseps.torch: dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(name, str) or not name:
            raise ValueError("sparseps.torch: every table needs a name= (its variable on the cluster)")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim <= 0:
            raise ValueError(f"sparseps.torch: embedding_dim must be a positive int, got {embedding_dim!r}")
        self.client, self.name, self.embedding_dim = client, name, embedding_dim
        self.dtype, self.dynamic, self._spec = dtype, dynamic, spec
        self._variable = None
        self._lookups = []   # (unique keys, leaf rows) of every forward since zero_grad()
        self._prefetch = None     # unique keys to read with the next step's push (prefetch())
        self._prefetched = None   # (unique keys, rows or a Future of them) read ahead
        self._pool = None         # the background reader of prefetch(staleness=1)
        self.pulls = 0            # round trips this module made for its own lookups
        # Zero-size: carries the module into optimizer param groups (the rows live on the cluster).
        self.table = nn.Parameter(torch.empty(0, dtype=dtype))
        self.table._sparseps_table = self   # (a cycle the garbage collector handles)
        try:   # a table another worker (or an earlier run) already created: use it as it is
            self._variable = client.variable(name)
        except errors.NotFound:
            pass

    # -- the variable
    def _create(self, optimizer: str):
        """Create the variable with its optimizer (called by the optimizer), or take the one another
        worker created: its shape, dtype and optimizer must be these."""
        kw = dict(self._spec, optimizer=optimizer, dtype=_DTYPES[self.dtype])
        if self._variable is None:
            try:
                if self.dynamic:
                    self._variable = self.client.create_variable(self.name, dim=self.embedding_dim, dynamic=True,
                                                                 **kw)
                else:
                    self._variable = self.client.create_variable(self.name, **kw)
            except errors.AlreadyExists:   # another worker was first
                self._variable = self.client.variable(self.name)
        var = self._variable
        want = (self.embedding_dim,) if self.dynamic else (self.num_embeddings, self.embedding_dim)
        if var.dynamic != self.dynamic or tuple(var.shape[-len(want):]) != want or \
                var.dtype != np.dtype(_DTYPES[self.dtype]):
            raise errors.AlreadyExists(f"sparseps.torch: table {self.name!r} exists on the cluster as {var!r}, not as "
                                       f"this {type(self).__name__}")
        placed = var.optimizer
        if placed is None or placed.name != optimizer:
            raise errors.AlreadyExists(f"sparseps.torch: table {self.name!r} exists on the cluster with optimizer "
                                       f"{placed.name if placed else None!r}, not {optimizer!r}")

    @property
    def variable(self):
        """The sparseps.Variable holding the rows (once an optimizer created it, or it existed)."""
        if self._variable is None:
            raise RuntimeError(f"sparseps.torch: table {self.name!r} does not exist on the cluster yet: construct "
                               "its optimizer (e.g. sparseps.torch.SparseAdam(model.parameters())) first")
        return self._variable

    # -- lookups
    def _check_ids(self, ids, what="ids"):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{type(self).__name__} {self.name!r}: {what} must be a torch.Tensor of int64 or int32, "
                            f"got {type(ids).__name__}")
        if ids.dtype not in _INT_IDS:
            raise TypeError(f"{type(self).__name__} {self.name!r}: {what} must be int64 or int32, got {ids.dtype}")
        if ids.is_sparse or ids.device.type != "cpu":
            raise TypeError(f"{type(self).__name__} {self.name!r}: {what} must be a dense CPU tensor")
        if not self.dynamic and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise IndexError(f"{type(self).__name__} {self.name!r}: index {lo if lo < 0 else hi} is out of range "
                                 f"for {self.num_embeddings} rows")

    def _rows(self, ids):
        """(inverse positions, leaf rows) for ids: the unique ids' rows pulled, recorded for step()."""
        flat = ids.reshape(-1).to(torch.int64)
        uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        keys = uniq.numpy()
        ready, self._prefetched = self._prefetched, None
        if ready is not None and torch.equal(ready[0], uniq):
            pulled = ready[1] if isinstance(ready[1], np.ndarray) else ready[1].result()
        elif len(keys):
            pulled = self.variable.pull(keys)
            self.pulls += 1
        else:
            pulled = np.zeros((0, self.embedding_dim), _DTYPES[self.dtype])
        leaf = torch.from_numpy(np.array(pulled, dtype=_DTYPES[self.dtype], copy=True))
        if torch.is_grad_enabled() and self.training:
            leaf.requires_grad_(True)
            self._lookups.append((uniq, leaf))
        return inverse.reshape(ids.shape), leaf

    def _gradient(self, coalesce=True):
        """This table's gradient since zero_grad() as (keys, rows) numpy arrays, coalesced by torch
        (or raw, every looked-up id in lookup order, as nn.Embedding's uncoalesced gradient is), or
        None when no lookup got a gradient (the table then pushes nothing, as torch skips p.grad None)."""
        got = [(uniq, leaf.grad) for uniq, leaf in self._lookups if leaf.grad is not None]
        if len(got) == 1 and got[0][1].is_sparse and coalesce:   # one lookup: its rows are the positions
            uniq, g = got[0]
            g = g.coalesce()
            return uniq[g._indices()[0]].numpy(), np.ascontiguousarray(g._values().detach().numpy())
        keys, values = [], []
        for uniq, leaf in self._lookups:
            g = leaf.grad
            if g is None:
                continue
            if not g.is_sparse:   # max bags (torch has no sparse max): every looked-up row
                g = torch.sparse_coo_tensor(torch.arange(len(uniq)).reshape(1, -1), g, tuple(g.shape),
                                            check_invariants=False)
            keys.append(uniq[g._indices()[0]])
            values.append(g._values())
        if not keys:
            return None
        keys, values = torch.cat(keys), torch.cat(values)
        if not coalesce:
            return keys.numpy(), np.ascontiguousarray(values.detach().numpy())
        # coalesce over positions in the sorted unique keys: the same comparisons, so the same sums
        u, pos = torch.unique(keys, sorted=True, return_inverse=True)
        g = torch.sparse_coo_tensor(pos.reshape(1, -1), values, (len(u), self.embedding_dim),
                                    check_invariants=False).coalesce()
        return u[g._indices()[0]].numpy(), np.ascontiguousarray(g._values().detach().numpy())

    def _gradients(self, coalesce=True) -> dict:
        g = self._gradient(coalesce)
        return {} if g is None else {self.name: g}

    def _clear(self):
        self._lookups = []

    def prefetch(self, ids, staleness: int = 0):
        """Read the rows of `ids` (the next batch's) ahead, so that the next forward on exactly these
        ids makes no round trip of its own (a forward on other ids ignores them and pulls).

        staleness=0 (default): in the same round trip as the optimizer's next step(), right after
        that step is applied (push_pull). The rows include this worker's step; like any pull they may
        miss another worker's concurrent step: no staleness beyond a plain pull.
        staleness=1: now, on a background thread, while this step's forward and backward run: the
        rows may miss this worker's next step (at most that one of its own steps), in exchange for
        the read overlapping the computation."""
        if staleness not in (0, 1):
            raise ValueError(f"{type(self).__name__} {self.name!r}: staleness must be 0 or 1, got {staleness!r}")
        self._check_ids(ids)
        keys = torch.unique(ids.reshape(-1).to(torch.int64), sorted=True)
        self._prefetch, self._prefetched = None, None
        if staleness == 0:
            self._prefetch = keys
            return
        if self._pool is None:
            import concurrent.futures
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sparseps-{self.name}")
        self._prefetched = (keys, self._pool.submit(self.variable.pull, keys.numpy()))

    def forward(self, ids):
        """The rows of ids (any shape) as a tensor of shape ids.shape + (embedding_dim,)."""
        self._check_ids(ids)
        inverse, leaf = self._rows(ids)
        return F.embedding(inverse, leaf, sparse=True)


class Embedding(_Table):
    """`nn.Embedding(num_embeddings, embedding_dim, sparse=True)` whose table is a sparseps variable.

    initial_value: the whole table (array or tensor) for a new variable; else initializer (a Keras
    initializer config, default N(0, 1) like nn.Embedding). The variable is created when an
    optimizer takes the module (it needs the optimizer's name), or found if it exists.
    """

    def __init__(self, num_embeddings, embedding_dim, *, client, name, initial_value=None, initializer=None,
                 dtype=torch.float32, partition=None):
        if isinstance(num_embeddings, bool) or not isinstance(num_embeddings, int) or num_embeddings <= 0:
            raise ValueError(f"sparseps.torch.Embedding: num_embeddings must be a positive int, got {num_embeddings!r}")
        spec = {"partition": partition}
        if initial_value is not None:
            value = initial_value.detach().cpu().numpy() if isinstance(initial_value, torch.Tensor) \
                else np.asarray(initial_value)
            if value.shape != (num_embeddings, embedding_dim):
                raise ValueError(f"sparseps.torch.Embedding {name!r}: initial_value has shape {list(value.shape)}, "
                                 f"expected {[num_embeddings, embedding_dim]}")
            spec["initial_value"] = np.ascontiguousarray(value, dtype=_DTYPES.get(dtype, "float32"))
        else:
            spec["shape"] = (num_embeddings, embedding_dim)
            spec["initializer"] = _initializer(initializer, name)
        self.num_embeddings = num_embeddings
        super().__init__(client=client, name=name, embedding_dim=embedding_dim, dtype=dtype, dynamic=False, spec=spec)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, name={self.name!r}"


class DynamicEmbedding(_Table):
    """An embedding keyed by any int64 id, rows created on the cluster at their first push (a
    dynamic variable: admission, eviction, capacity, on_full as in docs/dynamic.md). A lookup of an
    id the table does not hold returns the initializer's row for it."""

    num_embeddings = None

    def __init__(self, embedding_dim, *, client, name, initializer=None, dtype=torch.float32, admission=None,
                 eviction=None, capacity=None, on_full=None, evict_batch=None):
        spec = {"initializer": _initializer(initializer, name), "admission": admission, "eviction": eviction,
                "capacity": capacity, "on_full": on_full, "evict_batch": evict_batch}
        super().__init__(client=client, name=name, embedding_dim=embedding_dim, dtype=dtype, dynamic=True, spec=spec)

    def extra_repr(self):
        return f"dynamic, {self.embedding_dim}, name={self.name!r}"


class EmbeddingBag(_Table):
    """`nn.EmbeddingBag(num_embeddings, embedding_dim, mode=..., sparse=True)` on a sparseps table
    (dynamic=True: any int64 id, as DynamicEmbedding). forward(input, offsets=None,
    per_sample_weights=None) takes nn.EmbeddingBag's arguments: a 2-D input of fixed-length bags, or
    a 1-D input with offsets (bag starts; include_last_offset as nn.EmbeddingBag). mode="max", which
    torch has no sparse gradient for, pushes every looked-up row (zero where it was no bag's max)."""

    def __init__(self, num_embeddings, embedding_dim, *, client, name, mode="mean", include_last_offset=False,
                 initial_value=None, initializer=None, dtype=torch.float32, dynamic=False, **table):
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"sparseps.torch.EmbeddingBag: mode must be 'sum', 'mean' or 'max', got {mode!r}")
        self.mode, self.include_last_offset = mode, bool(include_last_offset)
        if dynamic:
            spec = {"initializer": _initializer(initializer, name), **table}
            self.num_embeddings = None
        else:
            if table:
                raise ValueError(f"sparseps.torch.EmbeddingBag: {sorted(table)} are for dynamic=True tables")
            proto = Embedding.__new__(Embedding)   # reuse Embedding's checks of size and initial value
            nn.Module.__init__(proto)
            Embedding.__init__(proto, num_embeddings, embedding_dim, client=client, name=name,
                               initial_value=initial_value, initializer=initializer, dtype=dtype)
            spec, self.num_embeddings = proto._spec, num_embeddings
        super().__init__(client=client, name=name, embedding_dim=embedding_dim, dtype=dtype, dynamic=dynamic,
                         spec=spec)

    def forward(self, input, offsets=None, per_sample_weights=None):
        self._check_ids(input, "input")
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError(f"EmbeddingBag {self.name!r}: offsets must be None for a 2-D input "
                                 "(fixed-length bags)")
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError(f"EmbeddingBag {self.name!r}: a 1-D input needs offsets (the start of every bag)")
            self._check_offsets(input, offsets)
        else:
            raise ValueError(f"EmbeddingBag {self.name!r}: input must be 1-D (with offsets) or 2-D, "
                             f"got {input.dim()}-D")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise NotImplementedError(f"EmbeddingBag {self.name!r}: per_sample_weights only with mode='sum' "
                                          f"(as nn.EmbeddingBag), not {self.mode!r}")
            if not isinstance(per_sample_weights, torch.Tensor) or per_sample_weights.shape != input.shape:
                raise ValueError(f"EmbeddingBag {self.name!r}: per_sample_weights must be a tensor of the input's "
                                 f"shape {list(input.shape)}")
            per_sample_weights = per_sample_weights.to(self.dtype)
        inverse, leaf = self._rows(input)
        return F.embedding_bag(inverse, leaf, offsets, mode=self.mode, sparse=self.mode != "max",
                               per_sample_weights=per_sample_weights, include_last_offset=self.include_last_offset)

    def _check_offsets(self, input, offsets):
        if not isinstance(offsets, torch.Tensor) or offsets.dtype not in _INT_IDS or offsets.dim() != 1:
            raise TypeError(f"EmbeddingBag {self.name!r}: offsets must be a 1-D int64 or int32 tensor")
        if offsets.numel() == 0 or int(offsets[0]) != 0:
            raise ValueError(f"EmbeddingBag {self.name!r}: offsets[0] must be 0 (the first bag starts the input)")
        if offsets.numel() > 1 and (bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > input.numel()):
            raise ValueError(f"EmbeddingBag {self.name!r}: offsets must be non-decreasing and at most len(input) "
                             f"= {input.numel()}")

    def extra_repr(self):
        size = "dynamic" if self.dynamic else str(self.num_embeddings)
        return f"{size}, {self.embedding_dim}, mode={self.mode!r}, name={self.name!r}"


class Linear(nn.Module):
    """`nn.Linear(in_features, out_features, bias)` whose weight and bias live on the cluster
    (variables `<name>.weight`, `<name>.bias`), so that their gradients go in the same atomic push
    as the tables' (what sparseps.keras.Dense does). Every forward pulls them whole. torch's sparse
    optimizers take no dense gradient: use it with sparseps.torch.Optimizer and a class that does
    (Adam, LazyAdam's dense path, RectifiedAdam, Adagrad, ...)."""

    _prefetch = None

    def __init__(self, in_features, out_features, bias=True, *, client, name, initial_value=None,
                 initializer=None, dtype=torch.float32):
        super().__init__()
        if dtype not in _DTYPES:
            raise TypeError(f"sparseps.torch.Linear: dtype must be torch.float32 or torch.float64, got {dtype}")
        self.client, self.name, self.dtype = client, name, dtype
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bool(bias)
        if initial_value is None:   # nn.Linear's U(-1/sqrt(in), 1/sqrt(in)), seeded from the name
            bound = 1 / math.sqrt(in_features)
            initializer = initializer or {"class_name": "RandomUniform", "config": {"minval": -bound, "maxval": bound}}
            self._init = {"weight": {"shape": (out_features, in_features), "initializer": _initializer(
                initializer, name + ".weight")}}
        else:
            w = np.asarray(initial_value.detach() if isinstance(initial_value, torch.Tensor) else initial_value)
            if w.shape != (out_features, in_features):
                raise ValueError(f"sparseps.torch.Linear {name!r}: initial_value has shape {list(w.shape)}, "
                                 f"expected {[out_features, in_features]}")
            self._init = {"weight": {"initial_value": np.ascontiguousarray(w, _DTYPES[dtype])}}
        if self.has_bias:
            self._init["bias"] = {"initial_value": np.zeros(out_features, _DTYPES[dtype])}
        self.table = nn.Parameter(torch.empty(0, dtype=dtype))
        self.table._sparseps_table = self
        self._leaves = []

    def _create(self, optimizer: str):
        for part, spec in self._init.items():
            try:
                self.client.create_variable(f"{self.name}.{part}", optimizer=optimizer, dtype=_DTYPES[self.dtype],
                                            partition="whole", **spec)
            except errors.AlreadyExists:   # another worker's: it must have this optimizer
                placed = self.client.variable(f"{self.name}.{part}").optimizer
                if placed is None or placed.name != optimizer:
                    raise

    def forward(self, x):
        parts = {}
        for part in self._init:
            leaf = torch.from_numpy(np.array(self.client.pull(f"{self.name}.{part}"), copy=True))
            if torch.is_grad_enabled() and self.training:
                leaf.requires_grad_(True)
                self._leaves.append((part, leaf))
            parts[part] = leaf
        return F.linear(x, parts["weight"], parts.get("bias"))

    def _gradients(self, coalesce=True) -> dict:
        out = {}
        for part, leaf in self._leaves:
            if leaf.grad is not None:
                g = leaf.grad.detach().numpy()
                key = f"{self.name}.{part}"
                out[key] = g.copy() if key not in out else out[key] + g
        return out

    def _clear(self):
        self._leaves = []

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, " \
               f"name={self.name!r}"


def _on_cluster(p) -> bool:
    return isinstance(getattr(p, "_sparseps_table", None), (_Table, Linear))


def cluster_parameters(module: nn.Module) -> list:
    """The parameters of `module`'s sparseps modules (what a sparseps.torch optimizer takes).

        opt = spt.SparseAdam(spt.cluster_parameters(model), lr=1e-3)
        dense_opt = torch.optim.Adam(spt.local_parameters(model), lr=1e-3)
    """
    return [p for p in module.parameters() if _on_cluster(p)]


def local_parameters(module: nn.Module) -> list:
    """Every other parameter of `module` (for a torch optimizer, or DistributedDataParallel)."""
    return [p for p in module.parameters() if not _on_cluster(p)]


# ------------------------------------------------------------------------------------ optimizers
def _table_of(p):
    module = getattr(p, "_sparseps_table", None)
    if not isinstance(module, (_Table, Linear)):
        shape = list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise TypeError(f"sparseps.torch optimizers take the parameters of sparseps.torch modules only; got a "
                        f"parameter of shape {shape} (give dense parameters to a torch.optim optimizer)")
    return module


class Optimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose update runs on the cluster.

    As a generic bridge: `Optimizer(params, {"class_name": "LazyAdam", "config": {...}}, name="opt")`
    applies any sparseps optimizer (LazyAdam, Ftrl, RectifiedAdam, ...) to the tables: one server
    optimizer `name` for all of them (its step count is shared, as in Keras). Its learning rate is
    the config's; `param_groups[i]["lr"]` is reported but a change is refused (those classes
    schedule their own). SparseAdam, Adagrad and SGD below are torch's own numbers.
    """

    _server_class = None       # the torch classes: one server optimizer per table, lr settable
    _coalesce = True           # push torch-coalesced gradients (SGD: raw rows, torch adds them one by one)
    _torch_keys = ()

    def __init__(self, params, config=None, *, name="optimizer", defaults=None):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        for group in groups:   # refuse foreign parameters before anything is created
            group["params"] = list(group["params"]) if not isinstance(group["params"], torch.Tensor) \
                else [group["params"]]
            for p in group["params"]:
                _table_of(p)
        self._config, self._name, self._ready = config, name, False
        self._bound = {}     # table name -> (module, server optimizer name, the group's hypers at binding)
        self._sent_lr = {}   # server optimizer -> the lr it holds
        super().__init__(groups, dict(defaults or {"lr": float("nan")}))
        if self._server_class is None:
            if config is None:
                raise ValueError("sparseps.torch.Optimizer needs a sparseps optimizer config, e.g. "
                                 "{'class_name': 'LazyAdam', 'config': {'learning_rate': 1e-3}}")
            self._bind_all()

    def _bind_all(self):
        for group in self.param_groups:
            for p in group["params"]:
                self._bind(_table_of(p), group)
        self._ready = True

    def _hypers(self, group):
        return {k: (list(group[k]) if isinstance(group[k], tuple) else group[k]) for k in self._torch_keys}

    def _bind(self, module, group):
        if isinstance(module, Linear) and self._server_class is not None:
            raise TypeError(f"sparseps.torch.{type(self).__name__} takes sparse gradients only (as torch's does); give "
                            f"the cluster Linear {module.name!r} to sparseps.torch.Optimizer with a class that takes "
                            "dense gradients (e.g. Adam, LazyAdam), or keep the layer local")
        if module.name in self._bound:
            raise ValueError(f"sparseps.torch: table {module.name!r} is given to this optimizer twice")
        client = module.client
        if self._server_class is None:
            server = self._name
            client.create_optimizer(server, self._config)
        else:
            server = f"{module.name}.{self._server_class}"
            config = {"class_name": self._server_class, "config": self._hypers(group)}
            client.create_optimizer(server, config)
            self._sent_lr[server] = float(client.optimizer(server).nonslot()["lr"])
        module._create(server)
        self._bound[module.name] = (module, server, self._hypers(group))

    def add_param_group(self, param_group):
        if getattr(self, "_ready", False):
            params = param_group["params"]
            for p in [params] if isinstance(params, torch.Tensor) else list(params):
                _table_of(p)
        super().add_param_group(param_group)
        if getattr(self, "_ready", False):
            for p in self.param_groups[-1]["params"]:
                self._bind(_table_of(p), self.param_groups[-1])

    # -- the step
    @torch.no_grad()
    def step(self, closure=None):
        """Push every touched table's coalesced gradient as one atomic step; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads, lr_updates, client = {}, {}, None
        for group in self.param_groups:
            for p in group["params"]:
                module = _table_of(p)
                _, server, hypers = self._bound[module.name]
                if self._server_class is not None:
                    now = self._hypers(group)
                    changed = [k for k in now if k != "lr" and now[k] != hypers[k]]
                    if changed:
                        raise ValueError(f"sparseps.torch: {changed} of a param group changed after the optimizer was "
                                         "made; only lr may change (the server holds the others)")
                elif group["lr"] == group["lr"] and group["lr"] != self.defaults["lr"]:
                    raise ValueError("sparseps.torch.Optimizer: this server optimizer's learning rate comes from its "
                                     "config; param_groups lr cannot change it")
                g = module._gradients(self._coalesce)
                if not g:
                    continue
                client = module.client
                grads.update(g)
                if self._server_class is not None:
                    lr = float(group["lr"])
                    if not math.isfinite(lr) or lr < 0:
                        raise ValueError(f"sparseps.torch: invalid learning rate {lr}")
                    if self._sent_lr.get(server) != lr:
                        lr_updates[server] = lr
        wanted = {}
        for group in self.param_groups:
            for p in group["params"]:
                module = _table_of(p)
                if module._prefetch is not None:
                    wanted[module.name] = module
                    client = client or module.client
        if not grads and not wanted:
            return loss
        for server, lr in lr_updates.items():
            client.set_weights([], optimizer=server, nonslot={"lr": lr})
            self._sent_lr[server] = lr
        pulls = {name: m._prefetch.numpy() for name, m in wanted.items()}
        if grads and pulls:
            _, rows = client.push_pull(grads, pulls)
        elif grads:
            client.push(grads)
        else:
            rows = {name: client.pull(name, keys) for name, keys in pulls.items()}
        for name, m in wanted.items():
            m._prefetched, m._prefetch = (m._prefetch, np.asarray(rows[name])), None
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for group in self.param_groups:
            for p in group["params"]:
                _table_of(p)._clear()

    # -- state: it lives on the cluster
    def state_dict(self):
        """torch's state_dict (param_groups with lr, ...) plus where the real state lives: the
        server optimizer of each table and its step count. Moments and accumulators stay on the
        cluster; keep them with a cluster checkpoint (client.checkpoint(), docs/reliability.md)."""
        sd = super().state_dict()
        sd["sparseps"] = {"tables": {t: server for t, (_, server, _) in self._bound.items()},
                          "iterations": {server: m.client.optimizer(server).iterations
                                         for t, (m, server, _) in self._bound.items()},
                          "note": "optimizer state lives on the sparseps cluster: restore it from a cluster checkpoint"}
        return sd

    def load_state_dict(self, state_dict):
        """Restores param_groups (lr schedules resume); the cluster keeps the moments."""
        state_dict = dict(state_dict)
        state_dict.pop("sparseps", None)
        super().load_state_dict(state_dict)


def _refuse(cls, *, maximize=False, weight_decay=0, foreach=None, fused=None, differentiable=False, **others):
    if maximize:
        raise ValueError(f"sparseps.torch.{cls}: maximize=True is not supported (negate the loss)")
    if weight_decay:
        raise ValueError(f"sparseps.torch.{cls}: weight_decay is not compatible with sparse gradients (torch raises "
                         "the same for sparse gradients)")
    if foreach is not None or fused is not None:
        raise ValueError(f"sparseps.torch.{cls}: foreach / fused have no meaning here (the update runs on the "
                         "server); leave them None")
    if differentiable:
        raise ValueError(f"sparseps.torch.{cls}: differentiable=True is not supported")
    bad = {k: v for k, v in others.items() if v}
    if bad:
        raise ValueError(f"sparseps.torch.{cls}: {sorted(bad)} not supported with sparse gradients on sparseps")


class SparseAdam(Optimizer):
    """torch.optim.SparseAdam, applied by the server (TorchSparseAdam: torch's numbers)."""

    _server_class, _torch_keys = "TorchSparseAdam", ("lr", "betas", "eps")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
        _refuse("SparseAdam", maximize=maximize)
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        super().__init__(params, defaults={"lr": float(lr), "betas": tuple(float(b) for b in betas),
                                           "eps": float(eps), "maximize": False})
        self._bind_all()


class Adagrad(Optimizer):
    """torch.optim.Adagrad with sparse gradients, applied by the server (TorchAdagrad)."""

    _server_class, _torch_keys = "TorchAdagrad", ("lr", "lr_decay", "initial_accumulator_value", "eps")

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None):
        _refuse("Adagrad", maximize=maximize, weight_decay=weight_decay, foreach=foreach, fused=fused,
                differentiable=differentiable)
        for key, v in (("learning rate", lr), ("lr_decay value", lr_decay), ("epsilon value", eps),
                       ("initial_accumulator_value", initial_accumulator_value)):
            if not 0.0 <= v:
                raise ValueError(f"Invalid {key}: {v}")
        super().__init__(params, defaults={"lr": float(lr), "lr_decay": float(lr_decay), "eps": float(eps),
                                           "initial_accumulator_value": float(initial_accumulator_value),
                                           "weight_decay": 0, "maximize": False})
        self._bind_all()


class SGD(Optimizer):
    """torch.optim.SGD with sparse gradients (no momentum), applied by the server (TorchSGD)."""

    _server_class, _torch_keys = "TorchSGD", ("lr",)
    _coalesce = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *, maximize=False,
                 foreach=None, differentiable=False, fused=None):
        _refuse("SGD", maximize=maximize, weight_decay=weight_decay, foreach=foreach, fused=fused,
                differentiable=differentiable, momentum=momentum, dampening=dampening, nesterov=nesterov)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        super().__init__(params, defaults={"lr": float(lr), "momentum": 0, "weight_decay": 0, "maximize": False})
        self._bind_all()
