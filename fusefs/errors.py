"""The one place where store errors become errno values (DESIGN §2, "Errors").

    NotFound            ENOENT   (ENODATA for a missing xattr: callers pass ``not_found``)
    AlreadyExists       EEXIST
    InvalidArgument     EINVAL   (E2BIG for labels: checked before the store is called)
    FailedPrecondition  EBADMSG  size or digest mismatch at commit ("Bad message")
    Unavailable         EBUSY    ref locked by another writer, commit of an open ingest
      Unreachable       EIO      a remote store that is down or did not answer in time
    DataLoss            EIO      a blob no longer matches its digest
    NotImplemented      EINVAL
    OSError             its own errno (ENOSPC, EACCES, ...)

Refusals decided by the view itself (EPERM, EROFS, ESPIPE, ENOTSUP) are raised with
``refuse``, which logs the reason once. Anything else raised in a handler is a bug: it is
not caught here, so it ends the mount (pyfuse3's contract) instead of becoming EIO.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pyfuse3

from store import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplemented,
    StoreError,
    Unavailable,
    Unreachable,
)

__all__ = ["ERRNO", "errno_of", "fuse_errors", "refuse"]

log = logging.getLogger("fusefs")

ERRNO: dict[type[StoreError], int] = {
    Unreachable: errno.EIO,
    NotFound: errno.ENOENT,
    AlreadyExists: errno.EEXIST,
    InvalidArgument: errno.EINVAL,
    FailedPrecondition: errno.EBADMSG,
    Unavailable: errno.EBUSY,
    DataLoss: errno.EIO,
    NotImplemented: errno.EINVAL,
}

# Errnos that are answers, not refusals: not worth a log line each time.
_QUIET = frozenset({errno.ENOENT, errno.ENODATA, errno.ENOTSUP})


def errno_of(exc: StoreError) -> int:
    """The errno for a store error (EIO for a class missing from the table)."""
    for cls in type(exc).__mro__:
        if cls in ERRNO:
            return ERRNO[cls]
    return errno.EIO


def refuse(code: int, reason: str) -> pyfuse3.FUSEError:
    """Log ``reason`` (unless ``code`` is a routine answer) and return the FUSEError."""
    if code not in _QUIET:
        log.warning("refused (%s): %s", errno.errorcode.get(code, code), reason)
    return pyfuse3.FUSEError(code)


@contextmanager
def fuse_errors(what: str, *, not_found: int = errno.ENOENT) -> Iterator[None]:
    """Translate StoreError and OSError raised inside into FUSEError.

    ``what`` names the operation for the log (``commit ingest foo``); ``not_found``
    replaces ENOENT where the caller means something else (ENODATA for xattrs).
    """
    try:
        yield
    except StoreError as exc:
        code = errno_of(exc)
        if code == errno.ENOENT:
            code = not_found
        raise refuse(code, f"{what}: {exc}") from None
    except OSError as exc:
        if exc.errno is None:
            raise
        raise refuse(exc.errno, f"{what}: {exc}") from None
