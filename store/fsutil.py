"""Small filesystem helpers: atomic small-file writes and directory fsync."""

from __future__ import annotations

import os
import stat

from .errors import FailedPrecondition

__all__ = ["ensure_dir", "fsync_dir", "read_small", "write_atomic"]


def ensure_dir(path: str, mode: int = 0o755) -> None:
    """Create the store directory ``path`` (its parent must exist) unless present.

    FailedPrecondition if something other than a real directory, e.g. a symlink, is
    planted there: the store never follows one out of its root."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise FailedPrecondition(f"store directory {path}: not a directory (a symlink?)")


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
