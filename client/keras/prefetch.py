"""Pull the next batch's rows while this one trains: the Keras-aware Prefetcher (see sparseps.overlap)."""
import numpy as np

from ..overlap import Prefetcher as _BasePrefetcher
from ..overlap import first_occurrence_unique
from .variables import _remote_of


class Prefetcher(_BasePrefetcher):
    """Iterate over batches while the NEXT batch's unique rows are pulled in the background.

        lookups = {users: lambda b: b[0], items: lambda b: b[1]}     # layer -> the batch's ids for it
        for batch in spk.Prefetcher(batches, lookups):
            train_step(*batch)           # the layers find their rows already pulled

    Rows for batch k+1 are pulled while step k runs (depth=1), so they miss step k's own update
    (and any push still in flight): bounded staleness, as with any asynchronous parameter server.
    A lookup whose ids do not match the prefetched ones simply pulls.
    """

    def __init__(self, batches, lookups: dict, depth: int = 1):
        remotes = {}
        for layer, fn in lookups.items():
            r = _remote_of(layer)
            remotes[r.name] = (r, fn)
        self._remotes = {name: r for name, (r, _) in remotes.items()}
        super().__init__(batches, {name: (r.variable, fn) for name, (r, fn) in remotes.items()}, depth, gather=False)

    def _deliver(self, batch, pulled):
        for name, rows in pulled.items():
            self._remotes[name]._offer(rows.unique_ids, rows.values)
        return batch

    @staticmethod
    def _dedupe(ids):
        # the order tf.unique gives inside the layer, so that a lookup finds its rows without a search
        return first_occurrence_unique(np.asarray(ids, np.int64).reshape(-1))

