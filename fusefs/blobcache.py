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
from .handles import ReadHandle
from .kernel import entry as make_entry
from .view import Attr, BlobListing, BlobRows, Kind, Node, NodeTable, index_inos

__all__ = ["BlobCache"]

#: Label changes by other processes are looked for this far back from the newest seen.
_UPDATED_SLACK_NS = 2_000_000_000
_READDIR_BATCH = 256  # entries stat-ed (and one DB query) per step of a listing
_VERIFIED_MAX = 100_000
_CHUNK = 8192  # names joined at a time when a listing is built
#: held blobs checked one query each for visibility; more: one listing per algorithm
_VISIBLE_ONE_BY_ONE = 2048
#: misses in blobs/<alg>/ remembered (to be told again after the change feed lost
#: events); past that, a miss is cached by the kernel this long only (seconds)
_MISSES_KEPT = 50_000
_SHORT_NEGATIVE = 1.0
#: readdirplus replies kept built per listing (~300 B each): 100,000 blobs list at the
#: speed of kept replies; past that, replies are built from the rows each time
REPLIES_KEPT = 150_000


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


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
        # Attributes of blobs (immutable but for ctime): those in the listing of their
        # directory in its rows (nodes.rows), others (looked up before any listing, or
        # committed since) here, by inode, as sent to the kernel.
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.blob_timeout = view.BLOB_TIMEOUT if self.files is not None else (
            self.negative_timeout)
        # one reply reused for every readdirplus entry (the reply copies it)
        self._scratch = make_entry(view.info_attr(0, 0, 0, 0, 0, 0, self.blob_timeout))
        # Listings of blobs/<alg>/, kept while the store's stamp is unchanged (and
        # drop_listing when a blob comes or goes, here or elsewhere).
        self._listings: dict[str, BlobListing] = {}
        self._listing_gen: dict[str, int] = {}
        self._updated_mark = time.time_ns()  # newest UpdatedAt seen (nothing cached yet)
        # (ino, size, mtime, ctime) of blob files whose bytes were hashed and matched,
        # or did not match
        self.verified: set[tuple[int, int, int, int]] = set()
        self.corrupt: set[tuple[int, int, int, int]] = set()
        # (alg dir inode, name) the kernel was told are missing and keeps as such for
        # negative_timeout: told again when the change feed overflows (lost events)
        self.misses: set[tuple[int, bytes]] = set()

    # attributes ------------------------------------------------------------------------

    @property
    def negative_timeout(self) -> float:
        """How long the kernel may keep a lookup miss in blobs/<alg>/."""
        return view.NEGATIVE_TIMEOUT if self.ttl is None else self.ttl

    def miss_timeout(self, parent: int, name: bytes) -> float:
        """How long the kernel may keep the miss of ``name`` in blobs/<alg>/ (inode
        ``parent``): remembered for :meth:`overflowed`, else briefly."""
        if self.ttl is not None:
            return self.ttl
        if len(self.misses) < _MISSES_KEPT:
            self.misses.add((parent, name))
            return self.negative_timeout
        return _SHORT_NEGATIVE

    def overflowed(self) -> list[tuple[int, bytes]]:
        """The change feed lost events: drop every cached listing; return the misses
        the kernel keeps (to invalidate: any may exist now). Deleted blobs the kernel
        holds are found by :meth:`invisible`; relabelled ones by :meth:`relabelled`
        (from the metadata, so the attributes it compares with are kept)."""
        for alg in ALGORITHMS:
            self.drop_listing(alg)
        misses = list(self.misses)
        self.misses.clear()
        return misses

    def expire(self) -> None:
        """Drop everything cached once ``ttl`` has passed (no change feed tells us)."""
        if self.ttl is not None and time.monotonic() - self._cleared >= self.ttl:
            self.attrs.clear()
            self._listings.clear()
            for rows in self.nodes.rows.values():
                rows.forget_attrs()
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
            self._keep(digest, self._info_attr(info))
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
        return self._file_attr(ino, digest)

    def _file_attr(self, ino: int, digest: str) -> Attr:
        """Attributes of blob ``digest`` from its file and row; NotFound (or the lstat's
        OSError) if it is gone or not a regular file."""
        assert self.files is not None
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
        entry = self.cached(node.ino)
        if entry is None:
            attr = await self.attr(node.ino, node.key)
            self._keep(node.key, attr)
            entry = make_entry(attr)
        return entry

    def _row(self, ino: int, digest: str | None = None) -> tuple[BlobRows, int] | None:
        """The row of blob ``ino`` in the table of its directory (of that digest)."""
        for rows in self.nodes.rows.values():
            r = rows.find(ino)
            if r >= 0 and (digest is None or rows.digest(r) == digest):
                return rows, r
        return None

    def _keep(self, digest: str, attr: Attr) -> None:
        """Cache the attributes of blob ``digest``: in its row if it has one."""
        found = self._row(attr.ino, digest)
        if found is not None:
            found[0].put(found[1], attr)
            self.attrs.pop(attr.ino, None)
        else:
            self.attrs[attr.ino] = make_entry(attr)

    def cached(self, ino: int) -> pyfuse3.EntryAttributes | None:
        """The cached attributes of blob ``ino``, or None."""
        entry = self.attrs.get(ino)
        if entry is None and (found := self._row(ino)) is not None:
            rows, r = found
            if rows.have[r]:
                entry = make_entry(rows.attr(r, ino, self.blob_timeout))
        return entry

    def drop(self, ino: int) -> None:
        """Forget the cached attributes of blob ``ino`` (deleted, committed, relabelled)."""
        self.attrs.pop(ino, None)
        if (found := self._row(ino)) is not None:
            found[0].unset(found[1])

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
            entry = self.cached(ino)
            if entry is not None and entry.st_ctime_ns != max(created, updated):
                self.drop(ino)
                if ino in self.nodes:
                    held.append(ino)
        return held

    def held_blobs(self) -> list[str]:
        """Digests of the blobs the kernel holds (a lookup count above 0), for
        :meth:`invisible` (call on the trio thread)."""
        out = [n.key for n in self.nodes.table.values()
               if n.kind is Kind.BLOB and n.ino >> 62 == 1]
        for rows in self.nodes.rows.values():
            lookups = rows.lookups
            out.extend(rows.digest(r) for r, n in enumerate(lookups) if n)
        return out

    def invisible(self, digests: list[str]) -> list[str]:
        """Of ``digests``, those this view no longer shows: in a namespace, a record
        deleted by another process while another namespace keeps the file (no event on
        blobs/), or a file deleted while the change feed overflowed. A worker thread's
        work: an lstat and a query each, or one listing per algorithm when there are
        many."""
        if not isinstance(self.store, BlobVisibility) or not digests:
            return []
        if len(digests) <= _VISIBLE_ONE_BY_ONE or not isinstance(self.store, BlobNames):
            files, visible = self.files, self.store.blob_visible
            return [d for d in digests
                    if (files is not None and not _is_file(files.blob_path(d)))
                    or not visible(d)]
        shown: dict[str, set[str]] = {}
        out = []
        for d in digests:
            alg, hexpart = d.partition(":")[::2]
            if alg not in shown:
                shown[alg] = set(self.store.blob_names(alg))
            if hexpart not in shown[alg]:
                out.append(d)
        return out

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
            good = self.store.blob_names(alg)
            good.sort()
        else:  # one walk gives the names and their attributes
            stamp, prefix = None, f"{alg}:"
            found = [i for i in self._walk() if i.digest.startswith(prefix)]
            found.sort(key=lambda i: i.digest)
            good = [i.digest[len(prefix):] for i in found]
            infos = {view.blob_ino(i.digest): i for i in found}
        width, n = ALGORITHMS[alg], len(good)
        inos = array.array("Q", map(view.hex_ino, good))
        keys = array.array("Q", map(view.hex_key, good))
        # the names as one bytes, built a chunk at a time: a million names as str take
        # ~120 MB; their copies are not all held at once beside them
        buf = bytearray(n * width)
        for k in range(0, n, _CHUNK):
            buf[k * width:(k + _CHUNK) * width] = "".join(good[k:k + _CHUNK]).encode()
        del good
        listing = BlobListing(stamp, width, bytes(buf), inos, keys, infos, index_inos(inos))
        del buf
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

    def use(self, alg: str, listing: BlobListing) -> None:
        """``listing`` (just taken by :meth:`listing`) is the table of blobs/<alg>/ from
        now on (call on the trio thread: it takes over the counts of the one before)."""
        rows = self.nodes.rows.get(alg)
        if rows is None or rows.listing is not listing:
            self.nodes.install(BlobRows(alg, listing))

    def readdir(self, alg: str, listing: BlobListing, start_id: int,
                token: pyfuse3.ReaddirToken) -> None:
        """readdirplus of blobs/<alg>/ from cursor ``start_id``: attributes from the
        rows of the listing; on a miss, those of the next batch are read (one lstat
        each, one DB query). The hot loop of ``ls -l``: keep it lean."""
        rows = self.nodes.rows.get(alg)
        if rows is None or rows.listing is not listing:
            self._readdir_stale(alg, listing, start_id, token)
            return
        inos, keys, width, names = listing.inos, listing.keys, listing.width, listing.names
        have, lookups, replies = rows.have, rows.lookups, rows.replies
        room = REPLIES_KEPT - rows.nreplies
        size, blocks, created, updated = rows.size, rows.blocks, rows.created, rows.updated
        uid, gid = rows.uid, rows.gid
        scratch = self._scratch
        node_get = self.nodes.table.get
        blob_kind = Kind.BLOB
        reply = pyfuse3.readdir_reply
        n = len(inos)
        i = bisect.bisect_left(keys, start_id)
        filled = i  # entries before this were read into the rows by this call
        while i < n:
            if not have[i]:
                if i >= filled:
                    filled = min(i + _READDIR_BATCH, n)
                    self._fill(alg, rows, i, filled)
                    continue
                i += 1  # deleted since opendir
                continue
            ino = inos[i]
            e = replies[i]
            if e is None:
                if room > 0 and have[i] == 2:  # sent before: keep its reply
                    e = replies[i] = make_entry(rows.attr(i, ino, self.blob_timeout))
                    rows.nreplies += 1
                    room -= 1
                else:
                    have[i] = 2
                    e = scratch
                    e.st_ino = ino
                    e.st_size = size[i]
                    e.st_blocks = blocks[i]
                    e.st_uid = uid[i]
                    e.st_gid = gid[i]
                    e.st_atime_ns = e.st_mtime_ns = created[i]
                    e.st_ctime_ns = updated[i]
            off = i * width
            if not reply(token, names[off:off + width], e, keys[i] + 1):
                return
            node = node_get(ino)
            if node is not None and node.kind is blob_kind:
                node.lookups += 1
            else:
                lookups[i] += 1
            i += 1

    def _readdir_stale(self, alg: str, listing: BlobListing, start_id: int,
                       token: pyfuse3.ReaddirToken) -> None:
        """readdirplus from a listing that is no longer its directory's table (opened
        before a change that another opendir has seen): entry by entry."""
        i = bisect.bisect_left(listing.keys, start_id)
        while i < len(listing):
            digest = f"{alg}:{listing.name(i).decode()}"
            ino = listing.inos[i]
            entry = self.cached(ino)
            if entry is None:
                attr = self._read(digest, ino, listing)
                if attr is None:  # gone
                    i += 1
                    continue
                self._keep(digest, attr)
                entry = make_entry(attr)
            node = self.nodes.blob(digest)
            if not pyfuse3.readdir_reply(token, listing.name(i), entry, listing.keys[i] + 1):
                self.nodes.drop_unused(node)
                return
            self.nodes.remember(node)
            i += 1

    def _read(self, digest: str, ino: int, listing: BlobListing) -> Attr | None:
        """Attributes of one listed blob, read now (None: it is gone)."""
        if listing.infos is not None:
            info = listing.infos.get(ino)
            return None if info is None else self._info_attr(info)
        try:
            return self._file_attr(ino, digest)
        except (FileNotFoundError, NotADirectoryError, NotFound):
            return None

    def _fill(self, alg: str, rows: BlobRows, start: int, stop: int) -> None:
        """Read the attributes of rows ``start`` to ``stop`` of ``rows`` that have none
        (one ``lstat`` each, beside their directory; one range query for their records);
        blobs that no longer exist are left out."""
        listing, have = rows.listing, rows.have
        batch = [j for j in range(start, stop) if not have[j]]
        if not batch:
            return
        if listing.infos is not None:  # from the walk that listed them
            for j in batch:
                info = listing.infos.get(listing.inos[j])
                if info is not None:
                    rows.put(j, self._info_attr(info))
            return
        assert self.files is not None
        w, first = listing.width, batch[0]
        text = listing.names[first * w:(batch[-1] + 1) * w].decode()
        prefix = f"{alg}:"
        recorded = {d: (size, cr, up) for d, size, cr, up in self.files.blob_times_between(
            prefix + text[:w], prefix + text[-w:])}
        directory = os.path.dirname(self.files.blob_path(prefix + text[:w]))
        size, blocks, created, updated = rows.size, rows.blocks, rows.created, rows.updated
        uid, gid = rows.uid, rows.gid
        lstat, is_reg, get = os.lstat, stat.S_ISREG, recorded.get
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for j in batch:
                off = (j - first) * w
                name = text[off:off + w]
                try:
                    st = lstat(name, dir_fd=dfd)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                if not is_reg(st.st_mode):
                    continue
                row = get(prefix + name)
                if row is not None and row[0] == st.st_size:  # (blob_times_of)
                    cr, up = row[1], row[2]
                else:
                    cr = up = st.st_mtime_ns
                size[j] = st.st_size
                blocks[j] = st.st_blocks
                created[j] = cr
                updated[j] = max(cr, up)
                uid[j] = st.st_uid
                gid[j] = st.st_gid
                have[j] = 1
        finally:
            os.close(dfd)

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
