"""Digest state of ingests closed in this process, so a writer resumed here continues
hashing where the last one stopped instead of rereading the data."""

from __future__ import annotations

import hashlib
import os
import threading

__all__ = ["HashCache"]

_MAX_ENTRIES = 1024


class HashCache:
    """ref -> the hasher of its ingest's bytes, valid while the data file is unchanged
    (same inode, size and mtime). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[int, int, int, hashlib._Hash]] = {}

    def remember(self, ref: str, st: os.stat_result, hasher: hashlib._Hash) -> None:
        """Keep a copy of ``hasher``, the digest state of the data file ``st``."""
        with self._lock:
            if len(self._entries) > _MAX_ENTRIES:
                self._entries.clear()
            self._entries[ref] = (st.st_ino, st.st_size, st.st_mtime_ns, hasher.copy())

    def take(self, ref: str, st: os.stat_result, algorithm: str) -> hashlib._Hash | None:
        """The hasher kept for ``ref`` if the data file is still ``st`` and it hashes
        with ``algorithm``; the entry is dropped either way."""
        with self._lock:
            cached = self._entries.pop(ref, None)
        if cached is None:
            return None
        ino, size, mtime, hasher = cached
        if (ino, size, mtime) != (st.st_ino, st.st_size, st.st_mtime_ns):
            return None
        return hasher if hasher.name == algorithm else None

    def drop(self, ref: str) -> None:
        with self._lock:
            self._entries.pop(ref, None)

    def rename(self, old: str, new: str) -> None:
        """The ingest ``old`` is now ``new`` (what was kept for ``new`` is dropped)."""
        with self._lock:
            cached = self._entries.pop(old, None)
            self._entries.pop(new, None)
            if cached is not None:
                self._entries[new] = cached
