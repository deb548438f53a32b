"""PushPull: one round trip that applies a step and reads rows that already include it."""
import numpy as np
import pytest

import sparseps


@pytest.mark.parametrize("shards", [1, 3])
def test_push_pull_equals_push_then_pull(numba_client, client3, unique, shards):
    c = numba_client if shards == 1 else client3
    init = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    for tag in ("a", "b"):
        c.create_optimizer(f"{unique}_{tag}", "LazyAdam", learning_rate=0.1)
        c.create_variable(f"{unique}_{tag}_emb", initial_value=init, optimizer=f"{unique}_{tag}")
        c.create_variable(f"{unique}_{tag}_bias", initial_value=np.zeros(4, np.float32), optimizer=f"{unique}_{tag}")
    rng = np.random.default_rng(1)
    for step in range(5):
        ids = rng.integers(0, 50, 30)
        rows = rng.normal(size=(30, 4)).astype(np.float32)
        bias = rng.normal(size=4).astype(np.float32)
        nxt = np.concatenate([rng.integers(0, 50, 20), ids[:5]])
        it_a = c.push({f"{unique}_a_emb": (ids, rows), f"{unique}_a_bias": bias})
        want = c.pull(f"{unique}_a_emb", nxt)
        it_b, got = c.push_pull({f"{unique}_b_emb": (ids, rows), f"{unique}_b_bias": bias},
                                {f"{unique}_b_emb": nxt, f"{unique}_b_bias": np.array([0, 3])})
        assert it_a == it_b == step + 1
        np.testing.assert_array_equal(got[f"{unique}_b_emb"], want)
        np.testing.assert_array_equal(got[f"{unique}_b_bias"], c.pull(f"{unique}_a_bias", np.array([0, 3])))
    np.testing.assert_array_equal(c.pull(f"{unique}_a_emb"), c.pull(f"{unique}_b_emb"))


def test_push_pull_refuses_bad_input_and_changes_nothing(numba_client, unique):
    c = numba_client
    c.create_optimizer(f"{unique}_o", "SGD", learning_rate=1.0)
    c.create_variable(f"{unique}_v", initial_value=np.zeros((5, 2), np.float32), optimizer=f"{unique}_o")
    good = {f"{unique}_v": (np.array([1]), np.ones((1, 2), np.float32))}
    with pytest.raises(sparseps.NotFound):
        c.push_pull(good, {"no_such": np.array([0])})
    with pytest.raises(sparseps.InvalidArgument):    # a bad pull refuses the push too (checked first)
        c.push_pull(good, {f"{unique}_v": np.array([7])})
    with pytest.raises(sparseps.InvalidArgument):    # a bad push refuses the call
        c.push_pull({f"{unique}_v": (np.array([9]), np.ones((1, 2), np.float32))}, {f"{unique}_v": np.array([0])})
    assert c.optimizer(f"{unique}_o").iterations == 0 and not c.pull(f"{unique}_v").any()


def test_lazy_adam_rows_of_any_rank_on_numba(numba_client, unique):
    """The fused LazyAdam kernel takes 2-D tables; 1-D and 3-D variables are flattened views of
    it, so a push to them updates the variable (it used to fail with INTERNAL half-applied)."""
    c, o = numba_client, f"{unique}_o"
    c.create_optimizer(o, "LazyAdam", learning_rate=0.01)
    shapes = {"e": (6, 2), "m": (6, 3, 2), "s": (6,)}
    for k, shape in shapes.items():
        c.create_variable(f"{unique}_{k}", initial_value=np.zeros(shape, np.float32), optimizer=o)
    ids = np.array([5, 1, 5])
    grads = {k: np.arange(3 * int(np.prod(shape[1:])), dtype=np.float32).reshape((3,) + shape[1:]) + 1
             for k, shape in shapes.items()}
    for step in range(2):
        assert c.push({f"{unique}_{k}": (ids, g) for k, g in grads.items()}) == step + 1
    for k, shape in shapes.items():   # Adam's first steps move every touched element by ~lr, in -sign(g)
        got = c.pull(f"{unique}_{k}")
        g = np.zeros(shape, np.float32)
        np.add.at(g, ids, grads[k])
        m = v = np.zeros(shape, np.float64)
        var = np.zeros(shape, np.float64)
        for t in (1, 2):
            m = 0.9 * m + 0.1 * g * (g != 0)
            v = 0.999 * v + 0.001 * g * g
            lr = 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
            var = np.where(np.isin(np.arange(shape[0]), ids).reshape((-1,) + (1,) * (len(shape) - 1)),
                           var - lr * m / (np.sqrt(v) + 1e-7), var)
        np.testing.assert_allclose(got, var, rtol=1e-5, atol=1e-7, err_msg=k)
        assert np.all(got[[0, 2, 3, 4]] == 0)


@pytest.mark.parametrize("data_plane", [True, False])
def test_push_pull_reads_its_own_step_and_no_later_one(numba_server, unique, data_plane):
    """Concurrent pushers move row 0 by -1 per step (SGD, lr 1): the rows a PushPull returns are
    those right after its own step, never one of the other workers' later steps."""
    import threading
    opt, var = f"{unique}_o", f"{unique}_v"
    with sparseps.connect(numba_server.address) as admin:
        admin.create_optimizer(opt, "SGD", learning_rate=1.0)
        admin.create_variable(var, initial_value=np.zeros((4, 2), np.float32), optimizer=opt)
    one = {var: (np.array([0]), np.ones((1, 2), np.float32))}
    stop, errors = threading.Event(), []

    def pusher():
        try:
            with sparseps.connect(numba_server.address, data_plane=data_plane) as c:
                while not stop.is_set():
                    c.push(one)
        except Exception as e:   # noqa: BLE001 -- reported below
            errors.append(e)
    threads = [threading.Thread(target=pusher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        with sparseps.connect(numba_server.address, data_plane=data_plane) as c:
            for _ in range(150):
                it, rows = c.push_pull(one, {var: np.array([0])})
                assert rows[var][0].tolist() == [-float(it)] * 2, (it, rows[var])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
