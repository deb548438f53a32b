"""The data plane (Pull, Push and PushPull as raw frames on a TCP/TLS port beside gRPC), for real.

Every test runs live sparseps-server processes on 127.0.0.1. The client is compared with a
gRPC-only client bit for bit; raw frames from a hand-written socket client check each refusal
(status code, message, and that the same connection then serves a good request); tokens, TLS,
mutual TLS, the memory budget, a restart on a new data port (exactly-once), the metrics labels
and a seeded fuzz of frames. Every refused push is followed by a snapshot of every variable,
slot and iteration count, taken over gRPC, that must equal the one taken before.
"""
import os
import random
import socket
import ssl
import threading
import time

import grpc
import numpy as np
import pytest

import sparseps
from sparseps import frames
from sparseps.local import LocalServer, free_ports
from sparseps.proto import sparseps_pb2 as pb

from test_bad_input import same, snapshot
from test_metrics import sample, scrape, wait_until
from test_security import TOKENS, mtls_server, pki, tls_server  # noqa: F401  (module-scoped fixtures)

MAX_MB = 1          # the frame-checking server's --max-message-mb
OK = 0
CODE = {c.value[0]: c for c in grpc.StatusCode}


# ---------------------------------------------------------------------------- a raw frame client
class Conn:
    """One data-plane connection driven by hand: frames in, (method, status, meta, payload) out."""

    def __init__(self, port, *, tls: ssl.SSLContext | None = None, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_raw(self, method, meta: bytes, payload: bytes = b"", *, magic=frames.MAGIC, meta_len=None,
                 payload_len=None):
        head = frames.HEADER.pack(magic, method, 0, 0, len(meta) if meta_len is None else meta_len,
                                  len(payload) if payload_len is None else payload_len)
        self.sock.sendall(head + meta + payload)

    def send(self, method, msg, arrays=()):
        frames.send_frame(self.sock, method, 0, msg.SerializeToString(), [np.ascontiguousarray(a) for a in arrays])

    def answer(self):
        """The next answer frame, or None if the server closed the connection."""
        head = bytearray(frames.HEADER.size)
        try:
            if not frames.recv_exact(self.sock, memoryview(head)):
                return None
        except ConnectionResetError:
            return None
        method, status, meta_len, payload_len = frames.parse_header(bytes(head))
        meta, payload = bytearray(meta_len), bytearray(payload_len)
        frames.recv_exact(self.sock, memoryview(meta))
        frames.recv_exact(self.sock, memoryview(payload))
        return method, status, bytes(meta), bytes(payload)

    def call(self, method, msg, arrays=()):
        self.send(method, msg, arrays)
        return self.answer()

    def closed(self) -> bool:
        """True if the server closed the connection without another frame (EOF or reset)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True


def push_msg(parts, *, client_id="", sequence=0, optimizers=()):
    """(PushRequest with empty Tensors, payload arrays) from [(variable, ids or None, values)]."""
    req, arrays = pb.PushRequest(client_id=client_id, sequence=sequence, optimizers=list(optimizers)), []
    for name, ids, values in parts:
        g = req.gradients.add(variable=name)
        if ids is not None:
            frames.describe(np.asarray(ids), g.ids, arrays)
        frames.describe(np.asarray(values), g.values, arrays)
    return req, arrays


def pull_msg(name, ids=None):
    req, arrays = pb.PullRequest(variable=name), []
    if ids is not None:
        frames.describe(np.asarray(ids), req.ids, arrays)
    return req, arrays


def decoded(answer, method=frames.PULL):
    """An OK answer's message, and its payload as arrays (frames.layout / views, as the client reads)."""
    got, status, meta, payload = answer
    assert (got, status) == (method, OK), (got, CODE.get(status), meta[:300])
    msg = frames.RESPONSES[method].FromString(meta)
    buf = np.frombuffer(payload, np.uint8)
    arrays = frames.views(buf, frames.layout(msg, len(buf))) if method != frames.HELLO else []
    return msg, arrays


def refused(answer, code, *fragments, method=None):
    assert answer is not None, "the server closed the connection instead of answering"
    got, status, meta, payload = answer
    assert CODE.get(status) == code, (CODE.get(status), meta[:300])
    text = meta.decode()
    assert payload == b"" and (method is None or got == method)
    for f in fragments:
        assert f in text, f"{f!r} not in {text!r}"
    return text


def data_port(client, k=0) -> int:
    return client.server_info[k].data_port


# ---------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def dp():
    """numba, data plane on a free port, a 1 MiB message limit and a metrics endpoint."""
    (mport,) = free_ports(1)
    srv = LocalServer("--backend", "numba", "--max-message-mb", str(MAX_MB), "--metrics-port", str(mport))
    srv.metrics_port = mport
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def dpc(dp):
    c = sparseps.connect(dp.address, timeout=20, retry_deadline=10)
    yield c
    c.close()


@pytest.fixture(scope="module")
def admin(dp):
    """gRPC only: takes the snapshots, independent of the transport under test."""
    c = sparseps.connect(dp.address, data_plane=False, timeout=20, retry_deadline=10)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_server():
    srv = LocalServer("--backend", "numba", "--data-port", "-1")
    yield srv
    srv.stop()


@pytest.fixture
def table(admin, unique):
    """LazyAdam over emb (10x4, arange) and ker (4x3 dense); one step applied (m, v non-zero)."""
    opt, emb, ker = f"{unique}_o", f"{unique}_emb", f"{unique}_ker"
    admin.create_optimizer(opt, "LazyAdam", learning_rate=0.1)
    admin.create_variable(emb, initial_value=np.arange(40, dtype=np.float32).reshape(10, 4), optimizer=opt)
    admin.create_variable(ker, initial_value=np.ones((4, 3), np.float32), optimizer=opt)
    admin.push({emb: (np.array([1, 2]), np.ones((2, 4), np.float32)), ker: np.ones((4, 3), np.float32)})
    return opt, emb, ker


# ---------------------------------------------------------------------------- 1. same numbers on both transports
def trajectory(c, p: str) -> list:
    """A seeded sequence of pushes and pulls; everything it read, in order."""
    rng = np.random.default_rng(20261121)
    lazy, adam = f"{p}_lazy", f"{p}_adam"
    emb, ker, e64 = f"{p}_emb", f"{p}_ker", f"{p}_e64"
    c.create_optimizer(lazy, "LazyAdam", learning_rate=0.01)
    c.create_optimizer(adam, "Adam", learning_rate=0.02, amsgrad=True)
    c.create_variable(emb, initial_value=rng.standard_normal((50, 8)).astype(np.float32), optimizer=lazy)
    c.create_variable(ker, initial_value=rng.standard_normal((8, 3)).astype(np.float32), optimizer=lazy)
    c.create_variable(e64, initial_value=rng.standard_normal((30, 2, 3)), optimizer=adam)   # float64, 3-D
    out = []
    for _ in range(5):
        ids = rng.integers(0, 50, 12)
        ids[:4] = ids[4]   # duplicates: their rows are summed
        out.append(c.push({emb: (ids, rng.standard_normal((12, 8)).astype(np.float32)),
                           ker: rng.standard_normal((8, 3)).astype(np.float32)}))   # sparse + dense, one step
        ids64 = rng.integers(0, 30, 7)
        out.append(c.push({e64: (np.concatenate([ids64, ids64[:2]]), rng.standard_normal((9, 2, 3)))}))
        it, rows = c.push_pull({emb: (ids, rng.standard_normal((12, 8)).astype(np.float32))},
                               {emb: rng.integers(0, 50, 20), ker: [0, 7, 7, 3]})
        out += [it, rows[emb], rows[ker]]
        out.append(c.pull(emb, np.array([3, 3, 49, 0, 3])))
        out.append(c.pull(e64, ids64))
    out += [c.pull(emb), c.pull(ker), c.pull(e64)]   # range pulls (ids=None)
    for name, var in ((lazy, emb), (lazy, ker), (adam, e64)):
        opt = c.optimizer(name)
        out.append(opt.iterations)
        out += [opt.get_slot(var, s) for s in opt.get_slot_names()]
        out += opt.get_weights()
    return out


def assert_bit_identical(a: list, b: list):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape, (i, x, y)
            assert x.tobytes() == y.tobytes(), f"entry {i} differs: {x} vs {y}"
        else:
            assert x == y, (i, x, y)


def test_client_uses_the_data_plane_and_grpc_only_clients_do_not(dp, dpc, grpc_server, monkeypatch):
    port = data_port(dpc)
    assert port > 0 and port != dp.port and not dpc.server_info[0].data_tls
    assert dpc.data_plane == [f"127.0.0.1:{port}"]
    with sparseps.connect(dp.address, data_plane=False) as c:
        assert c.data_plane == [None]
    monkeypatch.setenv("SPARSEPS_DATA_PLANE", "0")
    with sparseps.connect(dp.address) as c:
        assert c.data_plane == [None]
    monkeypatch.delenv("SPARSEPS_DATA_PLANE")
    with sparseps.connect(grpc_server.address) as c:   # --data-port -1: none advertised
        assert c.server_info[0].data_port == 0 and c.data_plane == [None]
        c.create_optimizer("dp_off", "SGD", learning_rate=1.0)
        c.create_variable("dp_off_w", initial_value=np.zeros((4, 2), np.float32), optimizer="dp_off")
        assert c.push({"dp_off_w": (np.array([1]), np.ones((1, 2), np.float32))}) == 1
        np.testing.assert_array_equal(c.pull("dp_off_w")[1], [-1, -1])


def test_same_bits_over_the_data_plane_and_grpc(dpc, grpc_server, unique):
    with sparseps.connect(grpc_server.address) as g:
        assert g.data_plane == [None]
        over_grpc = trajectory(g, unique)
    assert dpc.data_plane[0] is not None
    over_data = trajectory(dpc, unique)
    assert dpc._data[0]._idle, "the data-plane client kept no data connection: its calls did not go there"
    assert_bit_identical(over_data, over_grpc)
    assert not np.array_equal(over_data[-1], np.zeros_like(over_data[-1]))   # the optimizers did move


def test_same_bits_on_three_shards(cluster3, client3, unique):
    assert all(client3.data_plane) and len(set(client3.data_plane)) == 3
    with sparseps.connect(",".join(s.address for s in cluster3), data_plane=False) as g:
        assert g.data_plane == [None] * 3
        over_grpc = trajectory(g, unique + "g")
    assert_bit_identical(trajectory(client3, unique + "d"), over_grpc)


# ---------------------------------------------------------------------------- 3. bad frames
def _bad_push(case, emb, ker):
    """(method, meta bytes, payload bytes, status, fragments) of one malformed request."""
    rows = np.ones((1, 4), np.float32)
    good_dense = (ker, None, np.ones((4, 3), np.float32))   # a valid part: must not be applied either

    def frame(parts, **kw):
        req, arrays = push_msg(parts, **kw)
        return req, b"".join(a.tobytes() for a in arrays)

    if case == "unknown method":
        req, payload = frame([good_dense])
        return 9, req.SerializeToString(), payload, grpc.StatusCode.UNIMPLEMENTED, ["unknown method 9"]
    if case == "meta not a message":
        return frames.PUSH, b"\xff\xff\xff\x07garbage", b"", grpc.StatusCode.INVALID_ARGUMENT, \
            ["not a valid PushRequest"]
    if case in ("payload too long", "payload too short"):
        req, payload = frame([good_dense, (emb, np.array([1]), rows)])
        payload = payload + b"\0" * 4 if case == "payload too long" else payload[:-4]
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, ["payload"]
    if case == "bytes inline in meta":
        req, payload = frame([good_dense, (emb, np.array([1]), rows)])
        req.gradients[1].values.data = rows.tobytes()
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, \
            [f"push values of {emb!r}", "belong in the frame's payload"]
    if case == "unknown dtype":
        req, payload = frame([good_dense, (emb, np.array([1]), rows)])
        req.gradients[1].values.dtype = 77
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, \
            ["unknown dtype code 77"]
    if case == "negative dims":
        req, payload = frame([good_dense, (emb, np.array([1]), rows)])
        req.gradients[1].values.shape[:] = [-1, 4]
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, \
            ["negative dimension"]
    if case == "huge shape":
        req, payload = frame([good_dense, (emb, np.array([1]), rows)])
        req.gradients[1].values.shape[:] = [2 ** 40, 2 ** 40, 4]
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, ["bytes"]
    if case == "unknown variable":
        req, payload = frame([good_dense, ("nope", np.array([1]), rows)])
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.NOT_FOUND, ["'nope'"]
    if case == "id out of range":
        req, payload = frame([good_dense, (emb, np.array([10]), rows)])
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, [emb, "10"]
    if case == "negative id":
        req, payload = frame([good_dense, (emb, np.array([-3]), rows)])
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, [emb, "-3"]
    if case == "nan gradient":
        req, payload = frame([good_dense, (emb, np.array([1]), np.full((1, 4), np.nan, np.float32))])
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, [emb, "nan"]
    if case == "rows shape":
        req, payload = frame([good_dense, (emb, np.array([1]), np.ones((2, 4), np.float32))])
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, [emb, "[2, 4]"]
    if case == "float ids":
        req, payload = frame([good_dense, (emb, np.array([1.0]), rows)])
        return frames.PUSH, req.SerializeToString(), payload, grpc.StatusCode.INVALID_ARGUMENT, [emb, "float"]
    if case == "push_pull with a bad pull":
        push, arrays = push_msg([good_dense, (emb, np.array([1]), rows)])
        req = pb.PushPullRequest(push=push)
        q = req.pulls.add(variable=emb)
        frames.describe(np.array([99]), q.ids, arrays)
        return frames.PUSH_PULL, req.SerializeToString(), b"".join(a.tobytes() for a in arrays), \
            grpc.StatusCode.INVALID_ARGUMENT, [emb, "99"]
    if case == "push_pull with a bad push":
        push, arrays = push_msg([good_dense, (emb, np.array([1]), np.full((1, 4), np.inf, np.float32))])
        req = pb.PushPullRequest(push=push)
        q = req.pulls.add(variable=emb)
        frames.describe(np.array([1]), q.ids, arrays)
        return frames.PUSH_PULL, req.SerializeToString(), b"".join(a.tobytes() for a in arrays), \
            grpc.StatusCode.INVALID_ARGUMENT, [emb, "inf"]
    raise AssertionError(case)


BAD_PUSHES = ["unknown method", "meta not a message", "payload too long", "payload too short",
              "bytes inline in meta", "unknown dtype", "negative dims", "huge shape", "unknown variable",
              "id out of range", "negative id", "nan gradient", "rows shape", "float ids",
              "push_pull with a bad pull", "push_pull with a bad push"]


@pytest.mark.parametrize("case", BAD_PUSHES)
def test_bad_frame_is_refused_changes_nothing_and_the_connection_serves_on(dpc, admin, table, case):
    opt, emb, ker = table
    before = snapshot(admin, opt)
    method, meta, payload, code, fragments = _bad_push(case, emb, ker)
    conn = Conn(data_port(dpc))
    try:
        conn.send_raw(method, meta, payload)
        refused(conn.answer(), code, *fragments, method=method)
        assert same(before, snapshot(admin, opt)), case
        # the same connection, still in step: a good pull, then a good push
        msg, (values,) = decoded(conn.call(frames.PULL, *pull_msg(emb, np.array([2, 2, 0]))))
        np.testing.assert_array_equal(values, admin.pull(emb, [2, 2, 0]))
        assert msg.iterations == before[0] == 1
        msg, _ = decoded(conn.call(frames.PUSH, *push_msg([(emb, np.array([0]), np.ones((1, 4), np.float32))])),
                         frames.PUSH)
        assert [(o.optimizer, o.iterations) for o in msg.iterations] == [(opt, 2)]
    finally:
        conn.close()
    assert not same(before, snapshot(admin, opt))


@pytest.mark.parametrize("case", ["bad magic", "meta length over the limit", "truncated frame"])
def test_unreadable_frame_closes_the_connection_and_changes_nothing(dp, dpc, admin, table, case):
    opt, emb, ker = table
    before = snapshot(admin, opt)
    req, arrays = push_msg([(emb, np.array([1]), np.ones((1, 4), np.float32))])
    payload = b"".join(a.tobytes() for a in arrays)
    conn = Conn(data_port(dpc))
    try:
        if case == "bad magic":
            conn.send_raw(frames.PUSH, req.SerializeToString(), payload, magic=b"HTTP")
        elif case == "meta length over the limit":
            conn.send_raw(frames.PUSH, b"", meta_len=frames.MAX_META + 1, payload_len=0)
        else:   # the sender goes away in the middle of its payload
            conn.send_raw(frames.PUSH, req.SerializeToString(), payload[:5], payload_len=len(payload))
            conn.sock.shutdown(socket.SHUT_WR)
        assert conn.closed(), case
    finally:
        conn.close()
    assert same(before, snapshot(admin, opt))
    assert dp.proc.poll() is None
    with Conn(data_port(dpc)) as conn:   # a new connection is served
        _, (values, ids) = decoded(conn.call(frames.PULL, *pull_msg(emb)))   # a range pull: rows and ids
        np.testing.assert_array_equal(ids, np.arange(10))
        np.testing.assert_array_equal(values, admin.pull(emb))


def test_frame_over_the_message_limit_is_refused_and_closes_the_connection(dpc, admin, table):
    """--max-message-mb applies to a frame: RESOURCE_EXHAUSTED at its header, then the connection
    closes (the server does not read the megabytes announced)."""
    opt, emb, ker = table
    before = snapshot(admin, opt)
    n = (MAX_MB << 20) // 16 + 1   # rows of 4 float32: just over the limit
    req = pb.PushRequest(gradients=[pb.Gradient(variable=emb, ids=pb.Tensor(dtype=pb.INT64, shape=[n]),
                                                values=pb.Tensor(dtype=pb.FLOAT32, shape=[n, 4]))])
    with Conn(data_port(dpc)) as conn:
        conn.send_raw(frames.PUSH, req.SerializeToString(), b"", payload_len=n * 8 + n * 16)
        refused(conn.answer(), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max message size",
                f"({MAX_MB << 20} bytes, --max-message-mb)", "nothing was applied", method=frames.PUSH)
        assert conn.closed()
    assert same(before, snapshot(admin, opt))
    # the client's own push of that size is refused the same way, and changes nothing either
    with pytest.raises(sparseps.Error) as e:
        dpc.push({emb: (np.zeros(n, np.int64), np.ones((n, 4), np.float32))})
    assert e.value.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), e.value
    assert same(before, snapshot(admin, opt))
    assert dpc.push({emb: (np.array([3]), np.ones((1, 4), np.float32))}) == 2   # and it still pushes


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_sender_still_writing_an_oversized_frame_reads_the_refusal(transport, pki):
    """Refused at its header, a frame whose sender keeps writing its megabytes is read and dropped
    (for a while) before the connection closes: closing with them unread would reset the connection
    and could destroy the answer before the sender reads it (it would see only a reset)."""
    tls = ["--tls-cert", pki["server.pem"], "--tls-key", pki["server.key"]] if transport == "tls" else []
    with LocalServer("--backend", "numpy", "--max-message-mb", str(MAX_MB), "--no-malloc-tuning", *tls) as srv, \
            sparseps.connect(srv.address, tls_ca=pki["ca.pem"] if tls else None, timeout=10) as c:
        c.create_optimizer("o", "LazyAdam", learning_rate=0.1)
        c.create_variable("emb", initial_value=np.ones((10, 4), np.float32), optimizer="o")
        before = snapshot(c, "o")
        n = (4 * MAX_MB << 20) // 24   # rows of 4 float32 plus ids: 4x the limit
        req = pb.PushRequest(gradients=[pb.Gradient(variable="emb", ids=pb.Tensor(dtype=pb.INT64, shape=[n]),
                                                    values=pb.Tensor(dtype=pb.FLOAT32, shape=[n, 4]))])
        ctx = ssl.create_default_context(cafile=pki["ca.pem"]) if tls else None
        with Conn(data_port(c), tls=ctx) as conn:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
            conn.send_raw(frames.PUSH, req.SerializeToString(), bytes(n * 24))   # returns once all is read
            refused(conn.answer(), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max message size",
                    method=frames.PUSH)
            assert conn.closed()
        assert same(before, snapshot(c, "o"))
        # the client's own push of that size over the data plane: the same refusal, not a reset
        with pytest.raises(sparseps.ResourceExhausted, match="larger than max message size"):
            c.push({"emb": (np.zeros(n, np.int64), np.ones((n, 4), np.float32))})
        assert same(before, snapshot(c, "o"))


def test_duplicate_sequence_over_the_data_plane_applies_once(dpc, admin, table):
    opt, emb, ker = table
    req, arrays = push_msg([(emb, np.array([4, 4]), np.ones((2, 4), np.float32))], client_id="raw-dp", sequence=5)
    with Conn(data_port(dpc)) as conn:
        first, _ = decoded(conn.call(frames.PUSH, req, arrays), frames.PUSH)
        after = snapshot(admin, opt)
        again, _ = decoded(conn.call(frames.PUSH, req, arrays), frames.PUSH)
    assert not first.duplicate and again.duplicate
    assert [o.iterations for o in again.iterations] == [o.iterations for o in first.iterations] == [2]
    assert same(after, snapshot(admin, opt))


# ---------------------------------------------------------------------------- 7. metrics
def counted(samples, name, **labels) -> float:
    want = set((k, str(v)) for k, v in labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_count_data_plane_calls_under_the_grpc_method_names(dp, dpc, admin, table):
    opt, emb, ker = table

    def work(c):
        before = scrape(dp.metrics_port)
        for _ in range(3):
            c.push({emb: (np.array([1, 1, 5]), np.ones((3, 4), np.float32))})
        c.pull(emb, [1, 2])
        c.pull(emb, [3])
        c.push_pull({emb: (np.array([2]), np.ones((1, 4), np.float32))}, {emb: [2]})
        with pytest.raises(sparseps.InvalidArgument):   # the server refuses the NaN (the client does not check)
            c.push({emb: (np.array([1]), np.full((1, 4), np.nan, np.float32))})
        after = scrape(dp.metrics_port)
        delta = {}
        for method in ("Push", "Pull", "PushPull"):
            delta[method] = counted(after, "sparseps_requests_total", method=method) - \
                counted(before, "sparseps_requests_total", method=method)
        delta["rejected"] = counted(after, "sparseps_requests_rejected_total", method="Push",
                                    code="INVALID_ARGUMENT") - \
            counted(before, "sparseps_requests_rejected_total", method="Push", code="INVALID_ARGUMENT")
        for name in ("sparseps_bytes_received_total", "sparseps_bytes_sent_total", "sparseps_pushes_total"):
            delta[name] = counted(after, name) - counted(before, name)
        assert counted(after, "sparseps_requests_in_flight") == 0
        return delta

    assert dpc.data_plane[0] is not None and admin.data_plane == [None]
    over_data = work(dpc)
    assert over_data == work(admin)
    assert over_data["Push"] == 4 and over_data["Pull"] == 2 and over_data["PushPull"] == 1
    assert over_data["rejected"] == 1 and over_data["sparseps_pushes_total"] == 4
    # ids and rows: 3 pushes of 3 rows, the PushPull's row, and the refused NaN row (received, then checked)
    assert over_data["sparseps_bytes_received_total"] == 3 * (3 * 8 + 3 * 16) + 2 * (8 + 16)
    assert over_data["sparseps_bytes_sent_total"] == 3 * 16 + 16


# ---------------------------------------------------------------------------- 4. tokens and TLS
@pytest.fixture(scope="module")
def token_server(pki):
    srv = LocalServer("--backend", "numpy", "--tokens-file", pki["tokens"], "--no-malloc-tuning")
    with sparseps.connect(srv.address, token=TOKENS["admin"], timeout=5, retry_deadline=5) as c:
        c.create_optimizer("sgd", "SGD", learning_rate=1.0)
        c.create_variable("emb", initial_value=np.zeros((16, 4), np.float32), optimizer="sgd")
    yield srv
    srv.stop()


def _state(address, **kw):
    with sparseps.connect(address, token=TOKENS["admin"], data_plane=False, timeout=5, retry_deadline=5, **kw) as c:
        return c.pull("emb"), c.optimizer("sgd").iterations


def _hello(token):
    return f"authorization: Bearer {token}".encode()


def test_tokens_on_the_data_plane(token_server):
    before, its = _state(token_server.address)
    with sparseps.connect(token_server.address, token=TOKENS["read"], timeout=5) as c:
        port = data_port(c)
        assert c.data_plane == [f"127.0.0.1:{port}"]
    one_row = push_msg([("emb", np.array([1]), np.ones((1, 4), np.float32))], optimizers=["sgd"])
    with Conn(port) as conn:
        # no HELLO: no role
        text = refused(conn.call(frames.PUSH, *one_row), grpc.StatusCode.UNAUTHENTICATED, "Push", "no token")
        refused(conn.call(frames.PULL, *pull_msg("emb")), grpc.StatusCode.UNAUTHENTICATED, "Pull", "no token")
        # a token that is not in the file
        conn.send_raw(frames.HELLO, _hello("not-a-token"))
        refused(conn.answer(), grpc.StatusCode.UNAUTHENTICATED, "unknown token", method=frames.HELLO)
        refused(conn.call(frames.PUSH, *one_row), grpc.StatusCode.UNAUTHENTICATED)
        # read: pulls yes, pushes no
        conn.send_raw(frames.HELLO, _hello(TOKENS["read"]))
        info, _ = decoded(conn.answer(), frames.HELLO)
        assert info.num_shards == 1
        text += refused(conn.call(frames.PUSH, *one_row), grpc.StatusCode.PERMISSION_DENIED,
                        "Push needs the 'train' role")
        text += refused(conn.call(frames.PUSH_PULL, pb.PushPullRequest(push=one_row[0]), one_row[1]),
                        grpc.StatusCode.PERMISSION_DENIED, "PushPull needs the 'train' role")
        _, (values, _ids) = decoded(conn.call(frames.PULL, *pull_msg("emb")))
        np.testing.assert_array_equal(values, before)
        assert not any(t in text for t in TOKENS.values())
        assert _state(token_server.address)[1] == its and np.array_equal(_state(token_server.address)[0], before)
        # train: the push goes through on the same connection
        conn.send_raw(frames.HELLO, _hello(TOKENS["train"]))
        decoded(conn.answer(), frames.HELLO)
        msg, _ = decoded(conn.call(frames.PUSH, *one_row), frames.PUSH)
        assert msg.iterations[0].iterations == its + 1
    after, its_after = _state(token_server.address)
    assert its_after == its + 1 and np.array_equal(after[1], before[1] - 1)
    # the client: a read token's push is refused on the data plane, a train token's works there
    with sparseps.connect(token_server.address, token=TOKENS["read"], timeout=5) as c:
        assert c.data_plane[0] is not None
        with pytest.raises(sparseps.PermissionDenied, match="Push needs the 'train' role"):
            c.push({"emb": (np.array([2]), np.ones((1, 4), np.float32))})
        np.testing.assert_array_equal(c.pull("emb"), after)
    with sparseps.connect(token_server.address, token=TOKENS["train"], timeout=5) as c:
        assert c.data_plane[0] is not None
        assert c.push({"emb": (np.array([2]), np.ones((1, 4), np.float32))}) == its + 2
    final, its_final = _state(token_server.address)
    assert its_final == its + 2 and final[2].tolist() == (after[2] - 1).tolist()


def test_tls_data_plane(tls_server, pki):
    with sparseps.connect(tls_server.address, tls_ca=pki["ca.pem"], timeout=5, retry_deadline=5) as c:
        assert c.server_info[0].data_tls and c.data_plane == [f"127.0.0.1:{data_port(c)}"]
        port = data_port(c)
        c.create_optimizer("sgd", "SGD", learning_rate=1.0)
        c.create_variable("emb", initial_value=np.zeros((16, 4), np.float32), optimizer="sgd")
        assert c.push({"emb": (np.array([1, 1]), np.ones((2, 4), np.float32))}) == 1
        np.testing.assert_array_equal(c.pull("emb", [1]), [[-2] * 4])
        assert c._data[0]._idle and isinstance(c._data[0]._idle[0], ssl.SSLSocket)
    state = lambda: _state(tls_server.address, tls_ca=pki["ca.pem"])  # noqa: E731
    before, its = state()
    # a plaintext frame to the TLS port: no answer, the connection closes, nothing changes
    with Conn(port) as conn:
        conn.sock.settimeout(10)
        conn.send(frames.PUSH, *push_msg([("emb", np.array([3]), np.ones((1, 4), np.float32))]))
        got = b""
        try:
            while chunk := conn.sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        assert not got.startswith(frames.MAGIC), got[:40]
    after, its_after = state()
    assert its_after == its and np.array_equal(after, before)
    # TLS given only as opaque gRPC credentials: the client cannot use them for the data port
    creds = grpc.ssl_channel_credentials(open(pki["ca.pem"], "rb").read())
    with sparseps.connect(tls_server.address, credentials=creds, timeout=5, retry_deadline=5) as c:
        assert c.data_plane == [None]
        assert c.push({"emb": (np.array([3]), np.ones((1, 4), np.float32))}) == its + 1
    # a raw TLS connection (server verified against the CA) speaks frames
    ctx = ssl.create_default_context(cafile=pki["ca.pem"])
    with Conn(port, tls=ctx) as conn:
        _, (values,) = decoded(conn.call(frames.PULL, *pull_msg("emb", [3, 1])))
        np.testing.assert_array_equal(values, [[-1] * 4, [-2] * 4])


def test_mutual_tls_and_tokens_data_plane(mtls_server, pki):
    kw = dict(tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"], tls_key=pki["client.key"], timeout=5,
              retry_deadline=5)
    with sparseps.connect(mtls_server.address, token=TOKENS["admin"], **kw) as c:
        assert c.server_info[0].data_tls and c.data_plane[0] is not None
        port = data_port(c)
        c.create_optimizer("sgd", "SGD", learning_rate=1.0)
        c.create_variable("emb", initial_value=np.zeros((16, 4), np.float32), optimizer="sgd")
    with sparseps.connect(mtls_server.address, token=TOKENS["train"], **kw) as c:
        assert c.data_plane[0] is not None
        assert c.push({"emb": (np.array([5]), np.ones((1, 4), np.float32))}) == 1
        it, rows = c.push_pull({"emb": (np.array([5]), np.ones((1, 4), np.float32))}, {"emb": [5, 0]})
        assert it == 2 and rows["emb"].tolist() == [[-2] * 4, [0] * 4]
    # certificates given as bytes work as well
    kw_bytes = dict(kw, tls_ca=open(pki["ca.pem"], "rb").read(), tls_cert=open(pki["client.pem"], "rb").read(),
                    tls_key=open(pki["client.key"], "rb").read())
    with sparseps.connect(mtls_server.address, token=TOKENS["read"], **kw_bytes) as c:
        assert c.data_plane[0] is not None
        with pytest.raises(sparseps.PermissionDenied, match="Push needs the 'train' role"):
            c.push({"emb": (np.array([6]), np.ones((1, 4), np.float32))})
        np.testing.assert_array_equal(c.pull("emb", [5, 6]), [[-2] * 4, [0] * 4])
    state = lambda: _state(mtls_server.address, **{k: v for k, v in kw.items() if k.startswith("tls")})  # noqa
    before, its = state()
    assert its == 2
    # without a client certificate (TLS verifies the server only): no frame is ever answered
    for cert in (None, "rogue"):
        ctx = ssl.create_default_context(cafile=pki["ca.pem"])
        if cert:
            ctx.load_cert_chain(pki[f"{cert}.pem"], pki[f"{cert}.key"])
        answered = None
        try:
            with Conn(port, tls=ctx) as conn:
                conn.send_raw(frames.HELLO, _hello(TOKENS["admin"]))
                conn.send(frames.PUSH, *push_msg([("emb", np.array([7]), np.ones((1, 4), np.float32))]))
                answered = conn.answer()
        except (ssl.SSLError, OSError):
            pass
        assert answered is None, (cert, answered)
    after, its_after = state()
    assert its_after == its and np.array_equal(after, before)


# ---------------------------------------------------------------------------- 5. memory budget
def test_memory_budget_sheds_an_over_budget_frame_and_the_connection_serves_on():
    """--memory-budget-mb sheds backlog (a lone request is always admitted): a push whose payload is
    still arriving holds 0.9 MiB of a 1 MiB budget while other frames come in. The metrics show it."""
    mport, = free_ports(1)
    with LocalServer("--backend", "numpy", "--memory-budget-mb", "1", "--no-malloc-tuning",
                     "--metrics-port", str(mport)) as srv, \
            sparseps.connect(srv.address, data_plane=False, timeout=10, retry_deadline=5) as admin_c, \
            sparseps.connect(srv.address, timeout=10, retry_deadline=5) as c:
        admin_c.create_optimizer("lazy", "LazyAdam", learning_rate=0.1)
        admin_c.create_variable("emb", initial_value=np.ones((400, 64), np.float32), optimizer="lazy")
        admin_c.push({"emb": (np.array([0]), np.ones((1, 64), np.float32))})
        before = snapshot(admin_c, "lazy")
        port = data_port(c)
        assert c.data_plane[0] is not None
        slow_req, slow_arrays = push_msg([("emb", np.arange(3500) % 400, np.ones((3500, 64), np.float32))])
        slow_payload = b"".join(a.tobytes() for a in slow_arrays)   # 3500 x (8 + 256) bytes: 0.88 MiB
        with Conn(port) as slow, Conn(port) as conn:
            slow.send_raw(frames.PUSH, slow_req.SerializeToString(), slow_payload[:1000],
                          payload_len=len(slow_payload))
            # wait until the slow push holds its share (a pull in flight when it arrives would have it
            # shed instead: a lone request is always admitted, but not beside another)
            wait_until(lambda: sample(mport, "sparseps_memory_budget_in_use_bytes") >= len(slow_payload),
                       what="the slow push to be admitted")
            # a pull whose answer would not fit beside it (1000 rows x (256 + 8) bytes)
            answer = conn.call(frames.PULL, *pull_msg("emb", np.arange(1000) % 400))
            refused(answer, grpc.StatusCode.RESOURCE_EXHAUSTED, "memory budget", method=frames.PULL)
            # a push of 1000 rows: shed, nothing applied, and the connection stays in step
            big = push_msg([("emb", np.arange(1000) % 400, np.ones((1000, 64), np.float32))])
            refused(conn.call(frames.PUSH, *big), grpc.StatusCode.RESOURCE_EXHAUSTED, "memory budget",
                    "nothing was applied", method=frames.PUSH)
            refused(conn.call(frames.PUSH_PULL, pb.PushPullRequest(push=big[0]), big[1]),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "memory budget", method=frames.PUSH_PULL)
            with pytest.raises(sparseps.ResourceExhausted, match="memory budget"):   # the client: not retried
                c.push({"emb": (np.arange(1000) % 400, np.ones((1000, 64), np.float32))})
            assert same(before, snapshot(admin_c, "lazy"))   # (a whole-table read still fits: 400 rows)
            _, (rows,) = decoded(conn.call(frames.PULL, *pull_msg("emb", [1, 0])))   # a small one fits
            np.testing.assert_array_equal(rows, before[-1][[1, 0]])
            # the slow push completes and is applied; then the budget admits everything again
            slow.sock.sendall(slow_payload[1000:])
            msg, _ = decoded(slow.answer(), frames.PUSH)
            assert msg.iterations[0].iterations == 2
            msg, _ = decoded(conn.call(frames.PUSH, *big), frames.PUSH)
            assert msg.iterations[0].iterations == 3
            budget = [sample(mport, f"sparseps_{n}") for n in ("memory_budget_bytes", "memory_budget_in_use_bytes",
                                                               "requests_shed_total")]
            assert budget == [1 << 20, 0, 4]   # limit, in use, shed (3 frames and c.push)
        assert c.push({"emb": (np.arange(1000) % 400, np.ones((1000, 64), np.float32))}) == 4


@pytest.mark.parametrize("data_plane", [True, False])
def test_a_whole_table_pull_in_chunks_is_charged_per_chunk(data_plane):
    """The memory budget charges a range pull the rows of its range, not the whole table: a 4 MiB
    table pulled in 1 MiB chunks fits beside 0.5 MiB in flight under a 2 MiB budget."""
    mport, = free_ports(1)
    with LocalServer("--backend", "numpy", "--memory-budget-mb", "2", "--max-message-mb", "1",
                     "--no-malloc-tuning", "--metrics-port", str(mport)) as srv, \
            sparseps.connect(srv.address, max_message_mb=1, data_plane=data_plane, timeout=10,
                             retry_deadline=5) as c, \
            sparseps.connect(srv.address, timeout=10, retry_deadline=5) as dp:
        c.create_optimizer("sgd", "SGD", learning_rate=1.0)
        c.create_variable("big", shape=(16384, 64), initializer="Ones", optimizer="sgd")
        table = np.ones((16384, 64), np.float32)
        slow_req, slow_arrays = push_msg([("big", np.arange(2000), np.ones((2000, 64), np.float32))])
        slow_payload = b"".join(a.tobytes() for a in slow_arrays)   # 2000 x (8 + 256) bytes: 0.5 MiB
        with Conn(data_port(dp)) as slow:
            slow.send_raw(frames.PUSH, slow_req.SerializeToString(), slow_payload[:1000],
                          payload_len=len(slow_payload))
            wait_until(lambda: sample(mport, "sparseps_memory_budget_in_use_bytes") >= len(slow_payload),
                       what="the slow push to be admitted")
            np.testing.assert_array_equal(c.pull("big"), table)   # 5 chunks, none shed
            slow.sock.sendall(slow_payload[1000:])
            msg, _ = decoded(slow.answer(), frames.PUSH)
            assert msg.iterations[0].iterations == 1
        assert sample(mport, "sparseps_requests_shed_total") == 0


@pytest.mark.parametrize("data_plane", [True, False])
def test_a_waiting_pull_holds_no_budget_for_its_answer_while_it_waits(data_plane):
    """A pull waiting for step 1 of a 0.75 MiB table is charged its answer once the step is there:
    while it waits, the push that makes step 1 (0.26 MiB) fits under a 1 MiB budget."""
    mport, = free_ports(1)
    with LocalServer("--backend", "numpy", "--memory-budget-mb", "1", "--no-malloc-tuning",
                     "--metrics-port", str(mport)) as srv, \
            sparseps.connect(srv.address, data_plane=data_plane, timeout=30, retry_deadline=5) as c:
        c.create_optimizer("sgd", "SGD", learning_rate=1.0)
        c.create_variable("t", shape=(3000, 64), initializer="Zeros", optimizer="sgd")
        got = {}
        waiter = threading.Thread(target=lambda: got.setdefault("rows", c.pull("t", min_iterations=1, timeout=20)))
        waiter.start()
        wait_until(lambda: sample(mport, "sparseps_requests_in_flight") == 1, what="the pull to wait")
        assert c.push({"t": (np.arange(1000), np.ones((1000, 64), np.float32))}) == 1
        waiter.join(30)
        expected = np.zeros((3000, 64), np.float32)
        expected[:1000] = -1
        np.testing.assert_array_equal(got["rows"], expected)
        assert sample(mport, "sparseps_requests_shed_total") == 0


def test_at_the_connection_limit_the_oldest_idle_connection_makes_room():
    """SPARSEPS_DATA_MAX_CONNECTIONS: with every slot taken by idle connections (spare pooled ones,
    or ones whose host is gone), a new connection closes the oldest idle one instead of being refused."""
    with LocalServer("--backend", "numpy", "--no-malloc-tuning", env={"SPARSEPS_DATA_MAX_CONNECTIONS": "3"}) as srv, \
            sparseps.connect(srv.address, data_plane=False) as admin:
        admin.create_optimizer("sgd", "SGD", learning_rate=1.0)
        admin.create_variable("emb", initial_value=np.zeros((4, 2), np.float32), optimizer="sgd")
        port = admin.server_info[0].data_port
        idle = [Conn(port) for _ in range(3)]
        try:
            msg, _ = decoded(idle[2].call(frames.PUSH, *push_msg([("emb", np.array([1]), np.ones((1, 2), np.float32))])),
                             frames.PUSH)   # the newest has served a frame: all 3 are idle now
            assert msg.iterations[0].iterations == 1
            with sparseps.connect(srv.address, timeout=10, retry_deadline=2) as c:   # a 4th connection
                assert c.data_plane[0] is not None
                assert c.push({"emb": (np.array([2]), np.ones((1, 2), np.float32))}) == 2
            assert idle[0].closed()      # the oldest made room
        finally:
            for conn in idle:
                conn.close()
        np.testing.assert_array_equal(admin.pull("emb")[:, 0], [0, -1, -1, 0])


def test_a_sender_stalled_mid_frame_is_dropped_and_its_budget_released():
    """SPARSEPS_FRAME_TIMEOUT_S: a frame whose bytes stop coming loses its connection; nothing of it
    is applied, the memory it reserved is free again, and an idle connection is not dropped."""
    with LocalServer("--backend", "numpy", "--memory-budget-mb", "1", "--no-malloc-tuning",
                     env={"SPARSEPS_FRAME_TIMEOUT_S": "1"}) as srv, \
            sparseps.connect(srv.address, data_plane=False, timeout=10, retry_deadline=5) as admin_c, \
            sparseps.connect(srv.address, timeout=10, retry_deadline=5) as c:
        admin_c.create_optimizer("lazy", "LazyAdam", learning_rate=0.1)
        admin_c.create_variable("emb", initial_value=np.ones((400, 64), np.float32), optimizer="lazy")
        before = admin_c.pull("emb")
        port = data_port(c)
        slow_req, slow_arrays = push_msg([("emb", np.arange(3500) % 400, np.ones((3500, 64), np.float32))])
        slow_payload = b"".join(a.tobytes() for a in slow_arrays)   # 0.88 MiB of the 1 MiB budget
        with Conn(port) as slow, Conn(port) as idle:
            slow.send_raw(frames.PUSH, slow_req.SerializeToString(), slow_payload[:1000],
                          payload_len=len(slow_payload))
            time.sleep(2.5)          # more than the frame timeout, for both connections
            assert slow.closed()     # the stalled frame's connection was dropped
            # its 0.88 MiB are free again: a 0.25 MiB push is admitted, on the connection idle all along
            big = push_msg([("emb", np.arange(1000) % 100, np.ones((1000, 64), np.float32))])
            msg, _ = decoded(idle.call(frames.PUSH, *big), frames.PUSH)
            assert msg.iterations[0].iterations == 1   # the stalled push was never applied
        after = admin_c.pull("emb")
        np.testing.assert_array_equal(after[100:], before[100:])   # rows only the stalled push had
        assert np.all(after[:100] < before[:100])
        assert admin_c.optimizer("lazy").iterations == 1


# ---------------------------------------------------------------------------- 6. restart on a new data port
def test_restart_on_a_new_data_port_loses_and_duplicates_nothing(tmp_path):
    srv = LocalServer("--backend", "numpy", "--data-dir", str(tmp_path), "--no-malloc-tuning")
    port, rows, dim = srv.port, 32, 2
    try:
        c = sparseps.connect(srv.address, retry_deadline=60, timeout=10)
        old = c.data_plane[0]
        assert old is not None
        c.create_optimizer("sgd", "SGD", learning_rate=1.0)
        c.create_variable("emb", initial_value=np.zeros((rows, dim), np.float32), optimizer="sgd")
        acked = np.zeros(rows, np.int64)
        pushes = [0]
        stop, failures = threading.Event(), []

        def worker():
            rng = np.random.default_rng(1)
            while not stop.is_set():
                ids = rng.choice(rows, size=3, replace=False)
                try:
                    c.push({"emb": (ids, np.ones((3, dim), np.float32))})
                except sparseps.Error as e:
                    failures.append(e)
                    return
                acked[ids] += 1
                pushes[0] += 1

        t = threading.Thread(target=worker)
        t.start()
        try:
            deadline = time.monotonic() + 30
            while pushes[0] < 100 and time.monotonic() < deadline:
                time.sleep(0.005)
            srv.kill()
            killed_at = pushes[0]
            time.sleep(0.2)
            (new_port,) = [p for p in free_ports(2) if f"127.0.0.1:{p}" != old][:1]
            srv = LocalServer("--backend", "numpy", "--data-dir", str(tmp_path), "--data-port", str(new_port),
                              "--no-malloc-tuning", port=port)
            while pushes[0] < killed_at + 100 and time.monotonic() < deadline + 30 and not failures:
                time.sleep(0.005)
        finally:
            stop.set()
            t.join(60)
        assert not failures, failures[:3]
        assert 0 < killed_at and pushes[0] >= killed_at + 100, (killed_at, pushes[0])
        assert c.data_plane == [f"127.0.0.1:{new_port}"]   # the retry followed the shard to its new port
        with sparseps.connect(srv.address, data_plane=False) as g:
            np.testing.assert_array_equal(g.pull("emb"), -acked[:, None].astype(np.float32) * np.ones((1, dim)))
            assert g.optimizer("sgd").iterations == pushes[0]
        c.close()
    finally:
        srv.stop()


# ---------------------------------------------------------------------------- 8. fuzz
FUZZ_SEED = int(os.environ.get("SPARSEPS_FUZZ_SEED", "20261121"))
FUZZ_FRAMES = int(os.environ.get("SPARSEPS_DATA_FUZZ_FRAMES", "5000"))
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
FUZZ_NAMES = ["", "fz_emb ", "FZ_EMB", "fz_emb\x00", "nope", "fz_lazy", "x" * 3000, "\U0001f600", "../etc"]


def _fuzz_world(c):
    c.create_optimizer("fz_lazy", "LazyAdam", learning_rate=0.01)
    c.create_optimizer("fz_sgdm", "SGD", learning_rate=0.1, momentum=0.5)
    rng = np.random.default_rng(0)
    c.create_variable("fz_emb", initial_value=rng.standard_normal((64, 8)).astype(np.float32), optimizer="fz_lazy")
    c.create_variable("fz_e64", initial_value=rng.standard_normal((32, 4)), optimizer="fz_sgdm")
    c.create_variable("fz_dense", initial_value=np.ones(16, np.float32), optimizer="fz_lazy")
    c.create_variable("fz_mat", initial_value=np.zeros((6, 3, 2), np.float32), optimizer="fz_sgdm")


def _fuzz_state(c) -> list:
    out = []
    for name, var in (("fz_lazy", "fz_emb"), ("fz_lazy", "fz_dense"), ("fz_sgdm", "fz_mat"), ("fz_sgdm", "fz_e64")):
        opt = c.optimizer(name)
        out += [opt.iterations, c.pull(var)] + [opt.get_slot(var, s) for s in opt.get_slot_names()]
    return out


def _templates(rng):
    """Valid requests: (method, message, arrays). Pushes carry (client "fuzz", sequence k) and are
    applied once before fuzzing, so that a mutation which stays valid is a duplicate (changes nothing)."""
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    pushes = [
        push_msg([("fz_emb", rng.integers(0, 64, 5), f32(5, 8))], client_id="fuzz", sequence=1),
        push_msg([("fz_dense", None, f32(16)), ("fz_emb", np.array([0, 0]), f32(2, 8))], client_id="fuzz", sequence=2),
        push_msg([("fz_e64", np.array([3, 3, 31], np.int32), rng.standard_normal((3, 4))),
                  ("fz_mat", np.array([5]), f32(1, 3, 2))], client_id="fuzz", sequence=3),
    ]
    pp_push, pp_arrays = push_msg([("fz_emb", rng.integers(0, 64, 3), f32(3, 8))], client_id="fuzz", sequence=4)
    pp = pb.PushPullRequest(push=pp_push)
    frames.describe(np.array([1, 63, 1]), pp.pulls.add(variable="fz_emb").ids, pp_arrays)
    pp.pulls.add(variable="fz_dense")
    return [(frames.PUSH, m, a) for m, a in pushes] + [(frames.PUSH_PULL, pp, pp_arrays),
                                                      (frames.PULL, *pull_msg("fz_emb", rng.integers(0, 64, 7))),
                                                      (frames.PULL, *pull_msg("fz_mat")),
                                                      (frames.PULL, pb.PullRequest(variable="fz_e64", row_start=2,
                                                                                   row_stop=9), [])]


def _mutate(rng: random.Random, templates):
    """(method, meta, payload, header overrides or None, what): one fuzzed frame."""
    method, msg, arrays = rng.choice(templates)
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    kind = rng.randrange(9)
    if kind == 0:   # random bytes as the message
        return rng.choice([1, 2, 3, 4, 0, 5, 255]), rng.randbytes(rng.randrange(0, 200)), \
            rng.randbytes(rng.choice([0, 0, 8, 64])), None, "random meta"
    if kind == 1:   # flip bytes of the message
        meta = bytearray(msg.SerializeToString())
        for _ in range(rng.randrange(1, 4)):
            meta[rng.randrange(len(meta))] = rng.randrange(256)
        return method, bytes(meta), payload, None, "meta flips"
    if kind == 2:   # flip bytes of the payload (rows may turn NaN; ids may leave the table)
        p = bytearray(payload)
        for _ in range(rng.randrange(1, 6)):
            if p:
                p[rng.randrange(len(p))] = rng.randrange(256)
        return method, msg.SerializeToString(), bytes(p), None, "payload flips"
    if kind == 3:   # the payload longer or shorter than its tensors
        cut = rng.choice([-1, -4, -8, 1, 3, 8, 100])
        p = payload[:cut] if cut < 0 else payload + rng.randbytes(cut)
        return method, msg.SerializeToString(), p, None, "payload length"
    if kind in (4, 5):   # structured: one tensor's dtype, shape or bytes, or a name
        m = type(msg)()
        m.CopyFrom(msg)
        ts = [t for t, _ in frames.tensors(m)]
        choice = rng.randrange(6)
        if ts and choice == 0:
            rng.choice(ts).dtype = rng.choice([0, 1, 2, 3, 4, 5, 99, -1])
        elif ts and choice == 1:
            t = rng.choice(ts)
            t.shape[:] = [rng.choice([-1, 0, 1, 2, 5, 8, 2 ** 31, 2 ** 62]) for _ in range(rng.randrange(0, 5))]
        elif ts and choice == 2:
            rng.choice(ts).data = rng.randbytes(rng.randrange(1, 40))
        else:
            named = [g for g in getattr(m, "gradients", [])] + list(getattr(m, "pulls", [])) + \
                ([m] if isinstance(m, pb.PullRequest) else []) + \
                (list(m.push.gradients) if isinstance(m, pb.PushPullRequest) else [])
            if not named:
                return method, m.SerializeToString(), payload, None, "unchanged"
            rng.choice(named).variable = rng.choice(FUZZ_NAMES)
        return method, m.SerializeToString(), payload, None, "structured"
    if kind == 6:   # header: method and the status / reserved bytes of a request
        return rng.choice([0, 1, 5, 6, 128, 255, method]), msg.SerializeToString(), payload, \
            dict(status=rng.randrange(256), reserved=rng.randrange(65536)), "header"
    if kind == 7:   # lengths that do not match what follows (the stream is out of step)
        return method, msg.SerializeToString(), payload, \
            dict(meta_len=max(0, len(msg.SerializeToString()) + rng.choice([-3, -1, 1, 7, 10 ** 6])),
                 payload_len=max(0, len(payload) + rng.choice([0, -5, 9, 2 ** 40]))), "desync"
    return method, msg.SerializeToString(), payload[:rng.randrange(len(payload) + 1)], \
        dict(magic=rng.choice([b"SPS0", b"\0\0\0\0", b"GET ", frames.MAGIC]), truncated=True), "truncated"


def test_fuzzed_frames_never_crash_the_server_nor_change_state(dp, dpc, admin):
    _fuzz_world(admin)
    rng_np = np.random.default_rng(FUZZ_SEED)
    templates = _templates(rng_np)
    with Conn(data_port(dpc)) as conn:   # apply each push template once: a valid mutation is then a duplicate
        for method, msg, arrays in templates:
            decoded(conn.call(method, msg, arrays), method)
    baseline = _fuzz_state(admin)
    port, rng = data_port(dpc), random.Random(FUZZ_SEED)
    seen: dict = {}
    applied = {("fuzz", k) for k in (1, 2, 3, 4)}
    accepted = 0
    conn = Conn(port, timeout=10)
    started = time.monotonic()
    try:
        for i in range(FUZZ_FRAMES):
            method, meta, payload, over, what = _mutate(rng, templates)
            # A frame whose message parses as a push under another (client, sequence) than the applied
            # templates' may be a valid step: the state is checked right before it, and taken again
            # after it if it was applied. Pulls that wait for steps are not fuzzed.
            risky = False
            try:
                parsed = frames.REQUESTS[method].FromString(meta) if method in frames.REQUESTS else None
            except Exception:
                parsed = None
            if method == frames.PULL and parsed is not None and (parsed.min_iterations or parsed.worker_id):
                continue
            if method in (frames.PUSH, frames.PUSH_PULL) and parsed is not None:
                push = parsed if method == frames.PUSH else parsed.push
                risky = not push.client_id or (push.client_id, push.sequence) not in applied
                if risky:
                    assert same(baseline, _fuzz_state(admin)), f"state changed by frames before {i}"
            if over is None or not ({"meta_len", "payload_len", "magic"} & set(over)):
                head = frames.HEADER.pack(frames.MAGIC, method, (over or {}).get("status", 0),
                                          (over or {}).get("reserved", 0), len(meta), len(payload))
                conn.sock.sendall(head + meta + payload)
                answer = conn.answer()
                assert answer is not None, (i, what, method, meta[:80])
                answers = [answer]
            else:   # out of step: a connection of its own, closed for writing after the frame
                one, answers = Conn(port, timeout=10), []
                try:
                    head = frames.HEADER.pack(over.get("magic", frames.MAGIC), method, 0, 0,
                                              over.get("meta_len", len(meta)), over.get("payload_len", len(payload)))
                    one.sock.sendall(head + meta + payload)
                    one.sock.shutdown(socket.SHUT_WR)
                    while (a := one.answer()) is not None:
                        answers.append(a)
                except TimeoutError:
                    raise AssertionError(f"frame {i} ({what}): the server neither answered nor closed") from None
                except (OSError, ValueError):   # the server closed first (a reset, or an answer cut short)
                    pass
                finally:
                    one.close()
            stepped = False
            for got, status, text, body in answers:
                code = CODE.get(status, status)
                seen[code] = seen.get(code, 0) + 1
                assert code not in NEVER, (i, what, code, text[:300])
                assert got == method, (i, what, got, method, text[:200])
                if status:
                    assert text and body == b"", (i, what)
                elif got in (frames.PUSH, frames.PUSH_PULL):
                    resp = frames.RESPONSES[got].FromString(text)
                    pushed = resp if got == frames.PUSH else resp.push
                    if not pushed.duplicate:   # a mutation that stayed a valid push: a real step
                        assert risky, f"frame {i} ({what}) was applied: {meta!r}"
                        applied.add((push.client_id, push.sequence))
                        accepted += 1
                        stepped = True
                        baseline = _fuzz_state(admin)
            if risky and not stepped:
                assert same(baseline, _fuzz_state(admin)), f"refused frame {i} ({what}) changed the state"
            if i % 500 == 499:
                assert same(baseline, _fuzz_state(admin)), f"state changed by frames up to {i}"
                assert dp.proc.poll() is None
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    assert same(baseline, _fuzz_state(admin))
    assert dp.proc.poll() is None and admin.server_info[0].num_shards == 1
    with open(dp.log_path, errors="replace") as f:
        log = f.read()
    assert "Traceback" not in log and " failed" not in log, log[-3000:]
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
                 grpc.StatusCode.OK):
        assert seen.get(code, 0) > 20, seen   # the fuzz reached the checks it is meant to hit
    assert elapsed < 60, elapsed
    print(f"\n{FUZZ_FRAMES} fuzzed frames in {elapsed:.1f} s, {accepted} valid mutations applied: "
          f"{sorted((str(k), v) for k, v in seen.items())}")
