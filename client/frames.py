"""The data plane's wire format: a protobuf message whose tensors travel as raw bytes after it.

gRPC Python copies a 1 MiB message several times on each side and spends 1-2 ms of CPU per
request on it (docs/benchmarks.md). Pull, Push and PushPull therefore also travel over a plain
TCP (or TLS) connection, one frame per request and per answer:

    header  <4s B B H I Q>   magic b"SPS1", method, status code, reserved, meta length, payload length
    meta    the usual sparseps.v1 request/answer, every Tensor's `data` left empty
    payload the tensors' bytes, concatenated in wire order (`tensors()` below)

so a receiver reads rows straight into numpy arrays, and a sender hands numpy buffers to the
kernel. The messages, their validation and their errors are those of the gRPC API: an answer
with a non-zero status carries the gRPC status code and the message as UTF-8 in `meta`.
"""
import struct

import numpy as np

from sparseps.errors import InvalidArgument
from sparseps.proto import sparseps_pb2 as pb
from sparseps.tensors import DTYPE_NAMES, check_tensor, elements, wire_dtype

MAGIC = b"SPS1"
HEADER = struct.Struct("<4sBBHIQ")
HELLO, PULL, PUSH, PUSH_PULL = 1, 2, 3, 4
METHODS = {PULL: "Pull", PUSH: "Push", PUSH_PULL: "PushPull", HELLO: "Hello"}
REQUESTS = {PULL: pb.PullRequest, PUSH: pb.PushRequest, PUSH_PULL: pb.PushPullRequest}
RESPONSES = {PULL: pb.PullResponse, PUSH: pb.PushResponse, PUSH_PULL: pb.PushPullResponse, HELLO: pb.ServerInfo}
MAX_META = 64 << 20   # the message without its tensors: names, shapes, ids of the exactly-once window


def tensors(msg):
    """(Tensor, what) pairs of a message that carry bytes, in the order the payload holds them."""
    if isinstance(msg, pb.PushRequest):
        for g in msg.gradients:
            if g.HasField("ids"):
                yield g.ids, f"push ids of {g.variable!r}"
            yield g.values, f"push values of {g.variable!r}"
    elif isinstance(msg, pb.PullRequest):
        if msg.HasField("ids"):
            yield msg.ids, f"pull ids of {msg.variable!r}"
    elif isinstance(msg, pb.PushPullRequest):
        yield from tensors(msg.push)
        for q in msg.pulls:
            if q.HasField("ids"):
                yield q.ids, f"push_pull ids of {q.variable!r}"
    elif isinstance(msg, pb.PullResponse):
        yield msg.values, "values"
        if msg.HasField("ids"):
            yield msg.ids, "ids"
    elif isinstance(msg, pb.PushPullResponse):
        for p in msg.pulls:
            yield from tensors(p)


def describe(array, t: "pb.Tensor", attachments: list):
    """Fill a Tensor's dtype and shape and queue its bytes (to_tensor without the copy)."""
    a = np.asarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    t.dtype = wire_dtype(a.dtype)
    t.shape[:] = a.shape
    attachments.append(np.ascontiguousarray(a))


def reattach(msg, arrays):
    """Put the payload's arrays back into the message's Tensors (for gRPC or a log record)."""
    for (t, _), a in zip(list(tensors(msg)), arrays):
        t.data = np.ascontiguousarray(a).tobytes()


def layout(msg, payload_len: int) -> list:
    """(dtype, shape, byte offset) of each tensor in the payload; InvalidArgument if they disagree."""
    out, offset = [], 0
    for t, what in tensors(msg):
        if t.data:
            raise InvalidArgument(f"{what}: tensor bytes belong in the frame's payload, not in the message")
        dt, shape = check_tensor(t, what)
        nbytes = elements(shape, payload_len // dt.itemsize) * dt.itemsize
        if offset + nbytes > payload_len:
            raise InvalidArgument(f"{what}: shape {list(shape)} of {DTYPE_NAMES[t.dtype]} needs {nbytes} bytes, "
                                  f"but only {payload_len - offset} of the frame's payload are left")
        out.append((dt, shape, offset))
        offset += nbytes
    if offset != payload_len:
        raise InvalidArgument(f"the frame's payload has {payload_len} bytes but its tensors need {offset}")
    return out


def views(buf: np.ndarray, spec: list) -> list:
    """Read-only-by-convention arrays over one received payload buffer."""
    out = []
    for dt, shape, offset in spec:
        try:
            out.append(buf[offset:offset + elements(shape) * dt.itemsize].view(dt).reshape(shape))
        except ValueError as e:
            raise InvalidArgument(f"shape {list(shape)} is not supported ({e})") from None
    return out


def header(method: int, status: int, meta_len: int, payload_len: int) -> bytes:
    return HEADER.pack(MAGIC, method, status, 0, meta_len, payload_len)


def parse_header(raw) -> tuple:
    """(method, status, meta length, payload length); ValueError for a stream that is not ours."""
    magic, method, status, _, meta_len, payload_len = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ValueError(f"not a sparseps data-plane frame (magic {bytes(magic)!r})")
    return method, status, meta_len, payload_len


def recv_exact(sock, view) -> bool:
    """Fill a memoryview from the socket; False if the peer closed before the first byte."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return False
            raise ConnectionError(f"connection closed {n - got} bytes short of a frame")
        got += k
    return True


def send_frame(sock, method: int, status: int, meta: bytes, arrays=()):
    """One frame; numpy buffers go to the kernel without a copy (sendmsg) where the socket allows."""
    payload_len = sum(a.nbytes for a in arrays)
    head = header(method, status, len(meta), payload_len) + meta
    buffers = [head] + [memoryview(a).cast("B") for a in arrays if a.nbytes]
    if not hasattr(sock, "sendmsg") or type(sock).__name__ == "SSLSocket":
        for b in buffers:
            sock.sendall(b)
        return
    total = len(head) + payload_len
    sent = sock.sendmsg(buffers)
    if sent < total:   # a partial send: finish the rest buffer by buffer
        for i, b in enumerate(buffers):
            if sent >= len(b):
                sent -= len(b)
                continue
            sock.sendall(b[sent:])
            for rest in buffers[i + 1:]:
                sock.sendall(rest)
            return
