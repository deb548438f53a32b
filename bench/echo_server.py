"""The raw ceilings that sparseps-server is compared against: services that do nothing.

Same transport set-up as `sparseps-server` (server/main.py): sync `grpc.server` with a
ThreadPoolExecutor of the same size, the same message-size options, and the same glibc malloc
environment (the process re-executes itself with `MALLOC_ENV` exactly as `sparseps-server` does).
No protobuf: a generic handler receives the request as raw bytes and answers a 2-byte ack.

Methods (all under /echo.Echo/):
    Unary(bytes) -> b"ok"                  one request, one tiny ack
    Stream(stream bytes) -> count (8 B)    client-streaming: any number of messages, one ack
    Fetch(8-byte little-endian n) -> n B   a pull-shaped call: tiny request, n bytes back

With `--raw-tcp` the process is instead the data plane's ceiling: a plain TCP listener that
speaks the data-plane framing (client/frames.py: header `<4s B B H I Q>`, meta, payload), one
thread per connection as server/dataplane.py, TCP_NODELAY, the same malloc environment. Per frame
it reads the header, then meta + payload with recv_into into one preallocated numpy buffer (grown
when a frame is larger), and nothing else: no protobuf, no arrays.
    Push / PushPull / any method -> a header-only answer (meta b"ok", no payload)
    Pull with an 8-byte little-endian meta n -> a frame with n payload bytes (the pull-shaped call)

    python bench/echo_server.py --port 0 --port-file /tmp/p              # gRPC; serves until SIGTERM
    python bench/echo_server.py --raw-tcp --port 0 --port-file /tmp/p    # raw TCP frames
"""
import argparse
import os
import signal
import socket
import sys
import threading
from concurrent import futures

import grpc
import numpy as np

from sparseps import frames
from sparseps.server.main import MALLOC_ENV

SERVICE = "echo.Echo"
ACK = b"ok"


def build_server(host: str, port: int, threads: int, max_message_mb: int):
    limit = max_message_mb << 20
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0)])
    blobs = {}
    lock = threading.Lock()

    def unary(request: bytes, context):
        return ACK

    def stream(request_iterator, context):
        n = 0
        for _ in request_iterator:
            n += 1
        return n.to_bytes(8, "little")

    def fetch(request: bytes, context):
        n = int.from_bytes(request[:8], "little")
        with lock:
            b = blobs.get(n)
            if b is None:
                b = blobs[n] = os.urandom(n)
        return b

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_unary_rpc_method_handler(stream),
        "Fetch": grpc.unary_unary_rpc_method_handler(fetch),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"could not bind {host}:{port}")
    return server, bound


class RawEcho:
    """The data-plane ceiling: frames in, a tiny frame out, over plain TCP."""

    def __init__(self, host: str, port: int):
        self.listener = socket.create_server((host, port), backlog=128, reuse_port=False)
        self.port = self.listener.getsockname()[1]
        self._stopping = False
        self._blobs = {}
        self._lock = threading.Lock()

    def start(self):
        threading.Thread(target=self._accept, name="raw-accept", daemon=True).start()
        return self

    def stop(self):
        self._stopping = True
        try:
            self.listener.close()
        except OSError:
            pass

    def _accept(self):
        while not self._stopping:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name=f"raw-{peer[1]}", daemon=True).start()

    def _blob(self, n: int) -> np.ndarray:
        with self._lock:
            b = self._blobs.get(n)
            if b is None:
                b = self._blobs[n] = np.frombuffer(os.urandom(n), np.uint8)
        return b

    def _serve(self, sock):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = bytearray(frames.HEADER.size)
            hv = memoryview(head)
            buf = np.empty(1 << 20, np.uint8)
            while not self._stopping:
                if not frames.recv_exact(sock, hv):
                    return
                method, _, meta_len, payload_len = frames.parse_header(head)
                n = meta_len + payload_len
                if n > len(buf):
                    buf = np.empty(max(n, 2 * len(buf)), np.uint8)
                if n:
                    frames.recv_exact(sock, memoryview(buf)[:n]) or _short()
                if method == frames.PULL and meta_len == 8:
                    frames.send_frame(sock, method, 0, b"", (self._blob(int.from_bytes(buf[:8].tobytes(), "little")),))
                else:
                    sock.sendall(frames.header(method, 0, len(ACK), 0) + ACK)
        except (ConnectionError, ValueError, OSError):
            pass
        finally:
            sock.close()


def _short():
    raise ConnectionError("connection closed inside a frame")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", default=None)
    p.add_argument("--threads", type=int, default=16, help="as sparseps-server --threads (default 16)")
    p.add_argument("--max-message-mb", type=int, default=256, help="as sparseps-server (default 256)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="as sparseps-server: keep glibc defaults")
    p.add_argument("--raw-tcp", action="store_true", help="the data plane's ceiling: raw TCP frames, no gRPC")
    args = p.parse_args(argv)
    if not args.no_malloc_tuning and any(k not in os.environ for k in MALLOC_ENV):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], dict(os.environ, **MALLOC_ENV))
    if args.no_malloc_tuning:   # an A/B run must not inherit the tuning from its parent
        for k in MALLOC_ENV:
            if k in os.environ:
                env = {k2: v for k2, v in os.environ.items() if k2 not in MALLOC_ENV}
                os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    if args.raw_tcp:
        server = RawEcho(args.host, args.port).start()
        port = server.port
    else:
        server, port = build_server(args.host, args.port, args.threads, args.max_message_mb)
        server.start()
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    if args.raw_tcp:
        server.stop()
    else:
        server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
