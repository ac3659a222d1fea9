"""pyfuse3 request handlers: a thin adapter from FUSE requests to the store and the view.

All handlers run as trio tasks on one thread; they interleave only at ``await``. Fast
work (stat, pread, pwrite plus inline hashing, SQLite lookups) runs inline; work that
can take long (opening a writer that must rehash a resumed ingest, commit's fsyncs,
fsync at FLUSH, directory snapshots) goes to a thread. Only FUSEError leaves a handler;
anything else is a bug and ends the mount.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import errno
import functools
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pyfuse3
import trio

from store import (
    ALGORITHMS,
    MAX_LABEL_SIZE,
    AlreadyExists,
    FileReaderAt,
    Info,
    LocalStore,
    LocalWriter,
    NotFound,
    StoreError,
    Unavailable,
)
from store.digest import split_digest
from store.types import format_time, to_ns

from . import view
from .errors import fuse_errors, refuse
from .view import (
    BLOBS_INO,
    INGEST_INO,
    LAYOUT_FILES,
    ROOT_INO,
    Attr,
    Kind,
    Node,
    decode_name,
    encode_ref,
    is_blob_name,
)

__all__ = ["ContentOps"]

log = logging.getLogger("fusefs")

T = TypeVar("T")

#: How long an open-for-write or a commit waits for a writer whose RELEASE is still in
#: flight (close(2) returns before the kernel sends RELEASE) before answering EBUSY.
BUSY_WAIT = 1.0
_ZEROS = bytes(1 << 20)
_STATFS_TTL = 5.0
_RESERVED = "contentfs."
#: Label changes by other processes are looked for this far back from the newest seen.
_UPDATED_SLACK_NS = 2_000_000_000
_READDIR_BATCH = 64  # entries stat-ed (and one DB query) per step of a listing
_NAME_MAX = 255  # a new ingest name may be no longer than any Linux file name


@dataclasses.dataclass
class ReadHandle:
    """A read-only open: a blob (through its ReaderAt), an ingest or a layout file."""

    fd: int
    reader: FileReaderAt | None = None
    ino: int = 0  # the inode opened (0: not tracked)
    # a blob whose file changed since commit: the first sequential whole read is hashed
    hasher: hashlib._Hash | None = None
    hashed: int = 0
    file_key: tuple[int, int, int, int] = (0, 0, 0, 0)
    corrupt: bool = False  # its bytes were found not to match: every read is EIO

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        else:
            os.close(self.fd)


@dataclasses.dataclass
class WriteHandle:
    """An open for writing on an ingest: owns the ref's writer until RELEASE."""

    ref: str
    writer: LocalWriter
    append: bool
    read_fd: int
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


@dataclasses.dataclass(frozen=True, slots=True)
class BlobListing:
    """The blob names of one ``blobs/<alg>/``, sorted, shared by every open of it until
    the directory changes: ``names`` is their concatenation (each ``width`` bytes),
    ``inos`` their inodes. About 100 bytes per blob."""

    stamp: tuple[int, int, int]  # (ino, mtime, ctime) of the backing directory
    width: int
    names: bytes
    inos: array.array[int]
    keys: array.array[int]  # readdir cursors (``view.hex_key``: ascending like the names)

    def __len__(self) -> int:
        return len(self.inos)

    def name(self, j: int) -> bytes:
        return self.names[j * self.width:(j + 1) * self.width]



Handle = ReadHandle | WriteHandle | DirHandle


class ContentOps(pyfuse3.Operations):
    """The contentfs view of one store."""

    enable_writeback_cache = False

    def __init__(self, store: LocalStore, *, readonly: bool = False) -> None:
        super().__init__()
        self.store = store
        self.readonly = readonly
        self.root = store.root
        self.nodes = view.NodeTable()
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        # Open files by inode, and the inodes removed (rm) while open: those keep their
        # attributes, from the open file, with st_nlink 0, until the last close.
        self.open_files: dict[int, set[int]] = {}
        self.unlinked: dict[int, tuple[int, int]] = {}  # ino -> blob (created, updated)
        self.writers: dict[str, WriteHandle] = {}
        self.ingest_modes: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        # (ino, size, mtime, ctime) of blob files whose bytes were hashed and matched,
        # or did not match
        self.verified: set[tuple[int, int, int, int]] = set()
        self.corrupt: set[tuple[int, int, int, int]] = set()
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None
        # Attributes of blobs by inode, as sent to the kernel (blobs are immutable). An
        # entry is dropped when its blob is deleted, committed or relabelled, here or by
        # another process (watch.py); plain C structs keep 100k blobs at ~25 MB.
        self.blob_attrs: dict[int, pyfuse3.EntryAttributes] = {}
        # Listings of blobs/<alg>/, kept while the backing directory is unchanged (its
        # times, and drop_listing when a blob comes or goes, here or elsewhere).
        self._listings: dict[str, BlobListing] = {}
        self._listing_gen: dict[str, int] = {}
        self._updated_mark = time.time_ns()  # newest UpdatedAt seen (nothing cached yet)
        # Test hook: a lookup of this name at the root raises a non-FUSE exception, to
        # check that a handler bug ends the daemon non-zero instead of becoming EIO.
        crash = os.environ.get("CONTENTFS_TEST_CRASH_LOOKUP")
        self._crash_name = crash.encode() if crash else None

    # helpers ---------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _add_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        if not isinstance(handle, DirHandle) and handle.ino:
            self.open_files.setdefault(handle.ino, set()).add(fh)
        return fh

    def _drop_handle(self, fh: int) -> Handle | None:
        """Take handle ``fh`` out of the tables (RELEASE); the inode stops being an
        open unlinked file when this was its last open."""
        handle = self.handles.pop(fh, None)
        if handle is None or isinstance(handle, DirHandle) or not handle.ino:
            return handle
        fhs = self.open_files.get(handle.ino)
        if fhs is not None:
            fhs.discard(fh)
            if not fhs:
                del self.open_files[handle.ino]
                self.unlinked.pop(handle.ino, None)
        return handle

    def _unlinked_open(self, ino: int, created_ns: int = 0, updated_ns: int = 0) -> None:
        """Inode ``ino`` was removed: if a file is open on it, it keeps answering
        getattr (from the open file, st_nlink 0) until the last close."""
        if ino in self.open_files:
            self.unlinked[ino] = (created_ns, updated_ns)

    def _orphan_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of an open file removed since it was opened (fstat after rm, here
        or by another process)."""
        created, updated = self.unlinked[node.ino]
        handle = self.handles[min(self.open_files[node.ino])]
        assert not isinstance(handle, DirHandle)
        fd = handle.read_fd if isinstance(handle, WriteHandle) else handle.fd
        with fuse_errors(f"stat removed {node.key}"):
            st = os.fstat(fd)
        if node.kind is Kind.BLOB:
            if not created:  # its metadata went with it: the file's mtime is its commit
                created = updated = st.st_mtime_ns
            attr = view.blob_attr(node.ino, st, created, updated)
        else:
            size = handle.writer.offset if isinstance(handle, WriteHandle) else st.st_size
            attr = view.ingest_attr(node.ino, st, size, self.ingest_modes.get(node.key))
        attr.nlink = 0
        return self._entry(attr)

    def _deny(self, reason: str) -> pyfuse3.FUSEError:
        """EPERM for what the design forbids; EROFS for any change on a read-only mount."""
        return refuse(errno.EROFS if self.readonly else errno.EPERM, reason)

    def _check_writable(self, reason: str) -> None:
        if self.readonly:
            raise refuse(errno.EROFS, f"{reason}: read-only mount")

    @staticmethod
    def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
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

    @staticmethod
    def _negative() -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = view.NEGATIVE_TIMEOUT
        return e

    def is_oci_layout(self) -> bool:
        return os.path.isfile(os.path.join(self.root, "oci-layout"))

    def _data_path(self, ref: str) -> str:
        return self.store.ingest_data_path(ref)

    def _ingest_exists(self, ref: str) -> bool:
        return ref in self.writers or os.path.isfile(self._data_path(ref))

    # attributes ------------------------------------------------------------------------

    def _attr(self, node: Node) -> Attr:
        """Attributes of ``node``; FUSEError(ENOENT) if what it shows is gone."""
        kind = node.kind
        try:
            if kind is Kind.BLOB:
                return self._blob_attr(node.ino, node.key)
            if kind is Kind.INGEST:
                return self._ingest_attr(node.ino, node.key)
            if kind is Kind.LAYOUT_FILE:
                return view.layout_attr(node.ino, os.stat(os.path.join(self.root, node.key)))
        except (FileNotFoundError, NotADirectoryError, NotFound):
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except (OSError, StoreError) as exc:  # e.g. EACCES, a busy metadata database
            with fuse_errors(f"stat {node.key or node.kind.value}"):
                raise exc from None
        with fuse_errors("stat store root"):
            root_st = os.stat(self.root)
        if kind is Kind.ROOT:
            return view.dir_attr(node.ino, root_st, writable=False, nlink=4)
        if kind is Kind.BLOBS:
            return view.dir_attr(node.ino, root_st, writable=False, nlink=2 + 3)
        writable = not self.readonly
        return view.dir_attr(node.ino, root_st, writable=writable)

    def _blob_attr(self, ino: int, digest: str) -> Attr:
        path = self.store.layout.blob_path(digest)  # type: ignore[arg-type]
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"content {digest}")
        row = self.store.db.get_blob(digest)
        if row is not None and row[0] == st.st_size:
            return view.blob_attr(ino, st, row[1], row[2])
        return view.blob_attr(ino, st, st.st_mtime_ns, st.st_mtime_ns)

    def _ingest_attr(self, ino: int, ref: str) -> Attr:
        st = os.stat(self._data_path(ref))
        handle = self.writers.get(ref)
        size = handle.writer.offset if handle is not None else st.st_size
        return view.ingest_attr(ino, st, size, self.ingest_modes.get(ref))

    # lookup, getattr, forget -----------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INO and name == self._crash_name:
            raise RuntimeError(f"injected handler bug: lookup of {name!r}")
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        with fuse_errors(f"lookup {text}"):
            node = self._child(parent, text)
        if node is None:
            return self._negative()
        self.unlinked.pop(node.ino, None)  # e.g. the same blob committed again
        try:
            entry = self._entry_of(node)
        except pyfuse3.FUSEError:
            self.nodes.drop_unused(node)  # vanished between the check and the stat
            raise
        self.nodes.remember(node)
        return entry

    def _entry_of(self, node: Node) -> pyfuse3.EntryAttributes:
        """What the kernel gets for ``node``; blobs from ``blob_attrs`` when held there."""
        if node.kind is Kind.BLOB and node.ino >> 62 == 1:  # not a committed ingest's node
            entry = self.blob_attrs.get(node.ino)
            if entry is None:
                entry = self._entry(self._attr(node))
                self.blob_attrs[node.ino] = entry
            return entry
        return self._entry(self._attr(node))

    def updated_rows(self) -> list[tuple[str, int, int]]:
        """Metadata rows whose UpdatedAt moved lately, for ``relabelled`` (a scan of the
        blob table: call it from a worker thread)."""
        return self.store.db.blobs_updated_since(self._updated_mark - _UPDATED_SLACK_NS)

    def relabelled(self, rows: list[tuple[str, int, int]]) -> list[int]:
        """Of ``updated_rows``, the blobs relabelled (by any process) since their
        attributes were cached: drop those; return the inodes the kernel holds."""
        held = []
        for digest, created, updated in rows:
            self._updated_mark = max(self._updated_mark, updated)
            ino = view.blob_ino(digest)
            entry = self.blob_attrs.get(ino)
            if entry is not None and entry.st_ctime_ns != max(created, updated):
                self.blob_attrs.pop(ino, None)
                if ino in self.nodes:
                    held.append(ino)
        return held

    def drop_blob_attr(self, ino: int) -> None:
        """Forget the cached attributes of blob ``ino`` (deleted, committed, relabelled)."""
        self.blob_attrs.pop(ino, None)

    def _child(self, parent: Node, name: str) -> Node | None:
        """The node ``name`` in ``parent``; None for a cacheable miss; ENOENT otherwise."""
        kind = parent.kind
        found: Node | None = None
        if kind is Kind.ROOT:
            if name == "blobs":
                found = self.nodes.get(BLOBS_INO)
            elif name == "ingest":
                found = self.nodes.get(INGEST_INO)
            elif name in LAYOUT_FILES and self.is_oci_layout():
                found = self.nodes.get(LAYOUT_FILES[name])
        elif kind is Kind.BLOBS:
            ino = self.nodes.alg_ino(name)
            found = self.nodes.get(ino) if ino is not None else None
        elif kind is Kind.ALG:
            if not is_blob_name(parent.key, name):
                return None
            digest = f"{parent.key}:{name}"
            try:
                st = os.lstat(self.store.layout.blob_path(digest))  # type: ignore[arg-type]
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISREG(st.st_mode):
                return None
            return self.nodes.blob(digest)
        elif kind is Kind.INGEST_DIR:
            ref = decode_name(name)
            if ref is not None and self._ingest_exists(ref):
                return self.nodes.ingest(ref)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if inode not in self.unlinked:
            try:
                return self._entry_of(node)
            except pyfuse3.FUSEError as exc:
                if exc.errno != errno.ENOENT or inode not in self.open_files:
                    raise
                # removed by another process (contentfs rm/abort, containerd) while open
                self.unlinked[inode] = (0, 0)
        return self._orphan_entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.nodes.forget(ino, n)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        now = time.monotonic()
        if self._statfs is not None and now - self._statfs[0] < _STATFS_TTL:
            return self._statfs[1]
        with fuse_errors("statfs of the store root"):
            sv = os.statvfs(self.root)
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_frsize  # df multiplies by f_frsize: keep them equal
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = 255
        self._statfs = (now, out)
        return out

    # directories -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        entries: list[tuple[int, str, str]]  # cursor, name, what it names
        if node.kind is Kind.ROOT:
            names = ["blobs", "ingest"]
            if self.is_oci_layout():
                names += [n for n in LAYOUT_FILES if os.path.isfile(os.path.join(self.root, n))]
            entries = [(i + 1, n, n) for i, n in enumerate(names)]
        elif node.kind is Kind.BLOBS:
            entries = [(i + 1, alg, alg) for i, (alg, _) in enumerate(self.nodes.algorithms())]
        elif node.kind is Kind.ALG:
            with fuse_errors(f"list blobs/{node.key}"):
                listing = await trio.to_thread.run_sync(self._blob_listing, node.key)
            return self._add_handle(DirHandle(node.kind, node.key, [], [], [], listing))
        elif node.kind is Kind.INGEST_DIR:
            with fuse_errors("list ingest/"):
                entries = await trio.to_thread.run_sync(self._snapshot_ingests)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries.sort(key=lambda e: e[0])
        handle = DirHandle(node.kind, node.key, [e[0] for e in entries],
                           [e[1] for e in entries], [e[2] for e in entries])
        return self._add_handle(handle)

    def _blob_listing(self, alg: str) -> BlobListing:
        """The names in blobs/<alg>/: the kept listing if the directory has not changed
        since it was taken, else a new one (runs in a worker thread)."""
        gen = self._listing_gen.get(alg, 0)
        path = self.store.layout.blob_dir(alg)
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            kept = self._listings.get(alg)
            if kept is not None and kept.stamp == stamp:
                return kept
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            stamp, names = (0, 0, 0), []
        width = ALGORITHMS[alg]
        good = sorted(filter(_hex_pattern(width).fullmatch, names))
        del names
        listing = BlobListing(stamp, width, "".join(good).encode(),
                              array.array("Q", map(view.hex_ino, good)),
                              array.array("Q", map(view.hex_key, good)))
        if self._listing_gen.get(alg, 0) == gen:  # nothing dropped it meanwhile
            self._listings[alg] = listing
        return listing

    def drop_listing(self, alg: str) -> None:
        """A blob came or went in blobs/<alg>/: the next opendir lists it afresh."""
        self._listing_gen[alg] = self._listing_gen.get(alg, 0) + 1
        self._listings.pop(alg, None)

    def _snapshot_ingests(self) -> list[tuple[int, str, str]]:
        refs = {s.ref for s in self.store.list_statuses()} | set(self.writers)
        return [(view.dir_key(ref), encode_ref(ref), ref) for ref in refs]

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles[fh]
        assert isinstance(handle, DirHandle)
        if handle.listing is not None:
            with fuse_errors(f"list blobs/{handle.key}"):
                self._readdir_blobs(handle.key, handle.listing, start_id, token)
            return
        i = bisect.bisect_left(handle.keys, start_id)
        while i < len(handle.keys):
            batch = range(i, min(i + _READDIR_BATCH, len(handle.keys)))
            listed = self._listed(handle, batch)
            for j, item in zip(batch, listed, strict=True):
                if item is None:
                    continue
                node, attr = item
                if not pyfuse3.readdir_reply(
                    token, handle.names[j].encode("utf-8", "surrogateescape"),
                    self._entry(attr), handle.keys[j] + 1,
                ):
                    for rest in listed[j - batch.start:]:
                        if rest is not None:
                            self.nodes.drop_unused(rest[0])
                    return
                self.nodes.remember(node)
            i = batch.stop

    def _readdir_blobs(self, alg: str, listing: BlobListing, start_id: int,
                       token: pyfuse3.ReaddirToken) -> None:
        """readdirplus of blobs/<alg>/ from cursor ``start_id``: attributes from
        ``blob_attrs``; on a miss, those of the next batch are read (one lstat each, one
        DB query). The hot loop of ``ls -l``: keep it lean."""
        cache_get = self.blob_attrs.get
        inos, keys, width, names = listing.inos, listing.keys, listing.width, listing.names
        node_get = self.nodes.table.get
        blob_kind = Kind.BLOB
        reply = pyfuse3.readdir_reply
        n = len(inos)
        i = bisect.bisect_left(keys, start_id)
        filled = i  # entries before this were read into the cache by this call
        while i < n:
            ino = inos[i]
            entry = cache_get(ino)
            if entry is None:
                if i >= filled:
                    filled = min(i + _READDIR_BATCH, n)
                    batch = [j for j in range(i, filled) if inos[j] not in self.blob_attrs]
                    self._fill_blob_attrs(alg, [listing.name(j).decode() for j in batch],
                                          [inos[j] for j in batch])
                    continue
                i += 1  # deleted since opendir
                continue
            off = i * width
            name = names[off:off + width]
            if not reply(token, name, entry, keys[i] + 1):
                return
            node = node_get(ino)
            if node is None or node.kind is not blob_kind:
                node = self.nodes.blob(f"{alg}:{name.decode()}")
            node.lookups += 1
            i += 1

    def _fill_blob_attrs(self, alg: str, names: list[str], inos: list[int]) -> None:
        """Read the attributes of blobs ``names`` of ``alg`` into ``blob_attrs``; blobs
        that no longer exist are left out."""
        prefix = f"{alg}:"
        times = self.store.db.get_blob_times([prefix + n for n in names])
        base = os.path.join(self.store.layout.blob_dir(alg), "")
        entry = self._entry
        for name, ino in zip(names, inos, strict=True):
            try:
                st = os.lstat(base + name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            row = times.get(prefix + name)
            created, updated = ((row[1], row[2]) if row is not None and row[0] == st.st_size
                                else (st.st_mtime_ns, st.st_mtime_ns))
            self.blob_attrs[ino] = entry(view.blob_attr(ino, st, created, updated))

    def _listed(self, handle: DirHandle, batch: range) -> list[tuple[Node, Attr] | None]:
        """Nodes and attributes of some snapshot entries (None for those that vanished)."""
        out: list[tuple[Node, Attr] | None] = []
        for j in batch:
            what = handle.refs[j]
            node: Node | None
            if handle.kind is Kind.INGEST_DIR:
                node = self.nodes.ingest(what) if self._ingest_exists(what) else None
            else:
                parent = ROOT_INO if handle.kind is Kind.ROOT else BLOBS_INO
                try:
                    node = self._child(self._node(parent), what)
                except pyfuse3.FUSEError:  # a layout file removed since opendir
                    node = None
            if node is None:
                out.append(None)
                continue
            try:
                out.append((node, self._attr(node)))
            except pyfuse3.FUSEError:
                self.nodes.drop_unused(node)
                out.append(None)
        return out

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    # open, read, write, release --------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if node.kind is Kind.INGEST:
            if wants_write:
                fh = await self._open_ingest_writer(node.key, flags, inode)
                return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
            with fuse_errors(f"open ingest {node.key}"):
                fd = os.open(self._data_path(node.key), os.O_RDONLY | os.O_CLOEXEC)
            return pyfuse3.FileInfo(fh=self._add_handle(ReadHandle(fd, ino=inode)),
                                    direct_io=True, keep_cache=False)
        if wants_write:
            raise self._deny(f"open {node.key} for writing: blobs are read-only")
        if node.kind is Kind.LAYOUT_FILE:
            with fuse_errors(f"open {node.key}"):
                fd = os.open(os.path.join(self.root, node.key), os.O_RDONLY | os.O_CLOEXEC)
            return pyfuse3.FileInfo(fh=self._add_handle(ReadHandle(fd)), keep_cache=False)
        with fuse_errors(f"open blob {node.key}"):
            reader = self.store.reader_at(node.key)
        handle = ReadHandle(reader.fileno(), reader, ino=inode)
        self._arm_verify(handle, node.key)
        return pyfuse3.FileInfo(fh=self._add_handle(handle), keep_cache=True)

    def _arm_verify(self, handle: ReadHandle, digest: str) -> None:
        """Hash this open's first sequential whole read if the blob's file may have
        changed since its commit: no metadata row, an mtime other than the commit time
        (commit sets both), or a ctime more than 2 s after it. Unchanged blobs are
        trusted and read at full speed; `contentfs verify` rehashes everything."""
        try:
            st = os.fstat(handle.fd)
            row = self.store.db.get_blob(digest)
        except (OSError, StoreError):
            row = None
            st = None
        if st is None:
            return
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in self.verified:
            return
        if key in self.corrupt:
            handle.corrupt = True
            return
        if (row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns
                and st.st_ctime_ns - st.st_mtime_ns < 2_000_000_000):
            return
        handle.hasher = hashlib.new(split_digest(digest)[0])  # type: ignore[arg-type]
        handle.file_key = key

    async def _open_ingest_writer(self, ref: str, flags: int, ino: int = 0) -> int:
        self._check_writable(f"open ingest {ref} for writing")
        writer = await self._acquire(ref, f"open ingest {ref} for writing")
        try:
            with fuse_errors(f"open ingest {ref} for writing"):
                if flags & os.O_TRUNC and writer.offset:
                    writer.truncate(0)
                read_fd = os.open(self._data_path(ref), os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            writer.close()
            raise
        handle = WriteHandle(ref, writer, bool(flags & os.O_APPEND), read_fd, ino=ino)
        self.writers[ref] = handle
        self.errors.pop(ref, None)
        return self._add_handle(handle)

    async def _acquire(self, ref: str, what: str, *, create: bool = True) -> LocalWriter:
        """Open the store writer for ``ref``, waiting (in a thread, by the store's own
        wait) up to BUSY_WAIT while it is held. ``create=False`` only resumes an existing
        ingest (ENOENT if it is gone)."""
        open_writer = functools.partial(self.store.writer, ref, create=create, wait=BUSY_WAIT)
        with fuse_errors(what):
            return await trio.to_thread.run_sync(open_writer)

    async def _retry_busy(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` in a thread, retrying for up to BUSY_WAIT while it is Unavailable."""
        deadline = trio.current_time() + BUSY_WAIT
        with fuse_errors(what):
            while True:
                try:
                    return await trio.to_thread.run_sync(fn)
                except Unavailable:
                    if trio.current_time() >= deadline:
                        raise
                await trio.sleep(0.01)
        raise AssertionError("unreachable")

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if isinstance(handle, WriteHandle):
            fd = handle.read_fd
        elif isinstance(handle, ReadHandle):
            fd = handle.fd
        else:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            data = os.pread(fd, size, off)
        except OSError as exc:
            raise refuse(exc.errno or errno.EIO, f"read: {exc}") from None
        if isinstance(handle, ReadHandle) and handle.corrupt:
            raise pyfuse3.FUSEError(errno.EIO)  # logged when it was found
        if isinstance(handle, ReadHandle) and handle.hasher is not None:
            self._verify_step(handle, off, data)
        return data

    def _verify_step(self, handle: ReadHandle, off: int, data: bytes) -> None:
        """Feed a sequential read to the hasher; EIO for the read completing a mismatch."""
        hasher, reader = handle.hasher, handle.reader
        assert hasher is not None and reader is not None and reader.digest is not None
        if off != handle.hashed:
            if off > handle.hashed:
                handle.hasher = None  # not read sequentially: cannot tell
            return
        hasher.update(data)
        handle.hashed += len(data)
        if handle.hashed < reader.size and data:
            return
        handle.hasher = None
        if len(self.verified) + len(self.corrupt) > 100_000:
            self.verified.clear()
            self.corrupt.clear()
        want = split_digest(reader.digest)[1]
        if handle.hashed == reader.size and hasher.hexdigest() == want:
            self.verified.add(handle.file_key)
            return
        # kernel readahead drops errors and asks again: stay failed for this file
        self.corrupt.add(handle.file_key)
        handle.corrupt = True
        raise refuse(errno.EIO, f"read content {reader.digest}: bytes on disk hash to"
                     f" {hasher.name}:{hasher.hexdigest()} (run contentfs verify)")

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if not isinstance(handle, WriteHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        writer = handle.writer
        with fuse_errors(f"write ingest {handle.ref}"):
            if not handle.append:
                if off < writer.offset:
                    raise refuse(errno.ESPIPE, f"write ingest {handle.ref}: offset {off} is"
                                 f" before the end ({writer.offset}); ingests are append-only")
                self._zero_fill(writer, off - writer.offset)
            n = writer.write(buf)
        handle.dirty = True
        return n

    @staticmethod
    def _zero_fill(writer: LocalWriter, gap: int) -> None:
        while gap > 0:
            gap -= writer.write(memoryview(_ZEROS)[: min(gap, len(_ZEROS))])

    async def flush(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if isinstance(handle, WriteHandle) and handle.dirty:
            handle.dirty = False
            with fuse_errors(f"flush ingest {handle.ref}"):
                await trio.to_thread.run_sync(handle.writer.sync)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles.get(fh)
        if isinstance(handle, WriteHandle):
            handle.dirty = False
            with fuse_errors(f"fsync ingest {handle.ref}"):
                await trio.to_thread.run_sync(handle.writer.sync)

    async def release(self, fh: int) -> None:
        # Frees the writer slot before anything could await (DESIGN §2: RELEASE is late).
        handle = self._drop_handle(fh)
        if isinstance(handle, WriteHandle):
            self._close_writer(handle)
        elif isinstance(handle, ReadHandle):
            handle.close()

    def _close_writer(self, handle: WriteHandle) -> None:
        if self.writers.get(handle.ref) is handle:
            del self.writers[handle.ref]
        os.close(handle.read_fd)
        try:
            handle.writer.close()
        except (OSError, StoreError) as exc:
            log.warning("close ingest %s: %s", handle.ref, exc)

    def close_all(self) -> None:
        """Close every open handle (writers stay resumable). For unmount."""
        for fh in list(self.handles):
            handle = self._drop_handle(fh)
            if isinstance(handle, WriteHandle):
                log.info("closing open ingest %s at offset %d", handle.ref,
                         handle.writer.offset)
                self._close_writer(handle)
            elif isinstance(handle, ReadHandle):
                handle.close()

    # create, unlink, rename, and what is refused -------------------------------------

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        if parent.kind is not Kind.INGEST_DIR:
            raise self._deny(f"create {text}: files can only be created in ingest/")
        self._check_writable(f"create ingest/{text}")
        if len(name) > _NAME_MAX:
            raise refuse(errno.ENAMETOOLONG, f"create ingest/{text[:64]}...: name longer"
                         f" than {_NAME_MAX} bytes")
        ref = decode_name(text)
        if ref is None:
            raise refuse(errno.EINVAL, f"create ingest/{text}: not a ref name ('%' must be"
                         " written %25 and '/' %2F)")
        if flags & os.O_EXCL and self._ingest_exists(ref):
            raise pyfuse3.FUSEError(errno.EEXIST)
        # (if another process created the ingest since the kernel's lookup, this resumes
        # it, or restarts it for O_TRUNC, exactly as an open would)
        node = self.nodes.ingest(ref)
        try:
            fh = await self._open_ingest_writer(ref, flags, node.ino)
        except BaseException:
            self.nodes.drop_unused(node)
            raise
        self.ingest_modes[ref] = mode & 0o7777
        attr = self._attr(node)
        self.nodes.remember(node)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), self._entry(attr)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        if parent.kind is Kind.INGEST_DIR:
            self._check_writable(f"abort ingest/{text}")
            ref = decode_name(text)
            if ref is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            with fuse_errors(f"abort ingest {ref}"):
                await trio.to_thread.run_sync(self.store.abort, ref)
            log.info("aborted ingest %s", ref)
            ino = self.nodes.ingest_ino(ref)
            if ino is not None:
                self._unlinked_open(ino)
            self._forget_ingest(ref)
        elif parent.kind is Kind.ALG:
            self._check_writable(f"delete blobs/{parent.key}/{text}")
            if not is_blob_name(parent.key, text):
                raise pyfuse3.FUSEError(errno.ENOENT)
            digest = f"{parent.key}:{text}"
            ino = view.hex_ino(text)
            kept = self.blob_attrs.get(ino)
            with fuse_errors(f"delete content {digest}"):
                if kept is None and ino in self.open_files:
                    kept = self._entry(self._blob_attr(ino, digest))
                self.store.delete(digest)
            if kept is not None:
                self._unlinked_open(ino, kept.st_mtime_ns, kept.st_ctime_ns)
            self.drop_blob_attr(ino)
            self.drop_listing(parent.key)
            log.info("deleted content %s", digest)
        else:
            raise self._deny(f"unlink {text}: only blobs and ingests can be removed")

    def _forget_ingest(self, ref: str) -> None:
        self.nodes.gone(ref)
        self.ingest_modes.pop(ref, None)
        self.errors.pop(ref, None)

    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
        name_new: bytes, flags: int, ctx: pyfuse3.RequestContext,
    ) -> None:
        src_dir = self._node(parent_inode_old)
        dst_dir = self._node(parent_inode_new)
        old = name_old.decode("utf-8", "surrogateescape")
        new = name_new.decode("utf-8", "surrogateescape")
        what = f"rename {old} to {new}"
        self._check_writable(what)
        if src_dir.kind is not Kind.INGEST_DIR or flags & pyfuse3.RENAME_EXCHANGE:
            raise self._deny(f"{what}: only ingests can be renamed (into ingest/ or blobs/)")
        ref = decode_name(old)
        if ref is None or not self._ingest_exists(ref):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if dst_dir.kind is Kind.INGEST_DIR:
            await self._rename_ingest(ref, new, flags, what)
        elif dst_dir.kind is Kind.ALG:
            await self._commit_by_rename(ref, dst_dir, new, flags)
        else:
            raise self._deny(f"{what}: an ingest can only move within ingest/ or into"
                             " blobs/<alg>/ (commit)")

    async def _rename_ingest(self, ref: str, name: str, flags: int, what: str) -> None:
        if len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX:
            raise refuse(errno.ENAMETOOLONG, f"{what[:128]}...: name longer than"
                         f" {_NAME_MAX} bytes")
        new_ref = decode_name(name)
        if new_ref is None:
            raise self._deny(f"{what}: not a ref name ('%' must be %25, '/' %2F)")
        if new_ref == ref:
            return
        if flags & pyfuse3.RENAME_NOREPLACE and self._ingest_exists(new_ref):
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self._retry_busy(functools.partial(self.store.rename_ingest, ref, new_ref),
                               f"rename ingest {ref} to {new_ref}")
        self.nodes.rename_ingest(ref, new_ref)
        if ref in self.ingest_modes:
            self.ingest_modes[new_ref] = self.ingest_modes.pop(ref)
        self.errors.pop(new_ref, None)
        if ref in self.errors:
            self.errors[new_ref] = self.errors.pop(ref)

    async def _commit_by_rename(self, ref: str, alg_dir: Node, name: str, flags: int) -> None:
        alg = alg_dir.key
        if not is_blob_name(alg, name):
            raise self._deny(f"commit ingest {ref} as blobs/{alg}/{name}: not a {alg} digest")
        digest = f"{alg}:{name}"
        exists = os.path.isfile(self.store.layout.blob_path(digest))  # type: ignore[arg-type]
        if flags & pyfuse3.RENAME_NOREPLACE and exists:
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self.commit(ref, digest)
        self.nodes.committed(ref, digest)
        self.ingest_modes.pop(ref, None)
        # The kernel moves the ingest's inode into blobs/; let the next lookup find the
        # blob's own (stable) inode instead.
        pyfuse3.invalidate_entry_async(alg_dir.ino, name.encode(), ignore_enoent=True)

    async def commit(self, ref: str, expected: str | None) -> str:
        """Commit ingest ``ref`` (waiting briefly for an in-flight RELEASE); return the
        digest. Content that already exists is success. Failures are kept in
        ``errors[ref]`` for ``user.contentfs.error``."""
        what = f"commit ingest {ref}"
        # never a fresh writer: an ingest aborted since is ENOENT, not the empty blob
        writer = await self._acquire(ref, what, create=False)
        actual = writer.digest()
        try:
            digest: str = await trio.to_thread.run_sync(
                functools.partial(writer.commit, 0, expected))
        except AlreadyExists:
            digest = expected or actual
            log.info("commit ingest %s: content %s already exists", ref, digest)
            return digest
        except (StoreError, OSError) as exc:
            self.errors[ref] = f"{what}: {exc}"
            with fuse_errors(what):
                raise
            raise
        finally:
            writer.close()
        log.info("committed ingest %s as %s", ref, digest)
        self.drop_blob_attr(view.blob_ino(digest))
        self.drop_listing(split_digest(digest)[0])  # type: ignore[arg-type]
        self.errors.pop(ref, None)
        return digest

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._deny(f"mkdir {name!r}: the tree is fixed")

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise self._deny(f"rmdir {name!r}: the tree is fixed")

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._deny(f"symlink {name!r}: not supported")

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._deny(f"link {new_name!r}: not supported")

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise self._deny(f"mknod {name!r}: not supported")

    # setattr ---------------------------------------------------------------------------

    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        changes = (fields.update_size or fields.update_mode or fields.update_uid
                   or fields.update_gid or fields.update_atime or fields.update_mtime)
        if node.kind is Kind.INGEST:
            if changes:
                self._check_writable(f"change ingest {node.key}")
                await self._setattr_ingest(node.key, attr, fields, fh)
        elif node.kind is Kind.INGEST_DIR and not (fields.update_size or fields.update_uid
                                                   or fields.update_gid):
            pass  # rsync -a sets the times and mode of ingest/: accepted and ignored
        elif changes:
            raise self._deny(f"change attributes of {node.key or node.kind.value}:"
                             " blobs and directories are read-only")
        return self._entry(self._attr(node))

    async def _setattr_ingest(self, ref: str, attr: pyfuse3.EntryAttributes,
                              fields: pyfuse3.SetattrFields, fh: int | None) -> None:
        path = self._data_path(ref)
        with fuse_errors(f"change ingest {ref}"):
            st = os.stat(path)
            if (fields.update_uid and attr.st_uid != st.st_uid) or (
                    fields.update_gid and attr.st_gid != st.st_gid):
                raise refuse(errno.EPERM, f"chown ingest {ref}: owner cannot change")
            if fields.update_size:
                await self._truncate(ref, attr.st_size, fh)
            if fields.update_mode:
                self.ingest_modes[ref] = attr.st_mode & 0o7777
            if fields.update_atime or fields.update_mtime:
                st = os.stat(path)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime))

    async def _truncate(self, ref: str, size: int, fh: int | None) -> None:
        handle = self.handles.get(fh) if fh is not None else None
        if not isinstance(handle, WriteHandle):
            handle = self.writers.get(ref)
        if handle is not None:
            self._truncate_writer(handle.writer, size)
            handle.dirty = True
            return
        writer = await self._acquire(ref, f"truncate ingest {ref}", create=False)
        try:
            self._truncate_writer(writer, size)
        finally:
            writer.close()

    def _truncate_writer(self, writer: LocalWriter, size: int) -> None:
        """0 restarts, the current size is a no-op, larger zero-extends, smaller: EINVAL."""
        if size == 0:
            writer.truncate(0)
        elif size > writer.offset:
            self._zero_fill(writer, size - writer.offset)
        elif size < writer.offset:
            raise refuse(errno.EINVAL, f"truncate ingest {writer.ref} to {size}: ingests"
                         f" only shrink to 0 (current size {writer.offset})")

    # extended attributes ---------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)  # first: asked before every write(2)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        if key.startswith(_RESERVED):
            value = await self._reserved(node, key[len(_RESERVED):])
        else:
            value = self._labels(node).get(key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8", "surrogateescape")

    def _labels(self, node: Node) -> dict[str, str]:
        with fuse_errors(f"labels of {node.key}"):
            if node.kind is Kind.BLOB:
                return dict(self.store.info(node.key).labels)
            if node.kind is Kind.INGEST:
                if not self._ingest_exists(node.key):
                    raise NotFound(f"ingest {node.key}")
                return self.store.ingest_hints(node.key)[1]
        return {}

    async def _reserved(self, node: Node, field: str) -> str | None:
        """``user.contentfs.<field>``: status readable by name, never listed."""
        with fuse_errors(f"status of {node.key}"):
            if node.kind is Kind.BLOB:
                info = self.store.info(node.key)
                return {
                    "digest": info.digest,
                    "size": str(info.size),
                    "createdat": format_time(to_ns(info.created_at)),
                    "updatedat": format_time(to_ns(info.updated_at)),
                }.get(field)
            if node.kind is not Kind.INGEST:
                return None
            ref = node.key
            if field == "error":
                return self.errors.get(ref)
            if field == "digest":
                handle = self.writers.get(ref)
                if handle is not None:
                    return handle.writer.digest()
                return await trio.to_thread.run_sync(_hash_file, self._data_path(ref))
            st = self.store.status(ref)
            handle = self.writers.get(ref)
            if handle is not None:  # the writer's own times are exact (file mtimes are not)
                live = handle.writer.status()
                st = dataclasses.replace(live, expected=st.expected)
            return {
                "offset": str(st.offset),
                "total": str(st.total),
                "expected": st.expected or "",
                "startedat": format_time(to_ns(st.started_at)),
                "updatedat": format_time(to_ns(st.updated_at)),
            }.get(field)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        labels = self._labels(self._node(inode))
        return [b"user." + k.encode("utf-8", "surrogateescape") for k in sorted(labels)]

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        text = value.decode("utf-8", "surrogateescape")
        self._check_writable(f"set {key} on {node.key}")
        if node.kind not in (Kind.BLOB, Kind.INGEST):
            raise self._deny(f"set {key} on {node.key or node.kind.value}: only blobs and"
                             " ingests carry labels")
        if key.startswith(_RESERVED):
            await self._set_reserved(node, key[len(_RESERVED):], text)
            return
        self._check_label_size(key, text)
        await self._change_label(node, key, text)

    @staticmethod
    def _check_label_size(key: str, value: str) -> None:
        size = len(key.encode("utf-8", "surrogateescape")) + len(
            value.encode("utf-8", "surrogateescape"))
        if size > MAX_LABEL_SIZE:
            raise refuse(errno.E2BIG, f"label {key[:64]}: key and value are {size} bytes,"
                         f" more than {MAX_LABEL_SIZE}")

    async def _change_label(self, node: Node, key: str, value: str) -> None:
        """Set label ``key`` (an empty value removes it) on a blob or an ingest."""
        with fuse_errors(f"label {key} of {node.key}"):
            if node.kind is Kind.BLOB:
                info = self.store.info(node.key)
                self.store.update(
                    Info(info.digest, info.size, info.created_at, info.updated_at,
                         {key: value}), f"labels.{key}")
                self.drop_blob_attr(node.ino)
                # ctime (UpdatedAt) changed: drop the kernel's cached attributes
                try:
                    pyfuse3.invalidate_inode(node.ino, attr_only=True)
                except OSError as exc:  # ENOENT: the kernel no longer holds it
                    log.debug("invalidating inode of %s: %s", node.key, exc)
                return
            ref = node.key
            if not self._ingest_exists(ref):
                raise NotFound(f"ingest {ref}")
            labels = self.store.ingest_hints(ref)[1]
            if value:
                labels[key] = value
            else:
                labels.pop(key, None)
            self.store.set_ingest_hints(ref, labels=labels)

    async def _set_reserved(self, node: Node, field: str, value: str) -> None:
        if node.kind is Kind.BLOB:
            raise self._deny(f"set contentfs.{field} on {node.key}: blob status is read-only")
        ref = node.key
        with fuse_errors(f"set contentfs.{field} on ingest {ref}"):
            if field == "commit":
                await self._commit_by_xattr(ref, value.strip() or None)
            elif field == "expected":
                if value.strip():
                    self.store.set_ingest_hints(ref, expected=value.strip())
                else:
                    self.store.set_ingest_hints(ref, clear_expected=True)
            elif field == "total":
                try:
                    total = int(value.strip() or "0")
                except ValueError:
                    raise refuse(errno.EINVAL, f"ingest {ref}: total {value!r} is not a"
                                 " number") from None
                handle = self.writers.get(ref)
                if handle is not None:
                    handle.writer.set_total(total)
                else:
                    self.store.set_ingest_hints(ref, total=total)
            # other reserved names are informational: writes are accepted and ignored, so
            # copies of ingests round-trip

    async def _commit_by_xattr(self, ref: str, expected: str | None) -> None:
        digest = await self.commit(ref, expected)
        self._forget_ingest(ref)
        # Before replying, so the caller's next stat sees the blob (not a cached miss)
        # and no longer sees the ingest.
        await self._invalidate(INGEST_INO, encode_ref(ref).encode("utf-8", "surrogateescape"))
        alg, hexpart = split_digest(digest)  # type: ignore[arg-type]
        alg_ino = self.nodes.alg_ino(alg)
        if alg_ino is not None:
            await self._invalidate(alg_ino, hexpart.encode())

    @staticmethod
    async def _invalidate(parent: int, name: bytes) -> None:
        """Drop the kernel's dentry ``name`` in ``parent`` and wait until it is gone.

        Runs in a thread: the kernel may need a directory lock that a request we must
        still answer holds. Never call this from a handler whose request holds the
        lock of ``parent`` (rename, create, unlink in it): use invalidate_entry_async.
        """
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel had no such entry
                log.warning("invalidating %r: %s", name, exc)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        self._check_writable(f"remove {key} from {node.key}")
        if node.kind not in (Kind.BLOB, Kind.INGEST):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if key.startswith(_RESERVED):
            field = key[len(_RESERVED):]
            if node.kind is Kind.BLOB:
                raise self._deny(f"remove contentfs.{field} from {node.key}: read-only")
            if field == "expected":
                with fuse_errors(f"clear expected of ingest {node.key}"):
                    self.store.set_ingest_hints(node.key, clear_expected=True)
            elif field == "total":
                await self._set_reserved(node, "total", "0")
            return
        if key not in self._labels(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self._change_label(node, key, "")


@functools.cache
def _hex_pattern(width: int) -> re.Pattern[str]:
    return re.compile(f"[0-9a-f]{{{width}}}")


def _hash_file(path: str) -> str:
    """sha256 digest of a file's bytes (for an ingest no writer of ours holds)."""
    hasher = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
    except FileNotFoundError:
        raise NotFound(f"ingest data {path}") from None
    return f"sha256:{hasher.hexdigest()}"
