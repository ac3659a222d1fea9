"""pyfuse3 request handlers: a thin adapter from FUSE requests to the view's parts.

Each handler decodes the request, calls one of :mod:`fusefs.blobcache` (blob listings,
attributes, verification), :mod:`fusefs.ingests` (writers, truncate, rename, commit) or
:mod:`fusefs.xattrs` (labels and status), and maps errors (:mod:`fusefs.errors`).
:mod:`fusefs.view` holds the tree, inode numbers and attributes; :mod:`fusefs.handles`
the open files.

All handlers run as trio tasks on one thread; they interleave only at ``await``. Fast
work (stat, pread, pwrite plus inline hashing, SQLite lookups) runs inline; work that
can take long (opening a writer that must rehash a resumed ingest, commit's fsyncs,
fsync at FLUSH, directory snapshots) goes to a thread. Only FUSEError leaves a handler;
anything else is a bug and ends the mount.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator, Sequence

import pyfuse3
import trio

from store import NotFound, StoreError
from store.api import BlobFiles, ChangeFeed, FileReader, ReadyReader, Store

from . import offload, view
from .blobcache import BlobCache
from .errors import fuse_errors, refuse
from .handles import DirHandle, Handles, ReadHandle, WriteHandle
from .ingests import BUSY_WAIT, Ingests
from .kernel import entry as make_entry
from .kernel import invalidate_inode, negative
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
from .xattrs import RESERVED, Xattrs

__all__ = ["ContentOps"]

log = logging.getLogger("fusefs")

_STATFS_TTL = 5.0
#: Seconds blob attributes and listings are cached over a store that does not report
#: changes (a remote one), here and in the kernel.
REMOTE_TTL = 2.0
_READDIR_BATCH = 64  # entries stat-ed per step of a listing of the root or ingest/
_NAME_MAX = 255  # a new ingest name may be no longer than any Linux file name


class ContentOps(pyfuse3.Operations):
    """The contentfs view of one store."""

    enable_writeback_cache = False

    def __init__(self, store: Store, *, readonly: bool = False,
                 ttl: float | None = None) -> None:
        """The view of ``store``. Over a store of files here (:class:`store.api.BlobFiles`)
        the root directory shows through (times, statfs, an OCI layout's files); over any
        other, the directories are the mount's. Without a change feed
        (:class:`store.api.ChangeFeed`), cached blob attributes and listings last
        ``ttl`` seconds (default :data:`REMOTE_TTL`), in the kernel too."""
        super().__init__()
        self.store = store
        self.readonly = readonly
        self.root = store.root if isinstance(store, BlobFiles) else None
        self.inline = self.root is not None  # store calls on the trio thread (offload)
        if ttl is None and not isinstance(store, ChangeFeed):
            ttl = REMOTE_TTL
        self._started_ns = time.time_ns()
        self.nodes = view.NodeTable()
        self.handles = Handles()
        self.blobs = BlobCache(store, self.nodes, ttl=ttl)
        self.ingests = Ingests(store, self.nodes, self.blobs)
        self.xattrs = Xattrs(store, self.blobs, self.ingests)
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None
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

    def _orphan_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of an open file removed since it was opened (fstat after rm, here
        or by another process)."""
        created, updated = self.handles.unlinked[node.ino]
        handle = self.handles.first_open(node.ino)
        fd = handle.read_fd if isinstance(handle, WriteHandle) else handle.fd
        if fd < 0:  # not a file here: what the mount knows
            size = (handle.writer.offset if isinstance(handle, WriteHandle)
                    else handle.reader.size if handle.reader is not None else 0)
            attr = view.info_attr(node.ino, size, created, updated, os.getuid(),
                                  os.getgid(), self.blobs.negative_timeout)
            attr.nlink = 0
            return make_entry(attr)
        with fuse_errors(f"stat removed {node.key}"):
            st = os.fstat(fd)
        if node.kind is Kind.BLOB:
            if not created:  # its metadata went with it: the file's mtime is its commit
                created = updated = st.st_mtime_ns
            attr = view.blob_attr(node.ino, st, created, updated)
        else:
            size = handle.writer.offset if isinstance(handle, WriteHandle) else st.st_size
            attr = view.ingest_attr(node.ino, st, size, self.ingests.modes.get(node.key))
        attr.nlink = 0
        return make_entry(attr)

    def _deny(self, reason: str) -> pyfuse3.FUSEError:
        """EPERM for what the design forbids; EROFS for any change on a read-only mount."""
        return refuse(errno.EROFS if self.readonly else errno.EPERM, reason)

    def _check_writable(self, reason: str) -> None:
        if self.readonly:
            raise refuse(errno.EROFS, f"{reason}: read-only mount")

    def is_oci_layout(self) -> bool:
        return self.root is not None and os.path.isfile(os.path.join(self.root, "oci-layout"))

    # attributes ------------------------------------------------------------------------

    async def _attr(self, node: Node) -> Attr:
        """Attributes of ``node``; FUSEError(ENOENT) if what it shows is gone."""
        kind = node.kind
        with _stat_errors(node):
            if kind is Kind.BLOB:
                return await self.blobs.attr(node.ino, node.key)
            if kind is Kind.INGEST:
                return await self.ingests.attr(node.ino, node.key)
            if kind is Kind.LAYOUT_FILE:
                assert self.root is not None
                return view.layout_attr(node.ino, os.stat(os.path.join(self.root, node.key)))
        nlink = 4 if kind is Kind.ROOT else 2 + 3 if kind is Kind.BLOBS else 2
        writable = not self.readonly and kind not in (Kind.ROOT, Kind.BLOBS)
        if self.root is None:
            return view.synthetic_dir_attr(node.ino, self._started_ns, os.getuid(),
                                           os.getgid(), writable=writable, nlink=nlink)
        with fuse_errors("stat store root"):
            root_st = os.stat(self.root)
        return view.dir_attr(node.ino, root_st, writable=writable, nlink=nlink)

    # lookup, getattr, forget -----------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == ROOT_INO and name == self._crash_name:
            raise RuntimeError(f"injected handler bug: lookup of {name!r}")
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        with fuse_errors(f"lookup {text}"):
            node = await self._child(parent, text)
        if node is None:
            return negative(self.blobs.miss_timeout(parent_inode, name)
                            if parent.kind is Kind.ALG else self.blobs.negative_timeout)
        self.handles.unlinked.pop(node.ino, None)  # e.g. the same blob committed again
        try:
            entry = await self._entry_of(node)
        except pyfuse3.FUSEError:
            self.nodes.drop_unused(node)  # vanished between the check and the stat
            raise
        self.nodes.remember(node)
        return entry

    async def _entry_of(self, node: Node) -> pyfuse3.EntryAttributes:
        """What the kernel gets for ``node``; blobs through the blob cache."""
        if node.kind is Kind.BLOB and node.ino >> 62 == 1:  # not a committed ingest's node
            with _stat_errors(node):
                return await self.blobs.entry(node)
        return make_entry(await self._attr(node))

    async def _child(self, parent: Node, name: str) -> Node | None:
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
            return self.nodes.blob(digest) if await self.blobs.exists(digest) else None
        elif kind is Kind.INGEST_DIR:
            ref = decode_name(name)
            if ref is not None and await self.ingests.exists(ref):
                return self.nodes.ingest(ref)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if inode not in self.handles.unlinked:
            try:
                return await self._entry_of(node)
            except pyfuse3.FUSEError as exc:
                if exc.errno != errno.ENOENT or inode not in self.handles.open_files:
                    raise
                # removed by another process (contentfs rm/abort, containerd) while open
                self.handles.unlinked[inode] = (0, 0)
        return self._orphan_entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.nodes.forget(ino, n)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        now = time.monotonic()
        if self._statfs is not None and now - self._statfs[0] < _STATFS_TTL:
            return self._statfs[1]
        out = pyfuse3.StatvfsData()
        out.f_namemax = 255
        if self.root is None:  # a remote store: no figures to give
            out.f_bsize = out.f_frsize = 4096
            return out
        with fuse_errors("statfs of the store root"):
            sv = os.statvfs(self.root)
        out.f_bsize = sv.f_frsize  # df multiplies by f_frsize: keep them equal
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        self._statfs = (now, out)
        return out

    # directories -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        entries: list[tuple[int, str, str]]  # cursor, name, what it names
        if node.kind is Kind.ROOT:
            names = ["blobs", "ingest"]
            if self.root is not None and self.is_oci_layout():
                names += [n for n in LAYOUT_FILES if os.path.isfile(os.path.join(self.root, n))]
            entries = [(i + 1, n, n) for i, n in enumerate(names)]
        elif node.kind is Kind.BLOBS:
            entries = [(i + 1, alg, alg) for i, (alg, _) in enumerate(self.nodes.algorithms())]
        elif node.kind is Kind.ALG:
            self.blobs.expire()
            with fuse_errors(f"list blobs/{node.key}"):
                listing = await trio.to_thread.run_sync(self.blobs.listing, node.key)
            self.blobs.use(node.key, listing)
            return self.handles.add(DirHandle(node.kind, node.key, [], [], [], listing))
        elif node.kind is Kind.INGEST_DIR:
            with fuse_errors("list ingest/"):
                entries = await trio.to_thread.run_sync(self._snapshot_ingests)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries.sort(key=lambda e: e[0])
        handle = DirHandle(node.kind, node.key, [e[0] for e in entries],
                           [e[1] for e in entries], [e[2] for e in entries])
        return self.handles.add(handle)

    def _snapshot_ingests(self) -> list[tuple[int, str, str]]:
        refs = self.ingests.refs()
        return [(view.dir_key(ref), encode_ref(ref), ref) for ref in refs]

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles[fh]
        assert isinstance(handle, DirHandle)
        if handle.listing is not None:
            with fuse_errors(f"list blobs/{handle.key}"):
                self.blobs.readdir(handle.key, handle.listing, start_id, token)
            return
        i = bisect.bisect_left(handle.keys, start_id)
        while i < len(handle.keys):
            batch = range(i, min(i + _READDIR_BATCH, len(handle.keys)))
            with fuse_errors(f"list {handle.kind.value}"):
                listed = await self._listed(handle, batch)
            for j, item in zip(batch, listed, strict=True):
                if item is None:
                    continue
                node, attr = item
                if not pyfuse3.readdir_reply(
                    token, handle.names[j].encode("utf-8", "surrogateescape"),
                    make_entry(attr), handle.keys[j] + 1,
                ):
                    for rest in listed[j - batch.start:]:
                        if rest is not None:
                            self.nodes.drop_unused(rest[0])
                    return
                self.nodes.remember(node)
            i = batch.stop

    async def _listed(self, handle: DirHandle,
                      batch: range) -> list[tuple[Node, Attr] | None]:
        """Nodes and attributes of some snapshot entries (None for those that vanished)."""
        out: list[tuple[Node, Attr] | None] = []
        for j in batch:
            what = handle.refs[j]
            node: Node | None
            if handle.kind is Kind.INGEST_DIR:
                node = self.nodes.ingest(what) if await self.ingests.exists(what) else None
            else:
                parent = ROOT_INO if handle.kind is Kind.ROOT else BLOBS_INO
                try:
                    node = await self._child(self._node(parent), what)
                except pyfuse3.FUSEError:  # a layout file removed since opendir
                    node = None
            if node is None:
                out.append(None)
                continue
            try:
                out.append((node, await self._attr(node)))
            except pyfuse3.FUSEError:
                self.nodes.drop_unused(node)
                out.append(None)
        return out

    async def releasedir(self, fh: int) -> None:
        self.handles.drop(fh)

    # open, read, write, release --------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if node.kind is Kind.INGEST:
            if wants_write:
                fh = await self._open_writer(node.key, flags, inode)
                return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
            with fuse_errors(f"open ingest {node.key}"):
                fd = self.ingests.open_data(node.key)
                handle = ReadHandle(fd, ino=inode)
                if fd < 0:
                    handle.reader = await offload.call(False, self.ingests.open_reader,
                                                       node.key)
            return pyfuse3.FileInfo(fh=self.handles.add(handle), direct_io=True,
                                    keep_cache=False)
        if wants_write:
            raise self._deny(f"open {node.key} for writing: blobs are read-only")
        if node.kind is Kind.LAYOUT_FILE:
            assert self.root is not None
            with fuse_errors(f"open {node.key}"):
                # O_NONBLOCK: a FIFO planted there must not block the mount's event loop
                fd = os.open(os.path.join(self.root, node.key),
                             os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            return pyfuse3.FileInfo(fh=self.handles.add(ReadHandle(fd)), keep_cache=False)
        with fuse_errors(f"open blob {node.key}"):
            reader = await offload.call(self.inline, self.store.reader_at, node.key)
        fd = reader.fileno() if isinstance(reader, FileReader) else -1
        handle = ReadHandle(fd, reader, digest=node.key, ino=inode)
        self.blobs.arm_verify(handle)
        return pyfuse3.FileInfo(fh=self.handles.add(handle), keep_cache=True)

    async def _open_writer(self, ref: str, flags: int, ino: int) -> int:
        self._check_writable(f"open ingest {ref} for writing")
        return self.handles.add(await self.ingests.open_writer(ref, flags, ino))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if isinstance(handle, WriteHandle):
            fd = handle.read_fd
        elif isinstance(handle, ReadHandle):
            fd = handle.fd
        else:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            if fd >= 0:
                data = os.pread(fd, size, off)
            elif isinstance(handle, ReadHandle) and handle.reader is not None:
                reader = handle.reader
                ready = reader.read_ready(size, off) if isinstance(reader, ReadyReader) else None
                if ready is not None:  # fetched ahead already: no thread hop
                    data = ready
                else:
                    with fuse_errors(f"read {handle.digest or 'ingest'}"):
                        data = await trio.to_thread.run_sync(reader.read_at, size, off)
            else:
                raise refuse(errno.EACCES, "read: this store cannot read back an ingest")
        except OSError as exc:
            raise refuse(exc.errno or errno.EIO, f"read: {exc}") from None
        if isinstance(handle, ReadHandle) and handle.corrupt:
            raise pyfuse3.FUSEError(errno.EIO)  # logged when it was found
        if isinstance(handle, ReadHandle) and handle.hasher is not None:
            self.blobs.verify_step(handle, off, data)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if not isinstance(handle, WriteHandle):
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self.ingests.write(handle, off, buf)

    async def flush(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if isinstance(handle, WriteHandle) and handle.dirty:
            await self.ingests.sync(handle, "flush")

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles.get(fh)
        if isinstance(handle, WriteHandle):
            await self.ingests.sync(handle, "fsync")

    async def release(self, fh: int) -> None:
        # Frees the writer slot before anything could await (RELEASE comes late)
        handle = self.handles.drop(fh)
        if isinstance(handle, WriteHandle):
            await self.ingests.release_writer(handle)
        elif isinstance(handle, ReadHandle):
            handle.close()

    def close_all(self) -> None:
        """Close every open handle (writers stay resumable). For unmount."""
        for fh in self.handles.all():
            handle = self.handles.drop(fh)
            if isinstance(handle, WriteHandle):
                log.info("closing open ingest %s at offset %d", handle.ref,
                         handle.writer.offset)
                self.ingests.close_writer(handle)
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
        if flags & os.O_EXCL and await self.ingests.exists(ref):
            raise pyfuse3.FUSEError(errno.EEXIST)
        # (if another process created the ingest since the kernel's lookup, this resumes
        # it, or restarts it for O_TRUNC, exactly as an open would)
        node = self.nodes.ingest(ref)
        try:
            fh = await self._open_writer(ref, flags, node.ino)
        except BaseException:
            self.nodes.drop_unused(node)
            raise
        self.ingests.modes[ref] = mode & 0o7777
        attr = await self._attr(node)
        self.nodes.remember(node)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), make_entry(attr)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        if parent.kind is Kind.INGEST_DIR:
            self._check_writable(f"abort ingest/{text}")
            ref = decode_name(text)
            if ref is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if not self.inline:  # a remote ingest cannot be aborted under its own stream:
                # `echo x > f; rm f` may come before the RELEASE of that write
                deadline = trio.current_time() + BUSY_WAIT
                while ref in self.ingests.writers and trio.current_time() < deadline:
                    await trio.sleep(0.02)
            with fuse_errors(f"abort ingest {ref}"):
                await trio.to_thread.run_sync(self.store.abort, ref)
            log.info("aborted ingest %s", ref)
            ino = self.nodes.ingest_ino(ref)
            if ino is not None:
                self.handles.unlinked_open(ino)
            self.ingests.forget(ref)
        elif parent.kind is Kind.ALG:
            self._check_writable(f"delete blobs/{parent.key}/{text}")
            if not is_blob_name(parent.key, text):
                raise pyfuse3.FUSEError(errno.ENOENT)
            digest = f"{parent.key}:{text}"
            ino = view.hex_ino(text)
            # files opened through the entry a commit by mv left (the ingest's inode,
            # which shows the blob until the kernel drops that entry) are removed too
            moved = [i for i in self.handles.open_files if i != ino
                     and (n := self.nodes.get(i)) is not None
                     and n.kind is Kind.BLOB and n.key == digest]
            kept = self.blobs.cached(ino)
            with fuse_errors(f"delete content {digest}"):
                if kept is None and (moved or ino in self.handles.open_files):
                    kept = make_entry(await self.blobs.attr(ino, digest))
                await offload.call(self.inline, self.store.delete, digest)
            if kept is not None:
                for i in (ino, *moved):
                    self.handles.unlinked_open(i, kept.st_mtime_ns, kept.st_ctime_ns)
            for i in moved:  # the kernel drops st_nlink only for the removed entry's inode
                invalidate_inode(i, digest)
            self.blobs.drop(ino)
            self.blobs.drop_listing(parent.key)
            log.info("deleted content %s", digest)
        else:
            raise self._deny(f"unlink {text}: only blobs and ingests can be removed")

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
        if ref is None or not await self.ingests.exists(ref):
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
        if flags & pyfuse3.RENAME_NOREPLACE and await self.ingests.exists(new_ref):
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self.ingests.rename(ref, new_ref)

    async def _commit_by_rename(self, ref: str, alg_dir: Node, name: str, flags: int) -> None:
        alg = alg_dir.key
        if not is_blob_name(alg, name):
            raise self._deny(f"commit ingest {ref} as blobs/{alg}/{name}: not a {alg} digest")
        if flags & pyfuse3.RENAME_NOREPLACE and await self.blobs.exists(f"{alg}:{name}"):
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self.ingests.commit_by_rename(ref, alg_dir, name)

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
                handle = self.handles.get(fh) if fh is not None else None
                await self.ingests.setattr(
                    node.key, attr, fields, handle if isinstance(handle, WriteHandle) else None)
        elif node.kind is Kind.INGEST_DIR and not (fields.update_size or fields.update_uid
                                                   or fields.update_gid):
            pass  # rsync -a sets the times and mode of ingest/: accepted and ignored
        elif changes:
            raise self._deny(f"change attributes of {node.key or node.kind.value}:"
                             " blobs and directories are read-only")
        return make_entry(await self._attr(node))

    # extended attributes ---------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)  # first: asked before every write(2)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        value = await self.xattrs.get(node, key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8", "surrogateescape")

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        labels = await self.xattrs.labels(self._node(inode))
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
        if key.startswith(RESERVED) and node.kind is Kind.BLOB:
            raise self._deny(f"set {key} on {node.key}: blob status is read-only")
        await self.xattrs.set(node, key, text)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        self._check_writable(f"remove {key} from {node.key}")
        if node.kind not in (Kind.BLOB, Kind.INGEST):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        if key.startswith(RESERVED):
            field = key[len(RESERVED):]
            if node.kind is Kind.BLOB:
                raise self._deny(f"remove contentfs.{field} from {node.key}: read-only")
            await self.xattrs.remove_reserved(node, field)
            return
        if key not in await self.xattrs.labels(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self.xattrs.change_label(node, key, "")


@contextlib.contextmanager
def _stat_errors(node: Node) -> Iterator[None]:
    """Reading the attributes of ``node``: gone is ENOENT, anything else (EACCES, a busy
    metadata database, a store that cannot be reached) its errno."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, NotFound):
        raise pyfuse3.FUSEError(errno.ENOENT) from None
    except (OSError, StoreError) as exc:
        with fuse_errors(f"stat {node.key or node.kind.value}"):
            raise exc from None
