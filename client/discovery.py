"""Where a replicated cluster's shards are: their leaders (or serving replicas), read from etcd.

    client = sparseps.connect("etcd://127.0.0.1:2379/prod")                      # leaders
    reader = sparseps.connect("etcd://127.0.0.1:2379/prod", read_from="serving")  # serving replicas

The client asks again whenever a call fails as if its shard were gone (UNAVAILABLE, DEADLINE_EXCEEDED:
client/shards.py), so a failover costs the training loop a retry, not an error. Imported only for
an etcd:// address: `import sparseps` stays free of the etcd client.
"""
import time

from . import errors


class Discovery:
    def __init__(self, url: str, read_from: str = "leader"):
        from .server.coordination import parse_url
        if read_from not in ("leader", "serving"):
            raise ValueError(f"read_from must be 'leader' or 'serving', got {read_from!r}")
        host, port, self.cluster = parse_url(url)
        if not self.cluster:
            raise ValueError(f"{url!r} names no cluster: etcd://HOST:PORT/NAME")
        self.url, self.read_from = url, read_from

    def current(self) -> list:
        """[(address, data_port) or None] per shard, as etcd has them now."""
        from .server.coordination import cluster_view
        view = cluster_view(self.url)
        n = max((r.get("num_shards", 0) for s in view.values() for r in
                 ([s["leader"]] if s["leader"] else []) + s["replicas"]), default=0)
        out = []
        for k in range(n):
            s = view.get(k, {"leader": None, "replicas": []})
            if self.read_from == "leader":
                pick = s["leader"]
            else:
                pick = next((r for r in sorted(s["replicas"], key=lambda r: r.get("lag_records", 0))
                             if r.get("role") == "serving"), None)
            out.append((pick["address"], pick.get("data_port", 0)) if pick else None)
        return out

    def addresses(self, timeout: float) -> list:
        """Every shard's address, waiting up to `timeout` seconds for shards without one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = self.current()
            except Exception as e:   # etcd unreachable
                found, why = [], f"etcd at {self.url} unreachable ({e})"
            else:
                why = f"shards without a {self.read_from}: {[k for k, a in enumerate(found) if a is None] or 'all'}"
            if found and all(found):
                return [a for a, _ in found]
            if time.monotonic() > deadline:
                raise errors.Unavailable(f"cluster {self.cluster!r} at {self.url}: {why}")
            time.sleep(0.1)
