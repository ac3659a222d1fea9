"""What the mount knows about committed blobs: their listings, their attributes, and
whether their bytes still match their digest.

Blobs never change, so their attributes are cached by inode (as the kernel got them)
and the listing of each ``blobs/<alg>/`` is kept while the store's stamp for it is
unchanged. Entries are dropped when a blob is deleted, committed or relabelled, here or
by another process (:mod:`fusefs.watch` feeds the changes the store reports).

Verification: a blob whose file may have changed since its commit (no metadata record,
an mtime other than the commit time, a ctime long after it) is hashed on its first whole
sequential read; a mismatch makes that read, and every later read of the same file, EIO.
Unchanged blobs are trusted and read at full speed (``contentfs verify`` rehashes all).

Over a store whose blobs are files here (:class:`store.api.BlobFiles`, a local root)
attributes come from ``lstat`` and one metadata query per batch, inline. Over any other
store (a remote one) they come from its Info, in worker threads, a listing from one
walk; without a change feed everything cached is dropped after ``ttl`` seconds, and the
kernel is told to keep entries no longer. Verification needs the files.
"""

from __future__ import annotations

import array
import bisect
import errno
import hashlib
import os
import stat
import time

import pyfuse3

from store import ALGORITHMS, Info, NotFound, StoreError
from store.api import (
    BlobFiles,
    BlobNames,
    BlobVisibility,
    ChangeFeed,
    InfoIterator,
    Store,
    blob_times_of,
)
from store.digest import Digest, split_digest
from store.types import to_ns

from . import offload, view
from .errors import fuse_errors, refuse
from .handles import BlobListing, ReadHandle
from .kernel import entry as make_entry
from .view import Attr, Kind, Node, NodeTable

__all__ = ["BlobCache"]

#: Label changes by other processes are looked for this far back from the newest seen.
_UPDATED_SLACK_NS = 2_000_000_000
_READDIR_BATCH = 64  # entries stat-ed (and one DB query) per step of a listing
_VERIFIED_MAX = 100_000


class BlobCache:
    """Listings and attributes of the blobs of one store, for one mount."""

    def __init__(self, store: Store, nodes: NodeTable, *, ttl: float | None = None) -> None:
        self.store = store
        self.nodes = nodes
        self.files = store if isinstance(store, BlobFiles) else None
        self.inline = self.files is not None  # store calls on the trio thread
        #: seconds anything cached is kept (None: until the change feed drops it)
        self.ttl = ttl
        self._cleared = time.monotonic()
        self._uid, self._gid = os.getuid(), os.getgid()
        # Attributes of blobs by inode, as sent to the kernel (blobs are immutable).
        # Plain C structs keep 100k blobs at ~25 MB.
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        # Listings of blobs/<alg>/, kept while the store's stamp is unchanged (and
        # drop_listing when a blob comes or goes, here or elsewhere).
        self._listings: dict[str, BlobListing] = {}
        self._listing_gen: dict[str, int] = {}
        self._updated_mark = time.time_ns()  # newest UpdatedAt seen (nothing cached yet)
        # (ino, size, mtime, ctime) of blob files whose bytes were hashed and matched,
        # or did not match
        self.verified: set[tuple[int, int, int, int]] = set()
        self.corrupt: set[tuple[int, int, int, int]] = set()

    # attributes ------------------------------------------------------------------------

    @property
    def negative_timeout(self) -> float:
        """How long the kernel may keep a lookup miss in blobs/<alg>/."""
        return view.NEGATIVE_TIMEOUT if self.ttl is None else self.ttl

    def expire(self) -> None:
        """Drop everything cached once ``ttl`` has passed (no change feed tells us)."""
        if self.ttl is not None and time.monotonic() - self._cleared >= self.ttl:
            self.attrs.clear()
            self._listings.clear()
            self._cleared = time.monotonic()

    async def exists(self, digest: str) -> bool:
        """The blob is committed (its file is a regular file) and, for a store of
        namespaced views, in this view's namespace."""
        if self.files is None:
            try:
                info = await offload.call(False, self.store.info, digest)
            except NotFound:
                return False
            except StoreError as exc:  # e.g. the store cannot be reached: its errno
                with fuse_errors(f"info of {digest}"):
                    raise exc from None
            self.attrs[view.blob_ino(digest)] = make_entry(self._info_attr(info))
            return True
        try:
            st = os.lstat(self.files.blob_path(digest))
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        return not isinstance(self.store, BlobVisibility) or self.store.blob_visible(digest)

    async def attr(self, ino: int, digest: str) -> Attr:
        """Attributes of blob ``digest`` read afresh; NotFound if it is gone."""
        if self.files is None:
            return self._info_attr(await offload.call(False, self.store.info, digest), ino)
        st = os.lstat(self.files.blob_path(digest))
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"content {digest}")
        row = self.files.blob_times([digest]).get(Digest(digest))
        created, updated = blob_times_of(st, row)
        return view.blob_attr(ino, st, created, updated)

    def _info_attr(self, info: Info, ino: int = 0) -> Attr:
        return view.info_attr(ino or view.blob_ino(info.digest), info.size,
                              to_ns(info.created_at), to_ns(info.updated_at), self._uid,
                              self._gid, self.negative_timeout)

    async def entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """What the kernel gets for blob ``node``: the cached attributes, else read."""
        self.expire()
        entry = self.attrs.get(node.ino)
        if entry is None:
            entry = make_entry(await self.attr(node.ino, node.key))
            self.attrs[node.ino] = entry
        return entry

    def drop(self, ino: int) -> None:
        """Forget the cached attributes of blob ``ino`` (deleted, committed, relabelled)."""
        self.attrs.pop(ino, None)

    def updated_rows(self) -> list[tuple[Digest, int, int]]:
        """Metadata rows whose UpdatedAt moved lately, for ``relabelled`` (a scan of the
        blob table: call it from a worker thread)."""
        assert isinstance(self.store, ChangeFeed)
        return self.store.updated_since(self._updated_mark - _UPDATED_SLACK_NS)

    def relabelled(self, rows: list[tuple[Digest, int, int]]) -> list[int]:
        """Of ``updated_rows``, the blobs relabelled (by any process) since their
        attributes were cached: drop those; return the inodes the kernel holds."""
        held = []
        for digest, created, updated in rows:
            self._updated_mark = max(self._updated_mark, updated)
            ino = view.blob_ino(digest)
            entry = self.attrs.get(ino)
            if entry is not None and entry.st_ctime_ns != max(created, updated):
                self.attrs.pop(ino, None)
                if ino in self.nodes:
                    held.append(ino)
        return held

    # listings --------------------------------------------------------------------------

    def listing(self, alg: str) -> BlobListing:
        """The names in blobs/<alg>/: the kept listing if the store's stamp for it has
        not changed since it was taken, else a new one (runs in a worker thread)."""
        gen = self._listing_gen.get(alg, 0)
        infos: dict[int, Info] | None = None
        if isinstance(self.store, BlobNames):
            stamp = self.store.blob_names_stamp(alg)
            kept = self._listings.get(alg)
            if kept is not None and stamp is not None and kept.stamp == stamp:
                return kept
            good = sorted(self.store.blob_names(alg))
        else:  # one walk gives the names and their attributes
            stamp, prefix = None, f"{alg}:"
            found = [i for i in self._walk() if i.digest.startswith(prefix)]
            found.sort(key=lambda i: i.digest)
            good = [i.digest[len(prefix):] for i in found]
            infos = {view.blob_ino(i.digest): i for i in found}
        listing = BlobListing(stamp, ALGORITHMS[alg], "".join(good).encode(),
                              array.array("Q", map(view.hex_ino, good)),
                              array.array("Q", map(view.hex_key, good)), infos)
        if self._listing_gen.get(alg, 0) == gen and stamp is not None:
            self._listings[alg] = listing  # (nothing dropped it meanwhile)
        return listing

    def _walk(self) -> list[Info]:
        if isinstance(self.store, InfoIterator):
            return list(self.store.iter_infos())
        out: list[Info] = []
        self.store.walk(out.append)
        return out

    def drop_listing(self, alg: str) -> None:
        """A blob came or went in blobs/<alg>/: the next opendir lists it afresh."""
        self._listing_gen[alg] = self._listing_gen.get(alg, 0) + 1
        self._listings.pop(alg, None)

    def readdir(self, alg: str, listing: BlobListing, start_id: int,
                token: pyfuse3.ReaddirToken) -> None:
        """readdirplus of blobs/<alg>/ from cursor ``start_id``: attributes from the
        cache; on a miss, those of the next batch are read (one lstat each, one DB
        query). The hot loop of ``ls -l``: keep it lean."""
        cache_get = self.attrs.get
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
                    batch = [j for j in range(i, filled) if inos[j] not in self.attrs]
                    self._fill(alg, listing, batch)
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

    def _fill(self, alg: str, listing: BlobListing, batch: list[int]) -> None:
        """Read the attributes of entries ``batch`` of ``listing`` into the cache;
        blobs that no longer exist are left out."""
        if listing.infos is not None:  # from the walk that listed them
            for j in batch:
                info = listing.infos.get(listing.inos[j])
                if info is not None:
                    self.attrs[listing.inos[j]] = make_entry(self._info_attr(info))
            return
        assert self.files is not None
        prefix = f"{alg}:"
        names = [listing.name(j).decode() for j in batch]
        times = self.files.blob_times([prefix + n for n in names])
        blob_path = self.files.blob_path
        for name, j in zip(names, batch, strict=True):
            ino = listing.inos[j]
            digest = prefix + name
            try:
                st = os.lstat(blob_path(digest))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            created, updated = blob_times_of(st, times.get(Digest(digest)))
            self.attrs[ino] = make_entry(view.blob_attr(ino, st, created, updated))

    # verification ----------------------------------------------------------------------

    def arm_verify(self, handle: ReadHandle) -> None:
        """Hash this open's first sequential whole read if the blob's file may have
        changed since its commit: no metadata row, an mtime other than the commit time
        (commit sets both), or a ctime more than 2 s after it."""
        digest = handle.digest
        if self.files is None or handle.fd < 0:
            return  # only files here can be checked (a remote store checks its own)
        try:
            st = os.fstat(handle.fd)
            row = self.files.blob_times([digest]).get(Digest(digest))
        except (OSError, StoreError):
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
        handle.hasher = hashlib.new(split_digest(Digest(digest))[0])
        handle.file_key = key

    def verify_step(self, handle: ReadHandle, off: int, data: bytes) -> None:
        """Feed a sequential read to the hasher; EIO for the read completing a mismatch."""
        hasher, reader = handle.hasher, handle.reader
        assert hasher is not None and reader is not None
        if off != handle.hashed:
            if off > handle.hashed:
                handle.hasher = None  # not read sequentially: cannot tell
            return
        hasher.update(data)
        handle.hashed += len(data)
        if handle.hashed < reader.size and data:
            return
        handle.hasher = None
        if len(self.verified) + len(self.corrupt) > _VERIFIED_MAX:
            self.verified.clear()
            self.corrupt.clear()
        want = split_digest(Digest(handle.digest))[1]
        if handle.hashed == reader.size and hasher.hexdigest() == want:
            self.verified.add(handle.file_key)
            return
        # kernel readahead drops errors and asks again: stay failed for this file
        self.corrupt.add(handle.file_key)
        handle.corrupt = True
        raise refuse(errno.EIO, f"read content {handle.digest}: bytes on disk hash to"
                     f" {hasher.name}:{hasher.hexdigest()} (run contentfs verify)")
