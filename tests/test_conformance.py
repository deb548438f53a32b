"""Every golden trajectory of the real reference, replayed through a live server over a socket.

For each step the test pushes the reference's gradients with the public client and compares every
variable and every optimizer slot (and the iteration count) with what the reference computed.
Runs on each backend and on a 1-shard and a 3-shard cluster, over the data plane (the default
client), on the numba backend over gRPC as well (a client with data_plane=False), and on a cuda
shard (its fused CUDA kernels, under numba's CUDA simulator where there is no GPU). Every case
whose tables get sparse gradients runs again with those tables as dynamic variables (random int64
keys instead of row ids), on each backend and on 3 shards.
"""
import json
import os

import numpy as np
import pytest

import sparseps
from sparseps.local import LocalServer
from golden import Golden, assert_close, cases

CASES = [p for p in cases() if not p.stem.startswith("keras_mf")]


def replay(client, g: Golden, prefix: str, check_every_step=True):
    opt_name = f"{prefix}_opt"
    client.create_optimizer(opt_name, g.meta["optimizer"])
    names = {}
    for v in g.variables:
        names[v["name"]] = f"{prefix}_{v['name']}"
        client.create_variable(names[v["name"]], initial_value=g[f"init/{v['name']}"], optimizer=opt_name)
    opt = client.optimizer(opt_name)
    for k in range(g.steps):
        grads = {names[var]: grad for var, grad in g.gradients(k).items()}
        it = client.push(grads)
        assert it == int(g[f"step{k}/iterations"]), f"{g.name} step {k}: iterations {it}"
        if not check_every_step and k != g.steps - 1:
            continue
        for v in g.variables:
            name = v["name"]
            assert_close(client.pull(names[name]), g[f"step{k}/{name}/value"], g.dtype, f"{g.name} step {k} {name}")
            for slot, expected in g.slots(k, name).items():
                assert_close(opt.get_slot(names[name], slot), expected, g.dtype,
                             f"{g.name} step {k} {name}/{slot}")
        for key in g.data.files:
            if key.startswith(f"step{k}/nonslot/"):
                got = opt.nonslot()[key.rsplit("/", 1)[1]]
                assert_close(np.float32(got) if g.dtype == np.float32 else got, g[key], np.float32,
                             f"{g.name} step {k} {key}")
    return opt, names


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_matches_reference(client, path, unique):
    if os.environ.get("SPARSEPS_DATA_PLANE", "1") != "0":
        assert all(client.data_plane), "the fixture's pulls and pushes should travel on the data plane"
    check_reference(client, path, unique)


@pytest.fixture(scope="module")
def grpc_client(numba_server):
    """Pulls and pushes over gRPC (data_plane=False), so both transports meet the reference."""
    c = sparseps.connect(numba_server.address, data_plane=False)
    yield c
    c.close()


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_matches_reference_over_grpc(grpc_client, path, unique):
    assert grpc_client.data_plane == [None]
    check_reference(grpc_client, path, unique)


@pytest.fixture(scope="module")
def cuda_client():
    """A cuda shard: every golden case through the fused CUDA kernels (under numba's CUDA simulator
    unless NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU, see conftest.py)."""
    pytest.importorskip("numba")
    srv = LocalServer("--backend", "cuda")
    c = sparseps.connect(srv.address)
    yield c
    c.close()
    srv.stop()


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_matches_reference_on_cuda(cuda_client, path, unique):
    assert cuda_client.server_info[0].backend == "cuda"
    check_reference(cuda_client, path, unique)


def check_reference(client, path, unique):
    g = Golden(path)
    opt, names = replay(client, g, unique)
    assert sorted(opt.get_slot_names()) == sorted(g.meta["slot_names"])
    weights = opt.get_weights()
    order = g.meta.get("weights_order") or []
    assert len(weights) == len(order), f"get_weights() has {len(weights)} entries, reference {len(order)}"
    for i, entry in enumerate(order):
        if entry == ["iterations"]:
            assert int(weights[i]) == int(g[f"weights/{i}"])
        else:
            assert_close(weights[i], g[f"weights/{i}"], g.dtype, f"{g.name} weights[{i}] {entry}")


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_matches_reference_on_three_shards(client3, path, unique):
    g = Golden(path)
    replay(client3, g, unique, check_every_step=False)


def dynamic_tables(g: Golden) -> list:
    """The golden's 2-D variables that only ever get sparse gradients: replayable as dynamic tables."""
    return [v["name"] for v in g.variables if len(g[f"init/{v['name']}"].shape) == 2 and
            all(kinds.get(v["name"], "sparse") == "sparse" for kinds in g.meta["grad_kinds"])]


DYNAMIC_CASES = [p for p in CASES if dynamic_tables(Golden(p))]


def replay_dynamic(client, g: Golden, prefix: str, check_every_step=True):
    """The golden case with each sparse table replaced by a dynamic variable whose keys are a random
    int64 relabelling of its row ids (negative and huge keys included); its rows are created up
    front with the reference's initial values by assign(values, ids=keys)."""
    opt_name = f"{prefix}_opt"
    client.create_optimizer(opt_name, g.meta["optimizer"])
    opt = client.optimizer(opt_name)
    rng = np.random.default_rng(abs(hash(g.name)) % (1 << 32))
    names, keys = {}, {}
    for v in g.variables:
        name, init = v["name"], g[f"init/{v['name']}"]
        names[name] = f"{prefix}_{name}"
        if name in dynamic_tables(g):
            keys[name] = np.unique(rng.integers(-2 ** 63, 2 ** 63 - 1, 4 * len(init), dtype=np.int64))
            keys[name] = rng.permutation(keys[name])[:len(init)]
            var = client.create_variable(names[name], dim=init.shape[1], dtype=init.dtype, dynamic=True,
                                         optimizer=opt_name)
            var.assign(init, ids=keys[name])
        else:
            client.create_variable(names[name], initial_value=init, optimizer=opt_name)
    for k in range(g.steps):
        grads = {}
        for var, grad in g.gradients(k).items():
            grads[names[var]] = (keys[var][grad[0]], grad[1]) if var in keys else grad
        it = client.push(grads)
        assert it == int(g[f"step{k}/iterations"]), f"{g.name} step {k}: iterations {it}"
        if not check_every_step and k != g.steps - 1:
            continue
        for v in g.variables:
            name = v["name"]
            what = f"{g.name} (dynamic) step {k} {name}"
            if name in keys:
                assert_close(client.pull(names[name], keys[name]), g[f"step{k}/{name}/value"], g.dtype, what)
                for slot, expected in g.slots(k, name).items():
                    assert_close(client.pull(names[name], keys[name], slot=slot), expected, g.dtype, f"{what}/{slot}")
            else:
                assert_close(client.pull(names[name]), g[f"step{k}/{name}/value"], g.dtype, what)
                for slot, expected in g.slots(k, name).items():
                    assert_close(opt.get_slot(names[name], slot), expected, g.dtype, f"{what}/{slot}")
        for key in g.data.files:
            if key.startswith(f"step{k}/nonslot/"):
                got = opt.nonslot()[key.rsplit("/", 1)[1]]
                assert_close(np.float32(got) if g.dtype == np.float32 else got, g[key], np.float32,
                             f"{g.name} (dynamic) step {k} {key}")
    for name in keys:   # every row was created up front: no more, no fewer
        assert client.variable(names[name]).size() == len(keys[name])


@pytest.mark.parametrize("path", DYNAMIC_CASES, ids=[p.stem for p in DYNAMIC_CASES])
def test_dynamic_table_matches_reference(client, path, unique):
    replay_dynamic(client, Golden(path), unique)


@pytest.mark.parametrize("path", DYNAMIC_CASES, ids=[p.stem for p in DYNAMIC_CASES])
def test_dynamic_table_matches_reference_on_three_shards(client3, path, unique):
    replay_dynamic(client3, Golden(path), unique, check_every_step=False)


# one float32 case per optimizer family: the CUDA kernels on a dynamic table's gathered rows
CUDA_DYNAMIC_CASES = [p for p in DYNAMIC_CASES if p.stem in
                      {"lazyadam_f32", "adam_table_f32", "radam_f32", "lookahead_radam_f32", "sgd_momentum_f32",
                       "tf1contrib_lazyadam_f32", "lazyadam_f64"}]


@pytest.mark.parametrize("path", CUDA_DYNAMIC_CASES, ids=[p.stem for p in CUDA_DYNAMIC_CASES])
def test_dynamic_table_matches_reference_on_cuda(cuda_client, path, unique):
    replay_dynamic(cuda_client, Golden(path), unique)


CONFIG_CASES = [p for p in CASES if Golden(p).meta.get("reference_get_config") is not None]  # TF1 has none


@pytest.mark.parametrize("path", CONFIG_CASES, ids=[p.stem for p in CONFIG_CASES])
def test_config_round_trip(client, path, unique):
    """get_config() has the reference's keys and values (floats as given, not float32-rounded)."""
    g = Golden(path)
    ref = g.meta["reference_get_config"]
    client.create_optimizer(f"{unique}_cfg", g.meta["optimizer"])
    ours = client.optimizer(f"{unique}_cfg").get_config()
    assert set(ours) == set(ref), f"keys differ: ours-only {set(ours) - set(ref)}, reference-only {set(ref) - set(ours)}"
    for key, value in ref.items():
        if isinstance(value, float):
            assert ours[key] == pytest.approx(value, rel=1e-6), key
        elif not isinstance(value, dict):
            assert ours[key] == value, key
    # and the configuration we hand out creates the same optimizer again
    client.create_optimizer(f"{unique}_cfg2", {"class_name": g.meta["optimizer"]["class_name"], "config": ours})
