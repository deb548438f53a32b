"""`sparseps demo`: learn a synthetic click log's latent factors through a sparseps cluster.

    sparseps demo                                   # local server, 1 worker, numpy model (no TensorFlow)
    sparseps demo --workers 4 --plot loss.png       # 4 worker processes sharing one optimizer
    sparseps demo --address h1:50051,h2:50051       # an existing cluster (all its shards)
    sparseps demo --keras                           # the same model through sparseps.keras (TensorFlow)
    sparseps demo --dynamic                         # examples/train_hashed_ctr.py: hashed 64-bit ids, dynamic tables
    sparseps demo --torch --workers 2               # examples/train_torch_ctr.py: PyTorch (sparseps.torch), DLRM-like

The data come from a known model -- user and item factors, item biases, Zipf item and user
popularity -- so the demo reports how well the truth is recovered (correlation of the learned
logits with the true ones, and the log-loss / AUC an oracle knowing the true model would get),
not only that the loss goes down. The click log is streamed once, like a production click log:
it is cut into `--epochs` consecutive days; each epoch trains on one day (every click seen once)
and then scores held-out clicks. The model is matrix factorisation with an item bias,
logit = <users[u], items[i]> + item_bias[i], logistic loss, trained with LazyAdam on the cluster.
"""
import math
import os
import queue
import sys
import tempfile
import time

import numpy as np


def add_arguments(p):
    p.add_argument("--address", default=None,
                   help="the cluster, every shard comma-separated (default: start a local server)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the optimizer (default 1)")
    p.add_argument("--users", type=int, default=100_000, help="rows of the user table (default 100,000)")
    p.add_argument("--items", type=int, default=20_000, help="rows of the item table (default 20,000)")
    p.add_argument("--dim", type=int, default=32, help="embedding width (default 32)")
    p.add_argument("--steps", type=int, default=300, help="training steps in all, all workers together (default 300)")
    p.add_argument("--epochs", type=int, default=3, help="days of clicks the steps are split into (default 3)")
    p.add_argument("--batch", type=int, default=4096, help="clicks per step (default 4096)")
    p.add_argument("--val-clicks", type=int, default=20_000, help="held-out clicks scored each epoch")
    p.add_argument("--learning-rate", type=float, default=0.02, help="LazyAdam learning rate (default 0.02)")
    p.add_argument("--max-in-flight", type=int, default=2,
                   help="pushes a worker may have in flight while it computes (0: synchronous; default 2)")
    p.add_argument("--no-prefetch", action="store_true", help="do not pull the next batch's rows ahead of time")
    p.add_argument("--keras", action="store_true", help="train through sparseps.keras (needs TensorFlow)")
    p.add_argument("--dynamic", action="store_true",
                   help="instead: a CTR model on hashed 64-bit ids in dynamic tables under eviction "
                        "(examples/train_hashed_ctr.py, TensorFlow); its own options follow: "
                        "sparseps demo --dynamic --help")
    p.add_argument("--torch", action="store_true",
                   help="instead: a DLRM-like CTR model in PyTorch through sparseps.torch "
                        "(examples/train_torch_ctr.py; its options: sparseps demo --torch --help)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the loss curves to this PNG")
    p.add_argument("--name", default=None, help="prefix of the cluster's variable names (default demo<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------- data
def _zipf(rng, n, size, s):
    """`size` draws of ranks 0..n-1 with P(rank r) proportional to (r+1)^-s (inverse CDF)."""
    if s <= 0:
        return rng.integers(0, n, size)
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** s)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)


def synthetic_truth(users, items, seed=0, true_dim=8):
    """The hidden model: user and item factors (scaled so <u, i> has unit variance) and item biases."""
    rng = np.random.default_rng([seed, 1])
    u_true = rng.normal(0, 1, (users, true_dim)) / true_dim ** 0.25
    i_true = rng.normal(0, 1, (items, true_dim)) / true_dim ** 0.25
    b_true = rng.normal(-0.5, 1.0, items)
    return u_true, i_true, b_true


def synthetic_clicks(users, items, dim=None, n=100_000, seed=0, true_dim=8, user_zipf=0.8, item_zipf=1.05,
                     strength=1.5):
    """(user ids, item ids, labels, true logits) of n clicks drawn from the hidden model.

    Item popularity is Zipf(item_zipf) and user activity Zipf(user_zipf) over random permutations
    of the ids; label ~ Bernoulli(sigmoid(strength * <u_true, i_true> + b_true[i])). `dim` (the
    model's width) is accepted for compatibility and does not affect the data.
    """
    u_true, i_true, b_true = synthetic_truth(users, items, seed, true_dim)
    rng = np.random.default_rng([seed, 2])
    uperm, iperm = rng.permutation(users), rng.permutation(items)
    uid = uperm[_zipf(rng, users, n, user_zipf)]
    iid = iperm[_zipf(rng, items, n, item_zipf)]
    logit = strength * np.einsum("nd,nd->n", u_true[uid], i_true[iid]) + b_true[iid]
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return uid.astype(np.int64), iid.astype(np.int64), labels, logit


# ---------------------------------------------------------------------------------------------- model math
def loss_and_grads(u, i, y, b=None):
    """Mean logistic loss of logit = <u, i> (+ b) and its gradients: (loss, d_u, d_i[, d_b])."""
    logit = np.einsum("nd,nd->n", u, i)
    if b is not None:
        logit = logit + b.reshape(-1)
    prob = 1 / (1 + np.exp(-logit))
    loss = float(np.mean(np.logaddexp(0, logit) - y * logit))
    d = ((prob - y) / len(y)).astype(u.dtype)[:, None]
    if b is None:
        return loss, d * i, d * u
    return loss, d * i, d * u, d


def log_loss(y, logit) -> float:
    return float(np.mean(np.logaddexp(0, logit) - y * logit))


def auc(y, score) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    y = np.asarray(y) > 0.5
    score = np.asarray(score, np.float64)
    order = np.argsort(score, kind="mergesort")
    _, inv, counts = np.unique(score[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(score))
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def metrics(y, logit, true_logit) -> dict:
    return {"log_loss": log_loss(y, logit), "auc": auc(y, logit),
            "truth_corr": float(np.corrcoef(logit, true_logit)[0, 1]) if np.std(logit) > 0 else 0.0}


# ---------------------------------------------------------------------------------------------- trainers
class NumpyTrainer:
    """The model in numpy: pull rows, compute loss and gradients, push (optionally overlapped)."""

    def __init__(self, client, names, args, worker_id=""):
        from .overlap import AsyncPusher
        self.client, self.names, self.args = client, names, args
        self.pusher = AsyncPusher(client, args.max_in_flight, worker_id=worker_id)

    def _rows(self, uid, iid, pulled=None):
        n = self.names
        if pulled is not None:
            return pulled["u"].rows, pulled["i"].rows, pulled["b"].rows
        uu, ui = np.unique(uid, return_inverse=True)
        iu, ii = np.unique(iid, return_inverse=True)
        return (self.client.pull(n["users"], uu)[ui], self.client.pull(n["items"], iu)[ii],
                self.client.pull(n["bias"], iu)[ii])

    def train(self, batches, on_step):
        from .overlap import Prefetcher
        n = self.names
        if self.args.no_prefetch:
            stream = ((b, None) for b in batches)
        else:
            cl = self.client
            stream = Prefetcher(batches, {"u": (cl.variable(n["users"]), lambda b: b[0]),
                                          "i": (cl.variable(n["items"]), lambda b: b[1]),
                                          "b": (cl.variable(n["bias"]), lambda b: b[1])})
        for (uid, iid, y), pulled in stream:
            u, i, b = self._rows(uid, iid, pulled)
            loss, gu, gi, gb = loss_and_grads(u, i, y, b)
            self.pusher.push({n["users"]: (uid, gu), n["items"]: (iid, gi), n["bias"]: (iid, gb)})
            on_step(loss)
        self.pusher.flush()

    def predict(self, uid, iid):
        u, i, b = self._rows(uid, iid)
        return np.einsum("nd,nd->n", u, i) + b.reshape(-1)

    def close(self):
        self.pusher.close()


class KerasTrainer:
    """The same model written with sparseps.keras: Embedding layers, GradientTape, apply_gradients."""

    def __init__(self, client, names, args, worker_id=""):
        import keras
        import tensorflow as tf

        from . import keras as spk
        self.tf, self.spk, self.args = tf, spk, args
        self.opt = spk.Optimizer.attach(names["opt"], client, max_in_flight=args.max_in_flight, worker_id=worker_id)
        self.users = spk.Embedding(variable=names["users"], client=client)
        self.items = spk.Embedding(variable=names["items"], client=client)
        self.bias = spk.Embedding(variable=names["bias"], client=client)
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        variables = self.users.trainable_variables + self.items.trainable_variables + self.bias.trainable_variables
        spec = [tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.float32)]

        @tf.function(input_signature=spec[:2])
        def logits(u, i):
            return tf.reduce_sum(self.users(u) * self.items(i), -1) + tf.squeeze(self.bias(i), -1)

        @tf.function(input_signature=spec)
        def step(u, i, y):
            with tf.GradientTape() as tape:
                loss = bce(y, logits(u, i))
            self.opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss
        self._step, self._logits = step, logits

    def train(self, batches, on_step):
        if not self.args.no_prefetch:
            batches = self.spk.Prefetcher(batches, {self.users: lambda b: b[0], self.items: lambda b: b[1],
                                                    self.bias: lambda b: b[1]})
        for uid, iid, y in batches:
            on_step(float(self._step(uid, iid, y)))
        self.opt.flush()

    def predict(self, uid, iid):
        return self._logits(uid, iid).numpy()

    def close(self):
        self.opt.close()


# ---------------------------------------------------------------------------------------------- orchestration
def _names(args):
    tag = args.name or f"demo{args.seed}"
    return {"opt": f"{tag}_opt", "users": f"{tag}_users", "items": f"{tag}_items", "bias": f"{tag}_item_bias"}


def setup(client, args) -> dict:
    """Create (or find, if identical) the optimizer and the three tables; their names."""
    names = _names(args)
    client.create_optimizer(names["opt"], {"class_name": "LazyAdam", "config": {"learning_rate": args.learning_rate}})
    init = {"class_name": "RandomNormal", "config": {"stddev": 0.05, "seed": args.seed + 1}}
    client.create_variable(names["users"], shape=(args.users, args.dim), initializer=init, optimizer=names["opt"])
    client.create_variable(names["items"], shape=(args.items, args.dim), initializer=init, optimizer=names["opt"])
    client.create_variable(names["bias"], shape=(args.items, 1), initializer="Zeros", optimizer=names["opt"])
    return names


def _plan(args):
    steps_per_epoch = max(1, args.steps // max(1, args.epochs))
    return steps_per_epoch, steps_per_epoch * args.batch


def _worker(args, k, data, report):
    """Worker k of args.workers: its share of every epoch's batches; worker 0 scores each epoch."""
    import sparseps
    uid, iid, y, true_logit = data
    steps_per_epoch, day = _plan(args)
    n_train = steps_per_epoch * args.epochs * args.batch
    val = slice(n_train, n_train + args.val_clicks)
    client = sparseps.connect(args.address)
    names = _names(args)
    trainer = (KerasTrainer if args.keras else NumpyTrainer)(client, names, args, worker_id=f"worker{k}")
    mine = [s for s in range(steps_per_epoch) if s % args.workers == k]
    bar = _progress(len(mine) * args.epochs, f"worker {k}", k, args.no_progress)
    losses = []

    def on_step(loss):
        losses.append(loss)
        bar.update(1)
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    try:
        for epoch in range(args.epochs):
            def batches(epoch=epoch):
                for s in mine:
                    sl = slice(epoch * day + s * args.batch, epoch * day + (s + 1) * args.batch)
                    yield np.asarray(uid[sl]), np.asarray(iid[sl]), np.asarray(y[sl])
            trainer.train(batches(), on_step)
            if k == 0:
                m = metrics(np.asarray(y[val]), trainer.predict(np.asarray(uid[val]), np.asarray(iid[val])),
                            np.asarray(true_logit[val]))
                report("epoch", {"epoch": epoch + 1, "steps": len(losses), **m})
    finally:
        bar.close()
        trainer.close()
        client.close()
    report("done", {"worker": k, "losses": losses})


def _spawned(args, k, paths, q):
    data = tuple(np.load(p, mmap_mode="r") for p in paths)
    try:
        _worker(args, k, data, lambda kind, payload: q.put((kind, k, payload)))
    except BaseException as e:
        q.put(("error", k, f"{type(e).__name__}: {e}"))
        raise


def _progress(total, desc, position=0, disable=False):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="step", position=position, leave=True, mininterval=0.5,
                    disable=disable, dynamic_ncols=True)
    except ImportError:
        class Plain:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                if not disable and self.n % 50 == 0:
                    print(f"{desc}: {self.n}/{total}", file=sys.stderr)

            def set_postfix(self, **kw):
                pass

            def close(self):
                pass
        return Plain()


def _run_example(filename: str, argv, flag: str, extras: str) -> int:
    """examples/<filename>'s main(argv), from the source tree (what `sparseps demo <flag>` runs)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", filename)
    if not os.path.exists(path):
        raise SystemExit(f"sparseps demo {flag} runs examples/{filename} of a source checkout of "
                         f"sparseps, not found at {path}; run it from the repository (pip install -e '.[{extras}]')")
    spec = importlib.util.spec_from_file_location(filename[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv), prog=f"sparseps demo {flag}")


def run_dynamic(argv) -> int:
    """`sparseps demo --dynamic ARGS`: examples/train_hashed_ctr.py's main(ARGS)."""
    return _run_example("train_hashed_ctr.py", argv, "--dynamic", "tf")


def run_torch(argv) -> int:
    """`sparseps demo --torch ARGS`: examples/train_torch_ctr.py's main(ARGS) (needs torch)."""
    return _run_example("train_torch_ctr.py", argv, "--torch", "dev")


def run(args):
    import sparseps
    from .local import LocalServer
    server = None
    if args.address is None:
        import importlib.util
        # name the CPU backend: "auto" would import TensorFlow only to look for a GPU (seconds)
        backend = "numba" if importlib.util.find_spec("numba") else "numpy"
        server = LocalServer("--backend", backend)
        args.address = server.address
        print(f"started a local sparseps-server at {args.address} (pid {server.pid})")
    try:
        return _train(sparseps.connect(args.address), args)
    finally:
        if server is not None:
            server.stop()


def _say(msg):
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg)
    sys.stdout.flush()


def _train(client, args):
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    t0 = time.perf_counter()
    steps_per_epoch, day = _plan(args)
    n_train = steps_per_epoch * args.epochs * args.batch
    data = synthetic_clicks(args.users, args.items, args.dim, n_train + args.val_clicks, args.seed)
    names = setup(client, args)
    uid, iid, y, true_logit = data
    val = slice(n_train, None)
    oracle = metrics(y[val], true_logit[val], true_logit[val])
    print(f"{n_train:,} training clicks in {args.epochs} epoch(s) of {steps_per_epoch} steps x {args.batch}, "
          f"{args.workers} worker(s), tables {args.users:,}x{args.dim} and {args.items:,}x{args.dim} "
          f"on {','.join(client.addresses)}")
    print("rows travel on the data plane: " + ", ".join(d or f"{a} (gRPC)" for a, d in zip(client.addresses,
                                                                                         client.data_plane)))
    epochs, losses = [], {}

    def report(kind, payload, k=0):
        if kind == "epoch":
            epochs.append(payload)
            _say(f"epoch {payload['epoch']}: validation log-loss {payload['log_loss']:.4f}, "
                 f"AUC {payload['auc']:.4f} (after worker 0's {payload['steps']} steps)")
        elif kind == "done":
            losses[payload["worker"]] = payload["losses"]
    t_train = time.perf_counter()
    if args.workers == 1:
        _worker(args, 0, data, report)
    else:
        _run_processes(args, data, report)
    train_s = time.perf_counter() - t_train
    model = NumpyTrainer(client, names, _sync(args))
    final = metrics(y[val], model.predict(uid[val], iid[val]), true_logit[val])
    it = client.optimizer(names["opt"]).iterations
    k = max(1, min(len(v) for v in losses.values()) // 10)
    first = float(np.mean([np.mean(v[:k]) for v in losses.values()]))
    last = float(np.mean([np.mean(v[-k:]) for v in losses.values()]))
    print(f"trained {sum(len(v) for v in losses.values())} steps of {args.batch} clicks in {train_s:.1f} s "
          f"({args.workers} worker(s); optimizer iterations now {it})")
    print(f"training loss {first:.4f} -> {last:.4f}; validation log-loss {final['log_loss']:.4f}, "
          f"AUC {final['auc']:.4f} (ln 2 = 0.6931 is chance; the true model scores "
          f"{oracle['log_loss']:.4f}, AUC {oracle['auc']:.4f})")
    print(f"truth recovery: correlation of learned and true logits on held-out clicks {final['truth_corr']:.3f}")
    if args.plot:
        _plot(args.plot, losses, epochs, final, oracle, args)
        print(f"wrote the loss curves to {args.plot}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    # Success: this run's loss fell, or (a trainer that joined tables others had already trained,
    # e.g. the compose cluster's second trainer) the shared model beats chance on held-out clicks.
    if last < first or final["log_loss"] < math.log(2) - 0.01:
        return 0
    print("the model did not learn: training loss did not fall and validation log-loss is not below chance")
    return 1


def _sync(args):
    import argparse
    a = argparse.Namespace(**vars(args))
    a.max_in_flight, a.no_prefetch = 0, True
    return a


def _run_processes(args, data, report):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="sparseps-demo-")
    paths = []
    for name, arr in zip(("uid", "iid", "y", "logit"), data):
        p = os.path.join(tmp, name + ".npy")
        np.save(p, arr)
        paths.append(p)
    q = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(args, k, paths, q), name=f"sparseps-demo-worker{k}")
             for k in range(args.workers)]
    try:
        for p in procs:
            p.start()
        done, failed = set(), []
        while len(done) < args.workers:
            try:
                kind, k, payload = q.get(timeout=1.0)
            except queue.Empty:
                dead = [p for i, p in enumerate(procs) if i not in done and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"worker process(es) {[p.name for p in dead]} failed: {failed}")
                continue
            if kind == "error":
                failed.append(payload)
                done.add(k)
                continue
            report(kind, payload, k)
            if kind == "done":
                done.add(k)
        if failed:
            raise RuntimeError(f"worker(s) failed: {failed}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
        for p in paths:
            os.unlink(p)
        os.rmdir(tmp)


def _plot(path, losses, epochs, final, oracle, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    n = len(losses)
    w = max(1, min(len(v) for v in losses.values()) // 20)
    for k in sorted(losses):
        v = np.asarray(losses[k])
        steps = np.arange(len(v)) * n + k + 1           # the cluster-wide step each loss belongs to (roughly)
        raw, = ax.plot(steps, v, alpha=0.25, lw=0.8)
        if len(v) >= w:
            ax.plot(steps[w - 1:], np.convolve(v, np.ones(w) / w, "valid"), lw=1.6, color=raw.get_color(),
                    label=f"worker {k} (mean of {w})")
    if epochs:
        xs = [e["steps"] * n for e in epochs]
        ax.plot(xs, [e["log_loss"] for e in epochs], "ko-", label="validation log-loss")
    ax.axhline(np.log(2), color="grey", ls=":", label="chance (ln 2)")
    ax.axhline(oracle["log_loss"], color="green", ls="--", label="true model")
    ax.set_xlabel("step (all workers)")
    ax.set_ylabel("log-loss")
    ax.set_title(f"sparseps demo: {args.workers} worker(s), LazyAdam lr={args.learning_rate}; "
                 f"final AUC {final['auc']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
