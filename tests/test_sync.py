"""SYNC mode's two-phase commit and BOUNDED staleness, against live shards (docs/consistency.md)."""
import signal
import threading
import time

import numpy as np
import pytest

import sparseps
from sparseps.local import LocalServer, free_ports, start_cluster
from sparseps.proto import sparseps_pb2 as pb

from test_metrics import sample, scrape, value, wait_until

SGD = {"class_name": "SGD", "config": {"learning_rate": 1.0}}


def _addresses(cluster):
    return ",".join(s.address for s in cluster)


def _iterations(client, opt):
    return [client.optimizer(opt)._info(k).iterations for k in range(client.num_shards)]


def _sync(client, unique, n, total=None, average=False, rows=12):
    opt = f"{unique}_opt"
    client.create_optimizer(opt, SGD, consistency={"mode": "sync", "replicas_to_aggregate": n,
                                                   "total_num_replicas": total or n, "average": average})
    client.create_variable(f"{unique}_v", initial_value=np.zeros((rows, 2), np.float32), optimizer=opt)
    return opt, f"{unique}_v"


def _in_threads(fns):
    out, threads = {}, []

    def run(k, fn):
        try:
            out[k] = fn()
        except Exception as e:
            out[k] = e
    for k, fn in enumerate(fns):
        threads.append(threading.Thread(target=run, args=(k, fn)))
        threads[-1].start()
    for t in threads:
        t.join()
    return [out[k] for k in range(len(fns))]


def test_first_replicas_win_the_rest_are_stale(cluster3, client3, unique):
    opt, v = _sync(client3, unique, n=2, total=3)
    ones = np.ones((3, 2), np.float32)
    clients = [sparseps.connect(_addresses(cluster3)) for _ in range(3)]
    try:
        results = _in_threads([lambda c=c, r=r: c.push({v: (np.array([r, 4, 5 + 3 * r]), ones)}, step=0)
                               for r, c in enumerate(clients)])
        winners = [r for r, x in enumerate(results) if x == 1]
        losers = [r for r, x in enumerate(results) if isinstance(x, sparseps.StaleGradient)]
        assert len(winners) == 2 and len(losers) == 1, results
        assert results[losers[0]].iterations == {opt: 1}
        expected = np.zeros((12, 2), np.float32)
        for r in winners:
            expected[[r, 4, 5 + 3 * r]] -= 1            # sum (average=False); row 4 from both
        np.testing.assert_array_equal(client3.pull(v, min_iterations=1), expected)
        assert _iterations(client3, opt) == [1, 1, 1]
        # a late push for step 0 is dropped and said so; a push ahead of the optimizer is refused
        with pytest.raises(sparseps.StaleGradient, match="step 0"):
            clients[0].push({v: (np.array([0]), np.ones((1, 2), np.float32))}, step=0)
        with pytest.raises(sparseps.FailedPrecondition, match="is at step 1"):
            clients[0].push({v: (np.array([0]), np.ones((1, 2), np.float32))}, step=7)
        np.testing.assert_array_equal(client3.pull(v), expected)
        # sync pushes may not mix optimizers
        client3.create_optimizer(f"{unique}_other", SGD)
        client3.create_variable(f"{unique}_w", initial_value=np.zeros((3, 2), np.float32), optimizer=f"{unique}_other")
        with pytest.raises(sparseps.InvalidArgument, match="sync mode"):
            clients[0].push({v: (np.array([0]), np.ones((1, 2), np.float32)),
                             f"{unique}_w": (np.array([0]), np.ones((1, 2), np.float32))}, step=1)
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0])
def test_a_vote_with_a_bad_timeout_is_refused(cluster3, client3, unique, timeout):
    """The replica is prepared on every shard, so the vote would wait for the second one: an infinite
    wait overflowed threading's timeout (INTERNAL) before the check; now each is INVALID_ARGUMENT."""
    import grpc
    from sparseps.tensors import to_tensor
    opt, v = _sync(client3, unique, n=2)
    for k, stub in enumerate(client3._stubs):   # phase 1 by hand: row k lives on shard k (mod 3)
        prepared = stub.Push(pb.PushRequest(client_id="hand", sequence=1, step=0, gradients=[pb.Gradient(
            variable=v, ids=to_tensor(np.array([k])), values=to_tensor(np.ones((1, 2), np.float32)))]), timeout=10)
        assert prepared.prepared
    stub = client3._stubs[0]
    vote = pb.SyncVoteRequest(optimizer=opt, step=0, timeout_seconds=timeout,
                              replica=pb.ReplicaRef(client_id="hand", sequence=1))
    with pytest.raises(grpc.RpcError) as e:
        stub.SyncVote(vote, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout_seconds" in e.value.details()
    assert _iterations(client3, opt) == [0, 0, 0]


def test_a_shard_failing_prepare_applies_nowhere(cluster3, client3, unique):
    """A replica whose part is refused by one shard (NaN) is not committed anywhere, and its parts
    prepared on the other shards never enter a step."""
    opt, v = _sync(client3, unique, n=2, total=3)
    before = client3.pull(v)
    nan = np.ones((2, 2), np.float32)
    nan[1] = np.nan
    with pytest.raises(sparseps.InvalidArgument, match="NaN"):
        client3.push({v: (np.array([0, 2]), nan)}, step=0)   # row 0 on shard 0 fine, row 2 on shard 2 NaN
    np.testing.assert_array_equal(client3.pull(v), before)
    assert _iterations(client3, opt) == [0, 0, 0]
    # two good replicas make step 0; the failed replica's prepared row 0 is not part of it
    clients = [sparseps.connect(_addresses(cluster3)) for _ in range(2)]
    try:
        results = _in_threads([lambda c=c, r=r: c.push({v: (np.array([3 + r]), np.ones((1, 2), np.float32))}, step=0)
                               for r, c in enumerate(clients)])
        assert results == [1, 1], results
    finally:
        for c in clients:
            c.close()
    expected = before.copy()
    expected[[3, 4]] -= 1
    np.testing.assert_array_equal(client3.pull(v, min_iterations=1), expected)


def test_pull_of_step_t_is_one_step_everywhere(cluster3, client3, unique):
    """min_iterations=t waits on every shard and returns rows of a single step s >= t."""
    opt, v = _sync(client3, unique, n=1, rows=9)
    got = {}

    def wait_pull():
        got["v"] = client3.pull(v, min_iterations=2, timeout=30)
    t = threading.Thread(target=wait_pull)
    t.start()
    time.sleep(0.3)
    assert "v" not in got                                  # step 2 does not exist yet
    for step in range(3):
        assert client3.push({v: (np.arange(9), np.ones((9, 2), np.float32))}, step=step) == step + 1
    t.join(30)
    rows = got["v"]
    assert np.all(rows == rows[0, 0]) and rows[0, 0] <= -2    # all rows from one step, and >= 2
    with pytest.raises(sparseps.DeadlineExceeded, match="short of 10"):
        client3.pull(v, min_iterations=10, timeout=0.3)


def test_bounded_staleness_holds_the_fast_worker(cluster3, client3, unique):
    opt = f"{unique}_ssp"
    client3.create_optimizer(opt, SGD, consistency={"mode": "bounded", "staleness": 1, "total_num_replicas": 2})
    v = f"{unique}_v"
    client3.create_variable(v, initial_value=np.zeros((6, 2), np.float32), optimizer=opt)
    g = (np.array([0, 1, 2]), np.ones((3, 2), np.float32))
    client3.pull(v, worker_id="a")                          # clock 0, nobody ahead: no wait
    client3.push({v: g}, worker_id="a")
    client3.pull(v, worker_id="a", timeout=5)               # a at 1, b unseen (= 0): 0 >= 1 - 1
    client3.push({v: g}, worker_id="a")
    with pytest.raises(sparseps.DeadlineExceeded, match="staleness 1"):
        client3.pull(v, worker_id="a", timeout=0.3)         # a at 2, b still at 0
    released = threading.Event()

    def held():
        client3.pull(v, worker_id="a", timeout=30)
        released.set()
    t = threading.Thread(target=held)
    t.start()
    time.sleep(0.3)
    assert not released.is_set()
    client3.push({v: g}, worker_id="b")                     # b at 1: a (2) is within 1
    t.join(30)
    assert released.is_set()
    client3.pull(v, worker_id="b", timeout=5)               # the slow worker never waits
    client3.pull(v, timeout=5)                              # nor does a pull without a worker id


def test_a_dead_shard_fails_the_push_and_applies_nothing(unique):
    servers = start_cluster(2, "--backend", "numpy")
    try:
        with sparseps.connect(_addresses(servers), retry_deadline=1.0) as c:
            opt, v = _sync(c, unique, n=1, rows=4)
            servers[1].kill()
            with pytest.raises(sparseps.Unavailable):
                c.push({v: (np.array([0, 1]), np.ones((2, 2), np.float32))}, step=0)
            assert c.optimizer(opt)._info(0).iterations == 0
            np.testing.assert_array_equal(c.pull(v, np.array([0, 2])), np.zeros((2, 2), np.float32))
    finally:
        for s in servers:
            s.stop()


def _bounded(c, unique):
    c.create_optimizer(f"{unique}_ssp", SGD, consistency={"mode": "bounded", "staleness": 1, "total_num_replicas": 2})
    c.create_variable(f"{unique}_b", initial_value=np.zeros((4, 2), np.float32), optimizer=f"{unique}_ssp")
    for _ in range(2):
        c.push({f"{unique}_b": (np.array([0, 1]), np.ones((2, 2), np.float32))}, worker_id="a")


def _assert_clock_of_a_is_2(c, unique):
    with pytest.raises(sparseps.DeadlineExceeded, match="at clock 2"):
        c.pull(f"{unique}_b", worker_id="a", timeout=0.2)


def test_prepares_survive_a_crash(tmp_path, unique):
    """kill -9 every shard after a replica's push is prepared everywhere but before its step has
    enough votes: after the restart the prepared gradient is still there (write-ahead log) and the
    step commits with it once another replica arrives. Bounded-mode clocks survive too."""
    data = str(tmp_path)
    servers = start_cluster(2, "--backend", "numpy", "--wal-sync", "fsync", data_dir=data)
    rows = np.arange(6)
    ones = np.ones((6, 2), np.float32)
    try:
        with sparseps.connect(_addresses(servers)) as c:
            opt, v = _sync(c, unique, n=2, rows=6)
            _bounded(c, unique)
            for step in range(2):                         # two full steps: each row -2 per step
                with sparseps.connect(_addresses(servers)) as a, sparseps.connect(_addresses(servers)) as b:
                    assert _in_threads([lambda: a.push({v: (rows, ones)}, step=step),
                                        lambda: b.push({v: (rows, ones)}, step=step)]) == [step + 1, step + 1]
            # replica A's push of step 2: prepared on both shards, admitted, then its wait times out
            with sparseps.connect(_addresses(servers), client_id="replica-a", timeout=3.0,
                                  retry_deadline=0.5) as a:   # the coordinator waits 2.4 s for votes
                with pytest.raises(sparseps.DeadlineExceeded, match="1 of 2 replicas"):
                    a.push({v: (rows, 3 * ones)}, step=2)            # its sequence number is 1
        for s in servers:
            s.kill()
    finally:
        for s in servers:
            s.stop()
    servers = start_cluster(2, "--backend", "numpy", data_dir=data)
    try:
        with sparseps.connect(_addresses(servers)) as c:
            np.testing.assert_array_equal(c.pull(v), -4 * ones)
            assert _iterations(c, opt) == [2, 2]
            _assert_clock_of_a_is_2(c, unique)                     # rebuilt from the log
            # A retries its vote after the crash; replica B completes step 2 with it
            with sparseps.connect(_addresses(servers), client_id="replica-a") as a, \
                    sparseps.connect(_addresses(servers)) as b:
                got = _in_threads([lambda: a._vote(opt, 2, 1), lambda: b.push({v: (rows, ones)}, step=2)])
                assert got == [3, 3], got
            np.testing.assert_array_equal(c.pull(v, min_iterations=3), -8 * ones)
        for s in servers:   # a clean stop writes a final checkpoint holding the sync state; restart from it
            s.stop()
    finally:
        for s in servers:
            s.stop()
    servers = start_cluster(2, "--backend", "numpy", data_dir=data)
    try:
        with sparseps.connect(_addresses(servers)) as c:
            np.testing.assert_array_equal(c.pull(v), -8 * ones)
            assert _iterations(c, opt) == [3, 3]
            _assert_clock_of_a_is_2(c, unique)                     # from the final checkpoint
            with pytest.raises(sparseps.StaleGradient):
                c.push({v: (rows, ones)}, step=2)
    finally:
        for s in servers:
            s.stop()


def test_a_decided_step_reaches_a_shard_that_was_down(tmp_path, unique):
    """Shard 1 dies after both replicas prepared there, just before the deciding vote: the step is
    decided, applied on shard 0, and applied on shard 1 as soon as it is back (its prepares are in
    its log) -- on every shard, not on some."""
    servers = start_cluster(2, "--backend", "numpy", "--wal-sync", "fsync", data_dir=str(tmp_path))
    try:
        with sparseps.connect(_addresses(servers)) as c, \
                sparseps.connect(_addresses(servers), retry_deadline=60) as a, \
                sparseps.connect(_addresses(servers), retry_deadline=60) as b:
            opt, v = _sync(c, unique, n=2, rows=4)
            rows, ones = np.arange(4), np.ones((4, 2), np.float32)
            a_prepared = threading.Event()
            a_vote = a._vote

            def a_votes(*x):                                 # A's push is prepared on every shard
                a_prepared.set()
                return a_vote(*x)
            a._vote = a_votes
            first = threading.Thread(target=lambda: a.push({v: (rows, ones)}, step=0))
            first.start()                                    # then waits for a second vote
            assert a_prepared.wait(30)
            down = servers[1]
            args = down.proc.args[down.proc.args.index("--port-file") + 2:]
            vote = b._vote

            def vote_while_shard_1_is_down(*x):
                down.kill()
                threading.Timer(0.5, lambda: servers.__setitem__(1, LocalServer(*args, port=down.port))).start()
                return vote(*x)
            b._vote = vote_while_shard_1_is_down
            assert b.push({v: (rows, 2 * ones)}, step=0) == 1
            first.join(60)
            assert not first.is_alive()
            assert _iterations(c, opt) == [1, 1]
            np.testing.assert_array_equal(c.pull(v), -3 * ones)
    finally:
        for s in servers:
            s.stop()



def test_more_waiting_workers_than_server_threads():
    """6 sync replicas, then 4 bounded-staleness workers held at pull, against a shard with 4 gRPC
    threads (2 of which may wait): the waits past the limit are refused UNAVAILABLE and asked again,
    so the vote or push that ends the wait always finds a thread. Before, every thread waited and
    the last vote queued behind them until their 24 s wait ran out."""
    mport, = free_ports(1)
    with LocalServer("--backend", "numpy", "--threads", "4", "--no-malloc-tuning", "--metrics-port", str(mport)) as srv, \
            sparseps.connect(srv.address, data_plane=False, timeout=30) as admin:
        admin.create_optimizer("s", SGD, consistency={"mode": "sync", "replicas_to_aggregate": 6})
        admin.create_variable("v", initial_value=np.zeros((6, 2), np.float32), optimizer="s")
        replicas = [sparseps.connect(srv.address, data_plane=False, timeout=30) for _ in range(6)]
        try:
            for step in range(3):
                got = _in_threads([lambda c=c, r=r: c.push({"v": (np.array([r]), np.ones((1, 2), np.float32))},
                                                          step=step) for r, c in enumerate(replicas)])
                assert got == [step + 1] * 6, got
        finally:
            for c in replicas:
                c.close()
        np.testing.assert_array_equal(admin.pull("v"), -3 * np.ones((6, 2), np.float32))

        # bounded staleness 0 over 5 workers: 4 fast ones each push once, then pull and are held
        # until the slow one (whose push needs a thread) has pushed too
        admin.create_optimizer("b", SGD, consistency={"mode": "bounded", "staleness": 0, "total_num_replicas": 5})
        admin.create_variable("w", initial_value=np.zeros((5, 2), np.float32), optimizer="b")
        workers = [sparseps.connect(srv.address, data_plane=False, timeout=30) for _ in range(5)]
        try:
            for k, c in enumerate(workers):
                c.pull("w", worker_id=f"w{k}")
            for k, c in enumerate(workers[:4]):
                c.push({"w": (np.array([k]), np.ones((1, 2), np.float32))}, worker_id=f"w{k}")
            held = threading.Thread(target=lambda: _in_threads(
                [lambda c=c, k=k: c.pull("w", worker_id=f"w{k}", timeout=25) for k, c in enumerate(workers[:4])]))
            held.start()
            wait_until(lambda: sample(mport, "sparseps_calls_waiting", method="Pull") == 2)
            workers[4].push({"w": (np.array([4]), np.ones((1, 2), np.float32))}, worker_id="w4")
            held.join(60)
            assert not held.is_alive()
        finally:
            for c in workers:
                c.close()
        np.testing.assert_array_equal(admin.pull("w"), -np.ones((5, 2), np.float32))
        m = scrape(mport)
        assert value(m, "sparseps_requests_rejected_total", method="SyncVote", code="UNAVAILABLE") > 0
        assert value(m, "sparseps_requests_rejected_total", method="Pull", code="UNAVAILABLE") > 0
        for method in ("SyncVote", "Pull"):   # no wait ran out
            assert not [v for (n, ls), v in m.items() if n == "sparseps_requests_rejected_total"
                        and dict(ls).get("method") == method and dict(ls).get("code") == "DEADLINE_EXCEEDED"]


def test_pushing_a_timed_out_step_again_counts_the_replica_once(cluster3, unique):
    """A replica whose vote timed out and that pushes the same step again (what the error says is
    safe) is still one replica: the step waits for another, and sums each replica's rows once."""
    c = sparseps.connect(_addresses(cluster3))
    opt, v = _sync(c, unique, n=2, rows=6)
    rows, ones = np.arange(6), np.ones((6, 2), np.float32)
    try:
        with sparseps.connect(_addresses(cluster3), timeout=3.0, retry_deadline=0.5) as a:
            for _ in range(2):   # the first push and its repeat: 1 of 2 replicas each time
                with pytest.raises(sparseps.DeadlineExceeded, match="1 of 2 replicas"):
                    a.push({v: (rows, ones)}, step=0)
            with sparseps.connect(_addresses(cluster3)) as b:
                got = _in_threads([lambda: a.push({v: (rows, ones)}, step=0),
                                   lambda: b.push({v: (rows, 2 * ones)}, step=0)])
            assert got == [1, 1], got
            assert a._sync_pending == {}
        # a's rows once (1) and b's (2); a counted twice would have committed at its repeat, alone
        np.testing.assert_array_equal(c.pull(v, min_iterations=1)[:, 0], -3.0)
        assert _iterations(c, opt) == [1, 1, 1]
    finally:
        c.close()


def test_votes_are_answered_while_a_decided_step_waits_for_a_shard_that_is_down(tmp_path):
    """Shard 1 dies after a replica's push is prepared on both shards; the vote decides the step,
    but its commit cannot reach shard 1. Later votes hear UNAVAILABLE at once (the coordinator
    re-sends the decision in the background) instead of each holding shard 0's lock and one of its
    4 threads for another 10 s round, so shard 0 keeps answering; once shard 1 is back (same port,
    its log), the step is applied on both."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sparseps.proto import sparseps_pb2_grpc as pb_grpc
    args = ("--backend", "numpy", "--threads", "4", "--wal-sync", "fsync")
    servers = start_cluster(2, *args, data_dir=str(tmp_path))
    cluster, port1 = _addresses(servers), servers[1].port
    rows, ones = np.arange(4), np.ones((4, 2), np.float32)
    try:
        with sparseps.connect(cluster) as c:
            opt, v = _sync(c, "down", n=1, rows=4)
        with sparseps.connect(cluster, client_id="replica-a", timeout=20, retry_deadline=0.5) as a:
            requests, _, seq = a._push_requests({v: (rows, ones)}, 0, "")
            a._send_pushes(requests)                       # phase 1: prepared on both shards
            servers[1].kill()
            with pytest.raises(sparseps.Unavailable, match="decided and will be applied"):
                a._vote(opt, 0, seq)                       # decides; the commit round fails (10 s)
        with grpc.insecure_channel(servers[0].address) as ch:
            stub = pb_grpc.ParameterServerStub(ch)
            vote = pb.SyncVoteRequest(optimizer=opt, step=0, timeout_seconds=15,
                                      replica=pb.ReplicaRef(client_id="replica-a", sequence=seq))
            futures = [stub.SyncVote.future(vote, timeout=20) for _ in range(8)]   # 8 retries at once
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            for f in futures:
                assert f.exception() is not None and f.exception().code() == grpc.StatusCode.UNAVAILABLE
                assert "being re-sent" in f.exception().details()
        servers[1] = LocalServer("--shard-index", "1", "--num-shards", "2", "--cluster", cluster,
                                 "--data-dir", str(tmp_path / "shard-1"), *args, port=port1)
        with sparseps.connect(cluster, client_id="replica-a", timeout=20, retry_deadline=30) as a:
            assert a._vote(opt, 0, seq) == 1               # re-driven: applied on both shards now
            np.testing.assert_array_equal(a.pull(v), -ones)
            assert _iterations(a, opt) == [1, 1]
    finally:
        for s in servers:
            s.stop()
