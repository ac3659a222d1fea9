"""contentfs's content store: containerd's content-store contract in Python.

Never imports trio, pyfuse3 or grpc; the adapters (``fusefs``, ``store.grpc``) import it.
"""

from .digest import ALGORITHMS, Digest, digest_of, parse_digest
from .errors import (
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
from .filters import Filter, parse_filters
from .labels import MAX_LABEL_SIZE, validate_labels
from .local import LocalStore, prepare_root
from .reader import FileReaderAt
from .types import Info, Lease, Status
from .writer import LocalWriter

__all__ = [
    "ALGORITHMS",
    "MAX_LABEL_SIZE",
    "AlreadyExists",
    "DataLoss",
    "Digest",
    "FailedPrecondition",
    "FileReaderAt",
    "Filter",
    "Info",
    "InvalidArgument",
    "Lease",
    "LocalStore",
    "LocalWriter",
    "NotFound",
    "NotImplemented",
    "Status",
    "StoreError",
    "Unavailable",
    "Unreachable",
    "digest_of",
    "parse_digest",
    "parse_filters",
    "prepare_root",
    "validate_labels",
]
