"""What the mount tells the kernel: attribute replies and cache invalidations.

``entry`` turns the view's :class:`~fusefs.view.Attr` into pyfuse3's EntryAttributes;
the ``invalidate_*`` helpers drop what the kernel caches (dentries, attributes) when the
store changes under it.
"""

from __future__ import annotations

import errno
import logging

import pyfuse3
import trio

from . import view
from .view import Attr

__all__ = ["entry", "invalidate_entry", "invalidate_inode", "negative"]

log = logging.getLogger("fusefs")


def entry(attr: Attr) -> pyfuse3.EntryAttributes:
    """The reply for a node with attributes ``attr``."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = attr.ino
    e.generation = 0
    e.entry_timeout = attr.timeout
    e.attr_timeout = attr.timeout
    e.st_mode = attr.mode
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_rdev = 0
    e.st_size = attr.size
    e.st_blksize = view.BLKSIZE
    e.st_blocks = attr.blocks
    e.st_atime_ns = attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.ctime_ns
    return e


def negative(timeout: float = view.NEGATIVE_TIMEOUT) -> pyfuse3.EntryAttributes:
    """A lookup miss the kernel may cache for ``timeout`` seconds."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0
    e.entry_timeout = timeout
    return e


async def invalidate_entry(parent: int, name: bytes) -> None:
    """Drop the kernel's dentry ``name`` in ``parent`` and wait until it is gone.

    Runs in a thread: the kernel may need a directory lock that a request we must
    still answer holds. Never call this from a handler whose request holds the
    lock of ``parent`` (rename, create, unlink in it): use
    ``pyfuse3.invalidate_entry_async``.
    """
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the kernel had no such entry
            log.warning("invalidating %r: %s", name, exc)


def invalidate_inode(ino: int, what: str) -> None:
    """Drop the kernel's cached attributes of ``ino`` (e.g. ctime moved)."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError as exc:  # ENOENT: the kernel no longer holds it
        log.debug("invalidating inode of %s: %s", what, exc)
