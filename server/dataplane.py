"""The data-plane transport: Pull, Push and PushPull as frames on a plain TCP (or TLS) socket.

Same requests, same checks, same state changes and same status codes as the gRPC methods
(service.py does the work, wire.py the conversions); only the bytes move differently: a request's
rows are received straight into one numpy buffer and an answer's rows go to the kernel without
being copied into a protobuf (client/frames.py has the format). One thread per connection; a
client keeps a few connections per shard. Tokens (a HELLO frame first), roles, TLS and the memory
budget apply as on the gRPC port.
"""
import logging
import os
import socket
import ssl
import struct
import threading
import time

import grpc
import numpy as np

from sparseps import errors, frames
from sparseps.proto import sparseps_pb2 as pb
from sparseps.tensors import elements

from . import wire
from .auth import METHOD_ROLES, RANK
from .limits import pull_answer_bytes, pull_waits
from .pushes import frame_record

log = logging.getLogger("sparseps.server")

MAX_CONNECTIONS = 512
DISCARD_SECONDS = 10.0   # how long a refused oversized frame's bytes are still read before closing


class _Refusal(Exception):
    def __init__(self, code, message, fatal=False):
        super().__init__(message)
        self.code, self.message, self.fatal = code, message, fatal


class DataPlane:
    def __init__(self, service, host: str, port: int, *, tls: ssl.SSLContext | None = None, auth=None,
                 budget=None, max_message: int = 256 << 20):
        self.service, self.tls, self.auth, self.budget = service, tls, auth, budget
        self.max_message = max_message
        # seconds without a byte in the middle of a frame before the connection is dropped (its
        # budget released, nothing applied); SPARSEPS_FRAME_TIMEOUT_S
        self.frame_timeout = float(os.environ.get("SPARSEPS_FRAME_TIMEOUT_S", "60"))
        # connections (one thread each); past it the oldest idle one is closed to make room
        self.max_connections = int(os.environ.get("SPARSEPS_DATA_MAX_CONNECTIONS", MAX_CONNECTIONS))
        self._listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self._conns: dict = {}   # socket -> busy flag
        self._lock = threading.Lock()
        self._stopping = False
        self._threads = []
        self._acceptor = threading.Thread(target=self._accept, name="dataplane-accept", daemon=True)

    def start(self):
        self._acceptor.start()
        return self

    def stop(self, grace: float = 5.0):
        """Stop accepting; idle connections close now, busy ones after their current frame."""
        self._stopping = True
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            for sock, busy in list(self._conns.items()):
                if not busy:
                    _shutdown(sock)
        deadline = time.monotonic() + grace
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for sock in list(self._conns):
                _shutdown(sock)

    # ------------------------------------------------------------------ connections
    def _accept(self):
        while not self._stopping:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= self.max_connections:
                    # make room by closing the oldest idle one (a client's spare pooled connection,
                    # or one whose host is gone); its owner reconnects when it needs it again
                    idle = next((c for c, busy in self._conns.items() if not busy), None)
                    if idle is None:
                        sock.close()
                        log.warning("data plane: %d connections busy, refused %s", self.max_connections, peer)
                        continue
                    del self._conns[idle]
                    _shutdown(idle)
                self._conns[sock] = False
            t = threading.Thread(target=self._serve, args=(sock, peer), name=f"dataplane-{peer[1]}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, raw, peer):
        sock = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                raw.settimeout(30)
                sock = self.tls.wrap_socket(raw, server_side=True)
                sock.settimeout(None)
                with self._lock:
                    self._conns[sock] = self._conns.pop(raw, False)
            role = "admin" if self.auth is None else None
            head = bytearray(frames.HEADER.size)
            # A sender that stalls mid-frame (or stops reading its answer) loses the connection; an
            # idle pooled connection may wait for ever. On plain TCP the kernel times the reads and
            # writes (SO_RCVTIMEO / SO_SNDTIMEO on a blocking socket): Python's own timeouts would
            # add a poll() and a GIL round trip to every read.
            plain = self.tls is None
            if plain:
                _kernel_timeouts(sock, self.frame_timeout)
            while not self._stopping:
                if not (self._next_frame(sock, memoryview(head)) if plain else
                        frames.recv_exact(sock, memoryview(head))):
                    return
                with self._lock:
                    self._conns[sock] = True
                if not plain:
                    sock.settimeout(self.frame_timeout)
                role = self._frame(sock, bytes(head), role)
                if not plain:
                    sock.settimeout(None)
                with self._lock:
                    self._conns[sock] = False
        except (ConnectionError, ValueError, OSError, ssl.SSLError) as e:
            if not self._stopping:
                log.debug("data plane connection from %s closed: %s", peer, e)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
                self._conns.pop(raw, None)
            _shutdown(sock)

    def _next_frame(self, sock, view) -> bool:
        """Wait, however long, for the next frame's header; False when the peer closed first."""
        while True:
            try:
                got = sock.recv_into(view)
                break
            except BlockingIOError:   # SO_RCVTIMEO with no byte of a new frame: only idle
                if self._stopping:
                    return False
        if got == 0:
            return False
        return got == len(view) or frames.recv_exact(sock, view[got:]) or _short()

    # ------------------------------------------------------------------ one frame
    def _frame(self, sock, head: bytes, role):
        method, _, meta_len, payload_len = frames.parse_header(head)
        name = frames.METHODS.get(method, f"method {method}")
        if meta_len > frames.MAX_META:
            raise ValueError(f"{name}: {meta_len} bytes of message header is more than allowed")
        meta = bytearray(meta_len)
        frames.recv_exact(sock, memoryview(meta)) or _short()
        if method == frames.HELLO:
            return self._hello(sock, bytes(meta), payload_len)
        start = time.perf_counter()
        svc = self.service
        svc.observe_start(name)
        ticket = 0
        try:
            if method not in frames.REQUESTS:
                self._drain(sock, payload_len)
                raise _Refusal(grpc.StatusCode.UNIMPLEMENTED, f"data plane: unknown method {method}")
            need = METHOD_ROLES[name]
            if role is None or RANK[role] < RANK[need]:
                self._drain(sock, payload_len)
                raise _Refusal(grpc.StatusCode.UNAUTHENTICATED if role is None else grpc.StatusCode.PERMISSION_DENIED,
                               f"{name}: no token (send HELLO with `authorization: Bearer TOKEN` first)" if role is None
                               else f"{name} needs the {need!r} role; this token has {role!r}")
            if payload_len + meta_len > self.max_message:
                raise _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{name}: the request ({payload_len + meta_len} bytes) is larger than max message "
                               f"size of this server ({self.max_message} bytes, --max-message-mb); nothing was "
                               "applied: send it in parts", fatal=True)
            try:
                request = frames.REQUESTS[method].FromString(bytes(meta))
            except Exception as e:
                self._drain(sock, payload_len)
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{name}: the request body is not a valid {frames.REQUESTS[method].__name__} "
                               f"({meta_len} bytes): {type(e).__name__}: {e}")
            if self.budget is not None:
                ticket = payload_len + meta_len + _pull_estimate(svc.shard, request)
                if not self.budget.try_acquire(ticket):
                    self._drain(sock, payload_len)
                    b, nbytes, ticket = self.budget, ticket, 0
                    raise _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, b.shed_message(name, nbytes))
            payload = np.empty(payload_len, np.uint8)
            frames.recv_exact(sock, memoryview(payload)) or _short()
            with svc.serving():
                answer, arrays = self._call(method, request, payload)
        except _Refusal as r:
            svc.observe_error(name, r.code)
            self._error(sock, method, r.code, r.message)
            if r.fatal:
                self._discard(sock, payload_len)
                raise ConnectionError(r.message)
            return role
        except errors.Error as e:
            svc.observe_error(name, e.code)
            self._error(sock, method, e.code, e.message)
            return role
        except MemoryError as e:
            svc.observe_error(name, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self._error(sock, method, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{name}: out of memory ({e}); "
                        "nothing was changed")
            return role
        except (ConnectionError, OSError):
            svc.observe_error(name, grpc.StatusCode.CANCELLED)
            raise
        except Exception as e:   # a bug: say so instead of dropping the connection
            log.exception("%s failed", name)
            svc.observe_error(name, grpc.StatusCode.INTERNAL)
            self._error(sock, method, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            return role
        finally:
            if ticket:
                self.budget.release(ticket)
            svc.observe_latency(name, time.perf_counter() - start)
        frames.send_frame(sock, method, 0, answer.SerializeToString(), arrays)
        return role

    def _call(self, method, request, payload):
        """(answer message with its tensors left empty, arrays of its payload)."""
        svc = self.service
        spec = frames.layout(request, len(payload))
        arrays = frames.views(payload, spec)
        if method == frames.PULL:
            ids = arrays[0] if request.HasField("ids") else None
            return _pull_answer(pb.PullResponse(), *svc.pull(request, ids))
        push = request if method == frames.PUSH else request.push
        record = None
        if self._needs_bytes(push):
            frames.reattach(push, arrays)   # kept for a sync step: its prepared request holds the rows
        elif svc.pushes.wal is not None:     # logged as received: the push's message and its bytes
            n = sum(1 for _ in frames.tensors(push))
            record = frame_record(push, payload[:spec[n][2]] if n < len(spec) else payload)
        it = iter(arrays)
        grads = wire.gradients_of(push, it)
        if method == frames.PUSH:
            return svc.push(request, grads, record), []
        pull_ids = [next(it) if q.HasField("ids") else None for q in request.pulls]
        pushed, pulls = svc.push_pull(request, grads, pull_ids, record)
        out, arrays = pb.PushPullResponse(push=pushed), []
        for p in pulls:
            arrays += _pull_answer(out.pulls.add(), *p)[1]
        return out, arrays

    def _needs_bytes(self, push) -> bool:
        sync = self.service.pushes.sync
        if sync is None:
            return False
        variables = self.service.shard.variables
        return sync.handles(list(push.optimizers) + [variables[g.variable].optimizer for g in push.gradients
                                                     if g.variable in variables])

    def _hello(self, sock, meta: bytes, payload_len: int):
        """HELLO: metadata pairs (`key: value` lines) -> the connection's role and the server's info."""
        self._drain(sock, payload_len)
        pairs = []
        for line in meta.decode("utf-8", "replace").splitlines():
            k, _, v = line.partition(":")
            pairs.append((k.strip().lower(), v.strip()))
        role = "admin"
        if self.auth is not None:
            role, reason = self.auth.role_of(pairs)
            if role is None:
                self.auth.denied += 1
                self._error(sock, frames.HELLO, grpc.StatusCode.UNAUTHENTICATED,
                            f"data plane: {reason}; this server needs `authorization: Bearer TOKEN` with a token "
                            "from its --tokens-file (sparseps.connect(address, token=...))")
                return None
        svc = self.service
        info = pb.ServerInfo(shard_index=svc.shard.index, num_shards=svc.shard.num_shards,
                             instance_id=svc.shard.instance_id)
        frames.send_frame(sock, frames.HELLO, 0, info.SerializeToString())
        return role

    def _drain(self, sock, n: int):
        """Read and drop a refused request's payload, so that the connection stays usable."""
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n > 0:
            frames.recv_exact(sock, scratch[:min(n, len(scratch))]) or _short()
            n -= min(n, len(scratch))

    def _discard(self, sock, n: int, seconds: float = DISCARD_SECONDS):
        """Before closing on a refused oversized frame: end our side, then read and drop what the
        sender is still writing (up to n bytes, for `seconds` at most). Closing with bytes unread
        resets the connection, and a reset can destroy the refusal before the sender reads it; it
        would see only a broken connection, and retry."""
        deadline = time.monotonic() + seconds
        scratch = memoryview(bytearray(min(max(n, 1), 1 << 20)))
        try:
            sock.shutdown(socket.SHUT_WR)
            while n > 0:
                left = deadline - time.monotonic()
                if left < 1e-3:   # (a zero kernel timeout would mean none)
                    return
                if self.tls is None:
                    _kernel_timeouts(sock, min(left, self.frame_timeout))
                else:
                    sock.settimeout(min(left, self.frame_timeout))
                got = sock.recv_into(scratch[:min(n, len(scratch))])
                if not got:
                    return
                n -= got
        except (OSError, ssl.SSLError):
            return

    @staticmethod
    def _error(sock, method, code, message):
        frames.send_frame(sock, method, code.value[0], wire.clip_message(message).encode("utf-8"))


def _pull_answer(resp: "pb.PullResponse", values, gids, iterations) -> tuple:
    """(resp filled: iterations and its tensors described, the tensors' arrays in wire order)."""
    resp.iterations = iterations
    arrays = []
    frames.describe(values, resp.values, arrays)
    if gids is not None:
        frames.describe(gids, resp.ids, arrays)
    return resp, arrays


def _pull_estimate(shard, request) -> int:
    """Bytes the pull answers of a Pull or PushPull will take, for the memory budget."""
    pulls = [request] if isinstance(request, pb.PullRequest) else \
        list(request.pulls) if isinstance(request, pb.PushPullRequest) else []
    return sum(pull_answer_bytes(shard, q.variable, elements(q.ids.shape, 1 << 40) if q.HasField("ids") else None,
                                 q.row_start, q.row_stop) for q in pulls if not pull_waits(q))


def _short():
    raise ConnectionError("connection closed in the middle of a frame")


def _kernel_timeouts(sock, seconds: float):
    """Blocking reads and writes that fail (EAGAIN) after `seconds` without progress."""
    if not 0 < seconds < 1e9:
        return
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def server_tls_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """TLS for the data port from the gRPC port's --tls-cert/--tls-key/--tls-ca files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
