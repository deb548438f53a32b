"""The peer: TensorFlow ParameterServerStrategy on localhost training the same sparse workload.

Set-up as in /work/shared/notes/perf_anchors.md section 4 (run with the TF 2.15.1 + tensorflow-addons
0.23 venv, the only off-the-shelf lazy-Adam peer):

* cluster: 1 PS task and N worker tasks, each a separate process on 127.0.0.1 running
  `tf.distribute.Server(..., protocol="grpc").join()`; this script is the coordinator (chief):
  `ParameterServerStrategy(SimpleClusterResolver)` + `ClusterCoordinator`.
* model: embedding-bag. ids [512 bags x 8] = 4096 ids per step -> Keras 2 Embedding(1,000,000, 64)
  -> mean over the bag -> Dense(1) -> sigmoid cross-entropy against random labels;
  optimizer tfa.optimizers.LazyAdam(1e-3) for every variable.
* data: a per-worker tf.data of 16 pre-generated id batches (the same generator and seeds as the
  sparseps benchmarks: uniform, or finite Zipf s=1.05 with permuted ranks), repeated.
* step: `coord.schedule(step_fn, (iterator,))`, step_fn = `strategy.run(replica_fn)`; `coord.join()`
  closes each timed repetition. Reported: steps/s and unique rows/s (= steps/s x mean unique ids
  per batch) per repetition, set-up time, the PS task's peak RSS.

    .venv-golden/bin/python bench/peer_pss.py --workers 1 --steps 200 --reps 3
    .venv-golden/bin/python bench/peer_pss.py --rows 20000 --workers 1 --steps 20 --reps 1   # smoke
The last stdout line is `JSON{...}` for compare_peer.py.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


sys.path.insert(0, HERE)
from harness import id_pool, proc_mem, stop_processes  # noqa: E402  (stdlib + numpy only)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_task(job: str, index: int, cluster: dict, n_workers: int):
    import tensorflow as tf
    config = tf.compat.v1.ConfigProto()
    if job == "worker" and (os.cpu_count() or 1) < n_workers + 1:   # as the TF PSS tutorial does
        config.inter_op_parallelism_threads = n_workers + 1
    server = tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name=job, task_index=index,
                                  protocol="grpc", config=config, start=True)
    server.join()


def rss_peak(pid) -> int:
    try:
        return proc_mem(pid).get("VmHWM", 0)
    except OSError:
        return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", help=argparse.SUPPRESS)           # "ps:0" / "worker:1" (internal)
    p.add_argument("--cluster", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--bags", type=int, default=512)
    p.add_argument("--bag", type=int, default=8)
    p.add_argument("--dist", default="uniform", choices=["uniform", "zipf"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    if a.task:
        job, idx = a.task.split(":")
        return run_task(job, int(idx), json.loads(a.cluster), a.workers)

    t_start = time.perf_counter()
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(a.workers)],
               "ps": [f"127.0.0.1:{free_port()}"]}
    procs = {}
    devnull = open(os.devnull, "wb")
    try:
        for job in ("ps", "worker"):
            for i in range(len(cluster[job])):
                procs[f"{job}:{i}"] = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--task", f"{job}:{i}", "--cluster", json.dumps(cluster),
                     "--workers", str(a.workers)], stdout=devnull, stderr=devnull)
        import tensorflow as tf
        import tensorflow_addons as tfa
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(tf.train.ClusterSpec(cluster), rpc_layer="grpc")
        strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
        coord = tf.distribute.coordinator.ClusterCoordinator(strategy)

        batch = a.bags * a.bag
        pool = id_pool(a.dist, a.rows, batch)
        uniq_mean = float(np.mean([len(np.unique(x)) for x in pool]))
        rng = np.random.default_rng(0)
        ids_np = np.stack([x.reshape(a.bags, a.bag) for x in pool])
        labels_np = rng.integers(0, 2, (len(pool), a.bags)).astype(np.float32)

        with strategy.scope():
            emb = tf.keras.layers.Embedding(a.rows, a.dim, embeddings_initializer=tf.keras.initializers.RandomUniform(
                -0.05, 0.05, seed=3))
            dense = tf.keras.layers.Dense(1)
            emb.build((None, a.bag))
            dense.build((None, a.dim))
            opt = tfa.optimizers.LazyAdam(a.lr)
            variables = emb.trainable_variables + dense.trainable_variables
            opt._create_all_weights(variables)   # slots on the PS now, not inside the first step

        def dataset_fn():
            return tf.data.Dataset.from_tensor_slices((ids_np, labels_np)).repeat()

        per_worker = coord.create_per_worker_dataset(dataset_fn)
        it = iter(per_worker)

        @tf.function
        def step_fn(iterator):
            def replica_fn(batch):
                ids, y = batch
                with tf.GradientTape() as tape:
                    h = tf.reduce_mean(emb(ids), axis=1)
                    logits = dense(h)[:, 0]
                    loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))
                grads = tape.gradient(loss, variables)
                opt.apply_gradients(zip(grads, variables))
                return loss
            return strategy.run(replica_fn, args=(next(iterator),))

        for _ in range(a.warmup):
            coord.schedule(step_fn, args=(it,))
        coord.join()
        setup_s = time.perf_counter() - t_start
        grad_type = type(step_fn.get_concrete_function(it).structured_outputs).__name__
        reps = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                coord.schedule(step_fn, args=(it,))
            coord.join()
            dt = time.perf_counter() - t0
            reps.append({"steps_s": a.steps / dt, "rows_s": a.steps / dt * uniq_mean, "seconds": dt,
                         "t_end": time.time()})
        iters = int(opt.iterations.numpy())
        out = {"peer": "tf_pss", "tf": tf.__version__, "tfa": tfa.__version__, "workers": a.workers, "dist": a.dist,
               "rows": a.rows, "dim": a.dim, "ids_per_step": batch, "unique_per_step": uniq_mean,
               "reps": reps, "setup_s": setup_s, "optimizer_iterations": iters, "sparse_grad": str(type(grads_probe(emb))),
               "ps_peak_rss": rss_peak(procs["ps:0"].pid), "worker_peak_rss": [rss_peak(procs[f"worker:{i}"].pid)
                                                                             for i in range(a.workers)],
               "step_outputs": grad_type}
        print("JSON" + json.dumps(out), flush=True)
    finally:
        stop_processes(list(procs.values()))
        devnull.close()


def grads_probe(emb):
    """The gradient type the embedding produces (IndexedSlices = the lazy, sparse path)."""
    import tensorflow as tf
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(emb(tf.constant([[1, 2]])))
    return tape.gradient(y, emb.embeddings)


if __name__ == "__main__":
    main()
