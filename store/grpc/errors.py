"""The one mapping between store errors and gRPC status codes (containerd's errdefs
ToGRPC / FromGRPC).

Server side, :func:`to_grpc` turns an exception into (code, message): a StoreError by its
class, a :class:`GrpcError` (a code the server chose, e.g. OUT_OF_RANGE) as is, anything
else (OSError...) into UNKNOWN, as containerd passes unknown errors through. Client side,
:func:`from_grpc` maps a code back to a StoreError class; codes with no class (OUT_OF_RANGE,
DATA_LOSS from a short write, UNKNOWN, ...) become :class:`RemoteError`.
"""

from __future__ import annotations

import grpc

from store.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplemented,
    StoreError,
    Unavailable,
)

__all__ = ["GrpcError", "RemoteError", "from_grpc", "to_grpc"]

_CODES: tuple[tuple[type[StoreError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotImplemented, grpc.StatusCode.UNIMPLEMENTED),
    (DataLoss, grpc.StatusCode.DATA_LOSS),
)
_CLASSES: dict[grpc.StatusCode, type[StoreError]] = {
    code: cls for cls, code in _CODES if cls is not DataLoss
}


class GrpcError(Exception):
    """A status the server sends as is (containerd's ``status.Errorf``)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(StoreError):
    """A gRPC status with no store error class (OUT_OF_RANGE, UNKNOWN, ...)."""

    kind = "unknown"

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def to_grpc(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception raised while serving a call."""
    if isinstance(exc, GrpcError):
        return exc.code, exc.message
    if isinstance(exc, RemoteError):
        return exc.code, str(exc)
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.UNKNOWN, str(exc) or type(exc).__name__


def from_grpc(code: grpc.StatusCode | None, message: str | None) -> StoreError:
    """The store error for a status received by a client.

    DATA_LOSS is not mapped back: containerd's server uses it for a short write, not for
    a corrupt blob, and its client turns it into ErrUnknown as well.
    """
    text = message or ""
    if code is not None and code in _CLASSES:
        return _CLASSES[code](text)
    return RemoteError(code or grpc.StatusCode.UNKNOWN, text)
