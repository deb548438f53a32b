"""Dynamic variables (rows keyed by any int64, docs/dynamic.md), against live servers on 127.0.0.1.

The numbers of every optimizer on dynamic tables are proven by the golden replay in
test_conformance.py; this file proves the rest: initial values, routing, admission, capacity,
eviction, export, bad input, and durability (kill -9, log replay, restore onto other shard counts).
"""
import threading
import time

import numpy as np
import pytest

import sparseps
from sparseps.local import LocalServer, start_cluster
from sparseps.partition import key_shard

NORMAL = {"class_name": "RandomNormal", "config": {"stddev": 1.0, "seed": 11}}
EDGE_KEYS = np.array([0, -1, 1, 2 ** 63 - 1, -2 ** 63, 123456789012345678, -987654321], np.int64)


def sgd(client, name):
    client.create_optimizer(name, "SGD", learning_rate=1.0)
    return name


def wait_until(fn, timeout=30.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(every)
    return fn()


# ---------------------------------------------------------------------------------------- values
def test_initial_values_are_a_function_of_the_key_on_any_shard_count(client, client3, unique):
    """A pull before any push reads the initializer's value; the same on 1 and 3 shards, every call."""
    one = client.create_variable(f"{unique}_a", dim=8, dynamic=True, initializer=NORMAL)
    three = client3.create_variable(f"{unique}_a", dim=8, dynamic=True, initializer=NORMAL)
    keys = np.concatenate([EDGE_KEYS, EDGE_KEYS[::-1]])
    a, b = one.pull(keys), three.pull(keys)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:len(EDGE_KEYS)], a[len(EDGE_KEYS):][::-1])   # per key, not per position
    assert abs(float(np.std(a)) - 1.0) < 0.35 and len(np.unique(a[:, 0])) == len(EDGE_KEYS)
    assert one.size() == 0 and three.size() == 0   # a pull creates nothing
    seeded = client.create_variable(f"{unique}_b", dim=8, dynamic=True,
                                    initializer={"class_name": "RandomNormal", "config": {"stddev": 1.0, "seed": 12}})
    assert not np.array_equal(seeded.pull(keys), a)


def test_a_push_creates_rows_and_updates_them_like_a_fixed_table(client3, unique):
    """LazyAdam on a dynamic variable = LazyAdam on a fixed table holding the keys' initial rows."""
    client3.create_optimizer(f"{unique}_o", "LazyAdam", learning_rate=0.01)
    dyn = client3.create_variable(f"{unique}_d", dim=4, dynamic=True, initializer=NORMAL, optimizer=f"{unique}_o")
    keys = np.array([-7, 2 ** 62, 5, 99, -2 ** 63], np.int64)
    fixed = client3.create_variable(f"{unique}_f", initial_value=dyn.pull(keys), optimizer=f"{unique}_o")
    rng = np.random.default_rng(0)
    for step in range(6):
        pick = rng.integers(0, len(keys), 7)
        g = rng.standard_normal((7, 4)).astype(np.float32)
        client3.push({f"{unique}_d": (keys[pick], g), f"{unique}_f": (pick, g)})
    np.testing.assert_array_equal(dyn.pull(keys), fixed.numpy())
    assert dyn.size() == len(np.unique(keys))
    exported_keys, rows = dyn.export()
    order = np.argsort(exported_keys)
    np.testing.assert_array_equal(exported_keys[order], np.sort(keys))
    np.testing.assert_array_equal(rows[order], dyn.pull(np.sort(keys)))
    _, m = dyn.export(slot="m")
    assert m.shape == (len(keys), 4) and np.any(m != 0)


def test_patterned_keys_spread_evenly_over_shards(client3, unique):
    """Multiples of the shard count and sequential blocks: hash routing, not key % N."""
    var = client3.create_variable(f"{unique}_p", dim=1, dynamic=True, optimizer=sgd(client3, f"{unique}_o"))
    keys = np.concatenate([np.arange(3000, dtype=np.int64) * 3, np.arange(10 ** 12, 10 ** 12 + 3000)])
    client3.push({f"{unique}_p": (keys, np.ones((len(keys), 1), np.float32))})
    live = [v["local_rows"] for s in client3.status()["shards"] for v in s["variables"] if v["name"] == f"{unique}_p"]
    assert sum(live) == 6000 == var.size()
    assert max(live) < 1.1 * 2000 and min(live) > 0.9 * 2000, live
    assert np.all(np.bincount(key_shard(np.arange(3000) * 3, 3)) > 900)


# ---------------------------------------------------------------------------------------- admission
def test_frequency_admission_creates_a_row_on_the_kth_push(numba_client, unique):
    c = numba_client
    var = c.create_variable(f"{unique}_f", dim=2, dynamic=True, initializer=NORMAL,
                            optimizer=sgd(c, f"{unique}_o"), admission={"min_count": 3})
    key, other = np.array([42], np.int64), np.array([43], np.int64)
    start = var.pull(key)
    for _ in range(2):   # pushed in 2 steps: not admitted, its gradient dropped
        c.push({f"{unique}_f": (np.array([42, 42]), np.ones((2, 2), np.float32))})
        np.testing.assert_array_equal(var.pull(key), start)
        assert var.size() == 0
    c.push({f"{unique}_f": (np.concatenate([key, other]), np.ones((2, 2), np.float32))})   # 3rd push admits 42
    np.testing.assert_array_equal(var.pull(key), start - 1)
    assert var.size() == 1
    stats = c.status()["shards"][0]["variables"]
    stats = next(v for v in stats if v["name"] == f"{unique}_f")["table_stats"]
    assert (stats["admitted"], stats["created"], stats["refused_admission"], stats["live_rows"]) == (1, 1, 3, 1)


def test_probability_admission_is_the_same_coin_everywhere(client, client3, unique):
    """The per-(key, step) coin does not depend on the shard count: the same keys get rows."""
    got = []
    for c in (client, client3):
        var = c.create_variable(f"{unique}_p", dim=1, dynamic=True, optimizer=sgd(c, f"{unique}_o"),
                                admission={"probability": 0.25, "seed": 7})
        keys = np.arange(-2000, 2000, dtype=np.int64) * 7919
        c.push({f"{unique}_p": (keys, np.ones((len(keys), 1), np.float32))})
        exported, _ = var.export()
        got.append(np.sort(exported))
    np.testing.assert_array_equal(got[0], got[1])
    assert 800 < len(got[0]) < 1200   # about a quarter of 4000


# ---------------------------------------------------------------------------------------- capacity
def test_a_full_table_that_refuses_changes_nothing(numba_client, unique):
    c = numba_client
    var = c.create_variable(f"{unique}_r", dim=2, dynamic=True, optimizer=sgd(c, f"{unique}_o"),
                            capacity=4, on_full="refuse")
    c.push({f"{unique}_r": (np.array([1, 2, 3]), np.ones((3, 2), np.float32))})
    before = (var.export(), c.optimizer(f"{unique}_o").iterations)
    with pytest.raises(sparseps.ResourceExhausted, match="at most 4 rows"):
        c.push({f"{unique}_r": (np.array([1, 4, 5]), np.ones((3, 2), np.float32))})
    after = (var.export(), c.optimizer(f"{unique}_o").iterations)
    np.testing.assert_array_equal(before[0][0], after[0][0])
    np.testing.assert_array_equal(before[0][1], after[0][1])
    assert before[1] == after[1]
    c.push({f"{unique}_r": (np.array([1, 4]), np.ones((2, 2), np.float32))})   # fits: 4 rows
    assert var.size() == 4


def test_a_full_table_evicts_the_least_recently_updated_rows(numba_client, unique):
    c = numba_client
    var = c.create_variable(f"{unique}_e", dim=2, dynamic=True, optimizer=sgd(c, f"{unique}_o"), capacity=10,
                            evict_batch=0.0)   # evict exactly what a push needs
    for k in range(10):   # key k last updated at step k + 1
        c.push({f"{unique}_e": (np.array([k]), np.ones((1, 2), np.float32))})
    c.push({f"{unique}_e": (np.array([0]), np.ones((1, 2), np.float32))})   # key 0 is recent again
    c.push({f"{unique}_e": (np.array([100, 101]), np.ones((2, 2), np.float32))})
    keys, _ = var.export()
    assert sorted(keys) == [0] + list(range(3, 10)) + [100, 101]   # keys 1 and 2 were the oldest
    np.testing.assert_array_equal(var.pull([1]), np.zeros((1, 2)))   # evicted: the initial value again
    with pytest.raises(sparseps.ResourceExhausted, match="even after evicting"):
        c.push({f"{unique}_e": (np.arange(11), np.ones((11, 2), np.float32))})
    batched = c.create_variable(f"{unique}_eb", dim=2, dynamic=True, optimizer=f"{unique}_o", capacity=10,
                                evict_batch=0.5)   # a full table frees at least half of it at once
    c.push({f"{unique}_eb": (np.arange(10), np.ones((10, 2), np.float32))})
    c.push({f"{unique}_eb": (np.array([100]), np.ones((1, 2), np.float32))})
    assert batched.size() == 6   # 5 oldest evicted for 1 new key


# ---------------------------------------------------------------------------------------- eviction
def test_eviction_by_steps_on_demand_and_by_seconds_on_schedule(client3, unique):
    c = client3
    var = c.create_variable(f"{unique}_s", dim=2, dynamic=True, optimizer=sgd(c, f"{unique}_o"),
                            initializer=NORMAL, eviction={"max_age_steps": 2, "interval_seconds": 3600})
    old, new = np.arange(50, dtype=np.int64), np.arange(50, 60, dtype=np.int64)
    init = var.pull(old)
    c.push({f"{unique}_s": (old, np.ones((50, 2), np.float32))})
    c.push({f"{unique}_s": (new, np.ones((10, 2), np.float32))})
    c.push({f"{unique}_s": (new, np.ones((10, 2), np.float32))})
    assert c.evict(f"{unique}_s") == {f"{unique}_s": 50}   # updated at step 1, now step 3
    keys, _ = var.export()
    assert sorted(keys) == list(range(50, 60))
    np.testing.assert_array_equal(var.pull(old), init)
    timed = c.create_variable(f"{unique}_t", dim=2, dynamic=True, optimizer=sgd(c, f"{unique}_o"),
                              eviction={"max_age_seconds": 1, "interval_seconds": 0.2})
    c.push({f"{unique}_t": (np.arange(30), np.ones((30, 2), np.float32))})
    assert timed.size() == 30
    assert wait_until(lambda: timed.size() == 0), "rows older than 1 s were not evicted on schedule"


def test_eviction_gives_memory_back_and_keeps_the_survivors_exact(client, unique):
    """A table that eviction leaves at most a quarter full shrinks to twice its live rows (at
    least 1024): its bytes go down, the surviving rows and slots are unchanged, and it trains on."""
    c = client
    c.create_optimizer(f"{unique}_o", "LazyAdam", learning_rate=0.1)
    name = f"{unique}_g"
    var = c.create_variable(name, dim=8, dynamic=True, optimizer=f"{unique}_o", initializer=NORMAL,
                            eviction={"max_age_steps": 1, "interval_seconds": 3600})
    rng = np.random.default_rng(5)
    many, few = rng.choice(2 ** 40, 20000, replace=False).astype(np.int64), np.arange(300, dtype=np.int64)
    initial = var.pull(many[:50])
    c.push({name: (many, rng.normal(size=(20000, 8)).astype(np.float32))})
    c.push({name: (few, rng.normal(size=(300, 8)).astype(np.float32))})

    def stats():
        (v,) = [v for v in c.status()["shards"][0]["variables"] if v["name"] == name]
        return v["table_stats"]["capacity_rows"], v["bytes"]
    cap_before, bytes_before = stats()
    assert cap_before >= 20300
    kept = {s: c.pull(name, few, slot=s) for s in ("", "m", "v")}
    assert c.evict(name) == {name: 20000 - len(np.intersect1d(many, few))}
    cap_after, bytes_after = stats()
    assert cap_after == 1024 and bytes_after < bytes_before / 10, (cap_after, bytes_after, bytes_before)
    for s, rows in kept.items():
        np.testing.assert_array_equal(c.pull(name, few, slot=s), rows)
    np.testing.assert_array_equal(np.sort(var.export()[0]), few)
    np.testing.assert_array_equal(var.pull(many[:50]), initial)   # evicted: the initial value again
    c.push({name: (many[:50], np.zeros((50, 8), np.float32))})   # back as new rows (a zero step moves nothing)
    np.testing.assert_array_equal(var.pull(many[:50]), initial)
    assert var.size() == 350


def test_export_since_step_is_incremental(numba_client, unique):
    c = numba_client
    var = c.create_variable(f"{unique}_x", dim=3, dynamic=True, optimizer=sgd(c, f"{unique}_o"))
    c.push({f"{unique}_x": (np.array([1, 2, 3]), np.ones((3, 3), np.float32))})    # step 1
    c.push({f"{unique}_x": (np.array([3, 4]), np.ones((2, 3), np.float32))})       # step 2
    c.push({f"{unique}_x": (np.array([5]), np.ones((1, 3), np.float32))})          # step 3
    keys, rows = var.export(since_step=1)
    order = np.argsort(keys)
    assert list(keys[order]) == [3, 4, 5]
    np.testing.assert_array_equal(rows[order][:, 0], [-2, -1, -1])
    assert list(np.sort(var.export(since_step=3)[0])) == []


def test_export_of_a_table_larger_than_a_message_comes_in_chunks(numba_server, unique):
    with sparseps.connect(numba_server.address, max_message_mb=1) as c:
        var = c.create_variable(f"{unique}_big", dim=64, dynamic=True, optimizer=sgd(c, f"{unique}_o"))
        keys = np.arange(-5000, 5000, dtype=np.int64) * 1_000_003
        for part in np.array_split(keys, 4):
            c.push({f"{unique}_big": (part, np.full((len(part), 64), 0.5, np.float32))})
        got, rows = var.export()   # 10,000 x 64 x 4 bytes = 2.4 MiB over a 1 MiB limit
        assert sorted(got) == sorted(keys)
        np.testing.assert_array_equal(rows, np.full((len(keys), 64), -0.5, np.float32))


# ---------------------------------------------------------------------------------------- bad input
def _state(c, var, opt):
    keys, rows = var.export()
    order = np.argsort(keys)
    return keys[order], rows[order], c.optimizer(opt).iterations, c.status()


@pytest.mark.parametrize("bad", [
    "dense_push", "dim_mismatch", "float_keys", "whole_set_weights", "whole_pull", "since_step_on_fixed",
    "evict_fixed", "dense_key_dtype", "table_on_fixed", "bad_policy_types", "bad_policy_ranges",
    "unknown_policy_key", "dynamic_with_initial_value", "keys_of_another_shard"])
def test_bad_input_is_refused_clearly_and_changes_nothing(client3, unique, bad):
    c = client3
    opt = sgd(c, f"{unique}_o")
    var = c.create_variable(f"{unique}_v", dim=4, dynamic=True, optimizer=opt)
    fixed = c.create_variable(f"{unique}_fx", initial_value=np.zeros((6, 4), np.float32), optimizer=opt)
    c.push({f"{unique}_v": (np.array([5, -5]), np.ones((2, 4), np.float32))})
    before = _state(c, var, opt)
    name = f"{unique}_v"
    actions = {
        "dense_push": (lambda: c.push({name: np.ones((3, 4), np.float32)}), "dense gradient needs a fixed table"),
        "dim_mismatch": (lambda: c.push({name: (np.array([1, 2]), np.ones((2, 5), np.float32))}), r"row shape \[4\]"),
        "float_keys": (lambda: c.push({name: (np.array([1.0, 2.5]), np.ones((2, 4), np.float32))}), "integer"),
        "whole_set_weights": (lambda: var.assign(np.ones((3, 4), np.float32)), "give the keys"),
        "whole_pull": (lambda: c.pull(name), "export"),
        "since_step_on_fixed": (lambda: c._pulls.export(f"{unique}_fx", "", 1), "dynamic variables"),
        "evict_fixed": (lambda: c.evict(f"{unique}_fx"), "fixed table"),
        "dense_key_dtype": (lambda: c.create_variable(f"{unique}_k", dim=4, dynamic=True, key_dtype="float32"),
                            "keys are int64"),
        "table_on_fixed": (lambda: c.create_variable(f"{unique}_t", shape=(4, 4), capacity=10), "dynamic"),
        "bad_policy_types": (lambda: c.create_variable(f"{unique}_b", dim=4, dynamic=True,
                                                       eviction={"max_age_steps": "10"}), "max_age_steps"),
        "bad_policy_ranges": (lambda: c.create_variable(f"{unique}_b", dim=4, dynamic=True,
                                                        admission={"probability": 1.5}), "probability"),
        "unknown_policy_key": (lambda: c.create_variable(f"{unique}_b", dim=4, dynamic=True,
                                                         eviction={"max_age": 3}), "unknown key"),
        "dynamic_with_initial_value": (lambda: c.create_variable(f"{unique}_b", np.zeros((2, 4)), dynamic=True,
                                                                 dim=4), "initializer"),
        "keys_of_another_shard": (lambda: _raw_push_to_wrong_shard(c, name), "belong to another shard"),
    }
    action, message = actions[bad]
    with pytest.raises(sparseps.Error, match=message) as err:
        action()
    assert err.value.code.name in ("INVALID_ARGUMENT", "NOT_FOUND"), err.value
    after = _state(c, var, opt)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]
    assert [[v["name"] for v in s["variables"]] for s in before[3]["shards"]] == \
        [[v["name"] for v in s["variables"]] for s in after[3]["shards"]]
    fixed.numpy()   # the fixed table serves on


def _raw_push_to_wrong_shard(c, name):
    """A key sent to a shard that does not own it (a client whose cluster disagrees)."""
    from sparseps.proto import sparseps_pb2 as pb
    from sparseps.tensors import to_tensor
    key = next(k for k in range(100) if key_shard(np.array([k]), 3)[0] != 0)
    req = pb.PushRequest(gradients=[pb.Gradient(variable=name, ids=to_tensor(np.array([key], np.int64)),
                                                values=to_tensor(np.ones((1, 4), np.float32)))])
    shard0 = c.addresses.index(next(a for a, i in zip(c.addresses, c.server_info) if i.shard_index == 0))
    c._shards.call(shard0, "Push", req)


# ---------------------------------------------------------------------------------------- durability
def test_kill9_loses_and_duplicates_no_push_to_a_dynamic_table(tmp_path):
    """Workers push random int64 keys while the shard is SIGKILLed and restarted; afterwards every
    key's row is exactly minus its acknowledged pushes (SGD, lr 1, unit gradients)."""
    srv = LocalServer("--data-dir", str(tmp_path), "--checkpoint-every-steps", "30")
    port = srv.port
    c = sparseps.connect(srv.address)
    sgd(c, "sgd")
    c.create_variable("ids", dim=2, dynamic=True, optimizer="sgd")
    universe = np.random.default_rng(9).integers(-2 ** 63, 2 ** 63 - 1, 40, dtype=np.int64)
    acked = np.zeros(len(universe), np.int64)
    lock, stop, failures = threading.Lock(), threading.Event(), []

    def worker(seed):
        rng = np.random.default_rng(seed)
        w = sparseps.connect(f"127.0.0.1:{port}", retry_deadline=60)
        for _ in range(800):
            if stop.is_set():
                return
            pick = rng.choice(len(universe), size=3, replace=False)
            try:
                w.push({"ids": (universe[pick], np.ones((3, 2), np.float32))})
            except sparseps.Error as e:
                failures.append(e)
                return
            with lock:
                acked[pick] += 1

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: acked.sum() >= 3 * 150, 60, 0.01)
        srv.kill()
        killed_at = acked.sum()
        time.sleep(0.3)
        srv = LocalServer("--data-dir", str(tmp_path), port=port)
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    try:
        assert not failures, failures[:3]
        assert killed_at > 0 and acked.sum() > killed_at
        c = sparseps.connect(srv.address)
        np.testing.assert_array_equal(c.pull("ids", universe)[:, 0], -acked.astype(np.float32))
        assert c.variable("ids").size() == int((acked > 0).sum())
    finally:
        srv.stop()


def test_log_replay_repeats_admission_capacity_and_logged_evictions(tmp_path):
    """Without any checkpoint, a restart rebuilds the same table from the log alone: the sketch,
    LRU evictions of a full table, and evictions by age (replayed as the keys they removed)."""
    srv = LocalServer("--data-dir", str(tmp_path))
    port = srv.port
    c = sparseps.connect(srv.address)
    sgd(c, "sgd")
    var = c.create_variable("t", dim=3, dynamic=True, optimizer="sgd", initializer=NORMAL, capacity=50,
                            admission={"min_count": 2}, eviction={"max_age_steps": 5, "interval_seconds": 3600})
    rng = np.random.default_rng(4)
    for step in range(40):
        keys = rng.integers(0, 120, 12)
        c.push({"t": (keys, rng.standard_normal((12, 3)).astype(np.float32))})
        if step in (15, 30):
            c.evict()
    keys, rows = var.export()
    stats = c.status()["shards"][0]["variables"][0]["table_stats"]
    assert stats["evicted"] > 0 and stats["refused_admission"] > 0
    srv.kill()
    srv = LocalServer("--data-dir", str(tmp_path), port=port)
    try:
        c = sparseps.connect(srv.address)
        keys2, rows2 = c.variable("t").export()
        o1, o2 = np.argsort(keys), np.argsort(keys2)
        np.testing.assert_array_equal(keys[o1], keys2[o2])
        np.testing.assert_array_equal(rows[o1], rows2[o2])
        after = c.status()["shards"][0]["variables"][0]["table_stats"]
        assert after["live_rows"] == stats["live_rows"] and after["evicted"] == stats["evicted"]
    finally:
        srv.stop()


@pytest.mark.parametrize("old,new", [(1, 3), (3, 2)])
def test_restore_a_dynamic_table_onto_another_shard_count(tmp_path, old, new):
    servers = start_cluster(old, "--backend", "numba", data_dir=str(tmp_path))
    try:
        c = sparseps.connect(",".join(s.address for s in servers))
        c.create_optimizer("o", "LazyAdam", learning_rate=0.05)
        var = c.create_variable("t", dim=4, dynamic=True, optimizer="o", initializer=NORMAL,
                                admission={"min_count": 2})
        keys = np.random.default_rng(1).integers(-2 ** 63, 2 ** 63 - 1, 300, dtype=np.int64)
        for _ in range(3):
            c.push({"t": (keys, np.ones((300, 4), np.float32))})
        once = np.array([77, 78], np.int64)
        c.push({"t": (once, np.ones((2, 4), np.float32))})   # counted once in the sketch, no row
        want_keys, want_rows = var.export()
        _, want_m = var.export(slot="m")
        paths = [p for _, p, _ in c.checkpoint()]
    finally:
        for s in servers:
            s.stop()
    restored = start_cluster(new, "--backend", "numba", "--restore", ",".join(paths))
    try:
        c = sparseps.connect(",".join(s.address for s in restored))
        var = c.variable("t")
        got_keys, got_rows = var.export()
        _, got_m = var.export(slot="m")
        o1, o2 = np.argsort(want_keys), np.argsort(got_keys)
        np.testing.assert_array_equal(want_keys[o1], got_keys[o2])
        np.testing.assert_array_equal(want_rows[o1], got_rows[o2])
        np.testing.assert_array_equal(want_m[o1], got_m[o2])
        # every key's row is found where routing looks for it (on the shard its hash names)
        np.testing.assert_array_equal(var.pull(want_keys), want_rows)
        c.push({"t": (once, np.ones((2, 4), np.float32))})   # the merged sketch remembers the first push
        assert var.size() == len(want_keys) + 2
    finally:
        for s in restored:
            s.stop()


def test_sync_and_bounded_modes_step_dynamic_tables(client3, unique):
    """Sync mode aggregates replicas' keys (any int64) into one step; bounded mode counts clocks."""
    c = client3
    addr = ",".join(c.addresses)
    c.create_optimizer(f"{unique}_s", "SGD", learning_rate=1.0,
                       consistency={"mode": "sync", "replicas_to_aggregate": 2, "total_num_replicas": 2,
                                    "average": True})
    var = c.create_variable(f"{unique}_sd", dim=2, dynamic=True, optimizer=f"{unique}_s")
    keys = np.array([-5, 2 ** 60, 7, -2 ** 63], np.int64)
    answers, failures = {}, []

    def replica(i):
        try:
            with sparseps.connect(addr) as r:
                answers[i] = r.push({f"{unique}_sd": (keys[: 3 + i], np.full((3 + i, 2), i + 1.0, np.float32))},
                                    step=0)
        except sparseps.Error as e:
            failures.append(e)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and answers == {0: 1, 1: 1}
    # rows both replicas pushed: the mean of 1 and 2; the row only replica 1 pushed: its own 2
    np.testing.assert_array_equal(var.pull(keys)[:, 0], [-1.5, -1.5, -1.5, -2.0])
    assert var.size() == 4
    c.create_optimizer(f"{unique}_b", "SGD", learning_rate=1.0, consistency={"mode": "bounded", "staleness": 1})
    bounded = c.create_variable(f"{unique}_bd", dim=2, dynamic=True, optimizer=f"{unique}_b")
    c.push({f"{unique}_bd": (keys, np.ones((4, 2), np.float32))}, worker_id="w0")
    np.testing.assert_array_equal(bounded.pull(keys), -np.ones((4, 2), np.float32))
