"""The store's closed error hierarchy, one class per containerd errdefs kind.

    StoreError
     +-- NotFound            (also LookupError)  no such blob, ingest or label
     +-- AlreadyExists                           commit or writer for content that exists
     +-- InvalidArgument     (also ValueError)   bad digest, ref, filter, fieldpath or label
     +-- FailedPrecondition                      size or digest mismatch at commit, closed writer
     +-- Unavailable                             ref locked by another writer, database busy
     |    +-- Unreachable                        a remote store that did not answer in time
     +-- DataLoss                                a blob no longer matches its digest
     +-- NotImplemented                          an operation the store does not support

Messages are lowercase, subject first: ``content sha256:ab12...: not found``.  Protocol
adapters (FUSE, gRPC, CLI) map these classes to errno, status codes and exit codes, each
in one place; the store never knows about them.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "DataLoss",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "NotImplemented",
    "StoreError",
    "Unavailable",
    "Unreachable",
]


class StoreError(Exception):
    """Base of every error the store raises on purpose.

    ``kind`` is containerd's sentinel text, appended to the message as containerd does
    (``content sha256:...: not found``) unless the message already ends with it.
    """

    kind = "unknown"

    def __init__(self, message: str) -> None:
        if not message.endswith(": " + self.kind) and message != self.kind:
            message = f"{message}: {self.kind}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class NotFound(StoreError, LookupError):
    kind = "not found"


class AlreadyExists(StoreError):
    kind = "already exists"


class InvalidArgument(StoreError, ValueError):
    kind = "invalid argument"


class FailedPrecondition(StoreError):
    kind = "failed precondition"


class Unavailable(StoreError):
    kind = "unavailable"


class Unreachable(Unavailable):
    """A remote store that cannot be reached or did not answer within its deadline.

    Still Unavailable (a client that retries later does the right thing); adapters that
    must tell "busy" from "gone" (the mount: EBUSY versus EIO) branch on this class.
    """


class DataLoss(StoreError):
    kind = "data loss"


class NotImplemented(StoreError):  # noqa: A001 - containerd's name, kept on purpose
    kind = "not implemented"
