"""Ref locks that hold across threads and processes, and never wait.

A lock is ``flock(LOCK_EX | LOCK_NB)`` on ``.contentfs/locks/<sha256(ref)>``. flock locks
belong to an open file description, so two opens in one process exclude each other just
as two processes do. The holder writes the time it took the lock into the file so that a
refused caller can say for how long the ref has been held. The file is unlinked on
release while still locked; a taker that finds its file was unlinked retries.

``hold_lock`` is the one lock that waits: it serialises short critical sections (the
commits of one digest), never a writer's lifetime.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator

from .errors import Unavailable
from .types import format_time, parse_time

__all__ = ["RefLock", "hold_lock", "try_lock"]


class RefLock:
    """A held ref lock. ``release()`` is idempotent."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def try_lock(path: str, ref: str) -> RefLock:
    """Take the lock for ``ref`` at ``path`` or raise Unavailable at once."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            held = _describe_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Unavailable(f"ref {ref} locked{held}") from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # released and unlinked between our open and flock: retry
            os.close(fd)
            continue
        stamp = format_time(time.time_ns()).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp, 0)
        except OSError:  # e.g. ENOSPC: the stamp is only a diagnostic
            pass
        return RefLock(path, fd)


@contextlib.contextmanager
def hold_lock(path: str) -> Iterator[None]:
    """Hold the lock at ``path`` for a short critical section, waiting while another
    thread or process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # released and unlinked between our open and flock: retry
    lock = RefLock(path, fd)
    try:
        yield
    finally:
        lock.release()


def _describe_holder(fd: int) -> str:
    try:
        since = parse_time(os.pread(fd, 64, 0).decode())
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    held_for = max(0.0, (time.time_ns() - since) / 1e9)
    return f" for {held_for:.1f}s (since {format_time(since)})"
