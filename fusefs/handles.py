"""Open files and directories of the mount: the handle types and the table of them.

A file handle (``fh``) is what OPEN, CREATE and OPENDIR return and every later request
on that open names. The table also knows which inodes have open files, so a file
removed (``rm``) while open keeps answering getattr, from the open file with
``st_nlink`` 0, until its last close (what a local filesystem does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from store.api import ReaderAt, Writer

from .view import BlobListing, Kind

__all__ = ["DirHandle", "Handle", "Handles", "ReadHandle", "WriteHandle"]


@dataclasses.dataclass
class ReadHandle:
    """A read-only open: a blob (through its ReaderAt), an ingest or a layout file."""

    fd: int  # -1 for a reader that is not a file here (reads go through ``reader``)
    reader: ReaderAt | None = None
    digest: str = ""  # of a blob
    ino: int = 0  # the inode opened (0: not tracked)
    # a blob whose file changed since commit: the first sequential whole read is hashed
    hasher: hashlib._Hash | None = None
    hashed: int = 0
    file_key: tuple[int, int, int, int] = (0, 0, 0, 0)
    corrupt: bool = False  # its bytes were found not to match: every read is EIO

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        elif self.fd >= 0:
            os.close(self.fd)


@dataclasses.dataclass
class WriteHandle:
    """An open for writing on an ingest: owns the ref's writer until RELEASE."""

    ref: str
    writer: Writer
    append: bool
    read_fd: int  # the ingest's data for reading back (-1: the store cannot)
    dirty: bool = False
    ino: int = 0  # the inode opened (0: not tracked)


@dataclasses.dataclass
class DirHandle:
    """A directory listing snapshot taken at opendir, sorted by readdir cursor. Only
    names: attributes are read when an entry is sent (readdirplus)."""

    kind: Kind  # of the directory
    key: str  # the directory's node key (its algorithm for blobs/<alg>/)
    keys: list[int]  # readdir cursors, ascending
    names: list[str]  # entry names
    refs: list[str]  # what each entry names: a ref, an algorithm, a root entry
    listing: BlobListing | None = None  # blobs/<alg>/ (keys, names, refs are empty)


Handle = ReadHandle | WriteHandle | DirHandle


class Handles:
    """The open handles by ``fh``, and the inodes with open files."""

    def __init__(self) -> None:
        self.table: dict[int, Handle] = {}
        self._next_fh = 1
        # Open files by inode, and the inodes removed (rm) while open: those keep their
        # attributes, from the open file, with st_nlink 0, until the last close.
        self.open_files: dict[int, set[int]] = {}
        self.unlinked: dict[int, tuple[int, int]] = {}  # ino -> blob (created, updated)

    def get(self, fh: int) -> Handle | None:
        return self.table.get(fh)

    def __getitem__(self, fh: int) -> Handle:
        return self.table[fh]

    def add(self, handle: Handle) -> int:
        """Register an open; return its ``fh``."""
        fh = self._next_fh
        self._next_fh += 1
        self.table[fh] = handle
        if not isinstance(handle, DirHandle) and handle.ino:
            self.open_files.setdefault(handle.ino, set()).add(fh)
        return fh

    def drop(self, fh: int) -> Handle | None:
        """Take handle ``fh`` out of the tables (RELEASE); the inode stops being an
        open unlinked file when this was its last open."""
        handle = self.table.pop(fh, None)
        if handle is None or isinstance(handle, DirHandle) or not handle.ino:
            return handle
        fhs = self.open_files.get(handle.ino)
        if fhs is not None:
            fhs.discard(fh)
            if not fhs:
                del self.open_files[handle.ino]
                self.unlinked.pop(handle.ino, None)
        return handle

    def unlinked_open(self, ino: int, created_ns: int = 0, updated_ns: int = 0) -> None:
        """Inode ``ino`` was removed: if a file is open on it, it keeps answering
        getattr (from the open file, st_nlink 0) until the last close."""
        if ino in self.open_files:
            self.unlinked[ino] = (created_ns, updated_ns)

    def first_open(self, ino: int) -> ReadHandle | WriteHandle:
        """One open file on ``ino`` (which must have one)."""
        handle = self.table[min(self.open_files[ino])]
        assert not isinstance(handle, DirHandle)
        return handle

    def all(self) -> list[int]:
        return list(self.table)
