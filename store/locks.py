"""Ref locks that hold across threads and processes.

A lock is ``flock(LOCK_EX | LOCK_NB)`` on ``.contentfs/locks/<sha256(ref)>``. flock locks
belong to an open file description, so two opens in one process exclude each other just
as two processes do. The holder writes the time it took the lock into the file so that a
refused caller can say for how long the ref has been held. The file is unlinked on
release while still locked; a taker that finds its file was unlinked retries.

``take_lock`` waits for a held ref as containerd 1.6's local store does: it retries with
random sleeps that double (0 to 2^n - 1 ms after failure n, each at most 128 ms) until
``wait`` seconds have passed (default about 1 s), then raises Unavailable. A release in
this process wakes waiters at once, so a client that closes a writer and reopens the ref
at once never waits for a sleep to end; a release in another process is seen at the next
try. ``try_lock`` is the fail-at-once form (``wait=0``).

``hold_lock`` serialises short critical sections (the commits of one digest), never a
writer's lifetime: it blocks until the lock is free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import threading
import time
from collections.abc import Iterator

from .errors import Unavailable
from .types import format_time, parse_time

__all__ = ["DEFAULT_WAIT", "RefLock", "hold_lock", "take_lock", "try_lock"]

#: How long a writer waits for a held ref by default (containerd 1.6: 10 tries, < ~1 s).
DEFAULT_WAIT = 1.0
_MAX_PAUSE_MS = 128

# Bumped and notified on every release in this process, so waiters wake without polling.
_released = threading.Condition()
_generation = 0


def _notify_release() -> None:
    global _generation
    with _released:
        _generation += 1
        _released.notify_all()


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
            _notify_release()


def take_lock(path: str, ref: str, wait: float = DEFAULT_WAIT) -> RefLock:
    """Take the lock for ``ref`` at ``path``, waiting up to ``wait`` seconds while another
    holder (thread or process) has it; then Unavailable. ``wait <= 0`` fails at once."""
    deadline = time.monotonic() + max(0.0, wait)
    failures = 0
    while True:
        with _released:
            seen = _generation
        try:
            return try_lock(path, ref)
        except Unavailable:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
        pause_ms = random.uniform(0, min(1 << failures, _MAX_PAUSE_MS))
        failures += 1
        with _released:
            if _generation == seen:  # nothing released here since our try: sleep or wake
                _released.wait(min(remaining, pause_ms / 1000))


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
