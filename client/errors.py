"""Errors that carry a gRPC status code, shared by the client and the server.

The server raises these from its state and math layers; the transport turns them into a gRPC
status with the same code and message, and the client turns a failed call back into the same class.
"""
import grpc


class Error(Exception):
    """A sparseps failure: `code` is the gRPC status code, `message` the server's explanation."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(Error, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(Error, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return Error.__str__(self)


class AlreadyExists(Error):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(Error):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(Error):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(Error):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(Error):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(Error):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(Error):
    code = grpc.StatusCode.UNAUTHENTICATED


class Aborted(Error):
    code = grpc.StatusCode.ABORTED


class Internal(Error):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (
    InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
    Unavailable, DeadlineExceeded, PermissionDenied, Unauthenticated, Aborted, Internal)}


_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code, message: str) -> Error:
    """The Error subclass for a status: a grpc.StatusCode, or its number (a data-plane frame's)."""
    if not isinstance(code, grpc.StatusCode):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, Error)(message, code)


def from_rpc_error(err: grpc.RpcError) -> Error:
    """The Error subclass matching a failed call's status code."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details or code.name)
