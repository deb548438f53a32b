"""sparseps.keras: train a Keras model whose tables live on a sparseps cluster, as if the optimizer were local.

    import sparseps, sparseps.keras as spk
    client = sparseps.connect("127.0.0.1:50051")
    opt = spk.Optimizer(client, "LazyAdam", learning_rate=0.01, name="opt")       # lives on the cluster
    users = spk.Embedding(100_000, 32, client=client, name="users", optimizer=opt)
    items = spk.Embedding(20_000, 32, client=client, name="items", optimizer=opt)

    with tf.GradientTape() as tape:
        logits = tf.reduce_sum(users(u) * items(i), -1)
        loss = keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)
    variables = users.trainable_variables + items.trainable_variables
    opt.apply_gradients(zip(tape.gradient(loss, variables), variables))        # one push = one step

    ads = spk.DynamicEmbedding(16, name="ad_ids", optimizer=opt, eviction={"max_age_steps": 10_000})
    ads(tf.constant([-7, 2**62 + 3]))             # any int64 id; strings: input_type="string" / hash_strings

How it works. A remote layer owns one tiny local Keras weight, its *handle* (a scalar that never
changes). The forward pass reads the handle and, under a `tf.custom_gradient`, deduplicates the
batch's ids (`tf.unique`), pulls only the unique rows (directly when eager, through
`tf.numpy_function` inside `tf.function`) and gathers them back into batch order. The custom
gradient hands the tape, for the handle, a `tf.IndexedSlices` whose indices are the *table's row
ids* and whose values are the per-example gradient rows -- exactly the IndexedSlices that a local
`tf.keras.layers.Embedding` produces, so several lookups of one table in a step concatenate the
usual way. `Optimizer.apply_gradients` recognises handles, turns every remote gradient into
(ids, rows) or a dense array and sends them all in ONE push: one step of the server's optimizer
(iterations advance once), applied with the reference's semantics (duplicates summed, LazyAdam
touching only those rows). Gradients of ordinary Keras variables go to `local_optimizer`.

Overlap: `Optimizer(..., max_in_flight=N)` sends pushes from a background thread (at most N
queued or on the wire; `apply_gradients` returns at once), and `Prefetcher` pulls the next batch's
unique rows while the current step computes; the lookup uses them when the ids match. Both trade
exactness for speed the way any asynchronous parameter server does: a step may read rows that are
missing up to `max_in_flight` + 1 of this worker's latest updates. `max_in_flight=0` and no
prefetcher reproduce the reference step for step.

This package is the only place sparseps imports TensorFlow; `import sparseps` stays TensorFlow-free.
"""
from ..overlap import AsyncPusher
from .clients import get_client, set_client
from .hashing import hash_strings
from .layers import Dense, DynamicEmbedding, Embedding
from .optimizers import SGD, Adagrad, Adam, Ftrl, LazyAdam, Optimizer, RMSprop
from .prefetch import Prefetcher
from .variables import RemoteVariable, export_npz, export_saved_model, is_remote, load_saved_model, read, remote_name

__all__ = ["Embedding", "Dense", "RemoteVariable", "Optimizer", "LazyAdam", "Adam", "SGD", "Adagrad", "Ftrl",
           "RMSprop", "AsyncPusher",
           "Prefetcher", "set_client", "get_client", "remote_name", "is_remote", "read", "export_npz",
           "export_saved_model", "load_saved_model"]
__all__ += ["DynamicEmbedding", "hash_strings"]
