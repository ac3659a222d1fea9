"""Push changes made by other processes under the root into the kernel's caches.

Blob entries and misses are cached for an hour (view timeouts), blob attributes also by
the mount (``ContentOps.blob_attrs``). inotify on ``blobs/<alg>/`` tells us when a blob
appears or disappears, whoever did it (the CLI, a gRPC server, containerd): we drop its
cached attributes and invalidate that name so the next lookup sees the truth. inotify on
the metadata directory tells us the database changed: blobs whose UpdatedAt moved
(labels set elsewhere) get their cached attributes dropped and the kernel's invalidated,
so ctime moves. Ingest entries have short timeouts and need no watch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import struct

import pyfuse3
import trio

from store import ALGORITHMS, StoreError

from . import view
from .ops import ContentOps

__all__ = ["watch_store"]

log = logging.getLogger("fusefs")

IN_MODIFY = 0x002
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
_DIR_EVENTS = IN_CREATE | IN_MOVED_TO
_META_EVENTS = IN_MODIFY | IN_CREATE | IN_MOVED_TO
_META = ".meta"  # tag of the metadata directory's watch (no algorithm has a dot)
#: Looking for relabelled blobs scans the metadata: at most this often (seconds).
DB_CHECK_INTERVAL = 0.2
_BLOB_EVENTS = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM


class _Inotify:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd

    def add(self, path: str, mask: int) -> int:
        """Watch ``path``; -1 if it does not exist (yet)."""
        return int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))

    def close(self) -> None:
        os.close(self.fd)


async def watch_store(ops: ContentOps) -> None:
    """Run until cancelled, invalidating kernel entries (and the mount's cached blob
    attributes) for blobs added, deleted or relabelled under us."""
    try:
        ino = _Inotify()
    except (OSError, AttributeError) as exc:
        log.warning("inotify unavailable (%s): changes by other processes show up only"
                    " after cache timeouts", exc)
        return
    layout = ops.store.layout
    watches: dict[int, str] = {}  # wd -> "" (root), "blobs", _META, or an algorithm
    db_name = os.path.basename(layout.db).encode()

    def arm(first: bool = False) -> None:
        for path, tag, mask in [(layout.root, "", _DIR_EVENTS),
                                (layout.blobs, "blobs", _DIR_EVENTS),
                                (layout.private, _META, _META_EVENTS)] + [
                                    (layout.blob_dir(a), a, _BLOB_EVENTS) for a in ALGORITHMS]:
            if tag not in watches.values():
                wd = ino.add(path, mask)
                if wd >= 0:
                    watches[wd] = tag
                    if not first and tag in ALGORITHMS:
                        # a blob may have arrived in the new directory before the watch
                        _added_before_watch(ops, tag, path)

    db_dirty = False  # the metadata database changed: labels may have moved
    last_check = -math.inf
    try:
        arm(first=True)
        while True:
            wait = (last_check + DB_CHECK_INTERVAL - trio.current_time() if db_dirty
                    else math.inf)
            with trio.move_on_after(max(0.0, wait)):
                await trio.lowlevel.wait_readable(ino.fd)
                try:
                    data = os.read(ino.fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    log.warning("inotify failed (%s): watch stopped; other processes'"
                                " changes show up after cache timeouts", exc)
                    return
                rearm, changed = _handle(ops, watches, data, db_name)
                db_dirty = db_dirty or changed
                if rearm:
                    arm()
            if db_dirty and trio.current_time() >= last_check + DB_CHECK_INTERVAL:
                db_dirty = False
                last_check = trio.current_time()
                await _relabelled(ops)
    finally:
        ino.close()


def _handle(ops: ContentOps, watches: dict[int, str], data: bytes,
            db_name: bytes) -> tuple[bool, bool]:
    """Act on a buffer of inotify events: (whether to re-arm, whether the database
    changed)."""
    rearm = changed = False
    pos = 0
    while pos + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
        name = data[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0")
        pos += _EVENT.size + length
        if mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflow: cached blob entries may be stale")
            changed = True
            continue
        tag = watches.get(wd)
        if mask & IN_IGNORED:
            watches.pop(wd, None)
            rearm = True
        elif tag in ("", "blobs"):
            rearm = rearm or bool(mask & IN_ISDIR)
        elif tag == _META:
            changed = changed or name.startswith(db_name)
        elif tag is not None and name:
            alg_ino = ops.nodes.alg_ino(tag)
            if alg_ino is not None:
                ops.drop_listing(tag)
                try:
                    ops.drop_blob_attr(view.hex_ino(name.decode()))
                except ValueError:  # not a blob name
                    pass
                pyfuse3.invalidate_entry_async(alg_ino, name, ignore_enoent=True)
    return rearm, changed


def _added_before_watch(ops: ContentOps, alg: str, path: str) -> None:
    """``blobs/<alg>/`` appeared while the mount runs: drop the kernel's cached misses
    for what it already holds (its blobs came before our watch on it)."""
    alg_ino = ops.nodes.alg_ino(alg)
    if alg_ino is None:
        return
    ops.drop_listing(alg)
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        pyfuse3.invalidate_entry_async(alg_ino, os.fsencode(name), ignore_enoent=True)


async def _relabelled(ops: ContentOps) -> None:
    """Push label changes (ctime) made by any process into the kernel's attribute cache."""
    try:
        rows = await trio.to_thread.run_sync(ops.updated_rows)
        held = ops.relabelled(rows)
    except (StoreError, OSError) as exc:  # e.g. a locked database: try at the next change
        log.warning("looking for relabelled blobs: %s", exc)
        return

    def invalidate() -> None:
        for i in held:
            try:
                pyfuse3.invalidate_inode(i, attr_only=True)
            except OSError as exc:  # ENOENT: the kernel no longer holds it
                log.debug("invalidating inode %d: %s", i, exc)

    if held:
        await trio.to_thread.run_sync(invalidate)
