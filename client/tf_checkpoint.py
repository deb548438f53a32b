"""Export a sparseps optimizer's state as a TensorFlow checkpoint, and restore one.

    sparseps export-tf 127.0.0.1:50051 --out ckpt/            # writes ckpt/ckpt-1.{index,data-*}
    sparseps import-tf 127.0.0.1:50051 --from ckpt/           # the latest checkpoint in ckpt/

Everything goes through the client API (pull, get_slot, set_weights); TensorFlow is imported
here only, and only when a function needs it.

The layout written is the one TF 2.15 / Keras 2 (tf.keras optimizer_v2, tensorflow-addons
LazyAdam) writes for `tf.train.Checkpoint(model=model, optimizer=optimizer).save(...)`:

    _CHECKPOINTABLE_OBJECT_GRAPH                                           the object graph
    model/<PATH>/.ATTRIBUTES/VARIABLE_VALUE                                each variable
    model/<PATH>/.OPTIMIZER_SLOT/optimizer/<slot>/.ATTRIBUTES/VARIABLE_VALUE   m, v (vhat, momentum)
    optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE                              int64 iterations
    optimizer/<hyper>/.ATTRIBUTES/VARIABLE_VALUE                           float32 hyper-parameters
    save_counter/.ATTRIBUTES/VARIABLE_VALUE                                int64

with the object graph root -> {model, optimizer, save_counter}, model -> <PATH> (one child per
path component, e.g. `layer_with_weights-0` -> `embeddings`), optimizer -> {iter, <hypers>} and
the optimizer node's `slot_variables` linking each variable node to its slot nodes. By default
the i-th variable of the optimizer (creation order) is `layer_with_weights-<i>/embeddings`: a
Keras 2 `Sequential([Embedding(...)])` loads it with `tf.train.Checkpoint(model=m,
optimizer=tfa.optimizers.LazyAdam(...)).restore(path)`. Give `--var NAME=PATH` for other models.

The hyper-parameters written are those optimizer_v2 keeps as variables (Adam/LazyAdam:
learning_rate, decay, beta_1, beta_2; SGD: learning_rate, decay, momentum), so a restore sets them
as a Keras 2 checkpoint would. A learning-rate schedule is not a variable and is not written.

Keras 3 (TF >= 2.16) writes a different, positional layout for the same model: the model's
variables are not under `model/` at all, and the optimizer's are `optimizer/_iterations`,
`optimizer/_learning_rate`, `optimizer/_trainable_variables/<k>` and `optimizer/_variables/<n>`
(n = 2, 3, ... in creation order: m then v of each variable), with no `slot_variables` in the
graph. This module neither writes nor reads that layout.
"""
import os

import numpy as np

from . import errors

SLOT_KEY = "{path}/.OPTIMIZER_SLOT/optimizer/{slot}/.ATTRIBUTES/VARIABLE_VALUE"
VALUE_KEY = "{path}/.ATTRIBUTES/VARIABLE_VALUE"
GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
# optimizer_v2 hyper-parameters that live in variables (the checkpoint children of "optimizer")
HYPERS = {"Adam": ("beta_1", "beta_2", "decay", "learning_rate"),
          "LazyAdam": ("beta_1", "beta_2", "decay", "learning_rate"),
          "SGD": ("decay", "learning_rate", "momentum"),
          "Adagrad": ("decay", "learning_rate"),
          "Ftrl": ("beta", "decay", "l1_regularization_strength", "l2_regularization_strength", "learning_rate",
                   "learning_rate_power"),
          "RMSprop": ("decay", "learning_rate", "momentum", "rho")}
# Keras 2 display names for the attributes' full_name (informational only)
_FULL = {"LazyAdam": "LazyAdam", "Adam": "Adam", "SGD": "SGD", "Adagrad": "Adagrad", "Ftrl": "Ftrl",
         "RMSprop": "RMSprop"}


def default_path(i: int) -> str:
    return f"model/layer_with_weights-{i}/embeddings"


def parse_mapping(items) -> dict:
    """["emb=model/layer_with_weights-0/embeddings", ...] -> {"emb": "model/..."}"""
    out = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--var wants NAME=PATH (e.g. emb=model/layer_with_weights-0/embeddings), got {item!r}")
        out[name] = path.strip("/")
    return out


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    return tf


def _pick_optimizer(client, name):
    names = [o.name for o in client.optimizers()]
    if name:
        if name not in names:
            raise errors.NotFound(f"optimizer {name!r} does not exist (there are {names})")
        return name
    if len(names) != 1:
        raise errors.InvalidArgument(f"the cluster has optimizers {names}: choose one with --optimizer")
    return names[0]


def _paths(variables, mapping):
    mapping = dict(mapping or {})
    unknown = set(mapping) - set(variables)
    if unknown:
        raise errors.InvalidArgument(f"--var names variables the optimizer does not have: {sorted(unknown)} "
                                     f"(it has {variables})")
    paths = {v: mapping.get(v, default_path(i)) for i, v in enumerate(variables)}
    for v, p in paths.items():
        if not p.startswith("model/"):
            paths[v] = "model/" + p
    dup = {p for p in paths.values() if list(paths.values()).count(p) > 1}
    if dup:
        raise errors.InvalidArgument(f"two variables map to the same checkpoint path: {sorted(dup)}")
    return paths


# ---------------------------------------------------------------------------------------- export
def export_checkpoint(client, out_dir: str, optimizer: str | None = None, mapping: dict | None = None,
                      prefix: str = "ckpt") -> str:
    """Write the optimizer's variables, slots, iterations and hyper-parameters; returns the path prefix.
    Fixed tables only: a dynamic variable has no Keras 2 layout (`sparseps export --tf-checkpoint`
    writes its keys and rows)."""
    name = _pick_optimizer(client, optimizer)
    opt = client.optimizer(name)
    info = opt._info()
    config = opt.get_config()
    class_name = info.class_name
    variables = list(info.variables)
    if not variables:
        raise errors.FailedPrecondition(f"optimizer {name!r} has no variables to export")
    _refuse_dynamic(client, variables, "export-tf", "export each with `sparseps export ADDR --variable NAME "
                                                    "--tf-checkpoint DIR` (keys and values as two tensors)")
    tf = _tf()
    from tensorflow.core.protobuf import trackable_object_graph_pb2 as tog

    slot_names = list(info.slot_names)
    paths = _paths(variables, mapping)
    iterations = opt.iterations
    full = _FULL.get(class_name, class_name)

    graph = tog.TrackableObjectGraph()
    tensors = {}

    def node():
        graph.nodes.add()
        return len(graph.nodes) - 1

    def leaf(key, value, full_name):
        n = node()
        graph.nodes[n].attributes.add(name="VARIABLE_VALUE", full_name=full_name, checkpoint_key=key)
        tensors[key] = value
        return n

    def child(parent, local_name, node_id):
        graph.nodes[parent].children.add(node_id=node_id, local_name=local_name)

    root = node()
    model = node()
    opt_node = node()
    child(root, "model", model)
    child(root, "optimizer", opt_node)
    child(root, "save_counter", leaf("save_counter/.ATTRIBUTES/VARIABLE_VALUE", np.int64(1), "save_counter"))
    child(opt_node, "iter", leaf("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE", np.int64(iterations), f"{full}/iter"))
    for hyper in HYPERS.get(class_name, ()):
        value = config.get(hyper)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            child(opt_node, hyper, leaf(f"optimizer/{hyper}/.ATTRIBUTES/VARIABLE_VALUE", np.float32(value),
                                        f"{full}/{hyper}"))
    inner = {}   # path prefix -> node id, under model/
    for var in variables:
        path = paths[var]
        parts = path.split("/")[1:]
        parent = model
        for depth in range(len(parts) - 1):
            key = "/".join(parts[:depth + 1])
            if key not in inner:
                inner[key] = node()
                child(parent, parts[depth], inner[key])
            parent = inner[key]
        value = client.pull(var)
        var_node = leaf(VALUE_KEY.format(path=path), value, f"{parts[-2] if len(parts) > 1 else var}/{parts[-1]}")
        child(parent, parts[-1], var_node)
        for slot in slot_names:
            arr = client.pull(var, slot=slot)   # before any push: the value the slot will start at
            slot_node = leaf(SLOT_KEY.format(path=path, slot=slot), arr, f"{full}/{var}/{slot}")
            graph.nodes[opt_node].slot_variables.add(original_variable_node_id=var_node, slot_name=slot,
                                                     slot_variable_node_id=slot_node)
    for n in graph.nodes:
        n.has_checkpoint_values.value = True
    tensors[GRAPH_KEY] = graph.SerializeToString()

    os.makedirs(out_dir, exist_ok=True)
    number = _next_number(out_dir, prefix)
    path_prefix = os.path.join(out_dir, f"{prefix}-{number}")
    tensors["save_counter/.ATTRIBUTES/VARIABLE_VALUE"] = np.int64(number)
    keys = sorted(tensors)
    values = [tf.constant(tensors[k]) if k != GRAPH_KEY else tf.constant(tensors[k], dtype=tf.string)
              for k in keys]
    tf.raw_ops.SaveV2(prefix=path_prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=values)
    _write_state(out_dir, os.path.basename(path_prefix))
    return path_prefix


def _refuse_dynamic(client, variables, what, instead):
    dynamic = [v for v in variables if client.variable(v).dynamic]
    if dynamic:
        raise errors.FailedPrecondition(
            f"{what}: {', '.join(map(repr, dynamic))} " + ("is a dynamic variable" if len(dynamic) == 1 else
                                                            "are dynamic variables")
            + f" (rows keyed by int64, no row count), which the Keras 2 checkpoint layout cannot hold; {instead}")


def _next_number(out_dir, prefix):
    numbers = [0]
    for f in os.listdir(out_dir):
        if f.startswith(prefix + "-") and f.endswith(".index"):
            try:
                numbers.append(int(f[len(prefix) + 1:-len(".index")]))
            except ValueError:
                pass
    return max(numbers) + 1


def _write_state(out_dir, name):
    """The `checkpoint` file tf.train.latest_checkpoint reads."""
    tmp = os.path.join(out_dir, "checkpoint.tmp")
    with open(tmp, "w") as f:
        f.write(f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
    os.replace(tmp, os.path.join(out_dir, "checkpoint"))


# ---------------------------------------------------------------------------------------- import
def read_checkpoint(path: str) -> dict:
    """{"variables": {path: ndarray}, "slots": {path: {slot: ndarray}}, "iterations": int|None,
    "hypers": {name: float}} from a Keras 2 layout checkpoint (a directory or a path prefix)."""
    tf = _tf()
    from tensorflow.core.protobuf import trackable_object_graph_pb2 as tog

    prefix = tf.train.latest_checkpoint(path) if os.path.isdir(path) else path
    if not prefix:
        raise errors.NotFound(f"no TensorFlow checkpoint in {path}")
    reader = tf.train.load_checkpoint(prefix)
    keys = reader.get_variable_to_shape_map()
    if GRAPH_KEY not in keys:
        raise errors.InvalidArgument(f"{prefix} is not an object-based checkpoint (no {GRAPH_KEY})")
    graph = tog.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(GRAPH_KEY))
    names = {0: ""}          # node id -> path from the root (first one found, breadth first)
    queue = [0]
    while queue:
        n = queue.pop(0)
        for c in graph.nodes[n].children:
            if c.node_id not in names:
                names[c.node_id] = f"{names[n]}/{c.local_name}".lstrip("/")
                queue.append(c.node_id)

    def value_of(node_id):
        for a in graph.nodes[node_id].attributes:
            if a.name == "VARIABLE_VALUE":
                return reader.get_tensor(a.checkpoint_key)
        return None

    root_children = {c.local_name: c.node_id for c in graph.nodes[0].children}
    if "optimizer" not in root_children:
        if any(k.startswith("optimizer/_variables/") for k in keys):
            raise errors.InvalidArgument(f"{prefix} has the Keras 3 layout (optimizer/_variables/<n>); "
                                         "only the Keras 2 (TF <= 2.15, tf_keras) layout can be imported")
        raise errors.InvalidArgument(f"{prefix} has no 'optimizer' object")
    opt_node = graph.nodes[root_children["optimizer"]]
    if not opt_node.slot_variables and any(k.startswith("optimizer/_variables/") for k in keys):
        raise errors.InvalidArgument(f"{prefix} has the Keras 3 layout (optimizer/_variables/<n>); "
                                     "only the Keras 2 (TF <= 2.15, tf_keras) layout can be imported")
    out = {"variables": {}, "slots": {}, "iterations": None, "hypers": {}, "prefix": prefix}
    for c in opt_node.children:
        v = value_of(c.node_id)
        if v is None:
            continue
        if c.local_name == "iter":
            out["iterations"] = int(v)
        elif np.ndim(v) == 0:
            out["hypers"][c.local_name] = float(v)
    for s in opt_node.slot_variables:
        var_path = names.get(s.original_variable_node_id)
        if var_path is None:
            continue
        if var_path not in out["variables"]:
            out["variables"][var_path] = value_of(s.original_variable_node_id)
        out["slots"].setdefault(var_path, {})[s.slot_name] = value_of(s.slot_variable_node_id)
    return out


def import_checkpoint(client, path: str, optimizer: str | None = None, mapping: dict | None = None,
                      create: bool = False) -> dict:
    """Restore variables, slots and iterations from a Keras 2 layout checkpoint; returns a summary.

    Variables are matched as export_checkpoint writes them (the optimizer's i-th variable is
    `model/layer_with_weights-<i>/embeddings`, or --var NAME=PATH). create=True creates missing
    variables (with the checkpoint's shape and dtype) on the optimizer, which must exist. Rows are
    written in chunks that fit the message limit, then iterations: train nothing meanwhile.
    """
    ck = read_checkpoint(path)
    name = _pick_optimizer(client, optimizer)
    opt = client.optimizer(name)
    variables = list(opt._info().variables)
    mapping = dict(mapping or {})
    for var in mapping:   # a mapped variable the server lacks: created with --create, else NotFound below
        if var not in variables:
            variables.append(var)
    paths = _paths(variables, mapping)
    by_path = {p: v for v, p in paths.items()}
    missing = [p for p in ck["variables"] if p not in by_path]
    if missing:
        raise errors.InvalidArgument(
            f"the checkpoint has variables {missing} that match no variable of optimizer {name!r} "
            f"({paths}); map them with --var NAME=PATH" + ("" if create else " (and --create to create them)"))
    restored = []
    existing = {v.name for v in client.variables()}
    _refuse_dynamic(client, [by_path[p] for p in ck["variables"] if by_path[p] in existing], "import-tf",
                    "write their rows with client.set_weights([(NAME, '', keys, rows)])")
    for p, value in ck["variables"].items():
        var = by_path[p]
        value = np.asarray(value)
        if var not in existing:
            if not create:
                raise errors.NotFound(f"variable {var!r} does not exist; pass --create to create it")
            client.create_variable(var, shape=value.shape, dtype=value.dtype, optimizer=name)
        handle = client.variable(var)
        if tuple(handle.shape) != value.shape:
            raise errors.InvalidArgument(f"variable {var!r} has shape {list(handle.shape)}, the checkpoint's "
                                         f"{p} has {list(value.shape)}")
        arrays = [("", value)] + sorted(ck["slots"].get(p, {}).items())
        row_bytes = max(1, sum(a[0:1].nbytes for _, a in arrays))
        step = max(1, (client.max_message // 2) // (row_bytes + 8 * len(arrays)))
        for lo in range(0, value.shape[0], step):
            ids = np.arange(lo, min(lo + step, value.shape[0]))
            client.set_weights([(var, slot, ids, np.asarray(a)[ids]) for slot, a in arrays])
        restored.append((var, p, [s for s, _ in arrays if s]))
    if ck["iterations"] is not None:
        client.set_weights([], optimizer=name, iterations=ck["iterations"])
    return {"checkpoint": ck["prefix"], "optimizer": name, "iterations": ck["iterations"],
            "variables": restored, "hypers_not_restored": ck["hypers"]}


# ---------------------------------------------------------------------------------------- CLI
def connection_arguments(p):
    p.add_argument("address", help="shard addresses, comma-separated")
    p.add_argument("--token", default=os.environ.get("SPARSEPS_TOKEN"),
                   help="bearer token (default: $SPARSEPS_TOKEN)")
    p.add_argument("--tls-ca", default=os.environ.get("SPARSEPS_TLS_CA"), help="PEM CA that signed the servers")
    p.add_argument("--tls-cert", default=os.environ.get("SPARSEPS_TLS_CERT"), help="client certificate (mTLS)")
    p.add_argument("--tls-key", default=os.environ.get("SPARSEPS_TLS_KEY"), help="client key (mTLS)")
    p.add_argument("--server-name", default=None, help="name to verify in the server certificates")


def connect_from_args(args, **kw):
    from . import connect
    return connect(args.address, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                   tls_key=args.tls_key, server_name=args.server_name, **kw)


def _export_cli(args):
    with connect_from_args(args, retry_deadline=10) as client:
        path = export_checkpoint(client, args.out, args.optimizer, parse_mapping(args.var))
    print(path)
    return 0


def _import_cli(args):
    with connect_from_args(args, retry_deadline=10) as client:
        summary = import_checkpoint(client, getattr(args, "from"), args.optimizer, parse_mapping(args.var),
                                    args.create)
    print(f"restored {summary['checkpoint']} into optimizer {summary['optimizer']!r}: "
          f"iterations={summary['iterations']}")
    for var, path, slots in summary["variables"]:
        print(f"  {var} <- {path} (slots: {', '.join(slots) or 'none'})")
    if summary["hypers_not_restored"]:
        print(f"  hyper-parameters in the checkpoint, not applied (the server's optimizer config stands): "
              f"{summary['hypers_not_restored']}")
    return 0


def add_cli(sub):
    """The `export-tf` and `import-tf` subcommands of `sparseps`."""
    e = sub.add_parser("export-tf", help="write a TensorFlow (Keras 2 layout) checkpoint of an optimizer's state")
    connection_arguments(e)
    e.add_argument("--out", required=True, help="directory for the checkpoint (ckpt-N.index, ckpt-N.data-*)")
    e.add_argument("--optimizer", help="which optimizer (default: the only one)")
    e.add_argument("--var", action="append", metavar="NAME=PATH",
                   help="checkpoint path of a variable (default: the i-th is model/layer_with_weights-i/embeddings)")
    e.set_defaults(fn=_export_cli)
    i = sub.add_parser("import-tf", help="restore variables, slots and iterations from a TensorFlow checkpoint")
    connection_arguments(i)
    i.add_argument("--from", required=True, help="checkpoint directory (its latest) or path prefix")
    i.add_argument("--optimizer", help="which optimizer (default: the only one)")
    i.add_argument("--var", action="append", metavar="NAME=PATH", help="as for export-tf")
    i.add_argument("--create", action="store_true", help="create variables the server does not have yet")
    i.set_defaults(fn=_import_cli)
