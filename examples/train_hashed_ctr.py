"""Train a click-through model on high-cardinality hashed features with dynamic tables (DynamicEmbedding).

    python examples/train_hashed_ctr.py                              # starts a local server
    python examples/train_hashed_ctr.py --address h1:50051,h2:50051  # an existing cluster
    sparseps demo --dynamic                                          # the same, from the command line

The features are what ads and recommendation logs look like: a user id and an item id drawn from
Zipf distributions over 2^62 keys (a few ids are frequent, most are seen once), their cross
(user x item, hashed to one int64), and a device given as a string (hashed in-graph with
sparseps.keras.hash_strings). No vocabulary, no id remapping: the keys go to the tables as they are.

The model is a wide & deep CTR model:
  * wide: logistic regression on every hashed feature, a DynamicEmbedding of width 1 whose rows
    are evicted when not updated for --max-age-steps steps (client.evict() every --evict-every
    steps here; on a schedule in production, eviction.interval_seconds);
  * deep: an embedding bag of the user, item and device (a DynamicEmbedding of width --dim with a
    --capacity bound per shard: the least recently updated rows make room), then a local
    Dense(32, relu) + Dense(1) trained by a local Keras Adam.
The tables and their LazyAdam live on the cluster; the loss is printed falling with the tables'
live rows, which stay within the policies' bounds. Exit code 0 when the training loss fell and the
model beats chance (the base rate's log-loss) on held-out clicks.
"""
import argparse
import sys
import time

import numpy as np

import sparseps
from sparseps.local import LocalServer

DEVICES = np.array(["ios", "android", "web", "tv"])
KEY_BITS = (1 << 62) - 1


def splitmix64(x):
    """A 64-bit mixer (bijective on uint64): ids to well-spread keys, crosses to one key."""
    z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def feature_key(field: int, raw) -> np.ndarray:
    """The int64 key of a raw id of one field (fields share tables, so the field is in the hash)."""
    return (splitmix64(splitmix64(raw) ^ np.uint64(field)) & np.uint64(KEY_BITS)).astype(np.int64)


def cross_key(a, b) -> np.ndarray:
    """The key of the cross of two keys (user x item): one int64, as a feature-crossing pipeline hashes it."""
    return feature_key(3, splitmix64(a) ^ (b.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)))


def clicks(n, seed, user_zipf=1.15, item_zipf=1.3):
    """n clicks of a hidden model: (user keys, item keys, cross keys, device strings, labels).

    A user's taste group and an item's category and quality are functions of their keys, so the
    same id behaves the same in training and held-out clicks; P(click) = sigmoid(-1.2 + quality
    + affinity[group, category] + device effect). Ranks are Zipf over 2^62 ids."""
    rng = np.random.default_rng(seed)
    users = feature_key(1, np.minimum(rng.zipf(user_zipf, n), KEY_BITS))
    items = feature_key(2, np.minimum(rng.zipf(item_zipf, n), KEY_BITS))
    device = rng.integers(0, len(DEVICES), n)
    truth = np.random.default_rng(12345)
    affinity = truth.normal(0, 1.5, (8, 8))
    device_effect = np.array([0.3, 0.0, -0.3, -0.6])
    group = (splitmix64(users) % np.uint64(8)).astype(np.int64)
    category = (splitmix64(items) % np.uint64(8)).astype(np.int64)
    quality = (splitmix64(items ^ 77) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 * 2 - 1   # U(-1, 1)
    logit = -1.2 + quality + affinity[group, category] + device_effect[device]
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return users, items, cross_key(users, items), DEVICES[device], labels


def build(client, args):
    import keras
    import tensorflow as tf

    import sparseps.keras as spk
    tag = args.name
    opt = spk.LazyAdam(learning_rate=args.learning_rate, client=client, name=f"{tag}_opt",
                       local_optimizer=keras.optimizers.Adam(args.learning_rate / 5))     # the dense layers
    wide = spk.DynamicEmbedding(1, name=f"{tag}_wide", optimizer=opt, embeddings_initializer="zeros",
                                eviction={"max_age_steps": args.max_age_steps})
    deep = spk.DynamicEmbedding(args.dim, name=f"{tag}_deep", optimizer=opt, capacity=args.capacity,
                                on_full="evict",
                                embeddings_initializer={"class_name": "RandomNormal", "config": {"stddev": 0.05}})
    hidden, out = keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)
    hidden.build((None, 3 * args.dim))
    out.build((None, 32))
    variables = (wide.trainable_variables + deep.trainable_variables + hidden.trainable_variables
                 + out.trainable_variables)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    spec = [tf.TensorSpec([None], tf.int64)] * 3 + [tf.TensorSpec([None], tf.string)]

    @tf.function(input_signature=spec)
    def logits(user, item, cross, device):
        device = spk.hash_strings(tf.strings.join(["device=", device]))        # strings to int64 keys, in-graph
        features = tf.stack([user, item, cross, device], axis=1)               # (batch, 4) int64 keys
        w = tf.reduce_sum(wide(features), axis=[1, 2])                          # logistic regression
        bag = tf.reshape(deep(tf.stack([user, item, device], axis=1)), [-1, 3 * args.dim])
        return w + tf.squeeze(out(hidden(bag)), -1)

    @tf.function(input_signature=spec + [tf.TensorSpec([None], tf.float32)])
    def train_step(user, item, cross, device, y):
        with tf.GradientTape() as tape:
            loss = bce(y, logits(user, item, cross, device))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))   # one push + one local Adam step
        return loss

    return opt, wide, deep, train_step, logits


def train(client, args):
    from sparseps.demo import auc, log_loss
    n_train = args.steps * args.batch
    data = clicks(n_train + args.val, args.seed)
    train_part = [a[:n_train] for a in data]
    val = [a[n_train:] for a in data]
    opt, wide, deep, train_step, logits = build(client, args)
    shards = client.num_shards
    print(f"{args.steps} steps x {args.batch} clicks; {len(np.unique(train_part[0])):,} distinct users, "
          f"{len(np.unique(train_part[1])):,} items, {len(np.unique(train_part[2])):,} crosses in training; "
          f"wide table evicts rows idle for {args.max_age_steps} steps, deep table holds at most "
          f"{args.capacity:,} rows per shard x {shards} shard(s)")
    from sparseps.keras import hash_strings
    device_keys = dict(zip(DEVICES, hash_strings(np.char.add("device=", DEVICES))))
    step_keys = []              # the wide table's keys of each step, to show what the age policy keeps
    losses, t0, evicted, last_evict = [], time.perf_counter(), 0, 0
    for s in range(args.steps):
        b = slice(s * args.batch, (s + 1) * args.batch)
        batch = [a[b] for a in train_part]
        losses.append(float(train_step(*batch)))
        step_keys.append(np.unique(np.concatenate([*batch[:3], [device_keys[d] for d in np.unique(batch[3])]])))
        if (s + 1) % args.evict_every == 0:
            evicted += client.evict(wide.variable.name).get(wide.variable.name, 0)
            last_evict = s + 1
        if (s + 1) % args.report_every == 0 or s + 1 == args.steps:
            # an eviction at step e keeps the rows updated in steps e - max_age + 1 .. e; later steps add theirs
            since = max(0, last_evict - args.max_age_steps)
            kept = len(np.unique(np.concatenate(step_keys[since:])))
            print(f"step {s + 1:5d}: loss {np.mean(losses[-args.report_every:]):.4f}; live rows: wide {wide.size():,} "
                  f"(the keys of steps {since + 1}-{s + 1}: {kept:,}; {evicted:,} evicted by age), "
                  f"deep {deep.size():,} (capacity {args.capacity * shards:,})", flush=True)
    k = max(1, len(losses) // 10)
    first, last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    y = val[4]
    logit = logits(*val[:4]).numpy()
    base = float(np.clip(train_part[4].mean(), 1e-6, 1 - 1e-6))
    chance = log_loss(y, np.full(len(y), np.log(base / (1 - base))))
    held_out, held_auc = log_loss(y, logit), auc(y, logit)
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s; optimizer iterations {int(opt.iterations)}")
    print(f"training loss {first:.4f} -> {last:.4f}; held-out log-loss {held_out:.4f} (chance, the base rate: "
          f"{chance:.4f}), AUC {held_auc:.4f}")
    opt.close()
    if last < first and held_out < chance:
        return 0
    print("the model did not learn: the loss did not fall or it does not beat chance on held-out clicks")
    return 1


def add_arguments(p):
    p.add_argument("--address", default=None, help="the cluster, every shard comma-separated (default: a local server)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--batch", type=int, default=1024, help="clicks per step (default 1024)")
    p.add_argument("--dim", type=int, default=8, help="width of the deep table's rows (default 8)")
    p.add_argument("--learning-rate", type=float, default=0.05, help="LazyAdam learning rate (default 0.05)")
    p.add_argument("--max-age-steps", type=int, default=60,
                   help="wide table: evict rows not updated in this many steps (default 60)")
    p.add_argument("--evict-every", type=int, default=20, help="run the age eviction every N steps (default 20)")
    p.add_argument("--capacity", type=int, default=20_000, help="deep table: live rows per shard (default 20,000)")
    p.add_argument("--report-every", type=int, default=50, help="print the loss and live rows every N steps")
    p.add_argument("--val", type=int, default=20_000, help="held-out clicks (default 20,000)")
    p.add_argument("--name", default=None, help="prefix of the cluster's table names (default ctr<seed>)")
    p.add_argument("--seed", type=int, default=0)


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], prog=prog)
    add_arguments(p)
    args = p.parse_args(argv)
    args.name = args.name or f"ctr{args.seed}"
    return on_cluster(args, train)


def on_cluster(args, train_fn, connect=True):
    """train_fn(client, args) on args.address, or on a local server started (and stopped) here when
    there is none; connect=False: train_fn(args), which connects itself (worker processes)."""
    server = None
    if args.address is None:
        server = LocalServer("--backend", "numba")
        args.address = server.address
        print(f"started a local sparseps-server at {args.address} (pid {server.pid})", flush=True)
    try:
        if not connect:
            return train_fn(args)
        with sparseps.connect(args.address) as client:
            return train_fn(client, args)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
