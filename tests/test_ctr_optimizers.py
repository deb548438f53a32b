"""Adagrad, Ftrl and RMSprop beyond their golden trajectories, against live servers.

Bad configurations are refused with INVALID_ARGUMENT naming the key and leave the name free; the
real Keras 3 configs round-trip; get_weights/set_weights restore a run exactly; sync mode applies
the replicas' per-id sum like one push of all of it; the write-ahead log replays them after a
SIGKILL; TF checkpoints carry their slots under TensorFlow's names and a Keras 2 (tf_keras) legacy
optimizer of the same class restores them.
"""
import json
import pathlib
import threading

import numpy as np
import pytest

import sparseps
from sparseps.local import LocalServer, start_cluster

KERAS3 = json.loads((pathlib.Path(__file__).parent / "golden" / "keras3_configs.json").read_text())["optimizers"]

CONFIGS = {
    "adagrad": {"class_name": "Adagrad", "config": {"learning_rate": 0.1, "initial_accumulator_value": 0.2}},
    "ftrl": {"class_name": "Ftrl", "config": {"learning_rate": 0.1, "l1_regularization_strength": 0.01,
                                              "l2_shrinkage_regularization_strength": 0.01, "beta": 0.1}},
    "rmsprop": {"class_name": "RMSprop", "config": {"learning_rate": 0.01, "centered": True}},
    "rmsprop_momentum": {"class_name": "RMSprop", "config": {"learning_rate": 0.01, "momentum": 0.9}},
}
SLOTS = {"adagrad": ["accumulator"], "ftrl": ["accumulator", "linear"], "rmsprop": ["rms", "mg"],
         "rmsprop_momentum": ["rms", "momentum"]}


def pushes(seed=3, steps=6, rows=10, dim=4):
    """Sparse pushes with duplicate, unsorted ids (one empty) for a (rows, dim) table."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        n = 0 if k == 2 else 5
        ids = rng.integers(0, rows, n)
        if n:
            ids[-1] = ids[0]
        out.append((ids.astype(np.int64), rng.normal(0, 0.1, (n, dim)).astype(np.float32)))
    return out


def init(rows=10, dim=4):
    return np.random.default_rng(0).normal(0, 0.1, (rows, dim)).astype(np.float32)


# ---------------------------------------------------------------- bad configs
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("config, key", [
    ({"class_name": "Ftrl", "config": {"l1_regularization_strength": -0.1}}, "l1_regularization_strength"),
    ({"class_name": "Ftrl", "config": {"l2_regularization_strength": -1.0}}, "l2_regularization_strength"),
    ({"class_name": "Ftrl", "config": {"l2_shrinkage_regularization_strength": -1.0}},
     "l2_shrinkage_regularization_strength"),
    ({"class_name": "Ftrl", "config": {"learning_rate_power": 0.5}}, "learning_rate_power"),
    ({"class_name": "Ftrl", "config": {"initial_accumulator_value": -0.1}}, "initial_accumulator_value"),
    ({"class_name": "Ftrl", "config": {"beta": NAN}}, "beta"),
    ({"class_name": "Ftrl", "config": {"learning_rate": INF}}, "learning_rate"),
    ({"class_name": "Ftrl", "config": {"learning_rate_power": 0.5, "loss_scale_factor": None}}, "learning_rate_power"),
    ({"class_name": "Adagrad", "config": {"initial_accumulator_value": -1.0}}, "initial_accumulator_value"),
    ({"class_name": "Adagrad", "config": {"epsilon": NAN}}, "epsilon"),
    ({"class_name": "Adagrad", "config": {"initial_accumulator_value": -INF, "loss_scale_factor": None}},
     "initial_accumulator_value"),
    ({"class_name": "RMSprop", "config": {"momentum": 1.5}}, "momentum"),
    ({"class_name": "RMSprop", "config": {"rho": INF}}, "rho"),
    ({"class_name": "RMSprop", "config": {"centered": "yes"}}, "centered"),
    ({"class_name": "RMSprop", "config": {"epsilon": NAN, "loss_scale_factor": None}}, "epsilon"),
    ({"class_name": "RMSprop", "config": {"jit_compile": False}}, "legacy"),   # Keras 2.11+ flavour: not built
])
def test_bad_config_is_refused_naming_the_key_and_changes_nothing(numba_client, unique, config, key):
    name = f"{unique}_o"
    with pytest.raises(sparseps.InvalidArgument) as e:
        numba_client.create_optimizer(name, config)
    assert "INVALID_ARGUMENT" in str(e.value) and key in str(e.value), str(e.value)
    assert name not in [o.name for o in numba_client.optimizers()]
    numba_client.create_optimizer(name, {"class_name": config["class_name"], "config": {}})   # the name is free


def test_keras3_configs_round_trip(numba_client, unique):
    """keras.optimizers.{Adagrad, Ftrl, RMSprop}().get_config() / serialize() (TF 2.21) as they are."""
    for case in ("adagrad_default", "ftrl_l1l2", "rmsprop_momentum_centered"):
        ser = KERAS3[case]["serialize"]
        opt = numba_client.create_optimizer(f"{unique}_{case}", ser)
        assert opt.get_config() == KERAS3[case]["get_config"], case
    opt = numba_client.optimizer(f"{unique}_rmsprop_momentum_centered")
    assert opt.get_slot_names() == ["velocity", "momentum", "average_gradient"]


# ---------------------------------------------------------------- get_weights / set_weights
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_set_weights_restores_a_run(client, unique, case):
    """Three steps, get_weights(); a fresh optimizer and variable given those weights then trains on
    bit for bit like the original."""
    steps = pushes()
    for tag in ("a", "b"):
        client.create_optimizer(f"{unique}_{tag}", CONFIGS[case])
        client.create_variable(f"{unique}_{tag}v", initial_value=init(), optimizer=f"{unique}_{tag}")
    a, b = client.optimizer(f"{unique}_a"), client.optimizer(f"{unique}_b")
    for ids, rows in steps[:3]:
        client.push({f"{unique}_av": (ids, rows)})
    client.push({f"{unique}_bv": (np.array([0]), np.zeros((1, 4), np.float32))})   # creates b's slots
    assert a.get_slot_names() == SLOTS[case]
    weights = a.get_weights()
    assert len(weights) == 1 + len(SLOTS[case]) and int(weights[0]) == 3
    b.set_weights(weights)
    client.set_weights([(f"{unique}_bv", "", None, client.pull(f"{unique}_av"))])
    for ids, rows in steps[3:]:
        assert client.push({f"{unique}_av": (ids, rows)}) == client.push({f"{unique}_bv": (ids, rows)})
    np.testing.assert_array_equal(client.pull(f"{unique}_bv"), client.pull(f"{unique}_av"))
    for slot in SLOTS[case]:
        np.testing.assert_array_equal(b.get_slot(f"{unique}_bv", slot), a.get_slot(f"{unique}_av", slot))


# ---------------------------------------------------------------- sync mode
@pytest.mark.parametrize("case", ["ftrl", "rmsprop_momentum"])
def test_sync_applies_the_replicas_sum_like_one_push(cluster3, client3, numba_client, unique, case):
    """Two replicas' pushes for step 0 on three shards = one push of both (per-id sums in replica order)."""
    opt = f"{unique}_s"
    client3.create_optimizer(opt, CONFIGS[case], consistency={"mode": "sync", "replicas_to_aggregate": 2,
                                                               "total_num_replicas": 2})
    client3.create_variable(f"{unique}_sv", initial_value=init(), optimizer=opt)
    numba_client.create_optimizer(f"{unique}_r", CONFIGS[case])
    numba_client.create_variable(f"{unique}_rv", initial_value=init(), optimizer=f"{unique}_r")
    (i0, r0), (i1, r1) = pushes(seed=5)[:2]
    other = sparseps.connect(",".join(s.address for s in cluster3))
    t = threading.Thread(target=lambda: other.push({f"{unique}_sv": (i1, r1)}, step=0))
    try:
        t.start()
        assert client3.push({f"{unique}_sv": (i0, r0)}, step=0) == 1
        t.join()
    finally:
        other.close()
    numba_client.push({f"{unique}_rv": (np.concatenate([i0, i1]), np.concatenate([r0, r1]))})
    np.testing.assert_array_equal(client3.pull(f"{unique}_sv", min_iterations=1), numba_client.pull(f"{unique}_rv"))


# ---------------------------------------------------------------- write-ahead log
def test_wal_replay_after_sigkill(tmp_path):
    """Every optimizer's pushes, replayed from the log after a SIGKILL, give the same state."""
    with LocalServer("--data-dir", str(tmp_path), "--backend", "numba") as srv:
        c = sparseps.connect(srv.address)
        for case, cfg in CONFIGS.items():
            c.create_optimizer(case, cfg)
            c.create_variable(f"{case}_v", initial_value=init(), optimizer=case)
            for ids, rows in pushes():
                c.push({f"{case}_v": (ids, rows)})
        before = {case: [c.pull(f"{case}_v")] + [c.pull(f"{case}_v", slot=s) for s in SLOTS[case]] for case in CONFIGS}
        c.close()
        port = srv.port
        srv.kill()
    with LocalServer("--data-dir", str(tmp_path), "--backend", "numba", port=port) as srv:
        c = sparseps.connect(srv.address)
        for case in CONFIGS:
            after = [c.pull(f"{case}_v")] + [c.pull(f"{case}_v", slot=s) for s in SLOTS[case]]
            for x, y in zip(after, before[case]):
                np.testing.assert_array_equal(x, y)
            assert c.optimizer(case).iterations == len(pushes())
        c.close()


# ---------------------------------------------------------------- TF checkpoints
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_tf_checkpoint_restores_into_keras2_legacy_optimizer(tmp_path, case):
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras", reason="tf_keras not installed")
    from sparseps.tf_checkpoint import export_checkpoint, import_checkpoint
    cfg = CONFIGS[case]
    with LocalServer("--backend", "numpy", "--no-malloc-tuning") as srv, sparseps.connect(srv.address) as c:
        c.create_optimizer("o", cfg)
        c.create_variable("emb", initial_value=init(), optimizer="o")
        for ids, rows in pushes():
            c.push({"emb": (ids, rows)})
        state = {s: c.pull("emb", slot=s) for s in SLOTS[case]}
        value = c.pull("emb")
        prefix = export_checkpoint(c, str(tmp_path))
    model = tf_keras.Sequential([tf_keras.layers.Embedding(10, 4)])
    model.build((None, 3))
    opt = getattr(tf_keras.optimizers.legacy, cfg["class_name"])(**cfg["config"])
    status = tf.train.Checkpoint(model=model, optimizer=opt).restore(prefix)
    opt._create_all_weights(model.trainable_variables)
    status.assert_consumed()
    emb = model.layers[0].embeddings
    np.testing.assert_array_equal(emb.numpy(), value)
    assert sorted(opt.get_slot_names()) == sorted(SLOTS[case])
    for slot, arr in state.items():
        np.testing.assert_array_equal(opt.get_slot(emb, slot).numpy(), arr)
    assert int(opt.iterations.numpy()) == len(pushes())
    with LocalServer("--backend", "numpy", "--no-malloc-tuning") as srv, sparseps.connect(srv.address) as c:
        c.create_optimizer("o", cfg)
        import_checkpoint(c, str(tmp_path), mapping={"emb": "model/layer_with_weights-0/embeddings"}, create=True)
        np.testing.assert_array_equal(c.pull("emb"), value)
        for slot, arr in state.items():
            np.testing.assert_array_equal(c.pull("emb", slot=slot), arr)



@pytest.mark.parametrize("case", ["adagrad", "ftrl"])
def test_slots_before_the_first_push_read_and_export_as_keras_builds_them(tmp_path, case):
    """Adagrad's and Ftrl's accumulators start at initial_accumulator_value, not 0: an untouched
    variable's slots must read (and export to a TF checkpoint) as what Keras builds."""
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras", reason="tf_keras not installed")
    from sparseps.tf_checkpoint import export_checkpoint
    cfg = CONFIGS[case]
    model = tf_keras.Sequential([tf_keras.layers.Embedding(10, 4)])
    model.build((None, 3))
    built = getattr(tf_keras.optimizers.legacy, cfg["class_name"])(**cfg["config"])
    built._create_all_weights(model.trainable_variables)   # Keras's own slots, before any step
    emb = model.layers[0].embeddings
    with LocalServer("--backend", "numpy", "--no-malloc-tuning") as srv, sparseps.connect(srv.address) as c:
        c.create_optimizer("o", cfg)
        c.create_variable("emb", initial_value=init(), optimizer="o")
        for slot in SLOTS[case]:
            np.testing.assert_array_equal(c.pull("emb", slot=slot), built.get_slot(emb, slot).numpy())
            np.testing.assert_array_equal(c.pull("emb", np.array([7, 2]), slot=slot),
                                          built.get_slot(emb, slot).numpy()[[7, 2]])
        with pytest.raises(sparseps.NotFound, match="no slot 'm'"):
            c.pull("emb", slot="m")
        prefix = export_checkpoint(c, str(tmp_path))
        assert c.optimizer("o").iterations == 0
    restored = getattr(tf_keras.optimizers.legacy, cfg["class_name"])(**cfg["config"])
    status = tf.train.Checkpoint(model=model, optimizer=restored).restore(prefix)
    restored._create_all_weights(model.trainable_variables)
    status.assert_consumed()
    for slot in SLOTS[case]:
        np.testing.assert_array_equal(restored.get_slot(emb, slot).numpy(), built.get_slot(emb, slot).numpy())


# ---------------------------------------------------------------- Keras integration
@pytest.mark.parametrize("cls, kw", [("Adagrad", {"learning_rate": 0.1}),
                                     ("Ftrl", {"learning_rate": 0.1, "l1_regularization_strength": 0.01}),
                                     ("RMSprop", {"learning_rate": 0.01, "momentum": 0.5, "centered": True})])
def test_keras_classes_train_like_the_local_legacy_optimizer(numba_client, unique, cls, kw):
    """sparseps.keras.<cls> with a remote Embedding under a GradientTape == tf_keras's legacy <cls>
    on a local variable fed the same IndexedSlices (TensorFlow's own kernels), bit for bit."""
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras", reason="tf_keras not installed")
    spk = pytest.importorskip("sparseps.keras")
    table = init(50, 4)
    opt = getattr(spk, cls)(client=numba_client, name=f"{unique}_opt", **kw)
    emb = spk.Embedding(initial_value=table, name=f"{unique}_emb", optimizer=opt)
    local_var = tf.Variable(table)
    local_opt = getattr(tf_keras.optimizers.legacy, cls)(**kw)
    rng = np.random.default_rng(7)
    for _ in range(3):
        ids = tf.constant(rng.integers(0, 50, 12))
        w = tf.constant(rng.normal(size=(12, 4)).astype(np.float32))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb(ids) * w)
        opt.apply_gradients(zip(tape.gradient(loss, emb.trainable_variables), emb.trainable_variables))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(local_var, ids) * w)
        local_opt.apply_gradients([(tape.gradient(loss, local_var), local_var)])
    np.testing.assert_array_equal(emb.numpy(), local_var.numpy())
    assert int(opt.iterations) == 3 and opt.get_config()["name"] == f"{unique}_opt"
    for slot in local_opt.get_slot_names():
        np.testing.assert_array_equal(opt.get_slot(emb, slot).numpy(), local_opt.get_slot(local_var, slot).numpy())


# ---------------------------------------------------------------- fused kernels
@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_fused_kernels_equal_the_numpy_path_bitwise(case, dtype):
    """The numba backend's kernels (serial below 1024 ids, parallel above; 2-D and 1-D variables)
    give the numpy backend's bits, which are the reference's (the golden cases)."""
    from sparseps.server.backends.numpy_backend import NumbaBackend, NumpyBackend
    from sparseps.server.state import Shard
    out = []
    for bk in (NumpyBackend(), NumbaBackend()):
        rng = np.random.default_rng(11)
        shard = Shard(bk)
        shard.create_optimizer("o", json.dumps(CONFIGS[case]))
        shard.create_variable("t", (300, 5), dtype, "o", initial_value=rng.normal(0, 0.1, (300, 5)).astype(dtype))
        shard.create_variable("b", (300,), dtype, "o", initial_value=rng.normal(0, 0.1, 300).astype(dtype))
        for n in (40, 0, 2000, 7):
            ids = rng.integers(0, 300, n)
            shard.push([("t", ids, rng.normal(0, 0.1, (n, 5)).astype(dtype)),
                        ("b", ids, rng.normal(0, 0.1, n).astype(dtype))])
        out.append({f"{n}/{s}": a.copy() for n, v in shard.variables.items()
                    for s, a in [("", v.value)] + sorted(v.slots.items())})
    assert sorted(out[0]) == sorted(out[1])
    for key in out[0]:
        np.testing.assert_array_equal(out[1][key], out[0][key], err_msg=key)
