"""Changes made under a local root by anyone (this process, the CLI, a gRPC server,
containerd): inotify on ``blobs/<alg>/`` for blobs that come or go, and on the metadata
directory for label changes. :meth:`store.local.LocalStore.open_changes` opens one.

Only the directories are watched, never the blobs, so the cost does not grow with their
number. A directory created after the watch started (``blobs/`` or ``blobs/<alg>/`` on an
empty root) is watched from the moment its creation is seen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

from .api import Change, ChangeKind
from .digest import ALGORITHMS, Digest, is_hex_name
from .layout import Layout

__all__ = ["InotifyChanges"]

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
_BLOB_EVENTS = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM
_ROOT, _BLOBS, _META = "", "blobs", ".meta"  # watch tags (no algorithm has a dot)


class InotifyChanges:
    """A :class:`store.api.Changes` feed over inotify. Not thread-safe: one reader."""

    def __init__(self, layout: Layout) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = int(self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._fd = fd
        self._layout = layout
        self._db_name = os.path.basename(layout.db).encode()
        self._watches: dict[int, str] = {}  # wd -> tag: _ROOT, _BLOBS, _META or algorithm
        self._arm()

    def fileno(self) -> int:
        return self._fd

    def _arm(self, out: list[Change] | None = None) -> None:
        """Watch the directories not watched yet. A ``blobs/<alg>/`` that appears while
        the feed runs may already hold blobs that came before its watch: each is
        reported in ``out``."""
        layout = self._layout
        wanted = [(layout.root, _ROOT, _DIR_EVENTS), (layout.blobs, _BLOBS, _DIR_EVENTS),
                  (layout.private, _META, _META_EVENTS)]
        wanted += [(layout.blob_dir(a), a, _BLOB_EVENTS) for a in ALGORITHMS]
        held = set(self._watches.values())
        for path, tag, mask in wanted:
            if tag not in held:
                wd = int(self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask))
                if wd >= 0:  # else it does not exist (yet)
                    self._watches[wd] = tag
                    if out is not None and tag in ALGORITHMS:
                        out += _present(path, tag)

    def read(self) -> list[Change]:
        """What arrived since the last call; never blocks. OSError if inotify fails."""
        try:
            data = os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return []
        out: list[Change] = []
        rearm = labels = False
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            name = data[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0")
            pos += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                out.append(Change(ChangeKind.OVERFLOW))
                labels = True
                continue
            tag = self._watches.get(wd)
            if mask & IN_IGNORED:
                self._watches.pop(wd, None)
                rearm = True
            elif tag in (_ROOT, _BLOBS):
                rearm = rearm or bool(mask & IN_ISDIR)
            elif tag == _META:
                labels = labels or name.startswith(self._db_name)
            elif tag is not None and name:
                text = name.decode("utf-8", "surrogateescape")
                if is_hex_name(tag, text):
                    out.append(Change(ChangeKind.BLOBS, Digest(f"{tag}:{text}")))
        if labels:
            out.append(Change(ChangeKind.LABELS))
        if rearm:
            self._arm(out)
        return out

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _present(path: str, algorithm: str) -> list[Change]:
    """A change for each blob name already in ``path``."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return [Change(ChangeKind.BLOBS, Digest(f"{algorithm}:{n}"))
            for n in names if is_hex_name(algorithm, n)]
