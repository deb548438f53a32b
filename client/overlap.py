"""Overlap network and compute: push in the background, pull the next batch's rows ahead of time.

TensorFlow-free (numpy + the client); `sparseps.keras` builds its Keras-aware versions on these.

    pusher = AsyncPusher(client, max_in_flight=2)
    for batch, rows in Prefetcher(batches, {"users": (users_var, lambda b: b[0])}):
        u = rows["users"].rows                      # pulled while the previous step computed
        ...
        pusher.push({"users": (batch[0], grad_u)})  # returns at once; at most 2 pushes in flight
    pusher.flush()

Both trade exactness for speed the way any asynchronous parameter server does: rows prefetched for
step k+1 are read while step k (and up to `max_in_flight` earlier pushes) may not be applied yet.
"""
import queue
import threading
import time

import numpy as np


class AsyncPusher:
    """Send pushes from one background thread, at most `max_in_flight` queued or on the wire.

        pusher = AsyncPusher(client, max_in_flight=2)
        pusher.push({"emb": (ids, rows)})   # returns at once (blocks only while the bound is reached)
        pusher.flush()                     # wait for everything sent; re-raises a failed push

    The pushes of one pusher are applied in the order they were submitted. max_in_flight=0 sends
    synchronously in the caller's thread and returns the iterations.
    """

    def __init__(self, client, max_in_flight: int = 2, worker_id: str = ""):
        self.client, self.max_in_flight, self.worker_id = client, int(max_in_flight), worker_id
        self.last_iterations = None
        self.pushed = 0
        self.wait_seconds = 0.0           # time push() spent blocked on the bound
        self._error = None
        self._slots = threading.BoundedSemaphore(max(1, self.max_in_flight))
        self._queue = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = None

    def push(self, gradients: dict, step=None):
        """Submit one step's gradients; the iterations when synchronous, else None."""
        self._raise()
        if self.max_in_flight <= 0:
            it = self.client.push(gradients, step=step, worker_id=self.worker_id)
            self.last_iterations = it
            self.pushed += 1
            return it
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sparseps-pusher", daemon=True)
            self._thread.start()
        if not self._slots.acquire(blocking=False):
            t0 = time.perf_counter()
            self._slots.acquire()
            self.wait_seconds += time.perf_counter() - t0
        with self._idle:
            self._pending += 1
        self._queue.put((gradients, step))
        return None

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            gradients, step = item
            try:
                if self._error is None:
                    self.last_iterations = self.client.push(gradients, step=step, worker_id=self.worker_id)
                    self.pushed += 1
            except BaseException as e:   # noqa: BLE001 -- handed to the trainer's thread
                self._error = e
            finally:   # count it done before freeing its slot, so in_flight never exceeds max_in_flight
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
                self._slots.release()

    @property
    def in_flight(self) -> int:
        return self._pending

    def flush(self):
        """Wait until every submitted push was applied; raise the error of a failed one."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)
        self._raise()
        return self.last_iterations

    wait = flush

    def _raise(self):
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def close(self):
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Rows:
    """The rows pulled for one batch's ids.

    `unique_ids` and `values` (one row each); `rows` is the batch's rows in batch order
    (duplicates included, gathered in the background thread); `take(ids)` for any other ids.
    """

    __slots__ = ("unique_ids", "values", "rows")

    def __init__(self, unique_ids, values, rows=None):
        self.unique_ids, self.values, self.rows = unique_ids, values, rows

    def take(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        order = np.argsort(self.unique_ids, kind="stable")
        srt = self.unique_ids[order]
        pos = np.minimum(np.searchsorted(srt, ids), max(len(srt) - 1, 0))
        if ids.size and (not len(srt) or not np.array_equal(srt[pos], ids)):
            raise KeyError("take: some ids were not prefetched for this batch")
        return self.values[order[pos]]


def first_occurrence_unique(ids):
    """(unique ids in order of first occurrence -- tf.unique's order --, inverse) of a 1-D array."""
    u, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return u[order], rank[inverse]


class Prefetcher:
    """Iterate over batches while the NEXT batch's unique rows are pulled in a background thread.

        lookups = {"users": (users_var, lambda b: b["user"]), "items": (items_var, lambda b: b["item"])}
        for batch, rows in Prefetcher(batches, lookups):
            u = rows["users"].rows              # the batch's user rows, in batch order

    `variable` is anything with `.pull(ids)` (a sparseps.Variable). Each batch's ids are
    deduplicated (once per distinct ids array, so lookups sharing ids share the work), only the
    unique rows are pulled, and they are gathered back into batch order, all in the background
    thread. depth=1: rows for batch k+1 are pulled while batch k is being trained on (they miss
    step k's own update).
    """

    def __init__(self, batches, lookups: dict, depth: int = 1, gather: bool = True):
        self._batches = iter(batches)
        self._lookups = list(lookups.items())
        self._gather = gather
        self._out = queue.Queue()
        self._slots = threading.Semaphore(max(1, int(depth)))
        self._stop = threading.Event()
        self.pull_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="sparseps-prefetch", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for batch in self._batches:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                pulled, dedup = {}, {}
                for key, (variable, ids_fn) in self._lookups:
                    ids = ids_fn(batch)
                    if id(ids) not in dedup:
                        dedup[id(ids)] = (ids, self._dedupe(ids))      # ids kept alive: id() stays unique
                    uniq, inverse = dedup[id(ids)][1]
                    values = variable.pull(uniq)
                    pulled[key] = Rows(uniq, values, values[inverse.reshape(np.shape(ids))] if self._gather else None)
                self.pull_seconds += time.perf_counter() - t0
                self._out.put(("batch", batch, pulled))
            self._out.put(("end", None, None))
        except BaseException as e:    # noqa: BLE001 -- re-raised in the trainer's thread
            self._out.put(("error", e, None))

    def __iter__(self):
        return self

    def __next__(self):
        kind, batch, pulled = self._out.get()
        if kind == "end":
            self._out.put((kind, batch, pulled))
            raise StopIteration
        if kind == "error":
            raise batch
        out = self._deliver(batch, pulled)
        self._slots.release()       # start pulling the next batch while this one trains
        return out

    def _deliver(self, batch, pulled):
        return batch, pulled

    @staticmethod
    def _dedupe(ids):
        """(unique ids, inverse) of a batch's ids (sorted; np.unique)."""
        return np.unique(np.asarray(ids, np.int64).reshape(-1), return_inverse=True)

    def close(self):
        self._stop.set()
        self._slots.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
