"""Train a DLRM-like click-through model in PyTorch on hashed features whose embeddings live on sparseps.

    python examples/train_torch_ctr.py                              # starts a local server
    python examples/train_torch_ctr.py --address h1:50051,h2:50051  # an existing cluster
    python examples/train_torch_ctr.py --workers 2                  # two worker processes, one optimizer

The clicks are train_hashed_ctr.py's (a user and an item id drawn from Zipf laws over 2^62 keys,
their cross, a device), every feature hashed to an int64 key; no vocabulary, no remapping.

The model is DLRM's shape (Naumov et al. 2019), small:
  * a DynamicEmbedding (sparseps.torch) of width --dim holds every feature's vector, keyed by the
    hashed key: rows are created on the cluster by their first push;
  * a wide part: an EmbeddingBag (mode "sum", dynamic, width 1) over the same keys;
  * the pairwise dot products of the 4 feature vectors and the vectors themselves go through a
    local MLP (torch.optim.Adam) to a logit.
The tables are trained by sparseps.torch.Adagrad (torch's numbers, applied on the server); each
step is one atomic push. A progress bar shows the loss; the loss curve is saved as a PNG (--plot).
Exit code 0 when the training loss fell and the model beats chance on held-out clicks.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_hashed_ctr import DEVICES, clicks, feature_key, on_cluster  # noqa: E402


def keys_of(users, items, crosses, devices):
    device_keys = feature_key(4, np.searchsorted(np.sort(DEVICES), devices))
    return np.stack([users, items, crosses, device_keys], axis=1)   # [batch, 4] int64


def build(client, args):
    import torch
    from torch import nn

    import sparseps.torch as spt

    class DLRM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = spt.DynamicEmbedding(args.dim, client=client, name=f"{args.name}_emb",
                                            initializer={"class_name": "RandomNormal",
                                                         "config": {"stddev": 0.05, "seed": args.seed}})
            self.wide = spt.EmbeddingBag(None, 1, client=client, name=f"{args.name}_wide", mode="sum", dynamic=True,
                                         initializer="Zeros")
            torch.manual_seed(args.seed)
            n = 4 * args.dim + 6
            self.mlp = nn.Sequential(nn.Linear(n, 32), nn.ReLU(), nn.Linear(32, 1))

        def forward(self, keys):
            v = self.emb(keys)                                    # [batch, 4, dim]
            dots = torch.bmm(v, v.transpose(1, 2))                # pairwise interactions
            i, j = torch.triu_indices(4, 4, 1)
            x = torch.cat([v.flatten(1), dots[:, i, j]], 1)
            return (self.mlp(x) + self.wide(keys)).squeeze(1)

    model = DLRM()
    sparse_opt = spt.Adagrad(list(model.emb.parameters()) + list(model.wide.parameters()), lr=args.learning_rate)
    dense_opt = torch.optim.Adam(model.mlp.parameters(), lr=1e-3)
    return model, sparse_opt, dense_opt


def train(client, args):
    import torch
    from tqdm import tqdm

    from sparseps.demo import auc, log_loss
    torch.set_num_threads(1)
    n_train = args.steps * args.batch
    users, items, crosses, devices, labels = clicks(n_train + args.val, args.seed)
    keys = keys_of(users, items, crosses, devices)
    model, sparse_opt, dense_opt = build(client, args)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses, t0 = [], time.perf_counter()
    mine = range(args.worker_index, args.steps, args.num_workers)
    bar = tqdm(mine, desc=f"worker {args.worker_index}", unit="step", disable=not args.progress)
    for s in bar:
        b = slice(s * args.batch, (s + 1) * args.batch)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss = loss_fn(model(torch.from_numpy(keys[b])), torch.from_numpy(labels[b]))
        loss.backward()
        sparse_opt.step()                 # one atomic push: both tables
        dense_opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    k = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    print(f"worker {args.worker_index}: {len(losses)} steps in {time.perf_counter() - t0:.1f} s; "
          f"training loss {first:.4f} -> {last:.4f}; dynamic table rows {model.emb.variable.size():,}", flush=True)
    ok = last < first
    if args.worker_index == 0:
        model.eval()
        with torch.no_grad():
            logit = model(torch.from_numpy(keys[n_train:])).numpy()
        y = labels[n_train:]
        base = float(np.clip(labels[:n_train].mean(), 1e-6, 1 - 1e-6))
        chance = log_loss(y, np.full(len(y), np.log(base / (1 - base))))
        held_out = log_loss(y, logit)
        print(f"held-out log-loss {held_out:.4f} (chance, the base rate: {chance:.4f}), AUC {auc(y, logit):.4f}")
        ok = ok and held_out < chance
        if args.plot:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(6, 3.5))
            smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
            ax.plot(losses, alpha=0.3, label="step loss")
            ax.plot(np.arange(len(smooth)) + 9, smooth, label="mean of 10")
            ax.set_xlabel("step (this worker)")
            ax.set_ylabel("log-loss")
            ax.set_title("DLRM-like CTR, sparseps.torch + Adagrad")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot)
            print(f"loss curve: {args.plot}")
    if not ok:
        print("the model did not learn: the loss did not fall or it does not beat chance on held-out clicks")
    return 0 if ok else 1


def add_arguments(p):
    p.add_argument("--address", default=None, help="the cluster, every shard comma-separated (default: a local server)")
    p.add_argument("--steps", type=int, default=200, help="training steps, all workers together (default 200)")
    p.add_argument("--batch", type=int, default=1024, help="clicks per step (default 1024)")
    p.add_argument("--dim", type=int, default=8, help="width of the embedding rows (default 8)")
    p.add_argument("--learning-rate", type=float, default=0.05, help="Adagrad learning rate of the tables")
    p.add_argument("--val", type=int, default=20_000, help="held-out clicks (default 20,000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the tables (default 1)")
    p.add_argument("--plot", default="torch_ctr_loss.png", help="where to save the loss curve ('' for none)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--name", default=None, help="prefix of the cluster's table names (default torchctr<seed>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--num-workers", type=int, default=1, help=argparse.SUPPRESS)


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog=prog)
    add_arguments(p)
    args = p.parse_args(argv)
    args.name = args.name or f"torchctr{args.seed}"
    return on_cluster(args, run, connect=False)


def run(args):
    if args.workers > 1:   # each worker a process of its own, every one on the same tables
        base = [sys.executable, os.path.abspath(__file__), "--address", args.address, "--steps", str(args.steps),
                "--batch", str(args.batch), "--dim", str(args.dim), "--learning-rate", str(args.learning_rate),
                "--val", str(args.val), "--name", args.name, "--seed", str(args.seed), "--no-progress",
                "--num-workers", str(args.workers)]
        procs = [subprocess.Popen(base + ["--worker-index", str(i), "--plot", args.plot if i == 0 else ""])
                 for i in range(args.workers)]
        return max(p.wait() for p in procs)
    import sparseps
    with sparseps.connect(args.address) as client:
        return train(client, args)


if __name__ == "__main__":
    sys.exit(main())
