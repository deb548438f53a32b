"""Checkpoints of a shard: every variable, slot, optimizer config and counter, written atomically.

A checkpoint is a directory `ckpt-<number>` under `<data-dir>/checkpoints`: one .npy file per
array (this shard's rows, their global ids, each slot) and `manifest.json` (layout, optimizers,
iterations, the write-ahead-log position, exactly-once table, crc32 of every file). It is written
as `ckpt-<number>.tmp`, every file fsynced, then renamed: a crash leaves either the old set of
checkpoints or the new one, never a half-written checkpoint that looks complete.

A restore may come from a cluster with a different number of shards: pass the checkpoints of all
old shards and each new shard keeps the rows its new layout assigns to it. A dynamic variable
stores the keys of its live rows as `ids`, with each row's last update (step, second) and its
admission sketch; its keys are routed again by hash on load.
"""
import json
import os
import shutil
import threading
import time
import zlib

import numpy as np

from sparseps.errors import FailedPrecondition, InvalidArgument
from sparseps.partition import Layout, key_shard

from .wal import fsync_path

FORMAT = 1


def _crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


class _Writer:
    def __init__(self, f):
        self.write = f.write


def snapshot(shard) -> dict:
    """Host copies of the whole shard state; the caller holds shard.lock (a consistent cut)."""
    bk = shard.bk
    variables = []
    for var in shard.variables.values():
        if var.table is not None:
            t, pos = var.table, np.arange(var.table.live, dtype=np.int64)
            variables.append({
                "name": var.name, "shape": list(var.shape), "dtype": var.dtype.name, "optimizer": var.optimizer,
                "partition": "hash", "owner": 0, "initializer_json": var.initializer_json,
                "dynamic": True, "table_json": var.table_json, "stats": dict(t.stats),
                "ids": t.keys[:t.live].copy(), "value": bk.to_numpy(var.value, pos),
                "slots": {name: bk.to_numpy(arr, pos) for name, arr in var.slots.items()},
                "steps": t.step[:t.live].copy(), "when": t.when[:t.live].copy(),
                "sketch": t.sketch.copy() if t.sketch is not None else None})
            continue
        variables.append({
            "name": var.name, "shape": list(var.shape), "dtype": var.dtype.name, "optimizer": var.optimizer,
            "partition": var.layout.strategy, "owner": var.layout.owner, "initializer_json": var.initializer_json,
            "ids": var.layout.global_ids(shard.index), "value": bk.to_numpy(var.value),
            "slots": {name: bk.to_numpy(arr) for name, arr in var.slots.items()}})
    optimizers = [{"name": o.name, "config": o.config, "consistency": o.consistency, "iterations": o.iterations,
                   "variables": list(o.variables), "slot_order": [[list(e) for e in g] for g in o.slot_order],
                   "nonslot": dict(o.nonslot)} for o in shard.optimizers.values()]
    return {"shard_index": shard.index, "num_shards": shard.num_shards, "variables": variables,
            "optimizers": optimizers}


def write(snap: dict, directory: str, extra: dict) -> tuple:
    """Write a snapshot to `directory` atomically; returns (path, bytes)."""
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files, total = {}, 0

    def put(fname, array):
        nonlocal total
        path = os.path.join(tmp, fname)
        with open(path, "wb") as f:
            # Through a plain .write() (not ndarray.tofile) so a full disk raises ENOSPC, not a count.
            np.lib.format.write_array(_Writer(f), np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(path)
        total += size
        files[fname] = {"bytes": size, "crc32": _crc(path)}
        return fname

    manifest_vars = []
    for i, v in enumerate(snap["variables"]):
        entry = {k: v[k] for k in ("name", "shape", "dtype", "optimizer", "partition", "owner", "initializer_json")}
        entry["ids"] = put(f"v{i}.ids.npy", v["ids"])
        entry["value"] = put(f"v{i}.value.npy", v["value"])
        entry["slots"] = {s: put(f"v{i}.slot.{s}.npy", a) for s, a in v["slots"].items()}
        if v.get("dynamic"):
            entry.update(dynamic=True, table_json=v["table_json"], stats=v["stats"],
                         steps=put(f"v{i}.steps.npy", v["steps"]), when=put(f"v{i}.when.npy", v["when"]),
                         sketch=put(f"v{i}.sketch.npy", v["sketch"]) if v["sketch"] is not None else None)
        manifest_vars.append(entry)
    manifest = {"format": FORMAT, "created": time.time(), "shard_index": snap["shard_index"],
                "num_shards": snap["num_shards"], "variables": manifest_vars, "optimizers": snap["optimizers"],
                "extra": extra, "files": files}
    mpath = os.path.join(tmp, "manifest.json")
    with open(mpath, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    os.replace(tmp, directory)
    fsync_path(os.path.dirname(directory) or ".")
    return directory, total + os.path.getsize(os.path.join(directory, "manifest.json"))


def read_manifest(path: str, verify: bool = True) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.exists(mpath):
        raise InvalidArgument(f"{path} is not a sparseps checkpoint (no manifest.json)")
    with open(mpath) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise InvalidArgument(f"{path}: checkpoint format {manifest.get('format')} is not supported")
    if verify:
        for fname, info in manifest["files"].items():
            fpath = os.path.join(path, fname)
            if not os.path.exists(fpath) or os.path.getsize(fpath) != info["bytes"] or _crc(fpath) != info["crc32"]:
                raise InvalidArgument(f"{path}: {fname} is missing or corrupt (checksum mismatch)")
    return manifest


def restore(shard, paths: list) -> dict:
    """Load checkpoints (one per old shard) into an empty shard; returns this shard's `extra`."""
    if shard.variables or shard.optimizers:
        raise FailedPrecondition("restore needs an empty server")
    manifests = [(p, read_manifest(p)) for p in paths]
    first = manifests[0][1]
    for o in first["optimizers"]:
        state = shard.create_optimizer(o["name"], json.dumps(o["config"]), o["consistency"])
        state.iterations = max(m["optimizers"][i]["iterations"] for _, m in manifests
                               for i, oo in enumerate(m["optimizers"]) if oo["name"] == o["name"])
        state.nonslot.update(o["nonslot"])
        state.slot_order = [[tuple(e) for e in g] for g in o["slot_order"]]
        state.variables = []
    same = len(manifests) == 1 and first["shard_index"] == shard.index and first["num_shards"] == shard.num_shards
    for vi, v in enumerate(first["variables"]):
        if v.get("dynamic"):
            _restore_dynamic(shard, v, manifests, same)
            continue
        layout = Layout(v["shape"][0], shard.num_shards, v["partition"], v["owner"] % shard.num_shards)
        want = layout.global_ids(shard.index)
        local_shape = (len(want),) + tuple(v["shape"][1:])
        value = np.zeros(local_shape, v["dtype"])
        slots = {s: np.zeros(local_shape, v["dtype"]) for s in v["slots"]}
        found = np.zeros(len(want), bool)
        for p, m in manifests:
            mv = next((x for x in m["variables"] if x["name"] == v["name"]), None)
            if mv is None:
                raise InvalidArgument(f"{p}: variable {v['name']!r} is missing from this checkpoint")
            ids = np.load(os.path.join(p, mv["ids"]), mmap_mode="r")
            pos = np.searchsorted(want, ids)
            pos = np.clip(pos, 0, max(len(want) - 1, 0))
            hit = (want[pos] == ids) if len(want) else np.zeros(len(ids), bool)
            if not hit.any():
                continue
            value[pos[hit]] = np.load(os.path.join(p, mv["value"]), mmap_mode="r")[hit]
            for s in slots:
                slots[s][pos[hit]] = np.load(os.path.join(p, mv["slots"][s]), mmap_mode="r")[hit]
            found[pos[hit]] = True
        if not found.all():
            raise InvalidArgument(f"variable {v['name']!r}: {int((~found).sum())} rows of this shard are in none of "
                                  f"the checkpoints given ({len(paths)}); pass the checkpoints of every old shard")
        var = shard.create_variable(v["name"], v["shape"], v["dtype"], v["optimizer"], v["partition"],
                                    v["owner"] % shard.num_shards, v["initializer_json"], value)
        for s, arr in slots.items():
            var.slots[s] = shard.bk.from_numpy(arr, v["dtype"])
    return first.get("extra", {}) if same else {}


def _restore_dynamic(shard, v, manifests, same: bool):
    """A dynamic variable's rows whose keys route to this shard, from every old shard's checkpoint."""
    var = shard.create_variable(v["name"], v["shape"], v["dtype"], v["optimizer"], "hash", 0, v["initializer_json"],
                                None, True, v["table_json"])
    parts = {"ids": [], "value": [], "steps": [], "when": [], **{f"slot.{s}": [] for s in v["slots"]}}
    sketch = None
    for p, m in manifests:
        mv = next((x for x in m["variables"] if x["name"] == v["name"]), None)
        if mv is None or not mv.get("dynamic"):
            raise InvalidArgument(f"{p}: dynamic variable {v['name']!r} is missing from this checkpoint")
        keys = np.load(os.path.join(p, mv["ids"]))
        mine = key_shard(keys, shard.num_shards) == shard.index
        parts["ids"].append(keys[mine])
        for part, fname in [("value", mv["value"]), ("steps", mv["steps"]), ("when", mv["when"])] + \
                [(f"slot.{s}", mv["slots"][s]) for s in v["slots"]]:
            parts[part].append(np.load(os.path.join(p, fname), mmap_mode="r")[mine])
        if mv.get("sketch"):   # count-min sketches add up: a merged one still never under-counts
            sk = np.load(os.path.join(p, mv["sketch"])).astype(np.uint32)
            sketch = sk if sketch is None else sketch + sk
    joined = {k: np.concatenate(a) if a else None for k, a in parts.items()}
    shard.load_rows(var, joined["ids"], joined["value"], {s: joined[f"slot.{s}"] for s in v["slots"]},
                    joined["steps"], joined["when"],
                    np.minimum(sketch, 65535).astype(np.uint16) if sketch is not None else None,
                    v.get("stats") if same else None)


class Checkpoints:
    """The checkpoints of one shard under <data-dir>/checkpoints: save, list, prune, find latest."""

    def __init__(self, shard, data_dir: str, keep: int = 3, extra=lambda: {}, saved=lambda extra: None):
        self.shard, self.keep = shard, keep
        self.dir = os.path.join(data_dir, "checkpoints")
        os.makedirs(self.dir, exist_ok=True)
        self.extra, self.saved = extra, saved
        self.last_error = None
        # one save at a time: two would pick the same number and share its .tmp directory (the
        # periodic thread, a Checkpoint RPC and the final save on SIGTERM may overlap)
        self._saving = threading.Lock()

    def list(self) -> list:
        names = sorted(n for n in os.listdir(self.dir) if n.startswith("ckpt-") and not n.endswith(".tmp"))
        return [os.path.join(self.dir, n) for n in names]

    def latest(self):
        done = self.list()
        return done[-1] if done else None

    def save(self, path: str | None = None) -> tuple:
        """Snapshot under the shard lock (with the caller's `extra`), write, prune; (path, bytes, iterations)."""
        with self._saving:
            return self._save(path)

    def _save(self, path):
        with self.shard.lock:
            snap = snapshot(self.shard)
            extra = self.extra()
            iterations = {o["name"]: o["iterations"] for o in snap["optimizers"]}
        if path is None:
            existing = self.list()
            number = int(os.path.basename(existing[-1])[5:]) + 1 if existing else 1
            path = os.path.join(self.dir, f"ckpt-{number:08d}")
        try:
            result = write(snap, path, extra)
        except OSError as e:
            self.last_error = f"{path}: {e.strerror or e}"
            shutil.rmtree(path + ".tmp", ignore_errors=True)
            raise FailedPrecondition(f"checkpoint failed, the shard keeps serving: {self.last_error}") from None
        self.last_error = None
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.dir):
            for old in self.list()[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            self.saved(extra)
        return result[0], result[1], iterations
