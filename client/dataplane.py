"""Connections to one shard's data port: Pull, Push and PushPull without gRPC's copies.

A shard advertises its data port in ServerInfo; `Client` then sends those three calls here and
everything else over gRPC. Each call borrows one idle connection (a new one when all are busy,
so threads never queue behind each other), sends one frame and reads one answer straight into
numpy arrays (client/frames.py). A connection that fails is dropped and the call raises
UNAVAILABLE, which the client retries like a gRPC UNAVAILABLE (pushes are exactly-once).
"""
import os
import socket
import ssl
import tempfile
import threading
import types

import numpy as np

from sparseps import errors, frames
from sparseps.proto import sparseps_pb2 as pb
from sparseps.tensors import _FROM_WIRE

MAX_IDLE = 8   # idle connections kept per shard


def host_of(address: str) -> str:
    """'h:p' -> 'h', '[::1]:p' -> '::1', 'dns:///h:p' -> 'h'."""
    a = address.split("///")[-1]
    host = a.rsplit(":", 1)[0] if ":" in a else a
    return host[1:-1] if host.startswith("[") else host


def client_tls_context(ca=None, cert=None, key=None) -> ssl.SSLContext:
    """The data port's TLS from the same PEM paths or bytes as the gRPC channel."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        if isinstance(ca, (bytes, bytearray)):
            ctx.load_verify_locations(cadata=bytes(ca).decode("ascii"))
        else:
            ctx.load_verify_locations(cafile=ca)
    if cert is not None and key is not None:
        if isinstance(cert, (bytes, bytearray)) or isinstance(key, (bytes, bytearray)):
            # ssl reads a client certificate only from files: a private temporary copy, removed at once
            with tempfile.TemporaryDirectory() as d:
                paths = []
                for what, v in (("cert", cert), ("key", key)):
                    p = os.path.join(d, what + ".pem")
                    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        if isinstance(v, (bytes, bytearray)):
                            f.write(v)
                        else:
                            with open(v, "rb") as src:
                                f.write(src.read())
                    paths.append(p)
                ctx.load_cert_chain(*paths)
        else:
            ctx.load_cert_chain(cert, key)
    return ctx


class DataChannel:
    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None, server_name: str | None = None,
                 token: str | None = None, timeout: float | None = None):
        self.host, self.port, self.tls, self.server_name = host, port, tls, server_name or host
        self.token, self.timeout = token, timeout
        self._idle: list = []
        self._lock = threading.Lock()
        self._closed = False

    def moved(self, port: int, host: str | None = None) -> "DataChannel":
        """The same shard's connections at another port (a restarted shard may pick a new one),
        or at another host (a replicated shard's new leader)."""
        return DataChannel(host or self.host, port, tls=self.tls, server_name=self.server_name, token=self.token,
                           timeout=self.timeout)

    def __repr__(self):
        return f"DataChannel({self.host}:{self.port}{' tls' if self.tls else ''})"

    # ------------------------------------------------------------------ connections
    def _open(self, connect_timeout: float = 10.0):
        try:
            sock = socket.create_connection((self.host, self.port), timeout=connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
            sock.settimeout(self.timeout)
            if self.token is not None or self.tls is not None:
                meta = f"authorization: Bearer {self.token}".encode() if self.token else b""
                frames.send_frame(sock, frames.HELLO, 0, meta)
                self._read(sock, frames.HELLO)
            return sock
        except errors.Error:
            raise
        except (OSError, ssl.SSLError, ValueError) as e:
            raise errors.Unavailable(f"data plane {self.host}:{self.port}: {e}") from None

    def probe(self):
        """Open and keep one connection; raises Unavailable (or the HELLO's error) if the port is unusable."""
        self._release(self._open(connect_timeout=3.0))

    def _borrow(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._open()

    def _release(self, sock):
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(sock)
                return
        sock.close()

    def close(self):
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for s in idle:
            try:
                s.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ calls
    def call(self, method: int, request, attachments=()):
        """Send one request; the answer, whose tensors are numpy arrays (`.values`, `.ids`)."""
        return self.finish(self.start(method, request, attachments))

    def start(self, method: int, request, attachments=()):
        """Send a request without waiting for its answer (a client fans out to shards this way,
        without threads); `finish` reads the answer."""
        meta = request.SerializeToString()
        sock = self._borrow()
        try:
            frames.send_frame(sock, method, 0, meta, attachments)
        except Exception as e:
            raise self._failed(sock, method, e) from None
        return sock, method

    def finish(self, pending):
        sock, method = pending
        try:
            answer = self._read(sock, method)
        except errors.Error:
            self._release(sock)   # a status answer leaves the connection in step
            raise
        except Exception as e:
            raise self._failed(sock, method, e) from None
        self._release(sock)
        return answer

    def _failed(self, sock, method, e) -> errors.Error:
        sock.close()
        if isinstance(e, socket.timeout):
            return errors.DeadlineExceeded(f"{frames.METHODS[method]}: no answer from the data plane "
                                           f"{self.host}:{self.port} within {self.timeout} s")
        if isinstance(e, (OSError, ssl.SSLError, ValueError)):
            return errors.Unavailable(f"{frames.METHODS[method]}: data plane {self.host}:{self.port}: "
                                      f"{e or type(e).__name__}")
        raise e

    def _read(self, sock, method):
        head = bytearray(frames.HEADER.size)
        if not frames.recv_exact(sock, memoryview(head)):
            raise ConnectionError("the server closed the connection")
        got, status, meta_len, payload_len = frames.parse_header(bytes(head))
        if got != method or meta_len > frames.MAX_META:
            raise ConnectionError(f"unexpected answer (method {got}, {meta_len} bytes)")
        meta = bytearray(meta_len)
        frames.recv_exact(sock, memoryview(meta))
        if status:
            frames.recv_exact(sock, memoryview(bytearray(payload_len)))
            raise errors.from_status(status, meta.decode("utf-8", "replace"))
        msg = frames.RESPONSES[method].FromString(bytes(meta))
        arrays = []
        for t, _ in frames.tensors(msg):
            a = np.empty(tuple(t.shape), _FROM_WIRE[t.dtype])
            if a.nbytes:
                frames.recv_exact(sock, memoryview(a).cast("B"))
            arrays.append(a)
        if sum(a.nbytes for a in arrays) != payload_len:
            raise ConnectionError("answer payload does not match its tensors")
        return _with_arrays(msg, iter(arrays))


def _with_arrays(msg, arrays):
    """The answer with each Tensor replaced by its array (the client reads .values / .ids)."""
    if isinstance(msg, pb.PullResponse):
        return types.SimpleNamespace(iterations=msg.iterations, values=next(arrays),
                                     ids=next(arrays) if msg.HasField("ids") else None)
    if isinstance(msg, pb.PushPullResponse):
        return types.SimpleNamespace(push=msg.push, pulls=[_with_arrays(p, arrays) for p in msg.pulls])
    return msg
