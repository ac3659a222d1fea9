"""Ingests as files: the open writers, what ``stat`` shows of an ingest, and commit.

An ingest open for writing owns the store's Writer for its ref until RELEASE. Writes
append (a write before the end is ESPIPE, one past it zero-fills the gap); truncate
restarts at 0, is a no-op at the current size and zero-extends beyond it. An ingest is
committed by ``mv`` into ``blobs/<alg>/`` or ``setfattr -n user.contentfs.commit``;
a failed commit is kept for ``user.contentfs.error``.

close(2) returns before the kernel sends RELEASE, so opening a writer or committing
waits up to BUSY_WAIT for a writer still held before answering EBUSY.

Over a store of files here (:class:`store.api.BlobFiles`) an ingest's attributes come
from its data file, which is also how it is read back. Over any other store they come
from its Status (in worker threads); hints (expected digest, labels, total) are kept by
the store when it can (:class:`store.api.IngestHints`), else here and passed at commit;
an ingest is read back only if the store can (:class:`store.api.IngestReader`), and
renamed only if it can (:class:`store.api.IngestRenamer`, else EPERM).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import pyfuse3
import trio

from store import AlreadyExists, FailedPrecondition, NotFound, StoreError, Unavailable
from store.api import (
    BlobFiles,
    IngestHints,
    IngestReader,
    IngestRenamer,
    ReaderAt,
    Store,
    SyncWriter,
    TotalWriter,
    Writer,
)
from store.digest import Digest, split_digest
from store.helpers import open_writer, updated_hints
from store.types import Status, to_ns

from . import offload, view
from .blobcache import BlobCache
from .errors import fuse_errors, refuse
from .handles import WriteHandle
from .kernel import invalidate_entry
from .view import INGEST_INO, Attr, Node, NodeTable, encode_ref

__all__ = ["BUSY_WAIT", "Ingests"]

log = logging.getLogger("fusefs")

T = TypeVar("T")

#: How long an open-for-write or a commit waits for a writer whose RELEASE is still in
#: flight (close(2) returns before the kernel sends RELEASE) before answering EBUSY.
BUSY_WAIT = 1.0
_ZEROS = bytes(1 << 20)


class Ingests:
    """The ingests of one mount: open writers by ref, modes set by chmod, last errors."""

    def __init__(self, store: Store, nodes: NodeTable, blobs: BlobCache) -> None:
        self.store = store
        self.nodes = nodes
        self.blobs = blobs
        self.files = store if isinstance(store, BlobFiles) else None
        self.inline = self.files is not None  # store calls on the trio thread
        self.writers: dict[str, WriteHandle] = {}
        self.modes: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        # hints of ingests of a store that cannot keep them: ref -> (expected, labels,
        # total), passed at commit
        self._hints: dict[str, tuple[str | None, dict[str, str], int]] = {}
        self._uid, self._gid = os.getuid(), os.getgid()

    # what an ingest shows --------------------------------------------------------------

    async def exists(self, ref: str) -> bool:
        if ref in self.writers:
            return True
        if self.files is not None:
            return os.path.isfile(self.files.ingest_data_path(ref))
        try:
            await offload.call(False, self.store.status, ref)
        except NotFound:
            return False
        except StoreError as exc:  # e.g. the store cannot be reached: its errno
            with fuse_errors(f"status of ingest {ref}"):
                raise exc from None
        return True

    async def attr(self, ino: int, ref: str) -> Attr:
        """Attributes of ingest ``ref``: its data file's, the size as written so far."""
        handle = self.writers.get(ref)
        if self.files is not None:
            st = os.stat(self.files.ingest_data_path(ref))
            size = handle.writer.offset if handle is not None else st.st_size
            return view.ingest_attr(ino, st, size, self.modes.get(ref))
        status = await offload.call(False, self.store.status, ref)
        size = handle.writer.offset if handle is not None else status.offset
        return view.status_attr(ino, size, to_ns(status.started_at),
                                to_ns(status.updated_at), self._uid, self._gid,
                                self.modes.get(ref))

    def open_data(self, ref: str) -> int:
        """A descriptor of the ingest's data for reading back; -1 if only a reader
        (``open_reader``) can, OSError (EACCES) if the store cannot at all."""
        if self.files is not None:
            return os.open(self.files.ingest_data_path(ref),
                           os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        if isinstance(self.store, IngestReader):
            return -1
        raise OSError(errno.EACCES, "this store cannot read back an ingest")

    def open_reader(self, ref: str) -> ReaderAt:
        """A reader of the ingest's data (a store with IngestReader)."""
        assert isinstance(self.store, IngestReader)
        return self.store.ingest_reader_at(ref)

    def refs(self) -> set[str]:
        """The active ingests (a store listing: call it from a worker thread)."""
        return {s.ref for s in self.store.list_statuses()} | set(self.writers)

    async def status(self, ref: str) -> Status:
        """The store's status of ``ref``, with the live writer's exact offset and times."""
        st = await offload.call(self.inline, self.store.status, ref)
        handle = self.writers.get(ref)
        if handle is not None and not handle.writer.closed:
            try:  # the writer's own times are exact (file mtimes are not)
                live = await offload.call(self.inline, handle.writer.status)
            except FailedPrecondition:  # closed meanwhile (a remote one closes late)
                pass
            else:
                st = dataclasses.replace(live, expected=st.expected)
        if ref in self._hints:  # kept here for a store without IngestHints
            expected, _, total = self._hints[ref]
            st = dataclasses.replace(st, expected=Digest(expected) if expected else st.expected,
                                     total=total or st.total)
        return st

    async def digest(self, ref: str) -> str:
        """Digest of the bytes written so far."""
        handle = self.writers.get(ref)
        if handle is not None:
            return handle.writer.digest()
        if self.files is not None:
            return await trio.to_thread.run_sync(
                _hash_file, self.files.ingest_data_path(ref))
        writer = await self.acquire(ref, f"digest of ingest {ref}", create=False)
        try:
            return writer.digest()
        finally:
            await trio.to_thread.run_sync(writer.close)

    def forget(self, ref: str) -> None:
        """Ingest ``ref`` is gone (aborted or committed)."""
        self.nodes.gone(ref)
        self.modes.pop(ref, None)
        self.errors.pop(ref, None)
        self._hints.pop(ref, None)

    # hints -----------------------------------------------------------------------------

    def hints(self, ref: str) -> tuple[str | None, dict[str, str]]:
        """The expected digest and labels recorded for ``ref``."""
        if isinstance(self.store, IngestHints):
            return self.store.ingest_hints(ref)
        expected, labels, _ = self._hints.get(ref, (None, {}, 0))
        return expected, dict(labels)

    async def set_hints(self, ref: str, *, expected: str | None = None,
                        labels: dict[str, str] | None = None,
                        clear_expected: bool = False) -> None:
        """Record an expected digest and/or labels for ``ref`` (NotFound if no ingest)."""
        if isinstance(self.store, IngestHints):
            self.store.set_ingest_hints(ref, expected=expected, labels=labels,
                                        clear_expected=clear_expected)
            return
        if not await self.exists(ref):
            raise NotFound(f"ingest {ref}")
        old_expected, old_labels, total = self._hints.get(ref, (None, {}, 0))
        new_expected, new_labels = updated_hints(
            old_expected, old_labels, expected=expected, labels=labels,
            clear_expected=clear_expected)
        self._hints[ref] = (new_expected, new_labels, total)

    # writers ---------------------------------------------------------------------------

    async def open_writer(self, ref: str, flags: int, ino: int = 0) -> WriteHandle:
        """Take the writer of ``ref`` for an open (O_TRUNC restarts it)."""
        writer = await self.acquire(ref, f"open ingest {ref} for writing")
        try:
            with fuse_errors(f"open ingest {ref} for writing"):
                if flags & os.O_TRUNC and writer.offset:
                    await offload.call(self.inline, writer.truncate, 0)
                try:
                    read_fd = self.open_data(ref)
                except PermissionError:
                    read_fd = -1  # written only: reading it back is EACCES
        except BaseException:
            await offload.call(self.inline, writer.close)
            raise
        handle = WriteHandle(ref, writer, bool(flags & os.O_APPEND), read_fd, ino=ino)
        self.writers[ref] = handle
        self.errors.pop(ref, None)
        return handle

    async def acquire(self, ref: str, what: str, *, create: bool = True) -> Writer:
        """Open the store writer for ``ref``, waiting (in a thread, by the store's own
        wait) up to BUSY_WAIT while it is held. ``create=False`` only resumes an existing
        ingest (ENOENT if it is gone)."""
        opener = functools.partial(open_writer, self.store, ref, create=create, wait=BUSY_WAIT)
        with fuse_errors(what):
            return await trio.to_thread.run_sync(opener)

    async def retry_busy(self, fn: Callable[[], T], what: str) -> T:
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

    def close_writer(self, handle: WriteHandle) -> None:
        """The end of a write open: the writer is closed (the ingest stays resumable)."""
        self._let_go(handle)
        _close(handle)

    async def release_writer(self, handle: WriteHandle) -> None:
        """RELEASE of a write open. A local writer: the slot is free before anything
        awaits (a new open may be waiting for it). A remote one closes in a worker
        thread and holds the slot until its stream has ended, so an abort that waits for
        the slot never races the stream."""
        if self.inline:
            self._let_go(handle)
            _close(handle)
            return
        try:
            await trio.to_thread.run_sync(_close, handle)
        finally:
            self._let_go(handle)

    def _let_go(self, handle: WriteHandle) -> None:
        if self.writers.get(handle.ref) is handle:
            del self.writers[handle.ref]
        if handle.read_fd >= 0:
            os.close(handle.read_fd)
            handle.read_fd = -1

    async def write(self, handle: WriteHandle, off: int, buf: bytes) -> int:
        writer = handle.writer
        with fuse_errors(f"write ingest {handle.ref}"):
            if not handle.append:
                if off < writer.offset:
                    raise refuse(errno.ESPIPE, f"write ingest {handle.ref}: offset {off} is"
                                 f" before the end ({writer.offset}); ingests are append-only")
                if off > writer.offset:
                    await offload.call(self.inline, _zero_fill, writer, off - writer.offset)
            n = await offload.call(self.inline, writer.write, buf)
        handle.dirty = True
        return n

    async def sync(self, handle: WriteHandle, what: str) -> None:
        """Make the bytes written through ``handle`` durable (FLUSH, FSYNC), in a thread;
        a store whose writers cannot sync makes them durable at commit."""
        handle.dirty = False
        writer = handle.writer
        if isinstance(writer, SyncWriter):
            with fuse_errors(f"{what} ingest {handle.ref}"):
                await trio.to_thread.run_sync(writer.sync)

    async def truncate(self, ref: str, size: int, handle: WriteHandle | None) -> None:
        """Set the size of ingest ``ref`` through ``handle``, its open writer, or a
        writer taken for this call."""
        if handle is None:
            handle = self.writers.get(ref)
        if handle is not None:
            await offload.call(self.inline, _truncate_writer, handle.writer, size)
            handle.dirty = True
            return
        writer = await self.acquire(ref, f"truncate ingest {ref}", create=False)
        try:
            await offload.call(self.inline, _truncate_writer, writer, size)
        finally:
            await offload.call(self.inline, writer.close)

    async def setattr(self, ref: str, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, handle: WriteHandle | None) -> None:
        """chmod, truncate and utimes of an ingest; chown to another owner is EPERM.
        (Times are the data file's: a store that is not files here ignores them.)"""
        path = self.files.ingest_data_path(ref) if self.files is not None else None
        with fuse_errors(f"change ingest {ref}"):
            if path is not None:
                st = os.stat(path)
                uid, gid = st.st_uid, st.st_gid
            else:
                await offload.call(False, self.store.status, ref)  # NotFound if gone
                uid, gid = self._uid, self._gid
            if (fields.update_uid and attr.st_uid != uid) or (
                    fields.update_gid and attr.st_gid != gid):
                raise refuse(errno.EPERM, f"chown ingest {ref}: owner cannot change")
            if fields.update_size:
                await self.truncate(ref, attr.st_size, handle)
            if fields.update_mode:
                self.modes[ref] = attr.st_mode & 0o7777
            if path is not None and (fields.update_atime or fields.update_mtime):
                st = os.stat(path)
                atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
                os.utime(path, ns=(atime, mtime))

    def set_total(self, ref: str, total: int) -> None:
        """The expected total of ingest ``ref`` (0: unknown)."""
        handle = self.writers.get(ref)
        if handle is not None and isinstance(handle.writer, TotalWriter):
            handle.writer.set_total(total)
        elif isinstance(self.store, IngestHints):
            self.store.set_ingest_hints(ref, total=total)
        else:
            if total < 0:
                raise refuse(errno.EINVAL, f"ingest {ref}: negative total {total}")
            expected, labels, _ = self._hints.get(ref, (None, {}, 0))
            self._hints[ref] = (expected, labels, total)

    # rename and commit -----------------------------------------------------------------

    async def rename(self, ref: str, new_ref: str) -> None:
        """Give ingest ``ref`` the ref ``new_ref`` (replacing an ingest of that name)."""
        if not isinstance(self.store, IngestRenamer):
            raise refuse(errno.EPERM, f"rename ingest {ref} to {new_ref}: this store"
                         " cannot rename an ingest")
        await self.retry_busy(functools.partial(self.store.rename_ingest, ref, new_ref),
                              f"rename ingest {ref} to {new_ref}")
        if ref in self._hints:
            self._hints[new_ref] = self._hints.pop(ref)
        self.nodes.rename_ingest(ref, new_ref)
        if ref in self.modes:
            self.modes[new_ref] = self.modes.pop(ref)
        self.errors.pop(new_ref, None)
        if ref in self.errors:
            self.errors[new_ref] = self.errors.pop(ref)

    async def commit(self, ref: str, expected: str | None) -> str:
        """Commit ingest ``ref`` (waiting briefly for an in-flight RELEASE); return the
        digest. Content that already exists is success. Failures are kept in
        ``errors[ref]`` for ``user.contentfs.error``."""
        what = f"commit ingest {ref}"
        # never a fresh writer: an ingest aborted since is ENOENT, not the empty blob
        writer = await self.acquire(ref, what, create=False)
        actual = writer.digest()
        size, labels = 0, None
        if not isinstance(self.store, IngestHints):  # (a store with them applies its own)
            hint_expected, hint_labels, size = self._hints.get(ref, (None, {}, 0))
            expected = expected or hint_expected
            labels = hint_labels or None
        try:
            digest: str = await trio.to_thread.run_sync(
                functools.partial(writer.commit, size, expected, labels))
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
            await offload.call(self.inline, writer.close)
        log.info("committed ingest %s as %s", ref, digest)
        self._hints.pop(ref, None)
        self.blobs.drop(view.blob_ino(digest))
        self.blobs.drop_listing(split_digest(Digest(digest))[0])
        self.errors.pop(ref, None)
        return digest

    async def commit_by_rename(self, ref: str, alg_dir: Node, name: str) -> None:
        """``mv ingest/REF blobs/ALG/HEX``: commit expecting that digest. The kernel
        moves the ingest's inode into blobs/; the next lookup finds the blob's own."""
        digest = f"{alg_dir.key}:{name}"
        await self.commit(ref, digest)
        self.nodes.committed(ref, digest)
        self.modes.pop(ref, None)
        pyfuse3.invalidate_entry_async(alg_dir.ino, name.encode(), ignore_enoent=True)

    async def commit_by_xattr(self, ref: str, expected: str | None) -> None:
        """``setfattr -n user.contentfs.commit``: commit, then drop the kernel's entries
        before replying, so the caller's next stat sees the blob (not a cached miss) and
        no longer sees the ingest."""
        digest = await self.commit(ref, expected)
        self.forget(ref)
        await invalidate_entry(INGEST_INO, encode_ref(ref).encode("utf-8", "surrogateescape"))
        alg, hexpart = split_digest(Digest(digest))
        alg_ino = self.nodes.alg_ino(alg)
        if alg_ino is not None:
            await invalidate_entry(alg_ino, hexpart.encode())


def _close(handle: WriteHandle) -> None:
    try:
        handle.writer.close()
    except (OSError, StoreError) as exc:
        log.warning("close ingest %s: %s", handle.ref, exc)


def _zero_fill(writer: Writer, gap: int) -> None:
    while gap > 0:
        gap -= writer.write(memoryview(_ZEROS)[: min(gap, len(_ZEROS))])


def _truncate_writer(writer: Writer, size: int) -> None:
    """0 restarts, the current size is a no-op, larger zero-extends, smaller: EINVAL."""
    if size == 0:
        writer.truncate(0)
    elif size > writer.offset:
        _zero_fill(writer, size - writer.offset)
    elif size < writer.offset:
        raise refuse(errno.EINVAL, f"truncate ingest {writer.ref} to {size}: ingests"
                     f" only shrink to 0 (current size {writer.offset})")


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
