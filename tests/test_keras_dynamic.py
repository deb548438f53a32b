"""sparseps.keras.DynamicEmbedding and hash_strings against a live server (docs/keras.md, docs/dynamic.md).

Parity: a DynamicEmbedding trained with LazyAdam gives bit-identical losses, rows and slots to a
spk.Embedding whose rows are the keys' initial rows (the fixed path is itself proven against the
real tfa LazyAdam in test_keras.py), eagerly and inside tf.function.
"""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
spk = pytest.importorskip("sparseps.keras")

from sparseps import errors, hashing  # noqa: E402

NORMAL = {"class_name": "RandomNormal", "config": {"stddev": 0.1, "seed": 5}}
EDGE_KEYS = np.array([0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 62 + 3, -987654321012], np.int64)


def _keys(rng, n):
    keys = np.unique(np.concatenate([EDGE_KEYS, rng.integers(-2 ** 63, 2 ** 63 - 1, n, dtype=np.int64)]))
    return rng.permutation(keys)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf_function"])
def test_trains_like_an_embedding_of_the_initial_rows(numba_client, unique, compiled):
    """Two dynamic tables (one looked up twice per step) == two fixed tables holding the keys' initial
    rows: every loss, row, slot and iteration bit-identical; rows exist only for the keys pushed."""
    rng = np.random.default_rng(3)
    ukeys, ikeys = _keys(rng, 60), _keys(rng, 90)
    opt_d = spk.LazyAdam(0.01, client=numba_client, name=f"{unique}_od")
    opt_f = spk.LazyAdam(0.01, client=numba_client, name=f"{unique}_of")
    users = spk.DynamicEmbedding(8, name=f"{unique}_u", optimizer=opt_d, embeddings_initializer=NORMAL)
    items = spk.DynamicEmbedding(8, name=f"{unique}_i", optimizer=opt_d, embeddings_initializer=NORMAL)
    assert users.size() == 0 and repr(users.variable).startswith(f"<sparseps.Variable '{unique}_u' dynamic dim=8")
    users_f = spk.Embedding(initial_value=users.pull(ukeys), name=f"{unique}_uf", optimizer=opt_f)
    items_f = spk.Embedding(initial_value=items.pull(ikeys), name=f"{unique}_if", optimizer=opt_f)
    assert users.size() == 0                                     # a pull creates nothing
    bce = keras.losses.BinaryCrossentropy(from_logits=True)

    def make_step(u_layer, i_layer, opt):
        variables = u_layer.trainable_variables + i_layer.trainable_variables

        def step(u, i, i2, y):
            with tf.GradientTape() as tape:
                logit = tf.reduce_sum(u_layer(u) * i_layer(i), -1) + 0.5 * tf.reduce_sum(i_layer(i2), -1)
                loss = bce(y, logit)
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))
            return loss, grads
        return tf.function(step) if compiled else step
    step_d, step_f = make_step(users, items, opt_d), make_step(users_f, items_f, opt_f)
    seen_u, seen_i = set(), set()
    for k in range(20):
        u = rng.integers(0, len(ukeys) // 2, 32)                 # half the keys are never touched
        i, i2 = rng.integers(0, len(ikeys) // 2, 32), rng.integers(0, len(ikeys) // 2, 32)
        y = (rng.random(32) < 0.4).astype(np.float32)
        loss_d, grads = step_d(ukeys[u], ikeys[i], ikeys[i2], y)
        loss_f, _ = step_f(u, i, i2, y)
        assert float(loss_d) == float(loss_f), k
        if not compiled:
            assert isinstance(grads[0], tf.IndexedSlices)
            np.testing.assert_array_equal(grads[0].indices.numpy(), ukeys[u])          # the int64 keys
            np.testing.assert_array_equal(np.sort(grads[1].indices.numpy()), np.sort(ikeys[np.r_[i, i2]]))
        seen_u.update(ukeys[u].tolist())
        seen_i.update(ikeys[np.r_[i, i2]].tolist())
    assert int(opt_d.iterations) == int(opt_f.iterations) == 20
    np.testing.assert_array_equal(users.pull(ukeys), users_f.numpy())
    np.testing.assert_array_equal(items.pull(ikeys), items_f.numpy())
    assert users.size() == len(seen_u) and items.size() == len(seen_i)
    keys, m = items.export(slot="m")
    assert set(keys.tolist()) == seen_i
    where = {int(key): n for n, key in enumerate(ikeys)}
    np.testing.assert_array_equal(m, opt_f.get_slot(items_f, "m").numpy()[[where[int(x)] for x in keys]])
    keys, rows = users.export()
    np.testing.assert_array_equal(rows, users_f.numpy()[[np.flatnonzero(ukeys == x)[0] for x in keys]])


def test_hash_strings_numpy_and_tensorflow_agree():
    """The documented hash: SipHash-2-4 (the paper's test vector) with sparseps' key, mod 2^63 - 1;
    numpy, eager TF, tf.function and tf.data give the same int64 for every string."""
    assert hashing.siphash24(0x0706050403020100, 0x0F0E0D0C0B0A0908, bytes(range(15))) == 0xA129CA6149BE45E5
    strings = ["", "a", "us", "sparseps", "é漢字🙂", "x" * 7, "y" * 8, "z" * 9, "w" * 100,
               *[f"user={k}|item={k * 7}" for k in range(50)]]
    expected = np.array([hashing.siphash24(hashing.K0, hashing.K1, s.encode()) % (2 ** 63 - 1) for s in strings])
    assert hashing.K0 == int.from_bytes(b"sparseps", "little") and hashing.K1 == int.from_bytes(b"strings\0", "little")
    assert int(hashing.hash_strings("sparseps")) == 4948014126538483295   # pinned: a change breaks every table
    np.testing.assert_array_equal(hashing.hash_strings(np.array(strings)), expected)
    np.testing.assert_array_equal(spk.hash_strings(strings), expected)
    np.testing.assert_array_equal(spk.hash_strings(np.array([s.encode() for s in strings], object)), expected)
    eager = spk.hash_strings(tf.constant(strings))
    assert eager.dtype == tf.int64
    np.testing.assert_array_equal(eager.numpy(), expected)
    graph = tf.function(lambda s: spk.hash_strings(s))(tf.constant(np.array(strings).reshape(-1, 1)))
    np.testing.assert_array_equal(graph.numpy().reshape(-1), expected)
    ds = tf.data.Dataset.from_tensor_slices(strings).map(spk.hash_strings)
    np.testing.assert_array_equal(np.array(list(ds.as_numpy_iterator())), expected)
    assert np.all(expected >= 0) and len(np.unique(expected)) == len(strings)
    with pytest.raises(TypeError, match="integer ids are keys already"):
        spk.hash_strings(np.array([1, 2]))
    with pytest.raises(TypeError, match="tf.string tensor"):
        spk.hash_strings(tf.constant([1.0]))
    with pytest.raises(TypeError, match="got int"):
        hashing.hash_strings(np.array(["a", 3], object))


def test_string_features(numba_client, unique):
    """input_type="string": the layer hashes in-graph; its rows are those of the hashed keys."""
    opt = spk.SGD(1.0, client=numba_client, name=f"{unique}_o")
    country = spk.DynamicEmbedding(4, name=f"{unique}_c", optimizer=opt, input_type="string",
                                   embeddings_initializer=NORMAL)
    batch = np.array([["us", "de"], ["fr", "us"]])
    keys = hashing.hash_strings(batch)
    np.testing.assert_array_equal(country(tf.constant(batch)).numpy(), country.variable.pull(keys.reshape(-1))
                                  .reshape(2, 2, 4))
    np.testing.assert_array_equal(country.pull(batch), country(batch).numpy())

    @tf.function
    def step(s):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(country(s))
        opt.apply_gradients(zip(tape.gradient(loss, country.trainable_variables), country.trainable_variables))
    before = country.pull(np.array(["us", "de", "fr", "it"]))
    step(tf.constant(batch))
    exported, rows = country.export()
    assert sorted(exported.tolist()) == sorted(set(keys.reshape(-1).tolist()))
    after = country.pull(np.array(["us", "de", "fr", "it"]))
    np.testing.assert_allclose(before[:3] - after[:3], [[2] * 4, [1] * 4, [1] * 4], atol=1e-6)   # us twice, SGD lr 1
    np.testing.assert_array_equal(after[3], before[3])


def test_policies_pass_through_and_export(numba_client, unique, tmp_path):
    """admission, eviction and capacity given to the layer are the table's policy on the server."""
    opt = spk.SGD(0.1, client=numba_client, name=f"{unique}_o")
    admit = spk.DynamicEmbedding(2, name=f"{unique}_a", optimizer=opt, admission={"min_count": 2})
    aged = spk.DynamicEmbedding(2, name=f"{unique}_e", optimizer=opt, eviction={"max_age_steps": 3})
    capped = spk.DynamicEmbedding(2, name=f"{unique}_k", optimizer=opt, capacity=40, on_full="evict")
    layers = [admit, aged, capped]
    variables = [v for layer in layers for v in layer.trainable_variables]

    def step(keys):
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(layer(keys)) for layer in layers)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
    first = np.arange(10, dtype=np.int64) * 2 ** 40
    step(first)
    assert admit.size() == 0 and aged.size() == 10            # min_count 2: nothing admitted on the first push
    step(first)
    assert admit.size() == 10
    for k in range(4):                                        # other keys for 4 steps: `first` gets old
        step(np.arange(100, 130, dtype=np.int64) + 1000 * k)
        assert capped.size() <= 40
    # at step 6, rows not updated in steps 4-6 go: `first` (step 2) and step 3's keys
    assert numba_client.evict(aged.variable.name) == {aged.variable.name: 10 + 30}
    assert aged.size() == 90
    shard = numba_client.status()["shards"][0]
    table = {v["name"]: v.get("table") for v in shard["variables"]}
    assert table[capped.variable.name]["capacity"] == 40 and table[capped.variable.name]["on_full"] == "evict"
    assert table[admit.variable.name]["admission"]["min_count"] == 2
    assert table[aged.variable.name]["eviction"]["max_age_steps"] == 3
    path = spk.export_npz(aged, tmp_path / "aged.npz", slots=True)
    keys, rows = aged.export()
    with np.load(path) as f:
        np.testing.assert_array_equal(f["keys"], keys)
        np.testing.assert_array_equal(f["values"], rows)
    again = spk.DynamicEmbedding(variable=aged.variable.name, client=numba_client)   # attach to the table
    np.testing.assert_array_equal(again.pull(keys), rows)
    assert again.dim == 2 and again.get_config()["variable"] == aged.variable.name


def test_prefetcher_serves_dynamic_lookups(numba_client, unique):
    opt = spk.LazyAdam(0.01, client=numba_client, name=f"{unique}_o")
    emb = spk.DynamicEmbedding(4, name=f"{unique}_p", optimizer=opt)
    batches = [np.array([2 ** 62 + k, -k - 1, 2 ** 62 + k], np.int64) for k in range(5)]
    for keys in spk.Prefetcher(iter(batches), {emb: lambda b: b}):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(emb(keys) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, emb.trainable_variables), emb.trainable_variables))
    assert emb.remote.prefetch_hits == 5 and emb.size() == 10 and int(opt.iterations) == 5


def test_bad_input_is_refused_clearly_and_changes_nothing(numba_client, unique):
    opt = spk.LazyAdam(0.01, client=numba_client, name=f"{unique}_o")
    emb = spk.DynamicEmbedding(4, name=f"{unique}_d", optimizer=opt)
    fixed = spk.Embedding(10, 4, name=f"{unique}_f", optimizer=opt)
    with pytest.raises(TypeError, match="ids must be integers .*got float"):
        emb(np.array([1.0, 2.5]))
    with pytest.raises(TypeError, match="ids must be integers .*got float"):
        tf.function(lambda x: emb(x))(tf.constant([1.0]))
    with pytest.raises(TypeError, match="input_type='string'"):
        emb(tf.constant(["a"]))
    with pytest.raises(errors.AlreadyExists, match="dynamic variable of dim=8"):
        spk.DynamicEmbedding(8, name=f"{unique}_d", optimizer=opt)            # the table has dim 4
    with pytest.raises(errors.AlreadyExists, match="dynamic variable of dim=4"):
        spk.DynamicEmbedding(4, name=f"{unique}_f", optimizer=opt)            # a fixed table of that name
    with pytest.raises(ValueError, match="has rows of width 4, not dim=8"):
        spk.DynamicEmbedding(8, variable=f"{unique}_d", client=numba_client)
    with pytest.raises(ValueError, match="fixed table .* use sparseps.keras.Embedding"):
        spk.DynamicEmbedding(variable=f"{unique}_f", client=numba_client)
    with pytest.raises(ValueError, match="dynamic variable .* use sparseps.keras.DynamicEmbedding"):
        spk.Embedding(variable=f"{unique}_d", client=numba_client)
    with pytest.raises(errors.InvalidArgument, match="dim must be a positive integer"):
        spk.DynamicEmbedding(0, name=f"{unique}_z", optimizer=opt)
    with pytest.raises(errors.InvalidArgument, match="capacity"):
        spk.DynamicEmbedding(4, name=f"{unique}_c", optimizer=opt, capacity=-1)
    with pytest.raises(ValueError, match="input_type"):
        spk.DynamicEmbedding(4, name=f"{unique}_t", optimizer=opt, input_type="float")
    with pytest.raises(ValueError, match="export_saved_model: .* dynamic"):
        spk.export_saved_model(emb, "/nonexistent")
    names = {v.name for v in numba_client.variables()}
    assert not {f"{unique}_z", f"{unique}_c", f"{unique}_t"} & names
    assert emb.size() == 0 and int(opt.iterations) == 0 and fixed.input_dim == 10
