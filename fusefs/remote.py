"""The filesystem view of a store that is not files on this machine: a containerd or
another ``contentfs serve``, through :class:`store.grpc.client.RemoteStore`.

Same tree, names, inodes and errno rules as the view of a root (README, "The
filesystem"), written against the store interface (:mod:`store.api`) only:

* Every store call runs in a worker thread (``trio.to_thread.run_sync`` with one
  CapacityLimiter), never on the event loop, and each has the store's deadline: a dead
  or stopped containerd gives EIO (Unreachable) within it, never a hang, and the next
  call after containerd is back works (the channel reconnects by itself).
* Reads go through the store's ReaderAt, which asks for 2 MiB blocks and fetches ahead
  of a sequential reader; blobs never change, so opens keep the kernel's page cache.
* Listings and Infos are cached for ``TTL`` seconds (the store tells no changes), and
  dropped at once on the changes made through this mount; the kernel gets the same
  timeout for entries and attributes of blobs.
* Ingests: the store's Writer per open; hints set with setfattr (labels, expected
  digest, total) are kept in memory by the mount and passed at commit. What the store
  cannot do is refused: reading an ingest back (EACCES), renaming an ingest (EPERM;
  ``rsync --inplace`` writes in place instead).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from store import (
    MAX_LABEL_SIZE,
    AlreadyExists,
    FailedPrecondition,
    Info,
    NotFound,
    StoreError,
    Unavailable,
)
from store.api import ReaderAt, Store, Writer
from store.digest import Digest, split_digest
from store.types import Status, format_time, to_ns

from . import view
from .errors import fuse_errors, refuse
from .view import (
    BLOBS_INO,
    INGEST_INO,
    Attr,
    Kind,
    Node,
    NodeTable,
    decode_name,
    encode_ref,
    is_blob_name,
)

__all__ = ["TTL", "RemoteOps"]

log = logging.getLogger("fusefs")
T = TypeVar("T")

#: Seconds a listing, an Info or a missing name is trusted (changes made elsewhere show
#: up within this); also the kernel's entry and attribute timeout for blobs.
TTL = 2.0
#: Store calls in flight at once.
CALLS = 8
#: How long an open-for-write or a commit waits for a writer whose RELEASE is in flight.
BUSY_WAIT = 1.0
_RESERVED = "contentfs."
_ZEROS = bytes(1 << 20)


@dataclasses.dataclass
class _Writing:
    """An ingest open for writing: the store's Writer, owned until RELEASE."""

    ref: str
    writer: Writer
    append: bool


@dataclasses.dataclass
class _Hints:
    """What setfattr set on an ingest, passed at commit."""

    expected: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    total: int = 0


class RemoteOps(pyfuse3.Operations):
    """pyfuse3 handlers over any :class:`store.api.Store`, for stores reached over the
    network (all calls off the event loop, short caches)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: Store, *, readonly: bool = False) -> None:
        super().__init__()
        self.store = store
        self.readonly = readonly
        self.nodes = NodeTable()
        self.limiter = trio.CapacityLimiter(CALLS)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()
        self._infos: dict[str, tuple[float, Info]] = {}
        self._listing: tuple[float, list[Info]] | None = None
        self._handles: dict[int, Any] = {}
        self._next_fh = 1
        self.writers: dict[str, _Writing] = {}
        self.hints: dict[str, _Hints] = {}
        self.errors: dict[str, str] = {}
        self.modes: dict[str, int] = {}

    # plumbing ----------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a worker thread (the store may be slow or gone)."""
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.limiter
        )

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _add(self, handle: object) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    def _writable(self, what: str) -> None:
        if self.readonly:
            raise refuse(errno.EROFS, f"{what}: read-only mount")

    @staticmethod
    def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.entry_timeout = attr.timeout
        e.attr_timeout = attr.timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_size = attr.size
        e.st_blksize = view.BLKSIZE
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    # what the store holds, cached ------------------------------------------------------------

    async def info(self, digest: str) -> Info | None:
        """The blob's Info (cached for TTL), None if it is not committed."""
        now = time.monotonic()
        hit = self._infos.get(digest)
        if hit is not None and now - hit[0] < TTL:
            return hit[1]
        with fuse_errors(f"info of {digest}"):
            try:
                info = await self.call(self.store.info, digest)
            except NotFound:
                self._infos.pop(digest, None)
                return None
        self._infos[digest] = (now, info)
        return info

    async def listing(self) -> list[Info]:
        """Every committed blob (one List call per TTL); fills the Info cache."""
        now = time.monotonic()
        if self._listing is not None and now - self._listing[0] < TTL:
            return self._listing[1]
        with fuse_errors("list blobs"):
            infos = await self.call(_collect, self.store)
        self._listing = (now, infos)
        for info in infos:
            self._infos[info.digest] = (now, info)
        return infos

    def changed(self, digest: str | None = None) -> None:
        """Something changed through this mount: forget what was cached about it."""
        self._listing = None
        if digest is not None:
            self._infos.pop(digest, None)

    def _blob_attr(self, ino: int, info: Info) -> Attr:
        created = to_ns(info.created_at)
        updated = max(to_ns(info.updated_at), created)
        return Attr(ino, stat.S_IFREG | 0o444, size=info.size, uid=self.uid, gid=self.gid,
                    blocks=(info.size + 511) // 512, atime_ns=created, mtime_ns=created,
                    ctime_ns=updated, timeout=TTL)

    def _dir_attr(self, ino: int, writable: bool) -> Attr:
        mode = stat.S_IFDIR | (0o755 if writable and not self.readonly else 0o555)
        t = self.started_ns
        return Attr(ino, mode, size=4096, nlink=2, uid=self.uid, gid=self.gid,
                    atime_ns=t, mtime_ns=t, ctime_ns=t, timeout=TTL)

    async def _ingest_status(self, ref: str) -> Status | None:
        writing = self.writers.get(ref)
        with fuse_errors(f"status of ingest {ref}"):
            if writing is not None:  # the open writer's own status: offset and times
                try:
                    return await self.call(writing.writer.status)
                except FailedPrecondition:
                    if not writing.writer.closed:
                        raise  # else released meanwhile: ask the store
            try:
                return await self.call(self.store.status, ref)
            except NotFound:
                return None

    def _ingest_attr(self, ino: int, st: Status) -> Attr:
        mode = self.modes.get(st.ref, 0o644)
        started = to_ns(st.started_at)
        updated = max(to_ns(st.updated_at), started)
        return Attr(ino, stat.S_IFREG | (mode & 0o7777), size=st.offset, uid=self.uid,
                    gid=self.gid, blocks=(st.offset + 511) // 512, atime_ns=updated,
                    mtime_ns=updated, ctime_ns=updated, timeout=view.INGEST_TIMEOUT)

    async def _attr(self, node: Node) -> Attr:
        kind = node.kind
        if kind is Kind.ROOT or kind is Kind.BLOBS or kind is Kind.ALG:
            return self._dir_attr(node.ino, writable=False)
        if kind is Kind.INGEST_DIR:
            return self._dir_attr(node.ino, writable=True)
        if kind is Kind.BLOB:
            info = await self.info(node.key)
            if info is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._blob_attr(node.ino, info)
        if kind is Kind.INGEST:
            st = await self._ingest_status(node.key)
            if st is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._ingest_attr(node.ino, st)
        raise pyfuse3.FUSEError(errno.ENOENT)

    # lookup, getattr, forget, statfs -----------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        node: Node | None = None
        if parent.kind is Kind.ROOT:
            node = self.nodes.get({"blobs": BLOBS_INO, "ingest": INGEST_INO}.get(text, 0))
        elif parent.kind is Kind.BLOBS:
            ino = self.nodes.alg_ino(text)
            node = self.nodes.get(ino) if ino is not None else None
        elif parent.kind is Kind.ALG:
            if is_blob_name(parent.key, text):
                digest = f"{parent.key}:{text}"
                info = await self.info(digest)
                if info is not None:
                    node = self.nodes.blob(digest)
                    entry = self._entry(self._blob_attr(node.ino, info))
                    self.nodes.remember(node)
                    return entry
            e = pyfuse3.EntryAttributes()
            e.st_ino = 0
            e.entry_timeout = TTL  # a miss, cached as long as a listing
            return e
        elif parent.kind is Kind.INGEST_DIR:
            ref = decode_name(text)
            if ref is not None:
                st = await self._ingest_status(ref)
                if st is not None:
                    node = self.nodes.ingest(ref)
                    entry = self._entry(self._ingest_attr(node.ino, st))
                    self.nodes.remember(node)
                    return entry
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = self._entry(await self._attr(node))
        self.nodes.remember(node)
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self._attr(self._node(inode)))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.nodes.forget(ino, n)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = view.BLKSIZE
        out.f_frsize = view.BLKSIZE
        out.f_namemax = 255
        return out

    # directories -----------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        entries: list[tuple[str, Node, Attr]] = []
        if node.kind is Kind.ROOT:
            for name, ino in (("blobs", BLOBS_INO), ("ingest", INGEST_INO)):
                child = self._node(ino)
                entries.append((name, child, await self._attr(child)))
        elif node.kind is Kind.BLOBS:
            for alg, ino in self.nodes.algorithms():
                child = self._node(ino)
                entries.append((alg, child, self._dir_attr(ino, writable=False)))
        elif node.kind is Kind.ALG:
            prefix = node.key + ":"
            for info in sorted(await self.listing(), key=lambda i: i.digest):
                if info.digest.startswith(prefix):
                    child = self.nodes.blob(info.digest)
                    entries.append((info.digest[len(prefix):], child,
                                    self._blob_attr(child.ino, info)))
        elif node.kind is Kind.INGEST_DIR:
            with fuse_errors("list ingests"):
                statuses = await self.call(self.store.list_statuses)
            seen = {s.ref for s in statuses}
            now = _now()
            for ref, writing in self.writers.items():
                if ref not in seen:
                    statuses.append(Status(ref, writing.writer.offset, 0, None, now, now))
            for st in sorted(statuses, key=lambda s: s.ref):
                child = self.nodes.ingest(st.ref)
                entries.append((encode_ref(st.ref), child, self._ingest_attr(child.ino, st)))
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return self._add(entries)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._handles[fh]
        for i in range(start_id, len(entries)):
            name, node, attr = entries[i]
            if not pyfuse3.readdir_reply(token, name.encode("utf-8", "surrogateescape"),
                                         self._entry(attr), i + 1):
                return
            self.nodes.remember(node)

    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # open, read, write, release ----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        wants_write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if node.kind is Kind.INGEST:
            if not wants_write:
                raise refuse(errno.EACCES, f"open ingest {node.key} for reading: the store"
                             " cannot read an ingest back")
            fh = await self._open_writer(node.key, flags)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        if wants_write:
            raise refuse(errno.EPERM, f"open {node.key} for writing: blobs are read-only")
        with fuse_errors(f"open blob {node.key}"):
            reader = await self.call(self.store.reader_at, node.key)
        return pyfuse3.FileInfo(fh=self._add(reader), keep_cache=True)

    async def _open_writer(self, ref: str, flags: int) -> int:
        self._writable(f"open ingest {ref} for writing")
        writer = await self._acquire(ref, f"open ingest {ref} for writing")
        try:
            if flags & os.O_TRUNC and writer.offset:
                with fuse_errors(f"truncate ingest {ref}"):
                    await self.call(writer.truncate, 0)
        except BaseException:
            await self.call(writer.close)
            raise
        writing = _Writing(ref, writer, bool(flags & os.O_APPEND))
        self.writers[ref] = writing
        self.errors.pop(ref, None)
        return self._add(writing)

    async def _acquire(self, ref: str, what: str) -> Writer:
        """The store's writer for ``ref``, waiting up to BUSY_WAIT for one this mount is
        releasing (close(2) returns before RELEASE) or another client holds."""
        deadline = trio.current_time() + BUSY_WAIT
        with fuse_errors(what):
            while True:
                if ref not in self.writers:
                    try:
                        return await self.call(self.store.writer, ref)
                    except Unavailable as exc:
                        if type(exc) is not Unavailable or trio.current_time() >= deadline:
                            raise
                elif trio.current_time() >= deadline:
                    raise Unavailable(f"ingest {ref}: open for writing in this mount")
                await trio.sleep(0.02)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        reader = self._handles.get(fh)
        if not isinstance(reader, ReaderAt):
            raise pyfuse3.FUSEError(errno.EBADF)
        ready = getattr(reader, "read_ready", None)  # blocks fetched ahead: no thread hop
        if ready is not None and (data := ready(size, off)) is not None:
            return data  # type: ignore[no-any-return]
        with fuse_errors("read blob"):
            return await self.call(reader.read_at, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        writing = self._handles.get(fh)
        if not isinstance(writing, _Writing):
            raise pyfuse3.FUSEError(errno.EBADF)
        writer = writing.writer
        with fuse_errors(f"write ingest {writing.ref}"):
            if not writing.append:
                if off < writer.offset:
                    raise refuse(errno.ESPIPE, f"write ingest {writing.ref}: offset {off} is"
                                 f" before the end ({writer.offset}); ingests are append-only")
                await self.call(_zero_fill, writer, off - writer.offset)
            return await self.call(writer.write, buf)

    async def flush(self, fh: int) -> None:
        """Nothing to do: the store makes the bytes durable at commit."""

    async def fsync(self, fh: int, datasync: bool) -> None:
        """As flush."""

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _Writing):
            await self._close_writer(handle)
        elif handle is not None:
            handle.close()

    async def _close_writer(self, writing: _Writing) -> None:
        if self.writers.get(writing.ref) is writing:
            del self.writers[writing.ref]  # before the close: its slot is free from now
        try:
            await self.call(writing.writer.close)
        except StoreError as exc:
            log.warning("close ingest %s: %s", writing.ref, exc)

    def close_all(self) -> None:
        """Close every open handle (ingests stay resumable). For unmount."""
        for handle in self._handles.values():
            if isinstance(handle, _Writing):
                try:
                    handle.writer.close()
                except StoreError as exc:
                    log.warning("close ingest %s: %s", handle.ref, exc)
            elif not isinstance(handle, list):
                handle.close()
        self._handles.clear()
        self.writers.clear()

    # create, unlink, rename, setattr ---------------------------------------------------------

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        text = name.decode("utf-8", "surrogateescape")
        if parent_inode != INGEST_INO:
            raise refuse(errno.EPERM, f"create {text}: only ingest/ takes new files")
        ref = decode_name(text)
        if ref is None:
            raise refuse(errno.EINVAL, f"create {text}: not a canonical ingest name")
        fh = await self._open_writer(ref, flags)
        self.modes[ref] = mode & 0o7777
        node = self.nodes.ingest(ref)
        writer = self._handles[fh].writer
        st = Status(ref, writer.offset, 0, None, _now(), _now())
        self.nodes.remember(node)
        return (pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False),
                self._entry(self._ingest_attr(node.ino, st)))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        text = name.decode("utf-8", "surrogateescape")
        self._writable(f"remove {text}")
        if parent.kind is Kind.ALG and is_blob_name(parent.key, text):
            digest = f"{parent.key}:{text}"
            with fuse_errors(f"delete {digest}"):
                await self.call(self.store.delete, digest)
            self.changed(digest)
            return
        if parent.kind is Kind.INGEST_DIR and (ref := decode_name(text)) is not None:
            deadline = trio.current_time() + BUSY_WAIT
            while ref in self.writers and trio.current_time() < deadline:
                await trio.sleep(0.02)  # `echo x > f; rm f`: its RELEASE may be in flight
            with fuse_errors(f"abort ingest {ref}"):
                await self.call(self.store.abort, ref)
            self._forget_ingest(ref)
            return
        raise refuse(errno.EPERM, f"remove {text}: not a blob or an ingest")

    def _forget_ingest(self, ref: str) -> None:
        self.nodes.gone(ref)
        self.hints.pop(ref, None)
        self.errors.pop(ref, None)
        self.modes.pop(ref, None)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        old = name_old.decode("utf-8", "surrogateescape")
        new = name_new.decode("utf-8", "surrogateescape")
        self._writable(f"rename {old}")
        target = self._node(parent_inode_new)
        ref = decode_name(old) if parent_inode_old == INGEST_INO else None
        if ref is None:
            raise refuse(errno.EPERM, f"rename {old}: only ingests can be moved")
        if target.kind is not Kind.ALG:
            raise refuse(errno.EPERM, f"rename ingest {ref} to {new}: the store cannot"
                         " rename an ingest (rsync: use --inplace)")
        if not is_blob_name(target.key, new):
            raise refuse(errno.EPERM, f"commit ingest {ref} as {new}: not a {target.key}"
                         " digest")
        digest = f"{target.key}:{new}"
        if flags & pyfuse3.RENAME_NOREPLACE and await self.info(digest) is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        await self.commit(ref, digest)
        pyfuse3.invalidate_entry_async(target.ino, name_new, ignore_enoent=True)

    async def commit(self, ref: str, expected: str | None) -> str:
        """Commit ingest ``ref`` with its hints; EBADMSG on a mismatch (the ingest is
        kept), success when the content exists already."""
        hints = self.hints.get(ref, _Hints())
        expected = expected or hints.expected
        what = f"commit ingest {ref}"
        with fuse_errors(what):
            try:
                if await self._ingest_status(ref) is None:
                    raise NotFound(f"ingest {ref}")
                writer = await self._acquire(ref, what)
                try:
                    digest = await self.call(writer.commit, hints.total, expected,
                                             labels=hints.labels or None)
                except AlreadyExists:
                    digest = Digest(expected or writer.digest())
                    if hints.labels:
                        await self.call(self._merge_labels, digest, hints.labels)
            except StoreError as exc:  # the whole reason, for user.contentfs.error
                self.errors[ref] = str(exc)
                raise
        self._forget_ingest(ref)
        self.changed(digest)
        return digest

    def _merge_labels(self, digest: str, labels: dict[str, str]) -> None:
        info = self.store.info(digest)
        self.store.update(Info(info.digest, info.size, info.created_at, info.updated_at,
                               labels), *(f"labels.{k}" for k in labels))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind is not Kind.INGEST:
            raise refuse(errno.EPERM, f"change attributes of {node.key or node.kind.value}")
        self._writable(f"change attributes of ingest {node.key}")
        ref = node.key
        if fields.update_mode:
            self.modes[ref] = attr.st_mode & 0o7777
        if fields.update_size:
            await self._truncate(ref, attr.st_size)
        return self._entry(await self._attr(node))

    async def _truncate(self, ref: str, size: int) -> None:
        writing = self.writers.get(ref)
        writer = writing.writer if writing is not None else await self._acquire(
            ref, f"truncate ingest {ref}")
        try:
            with fuse_errors(f"truncate ingest {ref} to {size}"):
                if size == 0:
                    await self.call(writer.truncate, 0)
                elif size > writer.offset:
                    await self.call(_zero_fill, writer, size - writer.offset)
                elif size < writer.offset:
                    raise refuse(errno.EINVAL, f"truncate ingest {ref} to {size}: only to 0,"
                                 " the current size or beyond")
        finally:
            if writing is None:
                await self.call(writer.close)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "mkdir: the tree is fixed")

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "symlink: the tree is fixed")

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "link: the tree is fixed")

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise refuse(errno.EPERM, "mknod: the tree is fixed")

    # labels and status as xattrs ---------------------------------------------------------------

    async def _labels(self, node: Node) -> dict[str, str]:
        if node.kind is Kind.BLOB:
            info = await self.info(node.key)
            if info is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return dict(info.labels)
        if node.kind is Kind.INGEST:
            return dict(self.hints.get(node.key, _Hints()).labels)
        return {}

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)  # first: asked before every write(2)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        if key.startswith(_RESERVED):
            value = await self._reserved(node, key[len(_RESERVED):])
        else:
            value = (await self._labels(node)).get(key)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8", "surrogateescape")

    async def _reserved(self, node: Node, field: str) -> str | None:
        if node.kind is Kind.BLOB:
            info = await self.info(node.key)
            if info is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return {"digest": info.digest, "size": str(info.size),
                    "createdat": format_time(to_ns(info.created_at)),
                    "updatedat": format_time(to_ns(info.updated_at))}.get(field)
        if node.kind is not Kind.INGEST:
            return None
        ref = node.key
        hints = self.hints.get(ref, _Hints())
        if field == "error":
            return self.errors.get(ref)
        if field == "expected":
            return hints.expected or ""
        if field == "digest":
            writing = self.writers.get(ref)
            if writing is not None:
                return str(writing.writer.digest())
            writer = await self._acquire(ref, f"digest of ingest {ref}")
            try:
                return str(writer.digest())
            finally:
                await self.call(writer.close)
        st = await self._ingest_status(ref)
        if st is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return {"offset": str(st.offset), "total": str(hints.total or st.total),
                "startedat": format_time(to_ns(st.started_at)),
                "updatedat": format_time(to_ns(st.updated_at))}.get(field)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        labels = await self._labels(self._node(inode))
        return [b"user." + k.encode("utf-8", "surrogateescape") for k in sorted(labels)]

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        text = value.decode("utf-8", "surrogateescape")
        self._writable(f"set {key} on {node.key}")
        if node.kind not in (Kind.BLOB, Kind.INGEST):
            raise refuse(errno.EPERM, f"set {key}: only blobs and ingests carry labels")
        if key.startswith(_RESERVED):
            await self._set_reserved(node, key[len(_RESERVED):], text)
            return
        size = len(key.encode("utf-8", "surrogateescape")) + len(value)
        if size > MAX_LABEL_SIZE:
            raise refuse(errno.E2BIG, f"label {key[:64]}: key and value are {size} bytes,"
                         f" more than {MAX_LABEL_SIZE}")
        await self._change_label(node, key, text)

    async def _change_label(self, node: Node, key: str, value: str) -> None:
        if node.kind is Kind.BLOB:
            info = Info(Digest(node.key), 0, _now(), _now(), {key: value})
            with fuse_errors(f"label {key} of {node.key}"):
                await self.call(self.store.update, info, f"labels.{key}")
            self.changed(node.key)
            return
        if await self._ingest_status(node.key) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        labels = self.hints.setdefault(node.key, _Hints()).labels
        if value:
            labels[key] = value
        else:
            labels.pop(key, None)

    async def _set_reserved(self, node: Node, field: str, value: str) -> None:
        if node.kind is Kind.BLOB:
            raise refuse(errno.EPERM, f"set contentfs.{field} on {node.key}: read-only")
        ref = node.key
        hints = self.hints.setdefault(ref, _Hints())
        if field == "commit":
            digest = await self.commit(ref, value.strip() or None)
            await _invalidate(INGEST_INO, encode_ref(ref).encode("utf-8", "surrogateescape"))
            alg, hexpart = split_digest(Digest(digest))
            alg_ino = self.nodes.alg_ino(alg)
            if alg_ino is not None:
                await _invalidate(alg_ino, hexpart.encode())
        elif field == "expected":
            hints.expected = value.strip() or None
        elif field == "total":
            try:
                hints.total = int(value.strip() or "0")
            except ValueError:
                raise refuse(errno.EINVAL, f"ingest {ref}: total {value!r} is not a"
                             " number") from None
        # other reserved names are accepted and ignored (copies of ingests round-trip)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        node = self._node(inode)
        key = name[5:].decode("utf-8", "surrogateescape")
        self._writable(f"remove {key} from {node.key}")
        if key.startswith(_RESERVED):
            if node.kind is Kind.BLOB:
                raise refuse(errno.EPERM, f"remove {key} from {node.key}: read-only")
            await self._set_reserved(node, key[len(_RESERVED):], "")
            return
        if key not in await self._labels(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self._change_label(node, key, "")


def _collect(store: Store) -> list[Info]:
    out: list[Info] = []
    store.walk(out.append)
    return out


def _zero_fill(writer: Writer, gap: int) -> None:
    while gap > 0:
        gap -= writer.write(memoryview(_ZEROS)[: min(gap, len(_ZEROS))])


async def _invalidate(parent: int, name: bytes) -> None:
    """Drop the kernel's dentry ``name`` in ``parent`` (in a thread: the kernel may need a
    directory lock a request we must still answer holds)."""
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("invalidating %r: %s", name, exc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
