"""`sparseps export`, `sparseps evict` and `sparseps status` on dynamic variables, against a live
2-shard cluster on 127.0.0.1: the files hold what Variable.export() returns, TensorFlow reads the
checkpoint by the documented tensor names, and the printed counters are the ones the pushes caused.
"""
import numpy as np
import pytest

import sparseps
from sparseps import cli
from sparseps.export import KEYS_TENSOR, STEP_TENSOR, VALUES_TENSOR
from sparseps.local import start_cluster

NORMAL = {"class_name": "RandomNormal", "config": {"stddev": 1.0, "seed": 5}}


@pytest.fixture(scope="module")
def address():
    """A 2-shard cluster of this module (the CLI connects by address), stopped by PID after it."""
    servers = start_cluster(2, "--backend", "numpy")
    try:
        yield ",".join(s.address for s in servers)
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def client(address):
    c = sparseps.connect(address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def trained(client):
    """LazyAdam on a dynamic variable: step 1 touches keys A, step 2 keys B, step 3 keys C (C overlaps A)."""
    client.create_optimizer("xopt", "LazyAdam", learning_rate=0.01)
    var = client.create_variable("xemb", dim=4, dynamic=True, optimizer="xopt", initializer=NORMAL)
    rng = np.random.default_rng(3)
    steps = [rng.integers(-2 ** 63, 2 ** 63 - 1, n, dtype=np.int64) for n in (40, 30)]
    steps.append(np.concatenate([steps[0][:10], rng.integers(-2 ** 63, 2 ** 63 - 1, 5, dtype=np.int64)]))
    for keys in steps:
        client.push({"xemb": (keys, rng.standard_normal((len(keys), 4)).astype(np.float32))})
    return var, steps


def by_key(keys, values):
    order = np.argsort(keys)
    return keys[order], values[order]


def test_export_npz_holds_every_live_row(address, trained, tmp_path, capsys):
    var, steps = trained
    out = tmp_path / "rows.npz"
    assert cli.main(["export", address, "--variable", "xemb", "--out", str(out)]) == 0
    with np.load(out) as f:
        keys, values, step = f["keys"], f["values"], int(f["step"])
    assert keys.dtype == np.int64 and values.dtype == np.float32 and values.shape == (75, 4)
    want = by_key(*var.export())
    np.testing.assert_array_equal(by_key(keys, values)[0], want[0])
    np.testing.assert_array_equal(by_key(keys, values)[1], want[1])
    np.testing.assert_array_equal(np.sort(keys), np.unique(np.concatenate(steps)))
    assert step == 3
    assert f"75 rows of 'xemb' -> {out} (next incremental export: --since-step 3)" in capsys.readouterr().out
    slot = tmp_path / "m.npz"
    assert cli.main(["export", address, "--variable", "xemb", "--slot", "m", "--out", str(slot)]) == 0
    with np.load(slot) as f:
        got = by_key(f["keys"], f["values"])
    want = by_key(*var.export(slot="m"))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert np.all(np.any(got[1] != 0, axis=1))   # every live row was pushed: its m moved


def test_export_since_step_holds_the_rows_changed_after_it(address, trained, tmp_path):
    var, steps = trained
    for since, changed in ((1, np.concatenate(steps[1:])), (2, steps[2]), (3, steps[2][:0])):
        out = tmp_path / f"since{since}.npz"
        assert cli.main(["export", address, "--variable", "xemb", "--since-step", str(since), "--out", str(out)]) == 0
        with np.load(out) as f:
            keys, values = by_key(f["keys"], f["values"])
        np.testing.assert_array_equal(keys, np.unique(changed))
        np.testing.assert_array_equal(values, var.pull(keys).reshape(len(keys), 4))
        slot = tmp_path / f"since{since}_v.npz"   # a slot's rows since a step: the same keys
        assert cli.main(["export", address, "--variable", "xemb", "--since-step", str(since), "--slot", "v",
                         "--out", str(slot)]) == 0
        with np.load(slot) as f:
            np.testing.assert_array_equal(np.sort(f["keys"]), keys)
    with pytest.raises(SystemExit):   # argparse: a negative step
        cli.main(["export", address, "--variable", "xemb", "--since-step", "-1", "--out", str(tmp_path / "x.npz")])


def test_export_tf_checkpoint_is_read_by_tensorflow(address, trained, tmp_path):
    tf = pytest.importorskip("tensorflow")
    var, steps = trained
    directory = tmp_path / "ckpt"
    assert cli.main(["export", address, "--variable", "xemb", "--since-step", "2", "--tf-checkpoint",
                     str(directory)]) == 0
    assert cli.main(["export", address, "--variable", "xemb", "--tf-checkpoint", str(directory)]) == 0
    latest = tf.train.latest_checkpoint(str(directory))
    assert latest.endswith("rows-2")
    reader = tf.train.load_checkpoint(latest)
    assert {k for k, _ in tf.train.list_variables(latest)} >= {KEYS_TENSOR, VALUES_TENSOR, STEP_TENSOR}
    keys, values = reader.get_tensor(KEYS_TENSOR), reader.get_tensor(VALUES_TENSOR)
    assert keys.dtype == np.int64 and reader.get_tensor(STEP_TENSOR) == 3
    want = by_key(*var.export())
    np.testing.assert_array_equal(by_key(keys, values)[0], want[0])
    np.testing.assert_array_equal(by_key(keys, values)[1], want[1])
    first = tf.train.load_checkpoint(str(directory / "rows-1"))   # the incremental one
    np.testing.assert_array_equal(np.sort(first.get_tensor(KEYS_TENSOR)), np.unique(steps[2]))
    # TF's object-based restore fills variables of the same names
    into = tf.train.Checkpoint(keys=tf.Variable(np.zeros_like(keys)), values=tf.Variable(np.zeros_like(values)),
                               step=tf.Variable(np.int64(0)))
    into.read(latest).assert_consumed()
    np.testing.assert_array_equal(into.values.numpy(), values)


def test_evict_prints_the_rows_removed(address, client, capsys):
    client.create_optimizer("eopt", "SGD", learning_rate=1.0)
    client.create_variable("eold", dim=2, dynamic=True, optimizer="eopt",
                           eviction={"max_age_steps": 1, "interval_seconds": 3600})
    client.create_variable("efix", shape=(4, 2), optimizer="eopt")
    client.push({"eold": (np.arange(20), np.ones((20, 2), np.float32))})
    for _ in range(2):
        client.push({"eold": (np.arange(5), np.ones((5, 2), np.float32))})
    assert cli.main(["evict", address, "--variable", "eold"]) == 0
    assert capsys.readouterr().out == "eold: 15 rows evicted\n"
    assert client.variable("eold").size() == 5
    assert cli.main(["evict", address]) == 0   # every dynamic variable with an age policy, 0 included
    assert "eold: 0 rows evicted\n" in capsys.readouterr().out
    with pytest.raises(sparseps.InvalidArgument, match="fixed table"):
        cli.main(["evict", address, "--variable", "efix"])


def test_status_shows_policy_and_counters(address, client, capsys):
    client.create_optimizer("sopt", "SGD", learning_rate=1.0)
    client.create_variable("sdyn", dim=3, dynamic=True, optimizer="sopt", admission={"min_count": 2},
                           capacity=1000, on_full="refuse")
    keys = np.arange(100, dtype=np.int64) * 1_000_003
    for _ in range(2):   # the first push is refused admission, the second admits and creates
        client.push({"sdyn": (keys, np.ones((100, 3), np.float32))})
    client.push({"sdyn": (keys[:1] - 1, np.ones((1, 3), np.float32))})   # one more key refused once
    assert cli.main(["status", address]) == 0
    out = capsys.readouterr().out
    assert ("dynamic variable sdyn (all shards): live_rows=100 created=100 admitted=100 evicted=0 "
            "refused_admission=101 refused_capacity=0") in out
    lines = out.splitlines()
    mine = [i for i, line in enumerate(lines) if line.split()[:2] == ["variable", "sdyn"]]
    assert len(mine) == 2   # one per shard
    live = 0
    for i in mine:
        assert "dynamic dim=3 float32 optimizer=sopt" in lines[i]
        assert lines[i + 1].split() == ["policy:", "admission:", "min_count=2,", "sketch_width=1048576;",
                                        "eviction:", "none;", "capacity:", "1000", "rows", "per", "shard,",
                                        "on_full=refuse,", "evict_batch=0.05"]
        fields = dict(f.split("=") for f in lines[i + 2].split()[1:])
        assert fields["live_rows"] == fields["created"] == fields["admitted"]
        live += int(fields["live_rows"])
    assert live == 100


def test_export_tf_and_import_tf_refuse_a_dynamic_variable(address, client, tmp_path):
    client.create_optimizer("topt", "LazyAdam", learning_rate=0.01)
    client.create_variable("tdyn", dim=4, dynamic=True, optimizer="topt")
    with pytest.raises(sparseps.FailedPrecondition, match=r"'tdyn' is a dynamic variable.*sparseps export ADDR "
                                                          r"--variable NAME --tf-checkpoint DIR"):
        cli.main(["export-tf", address, "--optimizer", "topt", "--out", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    pytest.importorskip("tensorflow")
    client.create_optimizer("fopt", "LazyAdam", learning_rate=0.01)
    client.create_variable("ffix", shape=(10, 4), optimizer="fopt")
    assert cli.main(["export-tf", address, "--optimizer", "fopt", "--out", str(tmp_path / "fixed")]) == 0
    with pytest.raises(sparseps.FailedPrecondition, match="'tdyn' is a dynamic variable"):
        cli.main(["import-tf", address, "--optimizer", "topt", "--from", str(tmp_path / "fixed"),
                  "--var", "tdyn=model/layer_with_weights-0/embeddings"])
