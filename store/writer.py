"""LocalWriter: one open ingest, holding its ref lock until close or commit."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType

from .digest import Digest, parse_digest, split_digest
from .errors import AlreadyExists, FailedPrecondition, NotFound, NotImplemented  # noqa: A004
from .fsutil import ensure_dir, fsync_dir, write_atomic
from .hashcache import HashCache
from .labels import validate_labels
from .layout import Layout
from .locks import RefLock, hold_lock
from .metadata import NsMetadata
from .ondisk import blob_exists, write_total
from .types import Status, format_time, from_ns

__all__ = ["IngestState", "LocalWriter"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class IngestState:
    """Where an opened ingest stands: its data file (open read-write), the digest state
    of its bytes, their count, the expected total and its times (ns)."""

    fd: int
    hasher: hashlib._Hash
    offset: int
    total: int
    started_ns: int
    updated_ns: int


#: Writes at least this large are hashed on the writer's hashing thread.
HASH_BEHIND_MIN = 128 << 10
#: Bytes the hashing thread may lag behind the file before a write waits for it.
HASH_AHEAD = 32 << 20
#: Written bytes after which the hashing thread asks the kernel to start writing them
#: out (so the fsync at close or commit finds little left to do).
WRITEBACK_EVERY = 8 << 20

_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of ``fd`` to disk, without waiting for
    it (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; ctypes: Python has no binding). A
    hint: failures are ignored, durability still comes from fsync."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _immutable(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` cannot change after the call (so it may be hashed later)."""
    if isinstance(data, bytes):
        return True
    return isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytes)


class _HashBehind:
    """Feeds a hasher from a thread of its own, in write order, while the writer's
    caller goes on (hashlib releases the GIL for large updates, so hashing runs on
    another core beside the pwrites and the FUSE or gRPC transport). Also starts the
    kernel's writeback of what was written every WRITEBACK_EVERY bytes.

    ``hasher()`` waits until every queued update is applied and returns the hasher; the
    writer calls it before any use of the digest state. One producer (the writer, under
    its mutex)."""

    def __init__(self, hasher: hashlib._Hash, fd: int, flushed: int) -> None:
        self._hasher = hasher
        self._fd = fd
        self._queue: collections.deque[tuple[bytes | memoryview, int]] = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        self._pending = 0  # bytes queued or being hashed
        self._stop = False
        self._flushed = flushed  # file offset up to which writeback was started
        self._thread: threading.Thread | None = None

    def update(self, data: bytes | bytearray | memoryview, end: int) -> None:
        """Hash ``data`` (which ends at file offset ``end``): queued if it is immutable
        and large, or if earlier updates are still queued; else at once."""
        n = len(data)
        if self._pending == 0 and (n < HASH_BEHIND_MIN or not _immutable(data)):
            self._hasher.update(data)  # nothing queued: order is kept
            if end - self._flushed >= WRITEBACK_EVERY:
                start_writeback(self._fd, self._flushed, end - self._flushed)
                self._flushed = end
            return
        item = data if isinstance(data, bytes | memoryview) and _immutable(data) \
            else bytes(data)  # the caller may reuse its buffer
        with self._cv:
            while self._pending >= HASH_AHEAD:
                self._cv.wait()
            self._queue.append((item, end))
            self._pending += n
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="contentfs-hash",
                                                daemon=True)
                self._thread.start()
            else:
                self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                data, end = self._queue.popleft()
            self._hasher.update(data)
            if end - self._flushed >= WRITEBACK_EVERY:
                start_writeback(self._fd, self._flushed, end - self._flushed)
                self._flushed = end
            with self._cv:
                self._pending -= len(data)
                self._cv.notify_all()

    def hasher(self) -> hashlib._Hash:
        """The hasher, once every queued update is applied."""
        if self._pending:
            with self._cv:
                while self._pending:
                    self._cv.wait()
        return self._hasher

    def reset(self, hasher: hashlib._Hash) -> None:
        """Start over with ``hasher`` (truncate to 0)."""
        self.hasher()
        self._hasher = hasher
        self._flushed = 0

    def stop(self) -> None:
        """Apply what is queued and end the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None


class LocalWriter:
    """An open ingest (containerd's content.Writer).

    Writes append at ``offset``; the digest is computed as bytes arrive, so commit never
    rereads the data. ``close()`` keeps the ingest for resuming; ``commit()`` always
    ends the writer (and releases the ref lock), whether it succeeds or fails.
    """

    def __init__(
        self,
        layout: Layout,
        db: NsMetadata,
        hashes: HashCache,
        ref: str,
        lock: RefLock,
        state: IngestState,
        expected: Digest | None,
        *,
        bref: str | None = None,
        visible: Callable[[Digest], bool] | None = None,
        lease: str | None = None,
    ) -> None:
        """``db`` is the metadata of the namespace committed into; ``bref`` the backend
        ref (``ref`` qualified by that namespace); ``visible`` tells whether an existing
        blob file is already in that namespace (else a commit only records it there);
        ``lease`` holds the commit's blob (and held the ingest)."""
        self._layout = layout
        self._db = db
        self._hashes = hashes
        self.ref = ref
        self._bref = ref if bref is None else bref
        self._visible = visible or (lambda _d: True)
        self._lease = lease
        #: (digest, size) while the writer is shared (reference §5.3): complete, no bytes
        self._shared: tuple[Digest, int] | None = None
        self._hint_before_share: str | None = None
        path = layout.ingest_dir(self._bref)
        self._lock = lock
        self._path = path
        self._fd = state.fd
        self._hash = _HashBehind(state.hasher, state.fd, state.offset)
        self._offset = state.offset
        self._total = state.total
        self._started_ns = state.started_ns
        self._updated_ns = state.updated_ns
        self._expected = expected
        self._mutex = threading.Lock()
        self._closed = False
        self._dirty = False

    # queries ------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        return self._shared[1] if self._shared else self._offset

    def share(self, dgst: Digest, size: int, hint: str | None) -> None:
        """Start shared (the ``shared`` policy, reference §5.3): complete at ``size``
        bytes of blob ``dgst``, which a commit without new bytes records in this
        namespace. ``hint`` is the expected digest recorded before (the shared digest
        replaced it as a gc root; it comes back when the writer stops being shared)."""
        self._shared = (dgst, size)
        self._hint_before_share = hint

    def _drop_share(self) -> None:
        self._shared = None
        _, labels = self._db.get_ingest(self._bref)
        self._db.put_ingest(self._bref, self._hint_before_share, labels)

    def _unshare(self) -> None:
        """Before the first byte written to a shared writer: copy the blob in (as
        containerd does), so the new bytes follow it."""
        if self._shared is None:
            return
        dgst, _ = self._shared
        self._drop_share()
        try:
            src = os.open(self._layout.blob_path(dgst),
                          os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {dgst} (removed while shared with {self.ref})") from None
        try:
            while chunk := os.pread(src, 1 << 20, self._offset):
                os.pwrite(self._fd, chunk, self._offset)
                self._hash.update(chunk, self._offset + len(chunk))
                self._offset += len(chunk)
        finally:
            os.close(src)
        self._dirty = True

    @property
    def closed(self) -> bool:
        return self._closed

    def digest(self) -> Digest:
        """Digest of the bytes written so far (of the empty input for a fresh writer)."""
        with self._mutex:
            if self._shared:
                return self._shared[0]
            hasher = self._hash.hasher()
            return Digest(f"{hasher.name}:{hasher.hexdigest()}")

    def status(self) -> Status:
        with self._mutex:
            return Status(
                self.ref,
                self.offset,
                self._total,
                self._expected,
                from_ns(self._started_ns),
                from_ns(self._updated_ns),
            )

    def set_total(self, total: int) -> None:
        """Change the expected total size (0 = unknown), on disk too."""
        with self._mutex:
            self._check_open()
            self._total = max(0, total)
            write_total(os.path.join(self._path, "total"), self._total)

    # changes ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"ingest {self.ref}: writer is closed")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; return its length. All or nothing: on an OSError (e.g.
        ENOSPC) the bytes of this call that reached the file are cut off again, so
        offset, digest and file stay as before and a retry appends at the same place
        (a FUSE write that fails must not have changed the ingest)."""
        view = memoryview(data)
        with self._mutex:
            self._check_open()
            if len(view):
                self._unshare()
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._offset + done)
            except BaseException:
                if done:
                    try:
                        os.ftruncate(self._fd, self._offset)
                    except OSError as exc:  # the next write overwrites them; commit checks
                        log.warning("ingest %s: cannot drop a failed write: %s", self.ref, exc)
                raise
            if done:
                self._hash.update(data, self._offset + done)
                self._offset += done
                self._updated_ns = time.time_ns()
                self._dirty = True
            return done

    def truncate(self, size: int) -> None:
        """Only ``truncate(0)`` is supported: it restarts the ingest empty."""
        with self._mutex:
            self._check_open()
            if size != 0:
                raise NotImplemented(  # noqa: F901 - store.errors.NotImplemented
                    f"ingest {self.ref}: truncate to {size} bytes is not supported, only to 0"
                )
            if self._shared is not None:
                self._drop_share()
            os.ftruncate(self._fd, 0)
            self._hash.reset(hashlib.new(self._hash.hasher().name))
            self._offset = 0
            self._updated_ns = time.time_ns()
            self._dirty = True

    def sync(self) -> None:
        """Make the bytes written so far durable (fsync), if any changed."""
        with self._mutex:
            if not self._closed and self._dirty:
                os.fsync(self._fd)
                self._dirty = False

    def commit(
        self,
        size: int = 0,
        expected: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Digest:
        """Commit the ingest as a blob and return its digest.

        ``size`` (else the total given at open) and ``expected`` (else a recorded hint)
        are checked: a mismatch is FailedPrecondition and the ingest is kept, resumable.
        Labels are the ingest's recorded labels updated with ``labels``; an oversized one
        is InvalidArgument (ingest kept). Content that is already committed gives
        AlreadyExists and removes the ingest. Data and the blob directory are fsynced
        before this returns. The writer is closed afterwards in every case.
        """
        with self._mutex:
            if self._closed:
                raise FailedPrecondition("cannot commit on closed writer")
            try:
                hint, hint_labels = self._db.get_ingest(self._bref)
                hint_expected = Digest(hint) if hint else None
                all_labels = {**hint_labels, **(labels or {})}
                validate_labels(all_labels)
                want = parse_digest(expected) if expected else hint_expected
                want_size = size if size > 0 else self._total
                if self._shared is not None:
                    return self._commit_shared(want, want_size, all_labels)
                os.fsync(self._fd)
                actual_size = os.fstat(self._fd).st_size
                if actual_size != self._offset:
                    raise FailedPrecondition(
                        f"unexpected commit size {actual_size}, expected {self._offset}"
                    )
                if want_size > 0 and want_size != actual_size:
                    raise FailedPrecondition(
                        f'"{self.ref}" failed size validation: {actual_size} != {want_size}'
                    )
                hasher = self._hash.hasher()
                actual = Digest(f"{hasher.name}:{hasher.hexdigest()}")
                if want is not None and split_digest(want)[0] != hasher.name:
                    actual = self._rehash(split_digest(want)[0])
                if want is not None and want != actual:
                    raise FailedPrecondition(
                        f"unexpected commit digest {actual}, expected {want}"
                    )
                return self._publish(actual, actual_size, all_labels)
            finally:
                self._end()

    def _commit_shared(
        self, want: Digest | None, want_size: int, labels: Mapping[str, str]
    ) -> Digest:
        assert self._shared is not None
        dgst, size = self._shared
        if want_size > 0 and want_size != size:
            raise FailedPrecondition(
                f'"{self.ref}" failed size validation: {size} != {want_size}'
            )
        if want is not None and want != dgst:
            raise FailedPrecondition(f"unexpected commit digest {dgst}, expected {want}")
        return self._publish(dgst, size, labels, shared=True)

    def _rehash(self, algorithm: str) -> Digest:
        hasher = hashlib.new(algorithm)
        offset = 0
        while chunk := os.pread(self._fd, 1 << 20, offset):
            hasher.update(chunk)
            offset += len(chunk)
        return Digest(f"{algorithm}:{hasher.hexdigest()}")

    def _publish(
        self, dgst: Digest, size: int, labels: Mapping[str, str], *, shared: bool = False
    ) -> Digest:
        layout = self._layout
        meta, ns, lease = self._db.meta, self._db.ns, self._lease
        alg, _ = split_digest(dgst)
        blob_dir = layout.blob_dir(alg)
        ensure_dir(layout.blobs, 0o755)  # real directories: never a planted symlink
        ensure_dir(blob_dir, 0o755)
        target = layout.blob_path(dgst)
        # Commits of one digest take turns (any thread or process), so exactly one of
        # two racing commits of the same bytes succeeds and the other's row never
        # overwrites the winner's labels and times; deletes and gc's unlinks take the
        # same lock, so a blob a commit claims is never unlinked under it.
        ensure_dir(layout.private, 0o700)
        ensure_dir(layout.locks, 0o700)
        with hold_lock(layout.commit_lock_path(dgst)):
            now = time.time_ns()
            if blob_exists(layout, dgst):
                if self._visible(dgst):
                    if lease is not None:
                        meta.add_lease_resource(ns, lease, "content", dgst)
                    self._remove_ingest()
                    raise AlreadyExists(f"content {dgst}")
                # in the store, not in this namespace: record it here; the bytes stay
                meta.put_blob(ns, dgst, os.lstat(layout.blob_path(dgst)).st_size, now, labels,
                              lease=lease, ingest_ref=self.ref)
                self._remove_ingest()
                return dgst
            if shared:
                raise NotFound(f"content {dgst} (removed while shared with {self.ref})")
            data = os.path.join(self._path, "data")
            # The row goes in before the rename, so a crash never leaves a blob without
            # its labels (a row without a blob file is ignored); a busy database fails
            # the commit (Unavailable) with the ingest kept.
            meta.put_blob(ns, dgst, size, now, labels, lease=lease, ingest_ref=self.ref)
            mode = os.fstat(self._fd).st_mode & 0o777 & ~0o333
            os.fchmod(self._fd, mode or 0o400)
            os.utime(self._fd, ns=(now, now))
            try:
                # replaces a symlink planted at target, never follows it
                os.rename(data, target)
            except FileNotFoundError:
                try:
                    self._db.delete_blob(dgst)  # the row just written has no blob
                except Exception as exc:  # noqa: BLE001
                    log.warning("content %s: stale row not removed: %s", dgst, exc)
                raise NotFound(f"ingest {self.ref} (aborted while open)") from None
            fsync_dir(blob_dir)
        self._remove_ingest()
        return dgst

    def _remove_ingest(self) -> None:
        shutil.rmtree(self._path, ignore_errors=True)
        try:
            self._db.delete_ingest(self._bref)
        except Exception as exc:  # noqa: BLE001
            log.error("ingest %s: hints not removed: %s", self.ref, exc)

    def _end(self) -> None:
        self._closed = True
        self._hash.stop()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        self._lock.release()

    def close(self) -> None:
        """Keep the ingest for resuming: fsync data, record updatedat, release the lock.
        A second close, or a close after commit, does nothing."""
        with self._mutex:
            if self._closed:
                return
            try:
                if self._dirty:
                    os.fsync(self._fd)
                st = os.fstat(self._fd)
                if st.st_nlink:
                    self._hashes.remember(self._bref, st, self._hash.hasher())
                    try:
                        write_atomic(
                            os.path.join(self._path, "updatedat"),
                            format_time(self._updated_ns).encode(),
                            sync=False,
                        )
                    except FileNotFoundError:
                        pass  # aborted while open
                    except OSError as exc:  # e.g. ENOSPC: the data is safe, the time is not
                        log.info("ingest %s: updatedat not recorded: %s", self.ref, exc)
            finally:
                self._end()

    def close_if_idle(self) -> None:
        """``close()`` unless a call on this writer is in progress (its caller then sees
        the end of the stream and closes it itself); never blocks."""
        if not self._mutex.acquire(blocking=False):
            return
        self._mutex.release()
        self.close()

    def __enter__(self) -> LocalWriter:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"offset={self._offset}"
        return f"<LocalWriter ref={self.ref!r} {state}>"
