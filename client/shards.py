"""The connections behind a Client: one gRPC channel (and maybe a data port) per shard, retries, fan-out.

Pull, Push and PushPull go to each shard's data port when it has one (client/dataplane.py: the
same messages with the rows as raw bytes, several times less CPU than gRPC for large rows);
`data_plane=False` or SPARSEPS_DATA_PLANE=0 keeps everything on gRPC. A call that may not have
arrived (UNAVAILABLE, DEADLINE_EXCEEDED) is retried with backoff until `retry_deadline`; a push
carries its (client id, sequence), so the server applies it exactly once.
"""
import logging
import os
import random
import threading
import time

import grpc

from . import errors, frames
from .dataplane import DataChannel, client_tls_context, host_of
from .proto import sparseps_pb2 as pb
from .proto import sparseps_pb2_grpc as pb_grpc
from .tensors import to_tensor

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_DATA_METHODS = {"Pull": frames.PULL, "Push": frames.PUSH, "PushPull": frames.PUSH_PULL}
log = logging.getLogger("sparseps")

_MALLOC_TUNED = []


def tune_malloc():
    """Keep large request buffers in the heap (glibc): the server's MALLOC_* settings, at run time.

    Without it every ~1 MiB push or pull buffer is freshly mmapped and page-faulted: measured
    3.2-3.9 ms of client CPU per 4096 x 64 push, against ~1.3 ms with it (docs/benchmarks.md).
    Once per process; SPARSEPS_CLIENT_MALLOC_TUNING=0 leaves malloc alone.
    """
    if _MALLOC_TUNED or os.environ.get("SPARSEPS_CLIENT_MALLOC_TUNING", "1") == "0":
        return
    _MALLOC_TUNED.append(True)
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, 512 << 20)
        libc.mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):   # not glibc: nothing to tune
        pass


def tls_credentials(ca=None, cert=None, key=None) -> grpc.ChannelCredentials:
    """grpc.ssl_channel_credentials from PEM file paths or bytes; ca=None trusts the system roots."""
    def pem(x, what):
        if x is None or isinstance(x, bytes):
            return x
        try:
            with open(x, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"cannot read {what} {x}: {e.strerror or e}") from None
    if (cert is None) != (key is None):
        raise ValueError("mutual TLS needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(pem(ca, "tls_ca"), pem(key, "tls_key"), pem(cert, "tls_cert"))


def call(fn, request, timeout=None, metadata=None):
    """One unary gRPC call; a failure raises the sparseps error of its status code."""
    try:
        return fn(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        raise errors.from_rpc_error(e) from None


class Shards:
    """Every shard of one cluster, in shard-index order, whatever order the addresses came in."""

    def __init__(self, addresses, *, max_message_mb: int = 256, timeout: float | None = None,
                 retry_deadline: float = 60.0, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, tls_ca=None, tls_cert=None, tls_key=None, server_name: str | None = None,
                 data_plane: bool | None = None, read_from: str = "leader"):
        explicit_credentials = credentials is not None
        if credentials is None and (tls_ca or tls_cert or tls_key):
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        self.discovery, self._discovered = None, 0.0
        if isinstance(addresses, str) and addresses.startswith("etcd://"):
            from .discovery import Discovery
            self.discovery = Discovery(addresses, read_from)
            addresses = self.discovery.addresses(retry_deadline)
        elif read_from != "leader":
            raise ValueError("read_from='serving' needs an etcd://HOST:PORT/NAME address")
        if isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        if not addresses:
            raise ValueError("connect() needs at least one shard address")
        tune_malloc()
        self.max_message = max_message_mb << 20
        self.timeout = timeout
        self.retry_deadline = retry_deadline
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [("grpc.max_receive_message_length", self.max_message),
                   ("grpc.max_send_message_length", self.max_message)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._channel_args = (credentials, options)
        # (in the given order until each shard's index is known; rediscover() may move one meanwhile)
        self.addresses = addresses = list(addresses)
        self.channels = channels = [self._channel(a) for a in addresses]
        self.stubs = stubs = [pb_grpc.ParameterServerStub(c) for c in channels]
        self.n = len(addresses)
        infos = [self.retry(lambda k=k: call(stubs[k].GetServerInfo, pb.ServerInfoRequest(), 10, self.metadata))
                 for k in range(len(stubs))]
        n = infos[0].num_shards
        bad = [(a, i.num_shards) for a, i in zip(addresses, infos) if i.num_shards != n]
        if bad or n != len(addresses):
            raise errors.FailedPrecondition(
                f"the shards disagree on the cluster size: {[(a, i.num_shards) for a, i in zip(addresses, infos)]} "
                f"for {len(addresses)} addresses given")
        order = sorted(range(n), key=lambda k: infos[k].shard_index)
        if sorted(i.shard_index for i in infos) != list(range(n)):
            raise errors.FailedPrecondition(
                f"the shards' indexes are {[i.shard_index for i in infos]}, expected each of 0..{n - 1} once")
        self.addresses = [addresses[k] for k in order]
        self.channels = [channels[k] for k in order]
        self.stubs = [stubs[k] for k in order]
        self.server_info = [infos[k] for k in order]
        self.n = n
        if data_plane is None:
            data_plane = os.environ.get("SPARSEPS_DATA_PLANE", "1") != "0"
        self.data = [None] * n
        if data_plane:   # probed in parallel: a firewalled port costs one connect timeout, not one per shard
            def probe(k):
                self.data[k] = self._data_channel(self.addresses[k], self.server_info[k], token, explicit_credentials,
                                                  (tls_ca, tls_cert, tls_key), server_name)
            probes = [threading.Thread(target=probe, args=(k,)) for k in range(n)]
            for t in probes:
                t.start()
            for t in probes:
                t.join()

    def _channel(self, address):
        credentials, options = self._channel_args
        return grpc.secure_channel(address, credentials, options) if credentials else \
            grpc.insecure_channel(address, options)

    def rediscover(self):
        """A replicated cluster (etcd://): point each shard whose leader moved at the new one."""
        if self.discovery is None or time.monotonic() - self._discovered < 0.05:
            return
        self._discovered = time.monotonic()
        try:
            found = self.discovery.current()
        except Exception:   # etcd unreachable right now: the next retry asks again
            return
        for k, entry in enumerate(found[:self.n]):
            if entry is None or entry[0] == self.addresses[k]:
                continue
            address, data_port = entry
            log.info("shard %d: now at %s", k, address)
            old = self.channels[k]
            self.channels[k] = self._channel(address)
            self.stubs[k] = pb_grpc.ParameterServerStub(self.channels[k])
            self.addresses[k] = address
            if self.data[k] is not None and data_port:
                old_data, self.data[k] = self.data[k], self.data[k].moved(data_port, host_of(address))
                old_data.close()
            old.close()

    def _data_channel(self, address, info, token, explicit_credentials, tls_files, server_name):
        """A shard's data-plane connections, or None (gRPC only) if it has none we can use."""
        if not info.data_port:
            return None
        tls = None
        if info.data_tls:
            if explicit_credentials or not any(tls_files):
                return None   # TLS given as opaque gRPC credentials: only gRPC can use them
            try:
                tls = client_tls_context(*tls_files)
            except (OSError, ValueError) as e:
                log.warning("shard %s: cannot use the TLS files for the data plane (%s); using gRPC", address, e)
                return None
        elif any(tls_files) or explicit_credentials:
            return None       # never send over plain TCP what the caller wanted encrypted
        channel = DataChannel(host_of(address), info.data_port, tls=tls, server_name=server_name, token=token,
                              timeout=self.timeout)
        try:
            channel.probe()
        except (errors.Error, OSError) as e:
            log.warning("shard %s: data plane unreachable (%s); using gRPC for pulls and pushes", address, e)
            return None
        return channel

    def _data_call(self, k, method, request, arrays):
        data = self.data[k]
        try:
            return data.call(method, request, arrays)
        except errors.Unavailable:
            # a restarted shard may listen on another data port: ask its gRPC port where
            try:
                info = call(self.stubs[k].GetServerInfo, pb.ServerInfoRequest(), 5, self.metadata)
                if info.data_port and info.data_port != data.port:
                    self.data[k] = data.moved(info.data_port)
                    data.close()
            except errors.Error:
                pass
            raise

    def data_plane(self) -> list:
        """Per shard: 'host:port' of the data plane in use, or None where calls go over gRPC."""
        return [f"{d.host}:{d.port}" if d is not None else None for d in self.data]

    def close(self):
        for d in self.data:
            if d is not None:
                d.close()
        for c in self.channels:
            c.close()

    # ------------------------------------------------------------------ calls
    def call(self, k: int, method: str, request, timeout=None):
        """One gRPC call to shard k, not retried (timeout: the client's unless given)."""
        return call(getattr(self.stubs[k], method), request, self.timeout if timeout is None else timeout,
                    self.metadata)

    def read(self, k: int, method: str, request, timeout=None):
        """An idempotent call to shard k (Get*/List*/Describe*), retried like pulls: after a
        failover of a replicated shard it reaches the new leader instead of failing on the old."""
        return self.retry(lambda: self.call(k, method, request, timeout))

    def retry(self, fn, codes=RETRYABLE):
        """Call fn, retrying UNAVAILABLE / DEADLINE_EXCEEDED with backoff until retry_deadline."""
        deadline = time.monotonic() + self.retry_deadline
        delay = 0.05
        while True:
            try:
                return fn()
            except errors.Error as e:
                if e.code not in codes or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            self.rediscover()   # after the pause: a leader elected meanwhile is the one retried
            # a replicated cluster elects a new leader within its lease: ask etcd again often
            delay = min(delay * 2, 2.0 if self.discovery is None else 0.1)

    def attach(self):
        """{shard: []} for the shards whose requests go to the data plane (rows then travel aside)."""
        return {k: [] for k, d in enumerate(self.data) if d is not None}

    @staticmethod
    def put(k, array, t, attach):
        """Fill a request Tensor for shard k: its bytes inline (gRPC) or aside (data plane)."""
        if attach is not None and k in attach:
            frames.describe(array, t, attach[k])
        else:
            to_tensor(array, t)

    @staticmethod
    def size(k, request, attach) -> int:
        """Bytes a request to shard k puts on the wire, its rows included wherever they travel."""
        size = request.ByteSize()
        if attach is not None and k in attach:
            size += sum(a.nbytes for a in attach[k])
        return size

    def each(self, method: str, requests: dict, retry: bool | tuple = True, attach: dict | None = None) -> dict:
        """Send requests[shard] to each shard in parallel; {shard: response}. retry: a tuple
        narrows the status codes retried (a pull that waits server-side must not retry its own
        DEADLINE_EXCEEDED). attach: {shard: arrays} of requests built for the data plane."""
        codes = (retry if isinstance(retry, tuple) else RETRYABLE) if retry else ()

        def one(k, req):
            if attach is not None and k in attach:
                def send():
                    return self._data_call(k, _DATA_METHODS[method], req, attach[k])
            else:
                def send():
                    return self.call(k, method, req)
            return self.retry(send, codes) if codes else send()
        if len(requests) == 1:
            (k, req), = requests.items()
            return {k: one(k, req)}
        if attach is not None and all(k in attach for k in requests):
            return self._fan_out(method, requests, attach, one, codes)
        results, failures = {}, []

        def run(k, req):
            try:
                results[k] = one(k, req)
            except errors.Error as e:
                failures.append(e)
        threads = [threading.Thread(target=run, args=kv) for kv in requests.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        return results

    def _fan_out(self, method, requests, attach, one, codes) -> dict:
        """Data plane to several shards: send every request, then read every answer (no threads).
        A shard whose connection failed is sent again through `one` (retries, exactly-once)."""
        code = _DATA_METHODS[method]
        pending, results, failed = {}, {}, {}
        for k, req in requests.items():
            try:
                pending[k] = self.data[k].start(code, req, attach[k])
            except errors.Error as e:
                failed[k] = e
        for k, p in pending.items():
            try:
                results[k] = self.data[k].finish(p)
            except errors.Error as e:
                failed[k] = e
        for k, e in failed.items():
            if e.code not in codes:
                raise e
        for k in failed:
            results[k] = one(k, requests[k])
        return results

    def all(self, method: str, request) -> dict:
        """The same request to every shard; {shard: response}."""
        return self.each(method, {k: request for k in range(self.n)})
