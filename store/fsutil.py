"""Small filesystem helpers: atomic small-file writes and directory fsync."""

from __future__ import annotations

import os

__all__ = ["fsync_dir", "read_small", "write_atomic"]


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, sync: bool = True) -> None:
    """Replace ``path`` with ``data``: write a ``.tmp`` sibling, optionally fsync, rename."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)  # e.g. ENOSPC: leave no half-written .tmp behind
        raise
    os.close(fd)
    os.replace(tmp, path)


def read_small(path: str, limit: int = 65536) -> bytes:
    """Read a small metadata file without following a symlink planted in its place."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)
