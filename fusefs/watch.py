"""Push changes made by other processes under the root into the kernel's caches.

Blob entries are cached for an hour and misses for a second (view timeouts). inotify on
``blobs/<alg>/`` tells us when a blob appears or disappears, whoever did it (the CLI, a
gRPC server, containerd), and we invalidate that name so the next lookup sees the truth.
Ingest entries have short timeouts and need no watch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct

import pyfuse3
import trio

from store import ALGORITHMS

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
    """Run until cancelled, invalidating kernel entries for blobs changed under us."""
    try:
        ino = _Inotify()
    except (OSError, AttributeError) as exc:
        log.warning("inotify unavailable (%s): changes by other processes show up only"
                    " after cache timeouts", exc)
        return
    layout = ops.store.layout
    watches: dict[int, str] = {}  # wd -> "" (root), "blobs", or an algorithm

    def arm() -> None:
        for path, tag, mask in [(layout.root, "", _DIR_EVENTS),
                                (layout.blobs, "blobs", _DIR_EVENTS)] + [
                                    (layout.blob_dir(a), a, _BLOB_EVENTS) for a in ALGORITHMS]:
            if tag not in watches.values():
                wd = ino.add(path, mask)
                if wd >= 0:
                    watches[wd] = tag

    try:
        arm()
        while True:
            await trio.lowlevel.wait_readable(ino.fd)
            try:
                data = os.read(ino.fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.warning("inotify failed (%s): watch stopped; other processes' changes"
                            " show up after cache timeouts", exc)
                return
            rearm = False
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    log.warning("inotify queue overflow: cached blob entries may be stale")
                    continue
                tag = watches.get(wd)
                if mask & IN_IGNORED:
                    watches.pop(wd, None)
                    rearm = True
                elif tag in ("", "blobs"):
                    rearm = rearm or bool(mask & IN_ISDIR)
                elif tag is not None and name:
                    alg_ino = ops.nodes.alg_ino(tag)
                    if alg_ino is not None:
                        pyfuse3.invalidate_entry_async(alg_ino, name, ignore_enoent=True)
            if rearm:
                arm()
    finally:
        ino.close()
