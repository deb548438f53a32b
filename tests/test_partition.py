"""A real network partition between a shard's replicas (docs/replication.md, failure cases).

The test makes its own network: a Linux network namespace joined to this one by a veth pair
(10.213.X.1 on this side, 10.213.X.2 inside). etcd and two replicas listen on 10.213.X.1; the
first replica runs inside the namespace (`ip netns exec`) on 10.213.X.2 and leads. While 4 workers
push (each -1 to its own row with SGD(learning_rate=1), so a row's value is its pushes applied),
the namespace's end of the veth goes down: the leader can reach neither etcd nor its followers,
and nobody can reach it. A follower leads at a higher epoch, the workers go on through it, the
isolated leader acknowledges nothing once its lease may have expired; when the link comes back it
rejoins as a follower of the new epoch, and nothing acknowledged is lost or applied twice.

Needs root (namespaces, veth): CI runs the suite as root; without them the test fails and says so.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_replication import Shard, Workers, wait_equal

import sparseps
from sparseps.local import LocalEtcd

IP = shutil.which("ip") or "/usr/sbin/ip"
ROWS = 5      # rows 0-3: the workers'; row 4: the probe's, pushed only to the isolated leader


class Net:
    """A network namespace joined to this one by a veth pair: `outer` (10.213.X.1) on this side,
    `inner` (10.213.X.2) inside. cut() takes the namespace's end down (both directions: nothing
    crosses a veth whose peer is down), heal() brings it back; close() deletes the namespace, which
    deletes the veth pair with it."""

    def __init__(self):
        tag = str(os.getpid())[-6:]
        self.ns, self.outer_if, self.inner_if = f"sppart{tag}", f"spp{tag}h", f"spp{tag}n"
        try:
            used = self._ip("-4", "-o", "addr", "show")
            x = next(x for x in [(os.getpid() + i) % 250 + 1 for i in range(250)] if f" 10.213.{x}." not in used)
            self.outer, self.inner = f"10.213.{x}.1", f"10.213.{x}.2"
            self._ip("netns", "add", self.ns)
            self._ip("link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if, "netns", self.ns)
            self._ip("addr", "add", f"{self.outer}/24", "dev", self.outer_if)
            self._ip("link", "set", self.outer_if, "up")
            self._ip("addr", "add", f"{self.inner}/24", "dev", self.inner_if, ns=True)
            self._ip("link", "set", self.inner_if, "up", ns=True)
            self._ip("link", "set", "lo", "up", ns=True)
        except (OSError, subprocess.SubprocessError) as e:
            self.close()
            pytest.fail(f"this test needs to create a network namespace and a veth pair (root, `ip netns add`, "
                        f"`ip link add ... type veth`): {e} {getattr(e, 'stderr', '') or ''}", pytrace=False)
        self.prefix = (IP, "netns", "exec", self.ns)

    def _ip(self, *args, ns=False) -> str:
        cmd = [IP, "netns", "exec", self.ns, IP, *args] if ns else [IP, *args]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout

    def cut(self):
        self._ip("link", "set", self.inner_if, "down", ns=True)

    def heal(self):
        self._ip("link", "set", self.inner_if, "up", ns=True)
        # Addresses that went unanswered during the cut are FAILED in the neighbour tables: forget them.
        self._ip("neigh", "flush", "dev", self.inner_if, ns=True)
        self._ip("neigh", "flush", "dev", self.outer_if)

    def python(self, code: str, *args, timeout: float = 120.0) -> dict:
        """Run a Python snippet inside the namespace; its last line of output, as JSON."""
        r = subprocess.run([*self.prefix, sys.executable, "-c", code, *args], capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, f"the snippet inside {self.ns} failed: {r.stdout}{r.stderr}"
        return json.loads(r.stdout.strip().splitlines()[-1])

    def close(self):
        for cmd in ([IP, "netns", "del", self.ns], [IP, "link", "del", self.outer_if]):
            try:
                subprocess.run(cmd, capture_output=True, timeout=30)
            except (OSError, subprocess.SubprocessError):
                pass


class NetShard(Shard):
    """A Shard whose replica r0 runs inside the namespace on `inner`, the others here on `outer`
    (each binds and advertises that address). Replicas are started by the caller, in its order."""

    def __init__(self, etcd, cluster, net, **kw):
        self.net = net
        super().__init__(etcd, cluster, replicas=0, **kw)

    def start(self, name, *args):
        if name == "r0":
            return super().start(name, *args, host=self.net.inner, prefix=self.net.prefix)
        return super().start(name, *args, host=self.net.outer)


# Inside the namespace: a client of the isolated leader alone. Its state before, a push (which must
# be refused), its state a second later.
PROBE = r"""
import json, sys, time
import numpy as np
import sparseps
out = {}
with sparseps.connect(sys.argv[1], data_plane=False, timeout=10, retry_deadline=0) as c:
    out["before"] = c.pull("counts", np.arange(int(sys.argv[2]))).ravel().tolist()
    try:
        c.push({"counts": (np.array([int(sys.argv[2]) - 1]), -np.ones((1, 1), np.float32))})
        out["push"] = "acknowledged"
    except sparseps.Error as e:
        out["push"], out["error"] = type(e).__name__, str(e)
    time.sleep(1.0)
    out["after"] = c.pull("counts", np.arange(int(sys.argv[2]))).ravel().tolist()
print(json.dumps(out))
"""


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
        return True
    except OSError:
        return False


def test_partition_isolating_the_leader():
    """The leader (inside the namespace) is cut off from etcd, its followers and its clients while
    4 workers push: a follower leads at a higher epoch within seconds and the workers' pushes are
    acknowledged by it; the isolated leader refuses a push (UNAVAILABLE: its lease may have expired)
    and its state does not move; healed, it rejoins as a follower of the new epoch, in the in-sync
    set, truncating any tail it logged that the new leader does not have. 0 acknowledged pushes
    lost, 0 applied twice, and all 3 replicas bit-identical."""
    net = Net()
    etcd = shard = workers = None
    try:
        etcd = LocalEtcd(host=net.outer)
        shard = NetShard(etcd, "part", net, k=2, extra=["--lease-seconds", "2"])
        r0 = shard.start("r0")
        first = shard.wait(lambda v: v["leader"] and v["leader"]["pid"] == r0.pid and v["leader"], timeout=60)
        assert first["address"] == r0.address, first
        r1, r2 = shard.start("r1"), shard.start("r2")
        shard.wait_in_sync(3, timeout=60)
        address = f"{etcd}/part"
        with sparseps.connect(address, retry_deadline=30) as c:
            c.create_optimizer("opt", "SGD", learning_rate=1.0)
            c.create_variable("counts", initial_value=np.zeros((ROWS, 1), np.float32), optimizer="opt")
        workers = Workers(address, ROWS - 1)
        time.sleep(1.5)
        before = shard.view()
        assert before["leader"]["pid"] == r0.pid, before
        old_epoch, old_id = before["leader"]["epoch"], before["leader"]["id"]
        assert all(workers.acked), f"the workers pushed nothing through the first leader: {workers.acked}"

        net.cut()
        cut = time.monotonic()
        assert not reachable(net.inner, r0.port), "the partition is not real: r0 is still reachable"
        new = shard.wait(lambda v: v["leader"] and v["leader"]["epoch"] > old_epoch and v["leader"], timeout=30)
        took = time.monotonic() - cut
        assert new["pid"] in (r1.pid, r2.pid) and new["id"] != old_id, new

        # The isolated leader, asked from inside its namespace: it still thinks it leads, but its
        # lease may have expired, so it acknowledges nothing and its state stays where it was.
        probe = net.python(PROBE, r0.address, str(ROWS))
        assert probe["push"] in ("Unavailable", "FailedPrecondition"), probe
        assert probe["before"] == probe["after"] and probe["after"][ROWS - 1] == 0.0, probe

        time.sleep(2.0)   # training goes on at the new leader while the old one is cut off
        heal = time.monotonic()
        during = [sum(1 for t in ts if cut + took < t < heal) for ts in workers.acked_at]
        assert all(during), f"a worker got no acknowledgement from the new leader during the partition: {during}"
        net.heal()
        deadline = time.monotonic() + 10
        while not reachable(net.inner, r0.port):
            assert time.monotonic() < deadline, "r0 is still unreachable 10 s after the heal"

        def rejoined(v):
            me = [r for r in v["replicas"] if r["id"] == old_id]
            return (v["leader"] and v["leader"]["epoch"] == new["epoch"] and v["isr"] and old_id in v["isr"]["members"]
                    and len(v["isr"]["members"]) == 3 and me and me[0]["role"] == "follower"
                    and me[0]["epoch"] == new["epoch"] and me[0]["pid"] == r0.pid)
        shard.wait(rejoined, timeout=60)
        rejoin = time.monotonic() - heal
        time.sleep(1.0)
        w, workers = workers, None
        w.stop()
        assert r0.proc.poll() is None, "the old leader exited instead of rejoining"
        assert not w.errors, w.errors[:3]
        values = wait_equal([r0, r1, r2], "counts", np.arange(ROWS), timeout=30)[0][:, 0]
        assert values.tolist() == [float(a) for a in w.acked] + [0.0], (values, w.acked)
        log = open(r0.log_path, errors="replace").read()
        truncated = [ln for ln in log.splitlines() if "that the leader of epoch" in ln]
        print(f"failover {took:.1f} s, rejoin {rejoin:.1f} s, acked {w.acked}, old leader's tail truncated: "
              f"{truncated[-1].split('restarts: ')[-1] if truncated else 'none (it had no tail)'}")
        assert "restarts" in log, "the old leader did not rebuild to rejoin"
        assert took < 15, f"failover took {took:.1f} s"
    except BaseException:
        for name, s in (shard.servers.items() if shard is not None else ()):
            print(f"--- replica {name} at {s.address}, pid {s.pid}:\n{s.log()}")
        raise
    finally:
        if workers is not None:
            workers.stop()
        if shard is not None:
            shard.stop()
        if etcd is not None:
            etcd.stop()
        net.close()
