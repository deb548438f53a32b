"""Refuse what the server cannot afford instead of crashing on it.

Two limits sit in front of the servicer, as one gRPC server interceptor:

* Size: a message over --max-message-mb is refused by gRPC itself (RESOURCE_EXHAUSTED) from its
  length prefix, before its payload is buffered.
* Memory budget (--memory-budget-mb): the bytes of the requests being processed at once (Push,
  PushChunked parts, SetWeights, CreateVariable: their wire size; Pull and GetSlot: the rows they
  will return) are counted when the request arrives, *before* it is parsed. A request that
  would take the total over the budget is shed at once with RESOURCE_EXHAUSTED, and changes
  nothing; its bytes are released when the call ends. While nothing else is in flight any single
  request is admitted (up to the message limit), so the budget sheds backlog, never a lone
  request. A chunked push counts all its parts until it is applied, so one chunked push larger
  than the budget is refused.

The interceptor also turns a request body that does not parse into INVALID_ARGUMENT (gRPC's own
answer would be INTERNAL, "Exception deserializing request!").
"""
import contextlib
import logging
import threading

import grpc
import numpy as np

from sparseps import errors

log = logging.getLogger("sparseps.server")

SERVICE = "/sparseps.v1.ParameterServer/"
GATED = ("Push", "PushChunked", "SetWeights", "CreateVariable", "Pull", "GetSlot")
MiB = 1 << 20


class MemoryBudget:
    """A counter of bytes in flight with a ceiling; try_acquire never blocks."""

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self.in_use = 0
        self.peak = 0
        self.admitted = 0
        self.shed = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self.limit > 0 and self.in_use > 0 and self.in_use + n > self.limit:
                self.shed += 1
                return False
            self.in_use += n
            self.admitted += 1
            self.peak = max(self.peak, self.in_use)
            return True

    def release(self, n: int):
        with self._lock:
            self.in_use -= n

    def shed_message(self, method: str, nbytes: int) -> str:
        return (f"{method}: server busy: {nbytes / MiB:.1f} MiB request with {self.in_use / MiB:.1f} MiB of "
                f"requests already in progress would exceed the memory budget of {self.limit / MiB:.0f} MiB "
                "(--memory-budget-mb); nothing was applied, retry later")

    @contextlib.contextmanager
    def hold(self, method: str, nbytes: int):
        """Hold nbytes while building an answer, or raise RESOURCE_EXHAUSTED (nothing changed)."""
        if not self.try_acquire(nbytes):
            raise errors.ResourceExhausted(self.shed_message(method, nbytes))
        try:
            yield
        finally:
            self.release(nbytes)


def pull_waits(request) -> bool:
    """A pull that may wait for other workers: its answer is charged once the wait is over, so
    that a waiting pull does not hold budget that the pushes it waits for need."""
    return bool(getattr(request, "min_iterations", 0) or getattr(request, "worker_id", ""))


class WaitSlots:
    """How many gRPC worker threads may block at once waiting for other workers (a pull for a
    step, a bounded-staleness pull, a sync vote). A wait past the limit is refused UNAVAILABLE,
    which the client retries with backoff: the pool always keeps threads for the pushes and votes
    that end the waits, however many workers wait."""

    def __init__(self, threads: int):
        # all but a quarter of the threads (at least 2 kept for serving)
        self.threads, self.limit = threads, max(1, threads - max(2, threads // 4))
        self.in_use = 0
        self._lock = threading.Lock()

    def acquire(self, what: str):
        with self._lock:
            if self.in_use >= self.limit:
                raise errors.Unavailable(
                    f"{what}: {self.in_use} calls already wait for other workers on this server, the most "
                    f"allowed with --threads {self.threads} (the other threads serve the pushes they wait "
                    "for); the client asks again shortly")
            self.in_use += 1

    def release(self):
        with self._lock:
            self.in_use -= 1


class _Ticket:
    """Bytes held for one call; released once, when the call ends (or, failing that, when collected)."""

    __slots__ = ("budget", "nbytes", "__weakref__")

    def __init__(self, budget, nbytes):
        self.budget, self.nbytes = budget, nbytes

    def release(self):
        n, self.nbytes = self.nbytes, 0
        if n:
            self.budget.release(n)

    __del__ = release


class _Admitted:
    __slots__ = ("message", "ticket")

    def __init__(self, message, ticket):
        self.message, self.ticket = message, ticket


class _Refused:
    """What the deserializer hands on instead of a message: the call then ends with `code`."""

    __slots__ = ("code", "details")

    def __init__(self, code, details):
        self.code, self.details = code, details


def _message_name(deserializer):
    owner = getattr(deserializer, "__self__", None)
    return getattr(owner, "__name__", None) or "request message"


def pull_answer_bytes(shard, variable: str, rows: int | None, row_start: int = 0, row_stop: int = 0) -> int:
    """Bytes a pull's answer will take (rows of `variable`; when rows is None, those it holds in
    the global range [row_start, row_stop), 0 = to the end), for the memory budget; 0 for a
    variable the shard does not know (the pull will fail)."""
    var = shard.variables.get(variable) if shard is not None else None
    if var is None:
        return 0
    row = int(np.prod(var.shape[1:], dtype=np.int64)) * var.dtype.itemsize
    if rows is None:   # a range holds at most its length of this shard's rows
        rows = var.local_rows
        if row_start or row_stop:
            end = row_stop or (var.local_rows if var.table is not None else var.shape[0])   # dynamic: positions
            rows = min(rows, max(0, end - row_start))
    rows = min(max(0, rows), 1 << 40)
    return rows * (row + 8)


class LimitsInterceptor(grpc.ServerInterceptor):
    """Admission by memory budget, and INVALID_ARGUMENT for bodies that do not parse."""

    def __init__(self, budget: MemoryBudget | None = None, shard=None):
        self.budget = budget
        self.shard = shard
        self._cache = {}   # method -> (registered handler, wrapped handler): wrap once, not per call

    # ---- what a request costs --------------------------------------------------------
    def pull_bytes(self, request) -> int:
        """The response size a Pull/GetSlot will have, from the variable's shape (0 if unknown)."""
        rows = len(request.ids.data) // 4 if request.HasField("ids") else None   # at most a row per 4 bytes of ids
        return pull_answer_bytes(self.shard, request.variable, rows, request.row_start, request.row_stop)

    # ---- wrapping -------------------------------------------------------------------
    def _deserializer(self, method, deserializer, gated):
        name = _message_name(deserializer)
        budget = self.budget if gated else None
        pull = method in ("Pull", "GetSlot")

        def deserialize(data: bytes):
            nbytes = len(data)
            if budget is not None and not pull and not budget.try_acquire(nbytes):
                return self._shed(method, nbytes)
            try:
                message = deserializer(data)
            except Exception as e:
                if budget is not None and not pull:
                    budget.release(nbytes)
                return _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{method}: the request body is not a valid {name} ({len(data)} bytes): "
                                f"{type(e).__name__}: {e}")
            if budget is None:
                return message
            if pull:
                if not pull_waits(message):   # (a waiting pull's answer: ParameterServerService.pull)
                    nbytes += self.pull_bytes(message)
                if not budget.try_acquire(nbytes):
                    return self._shed(method, nbytes)
            return _Admitted(message, _Ticket(budget, nbytes))
        return deserialize

    def _shed(self, method, nbytes):
        b = self.budget
        log.debug("%s shed: %d bytes with %d in flight (budget %d)", method, nbytes, b.in_use, b.limit)
        return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, b.shed_message(method, nbytes))

    @staticmethod
    def _unary(behavior):
        def handle(request, context):
            if isinstance(request, _Refused):
                context.abort(request.code, request.details)
            if isinstance(request, _Admitted):
                try:
                    return behavior(request.message, context)
                finally:
                    request.ticket.release()
            return behavior(request, context)
        return handle

    @staticmethod
    def _streaming(behavior):
        def handle(request_iterator, context):
            tickets, refused = [], []

            def messages():
                for request in request_iterator:
                    if isinstance(request, _Refused):
                        refused.append(request)
                        # a sparseps error, so that the servicer's own error mapping keeps the code
                        raise errors.Error(request.details, request.code)
                    if isinstance(request, _Admitted):
                        tickets.append(request.ticket)
                        request = request.message
                    yield request
            try:
                return behavior(messages(), context)
            except Exception:
                if refused:   # whatever the behavior made of it, the call ends with the refusal
                    context.abort(refused[0].code, refused[0].details)
                raise
            finally:
                for t in tickets:
                    t.release()
        return handle

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._cache[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method, handler):
        short = method.rsplit("/", 1)[-1]
        gated = self.budget is not None and method.startswith(SERVICE) and short in GATED
        deserializer = self._deserializer(short, handler.request_deserializer, gated)
        if handler.request_streaming:
            if handler.response_streaming:
                return handler._replace(request_deserializer=deserializer,
                                        stream_stream=self._streaming(handler.stream_stream))
            return handler._replace(request_deserializer=deserializer,
                                    stream_unary=self._streaming(handler.stream_unary))
        if handler.response_streaming:
            return handler._replace(request_deserializer=deserializer,
                                    unary_stream=self._unary(handler.unary_stream))
        return handler._replace(request_deserializer=deserializer, unary_unary=self._unary(handler.unary_unary))
