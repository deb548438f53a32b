"""Limits instead of crashes: oversized messages and a backlog over the memory budget are refused
with RESOURCE_EXHAUSTED, change nothing, and the server keeps serving.

SGD with learning rate 1 and unit gradients makes every accepted push visible row by row: each push
owns a block of rows, which ends at -1 if the push was applied and at 0 if it was refused.
"""
import threading
import time

import grpc
import numpy as np
import pytest

import sparseps
from sparseps.local import LocalServer, free_ports
from sparseps.proto import sparseps_pb2 as pb
from sparseps.proto import sparseps_pb2_grpc as pb_grpc
from sparseps.server.limits import MemoryBudget
from sparseps.tensors import to_tensor
from test_metrics import sample, wait_until

MiB = 1 << 20


def test_memory_budget_counts():
    b = MemoryBudget(10)
    assert b.try_acquire(25)            # a lone request is always admitted (the budget sheds backlog)
    assert not b.try_acquire(1)
    b.release(25)
    assert b.try_acquire(6) and b.try_acquire(4) and not b.try_acquire(1)
    b.release(6)
    b.release(4)
    assert b.in_use == 0 and b.shed == 2 and b.peak == 25
    unlimited = MemoryBudget(0)
    assert all(unlimited.try_acquire(1 << 40) for _ in range(3))


@pytest.fixture(scope="module")
def small_server():
    """1 MiB messages, a 3 MiB memory budget, 16 worker threads."""
    srv = LocalServer("--backend", "numpy", "--max-message-mb", "1", "--memory-budget-mb", "3",
                      "--threads", "16", "--no-malloc-tuning")
    yield srv
    assert srv.proc.poll() is None, "the server died"
    srv.stop()


def test_oversized_push_is_refused_and_server_keeps_serving(small_server):
    c = sparseps.connect(small_server.address, max_message_mb=64, timeout=10, retry_deadline=5)
    c.create_optimizer("sgd_big", "SGD", learning_rate=1.0)
    c.create_variable("big", shape=(8192, 64), optimizer="sgd_big")
    ids = np.arange(8192)
    t = time.perf_counter()
    with pytest.raises(sparseps.ResourceExhausted, match="larger than max"):
        c.push({"big": (ids, np.ones((8192, 64), np.float32))})      # 2 MiB in one message
    assert time.perf_counter() - t < 5
    with pytest.raises(sparseps.ResourceExhausted, match="larger than max"):
        c.set_weights([("big", "", None, np.ones((8192, 64), np.float32))])
    assert small_server.proc.poll() is None
    # still serving: a small push goes through, and it is the only change
    assert c.push({"big": (np.array([5]), np.ones((1, 64), np.float32))}) == 1
    c.close()
    with sparseps.connect(small_server.address, max_message_mb=1, timeout=10) as c1:
        value = c1.pull("big")            # split into pulls that fit the 1 MiB limit
    expected = np.zeros((8192, 64), np.float32)
    expected[5] = -1
    np.testing.assert_array_equal(value, expected)


def test_pull_larger_than_a_message_is_refused_clearly(small_server):
    with sparseps.connect(small_server.address, max_message_mb=64, timeout=10) as c:
        c.create_variable("wide", shape=(4096, 128), dtype="float64")
        stub = pb_grpc.ParameterServerStub(c._channels[0])
        with pytest.raises(grpc.RpcError) as e:
            stub.Pull(pb.PullRequest(variable="wide"), timeout=10)
        assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
        assert "'wide'" in e.value.details()
    with sparseps.connect(small_server.address, max_message_mb=1, timeout=10) as c1:
        assert c1.pull("wide").shape == (4096, 128)


def test_backlog_over_budget_is_shed(small_server):
    """48 concurrent 1 MiB pushes against a 3 MiB budget: some shed, none crash, state = accepted pushes."""
    pushes, rows, dim = 48, 3968, 64          # 3968 x 64 float32 + ids = 1.0 MiB, under the message limit
    admin = sparseps.connect(small_server.address, max_message_mb=1, timeout=30)
    admin.create_optimizer("sgd_load", "SGD", learning_rate=1.0)
    admin.create_variable("load", shape=(pushes * rows, dim), optimizer="sgd_load")
    results = [None] * pushes
    barrier = threading.Barrier(pushes)
    # one connection per pusher (several HTTP/2 connections, as from several trainers)
    clients = [sparseps.connect(small_server.address, max_message_mb=1, timeout=30, retry_deadline=1)
               for _ in range(pushes)]

    def push(k):
        ids = np.arange(k * rows, (k + 1) * rows)
        grad = np.ones((rows, dim), np.float32)
        barrier.wait()
        try:
            results[k] = clients[k].push({"load": (ids, grad)})
        except sparseps.Error as e:
            results[k] = e
    t = time.perf_counter()
    threads = [threading.Thread(target=push, args=(k,)) for k in range(pushes)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    for c in clients:
        c.close()
    shed = [k for k, r in enumerate(results) if isinstance(r, sparseps.ResourceExhausted)]
    accepted = [k for k, r in enumerate(results) if isinstance(r, int)]
    other = [(k, r) for k, r in enumerate(results) if k not in shed and k not in accepted]
    assert not other, other
    assert shed, "no push was shed: the budget did not bite"
    assert accepted, "every push was shed"
    assert all("memory budget" in results[k].message and "nothing was applied" in results[k].message for k in shed)
    assert small_server.proc.poll() is None
    value = admin.pull("load").reshape(pushes, rows, dim)
    for k in range(pushes):
        np.testing.assert_array_equal(value[k], -1.0 if k in accepted else 0.0, err_msg=f"push {k}")
    assert admin.optimizer("sgd_load").iterations == len(accepted)
    admin.close()
    print(f"\n{len(accepted)} accepted, {len(shed)} shed of {pushes} concurrent 1 MiB pushes, 3 MiB budget, "
          f"{elapsed:.2f} s")


def test_waiting_pulls_are_bounded():
    """Pulls waiting for a step: bad timeouts refused, waits end at the call's deadline, and at most
    all but a quarter (at least 2) of --threads wait at once (UNAVAILABLE beyond), so pushes keep a thread."""
    mport, = free_ports(1)
    with LocalServer("--backend", "numpy", "--threads", "4", "--no-malloc-tuning",
                     "--metrics-port", str(mport)) as srv:
        c = sparseps.connect(srv.address, timeout=10)
        c.create_optimizer("sgd_w", "SGD", learning_rate=1.0)
        c.create_variable("w", shape=(4, 2), optimizer="sgd_w")
        stub = pb_grpc.ParameterServerStub(c._channels[0])
        for bad in (float("nan"), float("inf"), -1.0):
            with pytest.raises(grpc.RpcError) as e:
                stub.Pull(pb.PullRequest(variable="w", min_iterations=5, timeout_seconds=bad), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout_seconds" in e.value.details()
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:     # asks for 1e300 s: the call's 0.5 s deadline wins
            stub.Pull(pb.PullRequest(variable="w", min_iterations=5, timeout_seconds=1e300), timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.perf_counter() - t < 2
        wait_until(lambda: sample(mport, "sparseps_calls_waiting", method="Pull") == 0)   # the server's end of that call is over too
        waiting = [stub.Pull.future(pb.PullRequest(variable="w", min_iterations=2, timeout_seconds=20), timeout=30)
                   for _ in range(2)]
        wait_until(lambda: sample(mport, "sparseps_calls_waiting", method="Pull") == 2)
        assert not any(f.done() for f in waiting)
        with pytest.raises(grpc.RpcError) as e:          # a third is refused
            stub.Pull(pb.PullRequest(variable="w", min_iterations=2, timeout_seconds=20), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "already wait for other workers" in e.value.details()
        assert c.push({"w": (np.array([1]), np.ones((1, 2), np.float32))}) == 1    # pushes still get a thread
        assert c.push({"w": (np.array([1]), np.ones((1, 2), np.float32))}) == 2
        for f in waiting:                            # and the step they waited for releases them
            assert f.result().iterations == 2
        c.close()



def test_out_of_memory_creating_slots_changes_and_logs_nothing(tmp_path):
    """A push whose Adam slots do not fit (the server's address space capped between the 256 MiB
    `m` and the 256 MiB `v`) is refused RESOURCE_EXHAUSTED before it is logged, with no slot left
    half made: once memory is there, the next push creates both slots and is step 1, and a restart
    replays only that one."""
    import resource

    def vmsize(pid):
        return next(int(line.split()[1]) << 10 for line in open(f"/proc/{pid}/status") if line.startswith("VmSize"))
    grad = (np.array([3, 5]), np.ones((2, 64), np.float32))
    with LocalServer("--backend", "numpy", "--data-dir", str(tmp_path), "--no-malloc-tuning") as srv, \
            sparseps.connect(srv.address, timeout=20, retry_deadline=2) as c:
        c.create_optimizer("adam", "LazyAdam", learning_rate=0.1)
        c.create_variable("emb", shape=(1 << 20, 64), initializer="Zeros", optimizer="adam")
        c.pull("emb", [1])   # (the connection and its thread exist before the cap)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_AS, (vmsize(srv.proc.pid) + (380 << 20), resource.RLIM_INFINITY))
        with pytest.raises(sparseps.ResourceExhausted, match="out of memory.*nothing was changed"):
            c.push({"emb": grad})
        resource.prlimit(srv.proc.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert c.optimizer("adam").iterations == 0
        assert not c.pull("emb", [3, 5]).any()
        assert c.push({"emb": grad}) == 1
        np.testing.assert_allclose(c.pull("emb", [3], slot="m")[0], 0.1, rtol=1e-6)    # (1 - beta_1) * g
        np.testing.assert_allclose(c.pull("emb", [3], slot="v")[0], 0.001, rtol=1e-4)  # (1 - beta_2) * g^2
        after = c.pull("emb", [3, 5])
    with LocalServer("--backend", "numpy", "--data-dir", str(tmp_path), "--no-malloc-tuning") as srv, \
            sparseps.connect(srv.address) as c:
        assert c.optimizer("adam").iterations == 1
        np.testing.assert_array_equal(c.pull("emb", [3, 5]), after)
