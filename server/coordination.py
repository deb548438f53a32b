"""Membership, leadership and epochs of replicated shards, kept in etcd.

Why etcd: leadership must survive any one process, and a lease that expires when its holder stops
renewing it (crash, SIGSTOP, partition) is what lets a follower take over without asking the old
leader. Why etcd's JSON gateway through etcd3gw: it needs no protobuf of its own (the grpc-based
etcd clients pin protobuf < 4), and the same code works with etcd 3.4 and 3.5.

Keys of shard I of cluster NAME (values JSON):

    /sparseps/NAME/I/leader            the leader (id, address, pid); under the leader's lease. Its
                                       create revision is the shard's epoch: etcd revisions only
                                       grow, so a later leader always has a higher epoch.
    /sparseps/NAME/I/isr               {"epoch", "leader", "members"}: the in-sync replicas. Only a
                                       member may become leader; the leader writes it only while
                                       its own leader key stands (a transaction), before it acks
                                       anything that relies on a smaller set.
    /sparseps/NAME/I/replicas/ID       each replica's role, address, pid, lsn and lag (`sparseps
                                       status`); under that replica's lease.
    /sparseps/NAME/I/candidates/ID     a leaderless shard's candidates and their log ends: the
                                       most complete one campaigns first, so the others rarely
                                       have a tail to truncate.

This module is imported only when a server or client is given an etcd:// address.
"""
import base64
import json
import logging
import threading
import time

log = logging.getLogger("sparseps.server")

PREFIX = "/sparseps"


def parse_url(url: str) -> tuple:
    """'etcd://HOST:PORT[/NAME]' -> (host, port, name or '')."""
    if not url.startswith("etcd://"):
        raise ValueError(f"a coordinator address looks like etcd://HOST:PORT[/NAME], got {url!r}")
    rest = url[len("etcd://"):]
    hostport, _, name = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"a coordinator address looks like etcd://HOST:PORT[/NAME], got {url!r}")
    return host.strip("[]"), int(port), name.strip("/")


def shard_prefix(cluster: str, shard: int) -> str:
    return f"{PREFIX}/{cluster}/{shard}/"


def _b64(s) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s) -> bytes:
    return base64.b64decode(s) if s else b""


class Etcd:
    """The few etcd operations replication needs (range, put, txn, leases) over the JSON gateway."""

    def __init__(self, host: str, port: int, timeout: float = 2.0):
        try:
            import etcd3gw   # here: `import sparseps` never pays for it
        except ImportError:
            raise ImportError("etcd:// addresses need the etcd3gw package: pip install 'sparseps[replication]'") \
                from None
        self.client = etcd3gw.Etcd3Client(host=host, port=port, timeout=timeout)
        self.endpoint = f"{host}:{port}"

    def _post(self, path: str, body: dict) -> dict:
        return self.client.post(self.client.get_url(path), json=body)

    def get(self, key: str) -> tuple:
        """(value as dict or None, create revision, mod revision); revisions are 0 for no key."""
        kvs = self._post("/kv/range", {"key": _b64(key)}).get("kvs") or []
        if not kvs:
            return None, 0, 0
        kv = kvs[0]
        return json.loads(_unb64(kv.get("value"))), int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0))

    def get_prefix(self, prefix: str) -> list:
        """[(key, value dict, create revision)] of every key under prefix, by key."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(end)}).get("kvs") or []
        return [(_unb64(kv["key"]).decode(), json.loads(_unb64(kv.get("value"))), int(kv.get("create_revision", 0)))
                for kv in kvs]

    def put(self, key: str, value: dict, lease: int = 0):
        body = {"key": _b64(key), "value": _b64(json.dumps(value))}
        if lease:
            body["lease"] = str(lease)
        self._post("/kv/put", body)

    def delete(self, key: str):
        self._post("/kv/deleterange", {"key": _b64(key)})

    def txn(self, compare: list, success: list) -> tuple:
        """(succeeded, revision after): compare items are (key, target, value), target one of
        CREATE / MOD (revisions); success items are (key, value dict, lease)."""
        cmp = [{"key": _b64(k), "result": "EQUAL", "target": t, ("create_revision" if t == "CREATE" else "mod_revision"):
                str(v)} for k, t, v in compare]
        ops = [{"request_put": dict({"key": _b64(k), "value": _b64(json.dumps(v))}, **({"lease": str(le)} if le else {}))}
               for k, v, le in success]
        r = self._post("/kv/txn", {"compare": cmp, "success": ops})
        return bool(r.get("succeeded")), int(r.get("header", {}).get("revision", 0))

    def grant(self, ttl: int) -> int:
        return int(self._post("/lease/grant", {"TTL": str(ttl)})["ID"])

    def refresh(self, lease: int) -> int:
        """The lease's TTL after renewing it; <= 0 if it has expired."""
        r = self._post("/lease/keepalive", {"ID": str(lease)})
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int):
        self._post("/kv/lease/revoke", {"ID": str(lease)})


class Coordinator:
    """One replica's seat in etcd: its lease (renewed here), the shard's leader key, the in-sync set.

    `valid_until` is when the lease may have expired at the earliest, judged from the moment each
    renewal was *sent*: a leader acknowledges nothing after it (fencing that needs no other
    replica, for --min-insync-replicas 1, and closes the window before a stopped process notices).
    """

    def __init__(self, url: str, cluster: str, shard: int, replica_id: str, ttl: int = 2, on_lost=None):
        host, port, _ = parse_url(url)
        self.url, self.cluster, self.shard, self.id, self.ttl = url, cluster, shard, replica_id, ttl
        self.prefix = shard_prefix(cluster, shard)
        self.etcd = Etcd(host, port)
        self._renewer = Etcd(host, port)   # its own HTTP session: renewals never queue behind a slow call
        sent = time.monotonic()
        self.lease = self.etcd.grant(ttl)
        self.valid_until = sent + ttl
        self.on_lost = on_lost
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keepalive, name="etcd-lease", daemon=True)
        self._thread.start()

    def _keepalive(self):
        """Renew the lease every ttl/4. etcd unreachable: keep trying (holds_lease() turns false
        once ttl has passed, so a leader stops acknowledging); only etcd saying the lease is gone
        ends this replica's seat."""
        while not self._stop.wait(self.ttl / 4):
            sent = time.monotonic()
            try:
                ttl = self._renewer.refresh(self.lease)
            except Exception as e:
                log.warning("cannot renew the etcd lease (%s)", e)
                continue
            if ttl <= 0:
                self.lost = True
                log.error("etcd lease %x expired: this replica no longer holds its seat", self.lease)
                if self.on_lost is not None:
                    self.on_lost()
                return
            self.valid_until = sent + self.ttl

    def holds_lease(self) -> bool:
        return not self.lost and time.monotonic() < self.valid_until

    # ------------------------------------------------------------------ keys
    def leader(self) -> dict | None:
        """The shard's leader key, with "epoch" (its create revision), or None."""
        value, created, _ = self.etcd.get(self.prefix + "leader")
        return dict(value, epoch=created) if value is not None else None

    def isr(self) -> tuple:
        """(the in-sync record or None, its mod revision)."""
        value, _, mod = self.etcd.get(self.prefix + "isr")
        return value, mod

    def campaign(self, info: dict, isr_revision: int) -> int:
        """Become leader if there is none and the in-sync set is still the one read (at
        isr_revision): the epoch won, or 0."""
        ok, rev = self.etcd.txn([(self.prefix + "leader", "CREATE", 0), (self.prefix + "isr", "MOD", isr_revision)],
                                [(self.prefix + "leader", info, self.lease)])
        return rev if ok else 0

    def set_isr(self, epoch: int, members: list) -> bool:
        """Write the in-sync set, only while this replica's leadership of `epoch` stands."""
        ok, _ = self.etcd.txn([(self.prefix + "leader", "CREATE", epoch)],
                              [(self.prefix + "isr", {"epoch": epoch, "leader": self.id, "members": sorted(members)}, 0)])
        return ok

    def publish(self, info: dict):
        """This replica's line of `sparseps status`."""
        self.etcd.put(self.prefix + "replicas/" + self.id, info, self.lease)

    def propose(self, lsn: int):
        self.etcd.put(self.prefix + "candidates/" + self.id, {"id": self.id, "lsn": lsn}, self.lease)

    def candidates(self) -> list:
        return [v for _, v, _ in self.etcd.get_prefix(self.prefix + "candidates/")]

    def withdraw(self):
        self.etcd.delete(self.prefix + "candidates/" + self.id)

    def close(self, revoke: bool = True):
        self._stop.set()
        if revoke:
            try:
                self.etcd.revoke(self.lease)   # leadership and membership end now, not in ttl seconds
            except Exception:
                pass


def cluster_view(url: str, cluster: str | None = None) -> dict:
    """{shard: {"leader": dict or None, "isr": dict or None, "replicas": [dict]}} of a cluster
    (clients and `sparseps status`)."""
    host, port, name = parse_url(url)
    name = cluster or name
    if not name:
        raise ValueError(f"{url!r} names no cluster: etcd://HOST:PORT/NAME")
    etcd = Etcd(host, port)
    view: dict = {}
    base = f"{PREFIX}/{name}/"
    for key, value, created in etcd.get_prefix(base):
        shard, _, rest = key[len(base):].partition("/")
        if not shard.isdigit():
            continue
        s = view.setdefault(int(shard), {"leader": None, "isr": None, "replicas": []})
        if rest == "leader":
            s["leader"] = dict(value, epoch=created)
        elif rest == "isr":
            s["isr"] = value
        elif rest.startswith("replicas/"):
            s["replicas"].append(value)
    return view
