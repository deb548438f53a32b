"""Fixtures that start real sparseps-server processes on 127.0.0.1 (stopped by PID afterwards)."""
import os

# The cuda backend's kernels run under numba's CUDA simulator unless a run says otherwise
# (NUMBA_ENABLE_CUDASIM=0 on a machine with a GPU). numba reads it when first imported, so it is
# set before anything imports numba; the servers the tests start inherit it.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402

import sparseps  # noqa: E402
from sparseps.local import LocalServer, start_cluster

BACKENDS = [b for b in os.environ.get("SPARSEPS_TEST_BACKENDS", "numba,tensorflow").split(",") if b]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="session")
def server(backend):
    """One live shard per backend, shared by the tests of a session (names must be unique)."""
    srv = LocalServer("--backend", backend)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    c = sparseps.connect(server.address)
    yield c
    c.close()


@pytest.fixture(scope="session")
def numba_server():
    srv = LocalServer("--backend", "numba")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def numba_client(numba_server):
    c = sparseps.connect(numba_server.address)
    yield c
    c.close()


@pytest.fixture(scope="session")
def cluster3():
    """Three shards of one cluster (numba backend)."""
    servers = start_cluster(3, "--backend", "numba")
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def client3(cluster3):
    c = sparseps.connect(",".join(s.address for s in reversed(cluster3)))  # any order works
    yield c
    c.close()


_counter = [0]


@pytest.fixture
def unique():
    """A fresh name prefix per test, so tests can share one server."""
    _counter[0] += 1
    return f"t{_counter[0]}_{os.getpid()}"
