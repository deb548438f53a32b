"""Which shard holds which rows, from the client's side: every id-to-shard decision is made here.

A variable's Placement (its Layout, dtype, shape and optimizer) is learned once from the servers.
`route` is the one rule that sends ids to shards; `split` groups a request's ids by shard with it
and `holders` names the shards that hold any row. A new layout kind (rows routed by a hash of
the key, say) plugs in as a Layout strategy that `route` understands; pulls, pushes, push_pull and
set_weights all go through these three.
"""
from typing import NamedTuple

import numpy as np

from . import errors
from .partition import Layout
from .proto import sparseps_pb2 as pb
from .tensors import DTYPE_NAMES

PARTITIONS = {"mod": pb.MOD, "div": pb.DIV, "whole": pb.WHOLE, "hash": pb.HASH}
PARTITION_NAMES = {v: k for k, v in PARTITIONS.items()}


class Placement(NamedTuple):
    """Where a variable's rows live and what they are."""
    layout: Layout
    dtype: np.dtype
    shape: tuple
    optimizer: str

    @property
    def dynamic(self) -> bool:
        """Rows keyed by any int64 (docs/dynamic.md), routed by a hash of the key."""
        return self.layout.strategy == "hash"


def route(layout: Layout, ids: np.ndarray) -> np.ndarray:
    """The shard of each id (int64 array, one per id)."""
    if layout.n == 1:
        return np.zeros(len(ids), np.int64)
    return layout.shard_of(ids)


def split(layout: Layout, ids: np.ndarray, every: bool = False) -> dict:
    """{shard: which of `ids` it holds}: the shards holding some of them, or with every=True every
    shard (empty selections included). A single holder of every id gets slice(None), no mask."""
    if layout.n == 1 or (layout.strategy == "whole" and not every):
        return {layout.owner if layout.strategy == "whole" else 0: slice(None)}
    owner = route(layout, ids)
    return {int(k): owner == k for k in (range(layout.n) if every else np.unique(owner))}


def holders(layout: Layout):
    """The shards that hold rows of the variable."""
    return [layout.owner] if layout.strategy == "whole" else range(layout.n)


class Placements:
    """Every variable's Placement, asked of the servers once and then kept."""

    def __init__(self, shards):
        self._shards = shards
        self.known: dict[str, Placement] = {}

    def get(self, name: str) -> Placement:
        if name not in self.known:
            self.describe(name)
        return self.known[name]

    def add(self, name: str, placement: Placement):
        self.known[name] = placement

    def describe(self, name: str) -> "pb.VariableInfo":
        """Ask every shard about a variable (NotFound if there is none); they must agree on its layout."""
        infos = self._shards.all("DescribeVariable", pb.DescribeVariableRequest(name=name))
        first = infos[0]
        for k, info in infos.items():
            if (list(info.shape), info.dtype, info.partition, info.owner_shard) != \
                    (list(first.shape), first.dtype, first.partition, first.owner_shard):
                raise errors.FailedPrecondition(f"shards 0 and {k} disagree on the layout of variable {name!r}")
        layout = Layout(first.shape[0], self._shards.n, PARTITION_NAMES.get(first.partition, "mod"),
                        first.owner_shard)
        self.known[name] = Placement(layout, np.dtype(DTYPE_NAMES[first.dtype]), tuple(first.shape), first.optimizer)
        return first
