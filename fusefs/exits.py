"""The one place where store errors become exit statuses of the command line (and of
``contentfs mount``), stable for scripts and listed in the README."""

from __future__ import annotations

from store import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplemented,
    StoreError,
    Unavailable,
)

__all__ = ["EXIT_CODES", "EXIT_OTHER", "exit_code"]

#: Exit status per store error class.
EXIT_CODES: dict[type[StoreError], int] = {
    InvalidArgument: 3,
    NotFound: 4,
    AlreadyExists: 5,
    FailedPrecondition: 6,
    Unavailable: 7,
    DataLoss: 8,
    NotImplemented: 9,
}
#: Anything else that fails (a usage error is click's 2).
EXIT_OTHER = 1


def exit_code(exc: StoreError) -> int:
    """The exit status for ``exc``: its class's (or a base class's), else EXIT_OTHER."""
    for cls, code in EXIT_CODES.items():
        if isinstance(exc, cls):
            return code
    return EXIT_OTHER
