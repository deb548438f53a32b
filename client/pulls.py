"""Reading rows: pull requests split by shard and by the message limit, answers put back in the caller's order."""
import grpc
import numpy as np

from . import errors
from .proto import sparseps_pb2 as pb
from .routing import holders, split
from .tensors import from_tensor


def rows_of(t) -> np.ndarray:
    """A response tensor's rows: already an array on the data plane, protobuf bytes on gRPC."""
    return t if isinstance(t, np.ndarray) else from_tensor(t)


def int_ids(ids, what: str) -> np.ndarray:
    """Caller's ids as a flat int64 array (InvalidArgument for anything but integers)."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise errors.InvalidArgument(f"{what}: ids must be integers, got {ids.dtype}")
    return ids.astype(np.int64, copy=False).reshape(-1)


class Pulls:
    def __init__(self, shards, placements):
        self._shards, self._placements = shards, placements

    def read(self, name: str, ids, slot: str, min_iterations: int, timeout: float, worker_id: str,
             seen: set | None = None) -> np.ndarray:
        """Rows `ids` of a variable or of one of its slots (every row when ids is None); `seen`
        collects the iterations each answering shard was at."""
        layout, dtype, shape, _ = self._placements.get(name)
        retry = (grpc.StatusCode.UNAVAILABLE,) if (min_iterations or worker_id) else True
        method = "GetSlot" if slot else "Pull"
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        # a range pull returns ids too (8 bytes a row); keep 64 KiB for the message framing
        per_request = max(1, (self._shards.max_message - 65536) // (row_bytes + 8))
        if ids is None and layout.strategy == "hash":
            raise errors.InvalidArgument(f"pull of {name!r}: a dynamic variable has no row count to pull whole; "
                                         "pull keys, or export() its live rows with their keys")
        if ids is None:
            out = np.empty(shape, dtype)
            for k in holders(layout):
                count = layout.local_count(k)
                gids = layout.global_ids(k)
                for lo in range(0, count, per_request):
                    hi = min(count, lo + per_request)
                    attach = None if slot else self._shards.attach()
                    req = self.request(slot, name, None, min_iterations, timeout, worker_id)
                    req.row_start, req.row_stop = int(gids[lo]), int(gids[hi - 1]) + 1
                    resp = self._shards.each(method, {k: req}, retry, attach)[k]
                    if seen is not None:
                        seen.add(resp.iterations)
                    out[rows_of(resp.ids)] = rows_of(resp.values)
            return out
        ids = int_ids(ids, f"pull of {name!r}")
        out = np.empty((len(ids),) + shape[1:], dtype)
        for lo in range(0, max(len(ids), 1), per_request):
            sel = slice(lo, lo + per_request)
            attach = None if slot else self._shards.attach()
            masks = split(layout, ids[sel]) if len(ids) else {}
            requests = {k: self.request(slot, name, ids[sel][mask], min_iterations, timeout, worker_id, k, attach)
                        for k, mask in masks.items()}
            if not requests:
                break
            for k, resp in self._shards.each(method, requests, retry, attach).items():
                if len(requests) == 1 and isinstance(resp.values, np.ndarray) and resp.values.shape == out.shape:
                    out = resp.values   # the data plane received these rows into a fresh array: no copy
                elif len(requests) == 1:
                    out[sel] = rows_of(resp.values)
                else:
                    out[sel][masks[k]] = rows_of(resp.values)
                if seen is not None:
                    seen.add(resp.iterations)
        return out

    def export(self, name: str, slot: str = "", since_step: int = 0, attempts: int = 20) -> tuple:
        """(keys, rows) of every live row of a dynamic variable (or of a slot), those updated after
        optimizer step `since_step` when it is > 0. Each shard is read in chunks of positions and
        read again if its rows moved meanwhile (an eviction: its table_version changed), so every
        row that stayed live is exported exactly once. A slot's rows since a step are those of the
        keys whose rows were updated after it."""
        layout, dtype, shape, _ = self._placements.get(name)
        if layout.strategy != "hash":
            raise errors.InvalidArgument(f"export of {name!r}: export is for dynamic variables; pull() a fixed table")
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
        per_request = max(1, (self._shards.max_message - 65536) // (row_bytes + 8))
        method = "GetSlot" if slot else "Pull"
        keys, rows = [], []
        for k in range(layout.n):
            for _ in range(attempts):
                before = self._shards.read(k, "DescribeVariable", pb.DescribeVariableRequest(name=name))
                part_keys, part_rows = [], []
                for lo in range(0, before.local_rows, per_request):
                    req = self.request(slot, name, None, 0, 0.0)
                    req.row_start, req.row_stop = lo, min(before.local_rows, lo + per_request)
                    if since_step and not slot:
                        req.since_step = since_step
                    resp = self._shards.each(method, {k: req}, True, None if slot else self._shards.attach())[k]
                    part_keys.append(rows_of(resp.ids))
                    part_rows.append(rows_of(resp.values))
                after = self._shards.read(k, "DescribeVariable", pb.DescribeVariableRequest(name=name))
                if after.table_version == before.table_version:
                    keys += part_keys
                    rows += part_rows
                    break
            else:
                raise errors.Aborted(f"export of {name!r}: shard {k}'s rows kept moving (evictions) during "
                                     f"{attempts} attempts; try again")
        if not keys:
            return np.zeros(0, np.int64), np.zeros((0,) + shape[1:], dtype)
        keys, rows = np.concatenate(keys).astype(np.int64, copy=False), np.concatenate(rows)
        if since_step and slot:   # slot reads carry no since_step: the keys updated since
            changed = self.export(name, "", since_step, attempts)[0]
            keep = np.isin(keys, changed)
            keys, rows = keys[keep], rows[keep]
        return keys, rows

    def request(self, slot, name, ids, min_iterations, timeout, worker_id="", k=0, attach=None):
        if slot:
            req = pb.GetSlotRequest(variable=name, slot=slot)
        else:
            req = pb.PullRequest(variable=name, min_iterations=min_iterations, timeout_seconds=timeout,
                                 worker_id=worker_id)
        if ids is not None:
            self._shards.put(k, ids, req.ids, attach)
        return req

    def add_to(self, calls: dict, pulls: dict, attach) -> tuple:
        """PushPull: add {variable: ids} to each shard's PushPullRequest in `calls`; returns
        (where: [(variable, shard, positions in the caller's ids)], {variable: empty output})."""
        where, outs = [], {}
        for name, ids in pulls.items():
            layout, dtype, shape, _ = self._placements.get(name)
            ids = int_ids(ids, f"push_pull of {name!r}")
            outs[name] = np.empty((len(ids),) + shape[1:], dtype)
            for k, sel in split(layout, ids).items():
                q = calls[k].pulls.add(variable=name)
                self._shards.put(k, ids[sel], q.ids, attach)
                where.append((name, k, sel))
        return where, outs

    @staticmethod
    def gather(responses: dict, where: list, outs: dict) -> dict:
        """PushPull: each shard's pulled rows into the outputs add_to made."""
        cursor = {k: 0 for k in responses}
        for name, k, sel in where:
            values = responses[k].pulls[cursor[k]].values
            if isinstance(sel, slice) and isinstance(values, np.ndarray) and values.shape == outs[name].shape:
                outs[name] = values   # the data plane received these rows into a fresh array: no copy
            else:
                outs[name][sel] = rows_of(values)
            cursor[k] += 1
        return outs
