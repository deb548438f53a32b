"""Replicated shards for real: an etcd process started here, sparseps-server replicas on 127.0.0.1,
kill -9 and SIGSTOP, and SGD counts that make every applied push visible (docs/replication.md).

Each worker pushes -1 to a row of its own with SGD(learning_rate=1), so the row's value is the
number of that worker's pushes applied: it must equal the pushes acknowledged (none lost, none
applied twice) whatever happened to the leader meanwhile.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request

import grpc
import numpy as np
import pytest
from test_security import _key, _pem_cert, _pem_key

import sparseps
from sparseps.local import LocalEtcd, LocalServer, free_ports
from sparseps.server.coordination import cluster_view

@pytest.fixture(scope="module")
def etcd():
    """A real etcd (sparseps.local.LocalEtcd) shared by this module's tests (clusters differ by name)."""
    e = LocalEtcd()
    yield e
    e.stop()


class Shard:
    """The replicas of one shard of a cluster, each a sparseps-server process with its own data dir
    and a fixed port (a replica that re-executes itself comes back on it)."""

    def __init__(self, etcd, cluster, replicas=3, k=2, index=0, num_shards=1, extra=(), env=None):
        self.etcd, self.cluster, self.k, self.index, self.num_shards = str(etcd), cluster, k, index, num_shards
        self.root = tempfile.mkdtemp(prefix=f"repl-{cluster}-")
        self.extra, self.env = list(extra), env
        self.servers = {}
        for i in range(replicas):
            self.start(f"r{i}")

    def start(self, name, *args, **server):
        """Start replica `name` (server: more LocalServer options, e.g. host, prefix)."""
        port, metrics_port = free_ports(2)
        self.servers[name] = LocalServer(
            "--backend", "numba", "--coordinator", self.etcd, "--cluster", self.cluster, "--shard-index",
            str(self.index), "--num-shards", str(self.num_shards), "--data-dir", os.path.join(self.root, name),
            "--min-insync-replicas", str(self.k), "--metrics-port", str(metrics_port), *self.extra, *args, port=port,
            env=self.env, **server)
        self.servers[name].metrics_port = metrics_port
        return self.servers[name]

    def view(self):
        return cluster_view(f"{self.etcd}/{self.cluster}").get(self.index, {"leader": None, "isr": None, "replicas": []})

    def wait(self, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            v = self.view()
            got = what(v)
            if got:
                return got
            assert time.monotonic() < deadline, f"shard {self.index} of {self.cluster}: timed out; etcd has {v}"
            time.sleep(0.05)

    def wait_in_sync(self, n, timeout=30.0):
        return self.wait(lambda v: v["leader"] and v["isr"] and len(v["isr"]["members"]) == n
                         and v["isr"]["leader"] == v["leader"]["id"] and v["leader"], timeout)

    def by_pid(self, pid):
        return next(s for s in self.servers.values() if s.pid == pid)

    def leader(self):
        return self.by_pid(self.wait(lambda v: v["leader"])["pid"])

    def stop(self):
        for s in self.servers.values():
            if s.proc.poll() is None:
                os.kill(s.pid, signal.SIGCONT)
            s.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def direct(server, **kw):
    """A client of one replica (no etcd: it answers as that replica would)."""
    return sparseps.connect(server.address, data_plane=False, **kw)


def wait_equal(servers, name, rows, slots=(), timeout=20.0, **connect):
    """Every replica's variable (and slots) bit-identical to the first's; returns the values."""
    deadline = time.monotonic() + timeout
    while True:
        seen = []
        for s in servers:
            with direct(s, retry_deadline=5, **connect) as c:
                seen.append([c.pull(name, rows)] + [c.pull(name, rows, slot=sl) for sl in slots])
        if all(all(a.tobytes() == b.tobytes() for a, b in zip(seen[0], x)) for x in seen[1:]):
            return seen[0]
        assert time.monotonic() < deadline, f"replicas still differ: {[x[0].ravel()[:8] for x in seen]}"
        time.sleep(0.2)


class Workers:
    """n threads, each pushing -1 to its own row through an etcd:// client until stopped; counts
    the pushes acknowledged and those that raised (indeterminate)."""

    def __init__(self, address, n, variable="counts", timeout=5.0, retry_deadline=60.0):
        self.acked, self.failed = [0] * n, [0] * n
        self.errors = []
        self.acked_at = [[] for _ in range(n)]
        self._stop = threading.Event()
        self.clients = [sparseps.connect(address, timeout=timeout, retry_deadline=retry_deadline) for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(w, variable)) for w in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, w, variable):
        grad = -np.ones((1, 1), np.float32)
        while not self._stop.is_set():
            try:
                self.clients[w].push({variable: (np.array([w]), grad)})
                self.acked[w] += 1
                self.acked_at[w].append(time.monotonic())
            except sparseps.Error as e:
                self.failed[w] += 1
                self.errors.append(str(e))

    def stop(self):
        self._stop.set()
        for t in self.threads:
            t.join(120)
        for c in self.clients:
            c.close()


def counting_shard(etcd, cluster, rows, optimizer="SGD", before=lambda shard: None, **kw):
    """(a 3-replica shard in sync, its etcd:// address), with optimizer "opt" (learning rate 1)
    and a variable "counts" of `rows` zeros. before(shard): more replicas to start first."""
    shard = Shard(etcd, cluster, **kw)
    try:
        before(shard)
        shard.wait_in_sync(3)
        address = f"{etcd}/{cluster}"
        with sparseps.connect(address, retry_deadline=30) as c:
            c.create_optimizer("opt", optimizer, learning_rate=1.0)
            c.create_variable("counts", initial_value=np.zeros((rows, 1), np.float32), optimizer="opt")
        return shard, address
    except BaseException:
        shard.stop()
        raise


def pushing(etcd, cluster, workers=4, **kw):
    """(a counting shard, its address, `workers` Workers pushing to it)."""
    shard, address = counting_shard(etcd, cluster, workers, **kw)
    return shard, address, Workers(address, workers)


def test_kill9_leader_under_pushing_workers(etcd):
    """kill -9 of the leader while 4 workers push: a follower leads within seconds, training goes
    on through the same etcd:// clients, 0 acknowledged pushes lost, 0 applied twice, and the
    surviving replicas are bit-identical."""
    shard, address, workers = pushing(etcd, "kill9")
    reader = sparseps.connect(address, retry_deadline=20)   # knows the old leader; only reads after the kill
    try:
        time.sleep(1.5)
        old = shard.leader()
        old_id = shard.view()["leader"]["id"]
        killed = time.monotonic()
        old.kill()
        # reads (GetOptimizer, ListVariables) follow the failover like pulls and pushes do: a
        # trainer's first pull of a new optimizer after a failover used to raise UNAVAILABLE
        assert reader.optimizer("opt").iterations > 0 and "counts" in [v.name for v in reader.variables()]
        new = shard.wait(lambda v: v["leader"] and v["leader"]["id"] != old_id and v["leader"], timeout=20)
        took = time.monotonic() - killed
        time.sleep(2.0)   # training goes on under the new leader
        workers.stop()
        assert not workers.errors, workers.errors[:3]
        after = [sum(1 for t in ts if t > killed + took) for ts in workers.acked_at]
        assert all(after), f"a worker acknowledged nothing after the failover: {after}"
        survivors = [s for s in shard.servers.values() if s is not old]
        values = wait_equal(survivors, "counts", np.arange(4))[0][:, 0]
        assert values.tolist() == [float(a) for a in workers.acked], (values, workers.acked)
        assert took < 10, f"failover took {took:.1f} s"
        assert shard.by_pid(new["pid"]) in survivors
    finally:
        reader.close()
        shard.stop()


def test_acknowledged_pushes_survive_while_one_in_sync_replica_does(etcd):
    """The guarantee itself: a follower is paused (still in sync), pushes go on, then the leader
    and the other follower are killed -9. The paused follower, the last in-sync replica, leads:
    it has every acknowledged push (pushes waited for it), and the killed follower, restarted,
    truncates the tail it got that was never acknowledged and catches up."""
    shard, address, workers = pushing(etcd, "last", extra=["--replica-lag-max-ms", "4000"])
    try:
        time.sleep(1.0)
        view = shard.view()
        leader = shard.by_pid(view["leader"]["pid"])
        paused, other = [s for s in shard.servers.values() if s is not leader]
        os.kill(paused.pid, signal.SIGSTOP)
        time.sleep(1.0)            # the leader and `other` take records that `paused` does not have
        leader.kill()
        other.kill()
        os.kill(paused.pid, signal.SIGCONT)
        shard.wait(lambda v: v["leader"] and v["leader"]["pid"] == paused.pid, timeout=20)
        name = next(n for n, s in shard.servers.items() if s is other)
        shard.start(name)          # on its data dir: a divergent tail to truncate
        shard.wait_in_sync(2, timeout=30)
        time.sleep(1.0)
        workers.stop()
        assert not workers.errors, workers.errors[:3]
        live = [s for s in shard.servers.values() if s.proc.poll() is None]
        values = wait_equal(live, "counts", np.arange(4))[0][:, 0]
        assert values.tolist() == [float(a) for a in workers.acked], (values, workers.acked)
    finally:
        shard.stop()


def test_sigstopped_leader_is_fenced_after_sigcont(etcd):
    """SIGSTOP the leader past its lease: a follower takes over; after SIGCONT the old leader
    acknowledges nothing (a push that reached it while stopped is refused), rejoins as a follower
    and ends equal to the new leader. --min-insync-replicas 1: the lease check alone fences it."""
    shard, address = counting_shard(etcd, "stop", 2, k=1)
    try:
        with sparseps.connect(address, retry_deadline=30) as c:
            for _ in range(5):
                c.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
        old = shard.leader()
        old_id = shard.view()["leader"]["id"]
        stale = direct(old, timeout=30, retry_deadline=0)
        os.kill(old.pid, signal.SIGSTOP)
        shard.wait(lambda v: v["leader"] and v["leader"]["id"] != old_id, timeout=20)
        answer = {}

        def push_to_old():
            try:
                answer["ok"] = stale.push({"counts": (np.array([1]), -np.ones((1, 1), np.float32))})
            except sparseps.Error as e:
                answer["error"] = e

        t = threading.Thread(target=push_to_old)
        t.start()
        time.sleep(0.5)   # the push waits in the stopped process's socket
        os.kill(old.pid, signal.SIGCONT)
        t.join(60)
        assert "ok" not in answer, "a deposed leader acknowledged a push"
        assert isinstance(answer["error"], (sparseps.Unavailable, sparseps.FailedPrecondition)), answer
        stale.close()
        with sparseps.connect(address, retry_deadline=30) as c:   # training goes on at the new leader
            for _ in range(3):
                c.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
        shard.wait(lambda v: any(r["pid"] == old.pid and r["role"] == "follower" for r in v["replicas"]))
        values = wait_equal(list(shard.servers.values()), "counts", np.arange(2))[0][:, 0]
        assert values[0] == 8.0
        assert old.proc.poll() is None, "the old leader should have rejoined, not exited"
    finally:
        shard.stop()


def test_min_insync_refusal_and_catch_up_bit_identical(etcd):
    """K=2 of 3 with Adam (slots): kill -9 both followers and pushes are refused with UNAVAILABLE
    saying why; restart one on its data dir: it catches up from the log and pushes go on; after a
    checkpoint of the leader, a replica on an empty data dir catches up from the checkpoint
    (snapshot transfer) and the log after it; every replica's variable and slots are bit-identical
    to the leader's."""
    shard, address = counting_shard(etcd, "isr", 4, optimizer="Adam")
    try:
        c = sparseps.connect(address, retry_deadline=30)
        rng = np.random.default_rng(0)

        def push(n):
            for _ in range(n):
                ids = rng.choice(4, 2, replace=False)
                c.push({"counts": (ids, rng.standard_normal((2, 1)).astype(np.float32))})

        push(20)
        leader = shard.leader()
        followers = [s for s in shard.servers.values() if s is not leader]
        for f in followers:
            f.kill()
        shard.wait(lambda v: v["isr"] and len(v["isr"]["members"]) == 1, timeout=10)
        c.retry_deadline = 1.0
        with pytest.raises(sparseps.Unavailable, match="min-insync-replicas 2"):
            push(1)
        c.retry_deadline = 30.0
        name = next(n for n, s in shard.servers.items() if s is followers[0])
        shard.start(name)                           # the same data dir: log catch-up
        shard.wait_in_sync(2)
        push(20)
        c.checkpoint()                              # the leader's log now starts after the checkpoint:
        push(5)
        shard.start("fresh")                        # so a replica on an empty data dir gets the checkpoint
        shard.wait_in_sync(3)
        assert "installing its checkpoint" in shard.servers["fresh"].log()
        push(10)
        c.close()
        live = [s for s in shard.servers.values() if s.proc.poll() is None]
        assert len(live) == 3
        wait_equal(live, "counts", np.arange(4), slots=("m", "v"))
    finally:
        shard.stop()


def test_bad_replication_input_and_serving_replica(etcd):
    """Fetches with garbage, another cluster's name or a stale epoch are refused with a clear
    status; followers refuse writes with UNAVAILABLE, a serving replica with FAILED_PRECONDITION;
    the serving replica follows the log, answers pulls (read_from="serving") and `sparseps status`
    shows every replica with its role, epoch and pid."""
    shard, address = counting_shard(etcd, "bad", 2, before=lambda shard: shard.start("serving", "--role", "serving"))
    serving = shard.servers["serving"]
    try:
        with sparseps.connect(address, retry_deadline=30) as c:
            for _ in range(7):
                c.push({"counts": (np.array([1]), -np.ones((1, 1), np.float32))})
        view = shard.view()
        leader = shard.by_pid(view["leader"]["pid"])
        epoch = view["leader"]["epoch"]
        channel = grpc.insecure_channel(leader.address)
        fetch = channel.unary_unary("/sparseps.v1.Replication/Fetch")
        base = {"cluster": "bad", "shard": 0, "epoch": epoch, "id": "x", "lsn": 0}
        for body, code, words in [
                (b"\x00garbage\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a fetch request"),
                (json.dumps(dict(base, cluster="other")).encode(), grpc.StatusCode.FAILED_PRECONDITION, "cluster"),
                (json.dumps(dict(base, epoch=epoch - 1)).encode(), grpc.StatusCode.FAILED_PRECONDITION, "epoch"),
                (json.dumps(dict(base, lsn=10 ** 9)).encode(), grpc.StatusCode.FAILED_PRECONDITION, "ahead")]:
            with pytest.raises(grpc.RpcError) as e:
                fetch(body, timeout=5)
            assert e.value.code() == code and words in e.value.details(), e.value.details()
        channel.close()
        follower = next(s for s in shard.servers.values() if s not in (leader, serving))
        for srv, role in ((leader, "leader"), (follower, "follower"), (serving, "serving")):
            with direct(srv, retry_deadline=5) as d:   # GetServerInfo says what each replica is
                info = d.server_info[0]
                assert (info.role, info.epoch) == (role, epoch) and info.log_end >= 9, (role, info)
        for srv, err in ((follower, sparseps.Unavailable), (serving, sparseps.FailedPrecondition)):
            with direct(srv, retry_deadline=0) as d:
                with pytest.raises(err):
                    d.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
        with sparseps.connect(address, read_from="serving", retry_deadline=10) as r:
            assert r.addresses == [serving.address]
            deadline = time.monotonic() + 10
            while r.variable("counts").pull(np.arange(2))[:, 0].tolist() != [0.0, 7.0]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        wait_equal(list(shard.servers.values()), "counts", np.arange(2))   # nothing above changed anything
        out = subprocess.run([sys.executable, "-m", "sparseps.cli", "status", address], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("shard=0 ")]
        assert len(lines) == 4, out.stdout
        for role, srv in (("leader", leader), ("follower", follower), ("serving", serving)):
            assert any(f"role={role} epoch={epoch} pid={srv.pid} address={srv.address}" in ln for ln in lines), \
                out.stdout
        assert "optimizer opt" in out.stdout
        for srv, lines in ((leader, ['sparseps_replica_role{role="leader",shard="0"} 1.0',
                                     'sparseps_replica_in_sync{shard="0"} 3.0',
                                     f'sparseps_replica_epoch{{shard="0"}} {float(epoch)}',
                                     'sparseps_replication_ack_wait_seconds_count{shard="0"}']),
                           (serving, ['sparseps_replica_role{role="serving",shard="0"} 1.0',
                                      'sparseps_replica_lag_records{shard="0"} 0.0', 'sparseps_replica_lag_bytes{shard="0"} 0.0',
                                      'sparseps_replica_lag_seconds', 'sparseps_replica_failovers_total{shard="0"} 0.0'])):
            text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
            for line in lines:
                assert line in text, (line, [ln for ln in text.splitlines() if "replica" in ln])
        deploy = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
        used = set()
        for path in ("grafana/dashboards/sparseps.json", "prometheus/alerts.yml"):
            with open(os.path.join(deploy, path)) as f:
                used |= set(re.findall(r"\b(sparseps_replica(?:tion)?_[a-z_]+)", f.read()))
        exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M)) | set(re.findall(r"^(\w+)[{ ]", text, re.M))
        assert used and not used - exported, sorted(used - exported)   # the dashboard and alerts use real names
    finally:
        shard.stop()


def test_etcd_outage_leader_stops_acknowledging_then_resumes(etcd):
    """kill -9 etcd for longer than the lease: the leader cannot know whether it still leads, so
    it refuses pushes (UNAVAILABLE, before logging them) once its lease may have expired, rather than risk a second
    leader; etcd back on its data dir: the leases are still there and pushes go on; nothing
    acknowledged is lost."""
    shard, address = counting_shard(etcd, "outage", 1)
    try:
        acked = 0
        with sparseps.connect(address, retry_deadline=30) as c:
            for _ in range(10):
                c.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
                acked += 1
            leader = shard.leader()
            etcd.kill()
            try:
                time.sleep(3.0)   # past the 2 s lease
                with direct(leader, retry_deadline=0, timeout=10) as d:
                    with pytest.raises(sparseps.Unavailable, match="lease"):
                        d.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
            finally:
                etcd.start()
            for _ in range(10):
                c.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
                acked += 1
        values = wait_equal([s for s in shard.servers.values()], "counts", np.arange(1))[0][:, 0]
        assert values[0] == acked, (values, acked)   # the refused push was refused before it was logged
    finally:
        shard.stop()


def test_replication_needs_the_replica_role_under_tls_and_tokens(etcd, tmp_path):
    """Mutual TLS and tokens on: followers fetch over TLS with a token of the `replica` role
    (SPARSEPS_REPLICA_TOKEN), so K=2 pushes are acknowledged; a fetch without a token is
    UNAUTHENTICATED, with a `read` token PERMISSION_DENIED, and the replica token cannot push."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn, key, issuer=None, issuer_key=None, ca=False):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:   # a replica is a server to its followers and a client of its leader
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False).add_extension(x509.ExtendedKeyUsage(
                                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(issuer_key or key, hashes.SHA256())

    ca_key, key = _key(), _key()
    ca = cert("replication test CA", ca_key, ca=True)
    files = {"ca.pem": _pem_cert(ca), "peer.pem": _pem_cert(cert("replica", key, ca, ca_key)), "peer.key": _pem_key(key)}
    tokens = {"admin": "adm-" + os.urandom(8).hex(), "replica": "rep-" + os.urandom(8).hex(),
              "read": "rd-" + os.urandom(8).hex()}
    files["tokens"] = "".join(f"{t} {r}\n" for r, t in tokens.items()).encode()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        os.chmod(tmp_path / name, 0o600)
    tls = {"tls_ca": str(tmp_path / "ca.pem"), "tls_cert": str(tmp_path / "peer.pem"),
           "tls_key": str(tmp_path / "peer.key")}
    shard = Shard(etcd, "tls", replicas=2, k=2, env={"SPARSEPS_REPLICA_TOKEN": tokens["replica"]},
                  extra=["--tls-ca", tls["tls_ca"], "--tls-cert", tls["tls_cert"], "--tls-key", tls["tls_key"],
                         "--tokens-file", str(tmp_path / "tokens")])
    try:
        shard.wait_in_sync(2)
        with sparseps.connect(f"{etcd}/tls", token=tokens["admin"], retry_deadline=30, **tls) as c:
            c.create_optimizer("opt", "SGD", learning_rate=1.0)
            c.create_variable("counts", initial_value=np.zeros((1, 1), np.float32), optimizer="opt")
            for _ in range(5):
                c.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
        values = wait_equal(list(shard.servers.values()), "counts", np.arange(1), token=tokens["admin"], **tls)
        assert values[0][0, 0] == 5.0
        leader = shard.leader()
        view = shard.view()
        creds = grpc.ssl_channel_credentials(files["ca.pem"], files["peer.key"], files["peer.pem"])
        body = json.dumps({"cluster": "tls", "shard": 0, "epoch": view["leader"]["epoch"], "id": "x", "lsn": 0,
                           "handshake": True}).encode()
        with grpc.secure_channel(leader.address, creds) as channel:
            fetch = channel.unary_unary("/sparseps.v1.Replication/Fetch")
            for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                (tokens["read"], grpc.StatusCode.PERMISSION_DENIED)):
                with pytest.raises(grpc.RpcError) as e:
                    fetch(body, timeout=5, metadata=(("authorization", f"Bearer {token}"),) if token else None)
                assert e.value.code() == code, e.value.details()
            assert fetch(body, timeout=5, metadata=(("authorization", f"Bearer {tokens['replica']}"),))
        with direct(leader, token=tokens["replica"], retry_deadline=0, **tls) as d:
            with pytest.raises(sparseps.PermissionDenied):
                d.push({"counts": (np.array([0]), -np.ones((1, 1), np.float32))})
    finally:
        shard.stop()


def test_sync_mode_on_3_shards_x_3_replicas_survives_kills_a_pause_and_a_restart(etcd):
    """SYNC mode on 3 shards x 3 replicas (K=2): two workers push every step (each -1 to a row on
    each shard, summed) while, one after another, the leader of shard 0 (which coordinates the
    steps) is killed -9, the leader of shard 1 is SIGSTOPped past its lease and continued, and a
    follower of shard 2 is killed -9 and restarted on its data dir (the killed leader too). Steps go
    on throughout; every step is applied on all three shards or none, once: each row equals 2 x
    the steps applied, every step a worker saw acknowledged is among them, the paused leader has
    rejoined as a follower, and every replica of each shard is bit-identical."""
    shards = [Shard(etcd, "sync", replicas=3, k=2, index=i, num_shards=3) for i in range(3)]
    rows = np.arange(3)
    try:
        for s in shards:
            s.wait_in_sync(3, timeout=60)
        address = f"{etcd}/sync"
        with sparseps.connect(address, retry_deadline=30) as c:
            c.create_optimizer("opt", "SGD", learning_rate=1.0,
                               consistency={"mode": "sync", "replicas_to_aggregate": 2, "total_num_replicas": 2})
            c.create_variable("counts", initial_value=np.zeros((3, 1), np.float32), optimizer="opt")
        acked, errs, stop = [[], []], [], threading.Event()
        started, final, lock = [-1, -1], [None], threading.Lock()

        def work(w):
            # A step commits only with both workers' votes, so both stop after the same step: the
            # first to see `stop` fixes the last step as the highest either has started.
            with sparseps.connect(address, timeout=10, retry_deadline=60) as c:
                step = 0
                while step < 5000:
                    with lock:
                        if stop.is_set() and final[0] is None:
                            final[0] = max(started)
                        if final[0] is not None and step > final[0]:
                            return
                        started[w] = step
                    try:
                        acked[w].append((step, c.push({"counts": (rows, -np.ones((3, 1), np.float32))},
                                                      step=step, worker_id=f"w{w}")))
                    except sparseps.Error as e:
                        errs.append(f"w{w} step {step}: {e}")
                        return
                    step += 1

        def steps_go_on(n=3):
            seen = len(acked[0])
            deadline = time.monotonic() + 30
            while len(acked[0]) < seen + n:
                assert not errs and time.monotonic() < deadline, (errs[:3], len(acked[0]))
                time.sleep(0.05)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        steps_go_on()
        killed = shards[0].leader()                          # 1. the coordinating shard's leader, kill -9
        killed.kill()
        shards[0].wait(lambda v: v["leader"] and v["leader"]["pid"] != killed.pid, timeout=20)
        steps_go_on()
        paused = shards[1].leader()                          # 2. a leader paused past its lease
        os.kill(paused.pid, signal.SIGSTOP)
        shards[1].wait(lambda v: v["leader"] and v["leader"]["pid"] != paused.pid, timeout=20)
        os.kill(paused.pid, signal.SIGCONT)
        steps_go_on()
        lead2 = shards[2].view()["leader"]["pid"]            # 3. a follower, kill -9 and restart
        follower = next(n for n, s in shards[2].servers.items() if s.pid != lead2)
        shards[2].servers[follower].kill()
        steps_go_on()
        shards[2].start(follower)
        shards[0].start(next(n for n, s in shards[0].servers.items() if s is killed))
        for s in shards:
            s.wait_in_sync(3, timeout=60)
        steps_go_on()
        stop.set()
        for t in threads:
            t.join(120)
        assert not errs, errs[:3]
        done = [len(a) for a in acked]
        with sparseps.connect(address, retry_deadline=30) as c:
            values = c.pull("counts", rows)[:, 0]
            its = [c.optimizer("opt")._info(k).iterations for k in range(3)]
        assert len(set(its)) == 1 and values.tolist() == [2.0 * its[0]] * 3, (values, its, done)
        assert max(done) <= its[0] <= max(done) + 1 and min(done) > 10, (its, done)
        assert all(it == step + 1 for a in acked for step, it in a), acked
        assert any(r["pid"] == paused.pid and r["role"] == "follower" for r in shards[1].view()["replicas"])
        live = [[x for x in s.servers.values() if x.proc.poll() is None] for s in shards]
        assert [len(x) for x in live] == [3, 3, 3]
        # Replica j of every shard as one cluster: each answers pulls of its own shard's rows.
        deadline = time.monotonic() + 20
        while True:
            seen = []
            for j in range(3):
                with sparseps.connect(",".join(x[j].address for x in live), data_plane=False, retry_deadline=5) as c:
                    seen.append(c.pull("counts", rows).tobytes())
            if len(set(seen)) == 1:
                break
            assert time.monotonic() < deadline, "replicas still differ"
            time.sleep(0.2)
        assert np.frombuffer(seen[0], np.float32).tolist() == [2.0 * its[0]] * 3
    finally:
        for s in shards:
            s.stop()


def test_cluster_up_with_replicas_serves_stops_and_resumes(tmp_path):
    """`sparseps cluster up --shards 1 --replicas 2`: etcd and two replicas, an etcd:// address to
    train against; SIGTERM stops every process it started (each replica writes a final
    checkpoint) and exits 0; up again on the same data dirs: the state is back, applied once."""
    for first in (True, False):
        _cluster_up_push_and_stop(tmp_path, first)


def _cluster_up_push_and_stop(tmp_path, first):
    proc = subprocess.Popen([sys.executable, "-m", "sparseps.cli", "cluster", "up", "--shards", "1", "--replicas",
                             "2", "--backend", "numba", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                break
        assert lines and lines[-1].startswith("ready:"), "".join(lines)
        address = lines[-1].split(" at ")[1].strip()
        assert address.startswith("etcd://") and address.endswith("/local")
        pids = [int(ln.split(" pid ")[1].split()[0]) for ln in lines if " pid " in ln]
        assert len(pids) == 3, lines   # two replicas and etcd
        with sparseps.connect(address, retry_deadline=30) as c:
            if first:
                c.create_optimizer("opt", "SGD", learning_rate=1.0)
                c.create_variable("w", initial_value=np.zeros((2, 1), np.float32), optimizer="opt")
            assert c.pull("w").ravel().tolist() == [0.0, 0.0 if first else 1.0]   # restored, applied once
            c.push({"w": (np.array([1]), -np.ones((1, 1), np.float32))})
            assert c.pull("w").ravel().tolist() == [0.0, 1.0 if first else 2.0]
        replicas = [types.SimpleNamespace(address=ln.split(": ")[1].split()[0]) for ln in lines if " replica " in ln]
        assert wait_equal(replicas, "w", np.arange(2))[0].ravel().tolist() == [0.0, 1.0 if first else 2.0]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    finally:
        if proc.poll() is None:   # a failed check: SIGTERM still stops the processes it started
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def test_epoch_history_says_where_each_epoch_ended(tmp_path):
    """KIP-101's rule as EpochHistory keeps it: the end of an epoch in this log is the record
    before the next epoch's first; a new epoch drops an older leader's entries this log never
    reached; the history survives a reopen."""
    from sparseps.server.replication import EpochHistory
    path = str(tmp_path / "epochs.json")
    h = EpochHistory(path)
    assert h.epoch_at(10) == 0 and h.end_of(7, 10) == 10
    h.start(4, 1)
    h.adopt([(4, 1), (50, 150)])          # a follower at 120 takes its leader's history
    assert h.epoch_at(120) == 4 and h.epoch_at(160) == 50
    assert h.end_of(4, 120) == 149 and h.end_of(50, 120) == 120 and h.end_of(3, 120) == 0
    h.start(91, 121)                      # it leads from 121: epoch 50 never reached this log
    assert h.entries == [(4, 1), (91, 121)]
    assert EpochHistory(path).entries == [(4, 1), (91, 121)]
    assert EpochHistory(path).end_of(50, 300) == 120 and EpochHistory(path).epoch_at(300) == 91


def test_dynamic_tables_evictions_and_set_weights_replicate(etcd):
    """Everything that changes a shard is a record of the log: a dynamic table's new keys, an age
    eviction's removed keys, set_weights; every replica ends with the same live keys, rows and
    slots, bit for bit."""
    shard, address = counting_shard(etcd, "dyn", 2, optimizer="Adam")
    try:
        keys = np.array([10 ** 12 + 1, 7, -3, 99], np.int64)
        rng = np.random.default_rng(5)
        with sparseps.connect(address, retry_deadline=30) as c:
            c.create_variable("ids", dim=4, dynamic=True, optimizer="opt", eviction={"max_age_steps": 3})
            for step in range(10):
                k = keys if step < 2 else keys[:2]        # -3 and 99 age out
                c.push({"ids": (k, rng.standard_normal((len(k), 4)).astype(np.float32))})
            c.set_weights([("counts", "", None, np.full((2, 1), 5.0, np.float32))])
            assert c.evict("ids") == {"ids": 2}
            assert c.pull("counts").ravel().tolist() == [5.0, 5.0]
        live = list(shard.servers.values())
        wait_equal(live, "ids", keys, slots=("m", "v"))
        wait_equal(live, "counts", np.arange(2))
        for s in live:
            with direct(s, retry_deadline=5) as d:
                assert d.server_info[0].live_rows["ids"] == 2, s.address
    finally:
        shard.stop()
