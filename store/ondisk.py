"""Reading containerd's local layout safely, shared by the store and its writer.

A directory counts only if it is a real one (a symlink planted in its place does not),
a blob only if its file is a regular file. The small files of an ingest (``ref``,
``startedat``, ``updatedat``, ``total``) are read without following symlinks; unreadable
or malformed ones read as unset.
"""

from __future__ import annotations

import os
import stat

from .digest import Digest, split_digest
from .fsutil import read_small, write_atomic
from .layout import Layout
from .types import parse_time

__all__ = [
    "blob_dir_ok",
    "blob_exists",
    "is_dir",
    "parse_time_file",
    "read_time",
    "read_total",
    "write_total",
]


def is_dir(path: str) -> bool:
    """True for a real directory (a symlink planted in its place does not count)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def blob_dir_ok(layout: Layout, dgst: Digest) -> bool:
    """``blobs/`` and ``blobs/<alg>/`` are real directories, not planted symlinks."""
    return is_dir(layout.blobs) and is_dir(layout.blob_dir(split_digest(dgst)[0]))


def blob_exists(layout: Layout, dgst: Digest) -> bool:
    """The blob is committed: its file is a regular file in real directories."""
    if not blob_dir_ok(layout, dgst):
        return False
    try:
        return stat.S_ISREG(os.lstat(layout.blob_path(dgst)).st_mode)
    except OSError:
        return False


def parse_time_file(path: str) -> int:
    """The RFC 3339 time in ``path`` in ns; OSError or ValueError if it cannot be read."""
    return parse_time(read_small(path, 128).decode())


def read_time(path: str) -> int:
    """The time in ``path`` in ns, 0 when missing or malformed."""
    try:
        return parse_time_file(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def read_total(path: str) -> int:
    """The total size in ``path``, 0 (unknown) when missing or malformed."""
    try:
        return max(0, int(read_small(path, 64).decode().strip() or 0))
    except (OSError, ValueError, UnicodeDecodeError):
        return 0


def write_total(path: str, total: int) -> None:
    """Record an ingest's expected total (0: unknown, the file is removed)."""
    if total > 0:
        write_atomic(path, str(total).encode(), sync=False)
    elif os.path.lexists(path):
        os.unlink(path)
