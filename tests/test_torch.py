"""sparseps.torch against a live server over a real socket: the same small models trained once in
this process with torch's own modules and optimizers (nn.Embedding(sparse=True) /
nn.EmbeddingBag + torch.optim.SparseAdam / Adagrad / SGD) and once with sparseps.torch, step by step.

Tolerances: losses and tables within rtol 1e-5 / atol 1e-6 (float32). torch's CPU sqrt (MKL) is up
to 1 ulp from the correctly rounded one the server uses (docs/torch.md), so SparseAdam and Adagrad
are close, not bit-exact; SGD, which has no square root, is compared bit for bit where this CPU's
torch fuses its multiply-adds (every CPU with FMA; test_torch_optimizers.torch_fuses_axpy).
"""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import sparseps  # noqa: E402
import sparseps.torch as spt  # noqa: E402
from test_torch_optimizers import torch_fuses_axpy  # noqa: E402
from torch import nn  # noqa: E402

N, D = 50, 4


def batches(steps=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        ids = torch.from_numpy(rng.integers(0, N, (8, 3)))
        ids2 = torch.from_numpy(rng.integers(0, 10, (8,)))      # few rows: duplicates
        out.append((ids, ids2, torch.from_numpy(rng.normal(0, 1, 8).astype(np.float32))))
    return out


class Model(nn.Module):
    """Two tables: `a` looked up twice per forward, `b` only on even steps (unused otherwise)."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(2 * D, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, ids, ids2, k):
        x = self.a(ids).sum(1) + self.a(ids2)
        y = self.b(ids2) if k % 2 == 0 else torch.zeros_like(x)
        return self.mlp(torch.cat([x, y], 1)).squeeze(1)


OPTIMIZERS = {
    "SparseAdam": (torch.optim.SparseAdam, spt.SparseAdam, {"lr": 0.05, "betas": (0.8, 0.99)}, False),
    "Adagrad": (torch.optim.Adagrad, spt.Adagrad,
                {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}, False),
    "SGD": (torch.optim.SGD, spt.SGD, {"lr": 0.1}, True),
}


def train(model, opt, dense_opt, sched, data):
    losses = []
    for k, (ids, ids2, target) in enumerate(data):
        opt.zero_grad()
        dense_opt.zero_grad()
        loss = ((model(ids, ids2, k) - target) ** 2).mean()
        loss.backward()
        opt.step()
        dense_opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def parity(client, unique, kind, steps=12):
    ref_cls, our_cls, kw, exact = OPTIMIZERS[kind]
    exact = exact and torch_fuses_axpy()   # (on a CPU without FMA torch rounds SGD's adds twice)
    rng = np.random.default_rng(1)
    init_a = rng.normal(0, 0.1, (N, D)).astype(np.float32)
    init_b = rng.normal(0, 0.1, (10, D)).astype(np.float32)
    data = batches(steps)

    ref = Model(nn.Embedding(N, D, sparse=True), nn.Embedding(10, D, sparse=True))
    with torch.no_grad():
        ref.a.weight.copy_(torch.from_numpy(init_a))
        ref.b.weight.copy_(torch.from_numpy(init_b))
    ref_opt = ref_cls([ref.a.weight, ref.b.weight], **kw)
    ref_losses = train(ref, ref_opt, torch.optim.SGD(ref.mlp.parameters(), lr=0.05),
                       torch.optim.lr_scheduler.StepLR(ref_opt, 4, 0.5), data)

    ours = Model(spt.Embedding(N, D, client=client, name=f"{unique}_a", initial_value=init_a),
                 spt.Embedding(10, D, client=client, name=f"{unique}_b", initial_value=init_b))
    assert spt.cluster_parameters(ours) == [ours.a.table, ours.b.table]
    assert spt.local_parameters(ours) == list(ours.mlp.parameters())
    opt = our_cls(spt.cluster_parameters(ours), **kw)
    losses = train(ours, opt, torch.optim.SGD(spt.local_parameters(ours), lr=0.05),
                   torch.optim.lr_scheduler.StepLR(opt, 4, 0.5), data)

    a = client.variable(f"{unique}_a").numpy()
    b = client.variable(f"{unique}_b").numpy()
    if exact:
        assert losses == ref_losses
        assert np.array_equal(a, ref.a.weight.detach().numpy())
        assert np.array_equal(b, ref.b.weight.detach().numpy())
    else:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a, ref.a.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, ref.b.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    # per-table step counts as torch keeps them: `b` was used on even steps only
    if kind != "SGD":
        steps_a = int(float(ref_opt.state[ref.a.weight]["step"]))
        steps_b = int(float(ref_opt.state[ref.b.weight]["step"]))
        assert (steps_a, steps_b) == (steps, (steps + 1) // 2)
        srv = opt.state_dict()["sparseps"]["iterations"]
        assert sorted(srv.values()) == sorted([steps_a, steps_b])
    return opt


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_parity_with_torch(numba_client, unique, kind):
    parity(numba_client, unique, kind)


def test_parity_on_three_shards(client3, unique):
    parity(client3, unique, "SparseAdam", steps=8)


def test_lr_scheduler_and_state_dict(numba_client, unique):
    """param_groups lr is what the server applies; state_dict / load_state_dict round-trip it."""
    opt = parity(numba_client, unique, "Adagrad", steps=5)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert set(sd["sparseps"]["tables"]) == {f"{unique}_a", f"{unique}_b"}
    server = sd["sparseps"]["tables"][f"{unique}_a"]
    assert numba_client.optimizer(server).nonslot()["lr"] == 0.05
    opt.param_groups[0]["lr"] = 1.0
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_parity(numba_client, unique, mode):
    rng = np.random.default_rng(2)
    init = rng.normal(0, 0.1, (N, D)).astype(np.float32)
    ref = nn.EmbeddingBag(N, D, mode=mode, sparse=mode != "max")   # torch has no sparse max
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(init))
    ours = spt.EmbeddingBag(N, D, mode=mode, client=numba_client, name=f"{unique}_bag", initial_value=init)
    ref_opt, opt = torch.optim.SGD(ref.parameters(), lr=0.1), spt.SGD(ours.parameters(), lr=0.1)
    for k in range(6):
        flat = torch.from_numpy(rng.integers(0, N, 20))
        offsets = torch.tensor([0, 3, 3, 9, 15])   # an empty bag too
        psw = torch.from_numpy(rng.normal(1, 0.2, 20).astype(np.float32)) if mode == "sum" else None
        two_d = torch.from_numpy(rng.integers(0, N, (4, 5)))
        for m, o in ((ref, ref_opt), (ours, opt)):
            o.zero_grad()
            loss = (m(flat, offsets, per_sample_weights=psw) ** 2).sum() + m(two_d).sum()
            loss.backward()
            o.step()
    # close, not bit-exact: the order in which torch's embedding_bag backward lists a bag's rows (which
    # decides SGD's one-by-one adds) is not reproduced
    np.testing.assert_allclose(numba_client.variable(f"{unique}_bag").numpy(), ref.weight.detach().numpy(),
                               rtol=1e-5, atol=1e-7)


def test_dynamic_embedding_parity(numba_client, unique):
    """Any int64 id; rows created by the first push; the same numbers as an nn.Embedding over the
    ids' positions, started from the rows the dynamic table's initializer gives."""
    keys = np.array([-(2 ** 62), -5, 0, 7, 2 ** 40, 2 ** 62 + 3], np.int64)
    ours = spt.DynamicEmbedding(D, client=numba_client, name=f"{unique}_dyn",
                                initializer={"class_name": "RandomNormal", "config": {"stddev": 0.1, "seed": 3}})
    opt = spt.Adagrad(ours.parameters(), lr=0.1)
    init = numba_client.pull(f"{unique}_dyn", keys)
    assert numba_client.variable(f"{unique}_dyn").size() == 0
    ref = nn.Embedding(len(keys), D, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(init))
    ref_opt = torch.optim.Adagrad(ref.parameters(), lr=0.1)
    rng = np.random.default_rng(4)
    for _ in range(5):
        pos = rng.integers(0, 4, 12)   # keys 0..3 only: the last two never pushed
        for m, o, ids in ((ref, ref_opt, torch.from_numpy(pos)), (ours, opt, torch.from_numpy(keys[pos]))):
            o.zero_grad()
            (m(ids) ** 2).sum().backward()
            o.step()
    assert numba_client.variable(f"{unique}_dyn").size() == 4
    got = numba_client.pull(f"{unique}_dyn", keys)
    np.testing.assert_allclose(got, ref.weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_unused_table_pushes_nothing(numba_client, unique):
    a = spt.Embedding(N, D, client=numba_client, name=f"{unique}_u1")
    b = spt.Embedding(N, D, client=numba_client, name=f"{unique}_u2")
    opt = spt.SparseAdam(list(a.parameters()) + list(b.parameters()))
    before = numba_client.variable(f"{unique}_u2").numpy()
    for _ in range(3):
        opt.zero_grad()
        a(torch.tensor([1, 2])).sum().backward()
        opt.step()
    its = opt.state_dict()["sparseps"]["iterations"]
    assert its == {f"{unique}_u1.TorchSparseAdam": 3, f"{unique}_u2.TorchSparseAdam": 0}
    assert np.array_equal(numba_client.variable(f"{unique}_u2").numpy(), before)
    opt.zero_grad()
    opt.step()   # nothing looked up since zero_grad: no push at all
    assert opt.state_dict()["sparseps"]["iterations"][f"{unique}_u1.TorchSparseAdam"] == 3


def test_generic_sparseps_optimizer(numba_client, unique):
    """Any sparseps optimizer from torch: one server optimizer shared by the tables (LazyAdam)."""
    emb = spt.Embedding(N, D, client=numba_client, name=f"{unique}_g", initial_value=np.zeros((N, D), np.float32))
    opt = spt.Optimizer(emb.parameters(), {"class_name": "LazyAdam", "config": {"learning_rate": 0.01}},
                        name=f"{unique}_lazy")
    opt.zero_grad()
    emb(torch.tensor([3, 3, 4])).sum().backward()
    opt.step()
    assert numba_client.optimizer(f"{unique}_lazy").iterations == 1
    rows = numba_client.pull(f"{unique}_g", [3, 4, 5])
    np.testing.assert_allclose(rows[:2], -0.01, rtol=1e-5)
    assert not rows[2].any()
    opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(ValueError, match="learning rate comes from its config"):
        opt.step()


def test_bad_input_is_refused_and_changes_nothing(numba_client, unique):
    init = np.ones((N, D), np.float32)
    emb = spt.Embedding(N, D, client=numba_client, name=f"{unique}_bad", initial_value=init)
    names = lambda: {o.name for o in numba_client.optimizers()}   # noqa: E731
    before = names()
    for make, err, match in [
            (lambda: spt.SparseAdam(emb.parameters(), maximize=True), ValueError, "maximize"),
            (lambda: spt.Adagrad(emb.parameters(), weight_decay=0.1), ValueError, "weight_decay"),
            (lambda: spt.SGD(emb.parameters(), lr=0.1, weight_decay=0.1), ValueError, "weight_decay"),
            (lambda: spt.Adagrad(emb.parameters(), foreach=True), ValueError, "foreach"),
            (lambda: spt.SGD(emb.parameters(), lr=0.1, fused=True), ValueError, "fused"),
            (lambda: spt.SGD(emb.parameters(), lr=0.1, momentum=0.9), ValueError, "momentum"),
            (lambda: spt.SparseAdam(nn.Linear(2, 2).parameters()), TypeError, "sparseps.torch modules"),
            (lambda: spt.SparseAdam(list(emb.parameters()) + [nn.Parameter(torch.zeros(3))]), TypeError, "modules"),
            (lambda: spt.SparseAdam(emb.parameters(), lr=-1.0), ValueError, "learning rate")]:
        with pytest.raises(err, match=match):
            make()
    assert names() == before   # no optimizer created, the table not even created
    opt = spt.SparseAdam(emb.parameters(), lr=0.1)
    for bad, err in [(torch.tensor([1.0, 2.0]), TypeError), (torch.tensor([True]), TypeError),
                     ([1, 2], TypeError), (torch.tensor([N]), IndexError), (torch.tensor([-1]), IndexError)]:
        with pytest.raises(err):
            emb(bad)
    bag = spt.EmbeddingBag(N, D, client=numba_client, name=f"{unique}_badbag", mode="mean",
                           initial_value=init)
    spt.SGD(bag.parameters(), lr=0.1)
    ids = torch.tensor([1, 2, 3])
    for kwargs, err in [({}, ValueError), ({"offsets": torch.tensor([1])}, ValueError),
                        ({"offsets": torch.tensor([0.0])}, TypeError), ({"offsets": torch.tensor([0, 5])}, ValueError),
                        ({"offsets": torch.tensor([0, 1]), "per_sample_weights": torch.ones(3)}, NotImplementedError)]:
        with pytest.raises(err):
            bag(ids, **kwargs)
    with pytest.raises(ValueError):
        bag(torch.tensor([[1, 2]]), offsets=torch.tensor([0]))
    opt.zero_grad()
    opt.step()
    assert np.array_equal(numba_client.variable(f"{unique}_bad").numpy(), init)
    assert numba_client.optimizer(f"{unique}_bad.TorchSparseAdam").iterations == 0
    with pytest.raises(sparseps.InvalidArgument, match="sparse gradients"):   # the server refuses dense ones
        numba_client.push({f"{unique}_bad": np.ones((N, D), np.float32)})
    assert np.array_equal(numba_client.variable(f"{unique}_bad").numpy(), init)


def test_import_sparseps_does_not_import_torch():
    code = "import sys, sparseps, sparseps.server.state; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_two_workers_share_a_table(numba_client, unique):
    """A second worker's module of the same name takes the table the first created (the default
    initializer's seed comes from the name); its steps and the first's go to one server optimizer."""
    w1 = spt.Embedding(N, D, client=numba_client, name=f"{unique}_shared")
    opt1 = spt.SparseAdam(w1.parameters(), lr=0.01)
    other = sparseps.connect(numba_client.addresses)
    try:
        w2 = spt.Embedding(N, D, client=other, name=f"{unique}_shared")
        opt2 = spt.SparseAdam(w2.parameters(), lr=0.01)
        for w, o in ((w1, opt1), (w2, opt2)):
            o.zero_grad()
            w(torch.tensor([1, 2])).sum().backward()
            o.step()
        assert opt1.state_dict()["sparseps"]["iterations"] == {f"{unique}_shared.TorchSparseAdam": 2}
        with pytest.raises(sparseps.AlreadyExists):   # the same name with another shape
            spt.SGD(spt.Embedding(N + 1, D, client=other, name=f"{unique}_shared").parameters(), lr=0.1)
    finally:
        other.close()


def test_demo_torch_two_workers_learn(tmp_path):
    """`sparseps demo --torch --workers 2` (examples/train_torch_ctr.py): two processes train the
    DLRM-like model on one dynamic table through one optimizer per table; the loss falls, the model
    beats chance on held-out clicks (exit 0) and the loss curve is written."""
    png = tmp_path / "loss.png"
    out = subprocess.run([sys.executable, "-m", "sparseps.cli", "demo", "--torch", "--workers", "2", "--steps", "60",
                          "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("training loss") == 2 and "held-out log-loss" in out.stdout
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("kind", ["SGD", "SparseAdam"])
def test_prefetch_reads_the_next_batch_with_the_step(numba_client, unique, kind):
    """prefetch(next_ids) before step(): one push_pull round trip per step, the same numbers."""
    ref_cls, our_cls, kw, exact = OPTIMIZERS[kind]
    exact = exact and torch_fuses_axpy()
    init = np.random.default_rng(6).normal(0, 0.1, (N, D)).astype(np.float32)
    ref = nn.Embedding(N, D, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(init))
    ours = spt.Embedding(N, D, client=numba_client, name=f"{unique}_pf", initial_value=init)
    ref_opt, opt = ref_cls(ref.parameters(), **kw), our_cls(ours.parameters(), **kw)
    data = [torch.from_numpy(np.random.default_rng(k).integers(0, N, 12)) for k in range(7)]
    for k in range(6):
        for m, o in ((ref, ref_opt), (ours, opt)):
            o.zero_grad()
            (m(data[k]) ** 2).sum().backward()
            if m is ours:
                ours.prefetch(data[k + 1])
            o.step()
    assert ours.pulls == 1   # the first batch only; every later one came with the step before it
    got, want = numba_client.variable(f"{unique}_pf").numpy(), ref.weight.detach().numpy()
    if exact:
        assert np.array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ours(torch.tensor([1, 2]))   # other ids than prefetched: a pull of its own
    assert ours.pulls == 2


def test_dense_part_under_torch_compile(numba_client, unique):
    """The pull stays outside the compiled region: the embedding's output is an input of a dense
    part compiled whole (fullgraph=True). aot_eager runs dynamo and AOT autograd without a C++
    build (inductor compiled the same in ~55 s on this machine, docs/torch.md)."""
    init = np.random.default_rng(8).normal(0, 0.1, (N, D)).astype(np.float32)
    losses = {}
    for compiled in (False, True):
        emb = spt.Embedding(N, D, client=numba_client, name=f"{unique}_c{int(compiled)}", initial_value=init)
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, 1))
        head = torch.compile(mlp, backend="aot_eager", fullgraph=True) if compiled else mlp
        opt, dense = spt.SparseAdam(emb.parameters(), lr=0.01), torch.optim.SGD(mlp.parameters(), lr=0.1)
        out = []
        for k in range(4):
            ids = torch.from_numpy(np.random.default_rng(k).integers(0, N, (6, 3)))
            opt.zero_grad()
            dense.zero_grad()
            loss = (head(emb(ids).sum(1)) ** 2).mean()
            loss.backward()
            opt.step()
            dense.step()
            out.append(loss.item())
        losses[compiled] = out
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
    np.testing.assert_allclose(numba_client.variable(f"{unique}_c1").numpy(),
                               numba_client.variable(f"{unique}_c0").numpy(), rtol=1e-5, atol=1e-7)


def test_cluster_linear_in_the_same_push(numba_client, unique):
    """spt.Linear: weight and bias on the cluster, their dense gradients in the tables' push (one
    step of the shared optimizer per step); the numbers of a local nn.Linear + nn.Embedding under SGD."""
    init = np.random.default_rng(9).normal(0, 0.1, (N, D)).astype(np.float32)
    w0 = np.random.default_rng(10).normal(0, 0.3, (2, D)).astype(np.float32)
    ref_emb, ref_lin = nn.Embedding(N, D, sparse=True), nn.Linear(D, 2)
    with torch.no_grad():
        ref_emb.weight.copy_(torch.from_numpy(init))
        ref_lin.weight.copy_(torch.from_numpy(w0))
        ref_lin.bias.zero_()
    emb = spt.Embedding(N, D, client=numba_client, name=f"{unique}_le", initial_value=init)
    lin = spt.Linear(D, 2, client=numba_client, name=f"{unique}_lin", initial_value=w0)
    with pytest.raises(TypeError, match="sparse gradients only"):
        spt.SparseAdam(lin.parameters())
    opt = spt.Optimizer(list(emb.parameters()) + list(lin.parameters()),
                        {"class_name": "SGD", "config": {"learning_rate": 0.1}}, name=f"{unique}_sgd")
    ref_opt = torch.optim.SGD(list(ref_emb.parameters()) + list(ref_lin.parameters()), lr=0.1)
    for k in range(5):
        ids = torch.from_numpy(np.random.default_rng(20 + k).integers(0, N, (4, 3)))
        y = torch.from_numpy(np.random.default_rng(30 + k).normal(0, 1, (4, 2)).astype(np.float32))
        for e, lnr, o in ((ref_emb, ref_lin, ref_opt), (emb, lin, opt)):
            o.zero_grad()
            ((lnr(e(ids).sum(1)) - y) ** 2).mean().backward()
            o.step()
    assert numba_client.optimizer(f"{unique}_sgd").iterations == 5   # table, weight and bias: one push a step
    np.testing.assert_allclose(numba_client.variable(f"{unique}_lin.weight").numpy(),
                               ref_lin.weight.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(numba_client.variable(f"{unique}_lin.bias").numpy(),
                               ref_lin.bias.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(numba_client.variable(f"{unique}_le").numpy(), ref_emb.weight.detach().numpy(),
                               rtol=1e-5, atol=1e-7)


def test_a_killed_shard_restarts_with_the_tables_steps_and_lr(tmp_path):
    """sparseps.torch on a shard with a --data-dir: SIGKILL after training with a scheduled lr, restart
    from the write-ahead log; the table, the slots, each table's step count and the lr the scheduler
    last set are as acknowledged, and training goes on with torch's numbers."""
    import signal
    from sparseps.local import LocalServer
    init = np.random.default_rng(11).normal(0, 0.1, (N, D)).astype(np.float32)
    ref = nn.Embedding(N, D, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(init))
    ref_opt = torch.optim.Adagrad(ref.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, 2, 0.5)
    data = [torch.from_numpy(np.random.default_rng(40 + k).integers(0, N, 10)) for k in range(8)]

    def steps(m, o, sched, ks):
        for k in ks:
            o.zero_grad()
            (m(data[k]) ** 2).sum().backward()
            o.step()
            sched.step()

    steps(ref, ref_opt, ref_sched, range(8))
    srv = LocalServer("--backend", "numba", "--data-dir", str(tmp_path))
    port = srv.port
    try:
        with sparseps.connect(srv.address) as client:
            emb = spt.Embedding(N, D, client=client, name="emb", initial_value=init)
            opt = spt.Adagrad(emb.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
            steps(emb, opt, sched, range(5))
            saved = opt.state_dict()
        srv.stop(signal.SIGKILL)
        srv = LocalServer("--backend", "numba", "--data-dir", str(tmp_path), port=port)
        with sparseps.connect(srv.address) as client:
            assert client.optimizer("emb.TorchAdagrad").iterations == 5
            assert client.optimizer("emb.TorchAdagrad").nonslot()["lr"] == 0.1 * 0.5 ** 2   # set before step 5
            emb = spt.Embedding(N, D, client=client, name="emb", initial_value=init)
            opt = spt.Adagrad(emb.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
            opt.load_state_dict(saved)
            sched.last_epoch = 5
            steps(emb, opt, sched, range(5, 8))
            np.testing.assert_allclose(client.variable("emb").numpy(), ref.weight.detach().numpy(),
                                       rtol=1e-5, atol=1e-6)
            # (the gradients depend on the parameters, which carry the sqrt bound: close, not equal)
            np.testing.assert_allclose(client.pull("emb", slot="sum"), ref_opt.state[ref.weight]["sum"].numpy(),
                                       rtol=1e-5)
    finally:
        srv.stop()


def test_background_prefetch_with_staleness_one(numba_client, unique):
    """prefetch(ids, staleness=1) reads on a background thread now: the next forward gets the rows
    as they were before this step (here the read is waited for before the step, so exactly one
    step stale) and makes no pull of its own; staleness must be 0 or 1."""
    init = np.random.default_rng(12).normal(0, 0.1, (N, D)).astype(np.float32)
    emb = spt.Embedding(N, D, client=numba_client, name=f"{unique}_bg", initial_value=init)
    opt = spt.SGD(emb.parameters(), lr=0.5)
    ids = torch.tensor([3, 4, 5])
    with pytest.raises(ValueError, match="staleness"):
        emb.prefetch(ids, staleness=2)
    opt.zero_grad()
    emb(ids).sum().backward()
    emb.prefetch(ids, staleness=1)
    emb._prefetched[1].result()              # the read lands before the step
    opt.step()
    pulls = emb.pulls
    rows = emb(ids)
    assert emb.pulls == pulls
    np.testing.assert_array_equal(rows.detach().numpy(), init[[3, 4, 5]])                    # one step stale
    assert not np.array_equal(numba_client.pull(f"{unique}_bg", [3, 4, 5]), init[[3, 4, 5]])  # the step landed
