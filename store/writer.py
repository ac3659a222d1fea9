"""LocalWriter: one open ingest, holding its ref lock until close or commit."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from .digest import Digest, parse_digest, split_digest
from .errors import AlreadyExists, FailedPrecondition, NotFound, NotImplemented  # noqa: A004
from .fsutil import ensure_dir, fsync_dir, write_atomic
from .locks import RefLock, hold_lock
from .types import Status, format_time, from_ns

if TYPE_CHECKING:
    from .local import LocalStore

__all__ = ["LocalWriter"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _ResumeState:
    fd: int
    hasher: hashlib._Hash
    offset: int
    total: int
    started_ns: int
    updated_ns: int


class LocalWriter:
    """An open ingest (containerd's content.Writer).

    Writes append at ``offset``; the digest is computed as bytes arrive, so commit never
    rereads the data. ``close()`` keeps the ingest for resuming; ``commit()`` always
    ends the writer (and releases the ref lock), whether it succeeds or fails.
    """

    def __init__(
        self,
        store: LocalStore,
        ref: str,
        lock: RefLock,
        path: str,
        state: _ResumeState,
        expected: Digest | None,
        *,
        bref: str | None = None,
    ) -> None:
        self._store = store
        self.ref = ref
        self._bref = ref if bref is None else bref  # the backend ref (namespace-qualified)
        #: (digest, size) while the writer is shared (reference §5.3): complete, no bytes
        self._shared: tuple[Digest, int] | None = None
        self._hint_before_share: str | None = None
        self._lock = lock
        self._path = path
        self._fd = state.fd
        self._hasher = state.hasher
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

    def _share(self, dgst: Digest, size: int, hint: str | None) -> None:
        """Start shared; ``hint`` is the expected digest recorded before (restored when
        the writer stops being shared: the shared digest was recorded as a gc root)."""
        self._shared = (dgst, size)
        self._hint_before_share = hint

    def _drop_share(self) -> None:
        self._shared = None
        _, labels = self._store.meta.get_ingest(self._bref)
        self._store.meta.put_ingest(self._bref, self._hint_before_share, labels)

    def _unshare(self) -> None:
        """Before the first change to a shared writer: copy the blob in (as containerd)."""
        if self._shared is None:
            return
        dgst, _ = self._shared
        self._drop_share()
        path = self._store.layout.blob_path(dgst)
        try:
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content {dgst} (removed while shared with {self.ref})") from None
        try:
            while chunk := os.pread(src, 1 << 20, self._offset):
                os.pwrite(self._fd, chunk, self._offset)
                self._hasher.update(chunk)
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
            return Digest(f"{self._hasher.name}:{self._hasher.hexdigest()}")

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
            self._store.set_ingest_hints(self.ref, total=self._total)

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
                self._hasher.update(view)
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
            self._hasher = hashlib.new(self._hasher.name)
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
        from .local import validate_labels

        with self._mutex:
            if self._closed:
                raise FailedPrecondition("cannot commit on closed writer")
            store = self._store
            try:
                hint_expected, hint_labels = store.ingest_hints(self.ref)
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
                actual = Digest(f"{self._hasher.name}:{self._hasher.hexdigest()}")
                if want is not None and split_digest(want)[0] != self._hasher.name:
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
        store = self._store
        layout = store.layout
        alg, _ = split_digest(dgst)
        blob_dir = layout.blob_dir(alg)
        ensure_dir(layout.blobs, 0o755)  # real directories: never a planted symlink
        ensure_dir(blob_dir, 0o755)
        target = layout.blob_path(dgst)
        # Commits of one digest take turns (any thread or process), so exactly one of
        # two racing commits of the same bytes succeeds and the other's row never
        # overwrites the winner's labels and times; deletes and gc's unlinks take the
        # same lock, so a blob a commit claims is never unlinked under it.
        store._ensure_private()
        lease = store.lease if store.ns is not None else None
        with hold_lock(store._commit_lock(dgst)):
            now = time.time_ns()
            if store._exists(dgst):
                row = store.db.get_blob(dgst)
                if store._visible(dgst, row):
                    if lease is not None:
                        store.meta.add_lease_resource(store._key, lease, "content", dgst)
                    self._remove_ingest()
                    raise AlreadyExists(f"content {dgst}")
                # in the store, not in this namespace: record it here, bytes stay put
                store.meta.put_blob(store._key, dgst, os.lstat(target).st_size, now, labels,
                                    lease=lease, ingest_ref=self.ref)
                self._remove_ingest()
                return dgst
            if shared:
                raise NotFound(f"content {dgst} (removed while shared with {self.ref})")
            data = os.path.join(self._path, "data")
            # The row goes in before the rename, so a crash never leaves a blob without
            # its labels (a row without a blob file is ignored); a busy database fails
            # the commit (Unavailable) with the ingest kept.
            store.meta.put_blob(store._key, dgst, size, now, labels,
                                lease=lease, ingest_ref=self.ref)
            mode = os.fstat(self._fd).st_mode & 0o777 & ~0o333
            os.fchmod(self._fd, mode or 0o400)
            os.utime(self._fd, ns=(now, now))
            try:
                # replaces a symlink planted at target, never follows it
                os.rename(data, target)
            except FileNotFoundError:
                try:
                    store.db.delete_blob(dgst)  # the row just written has no blob
                except Exception as exc:  # noqa: BLE001
                    log.warning("content %s: stale row not removed: %s", dgst, exc)
                raise NotFound(f"ingest {self.ref} (aborted while open)") from None
            fsync_dir(blob_dir)
        self._remove_ingest()
        return dgst

    def _remove_ingest(self) -> None:
        shutil.rmtree(self._path, ignore_errors=True)
        try:
            self._store.db.delete_ingest(self._bref)
        except Exception as exc:  # noqa: BLE001
            log.error("ingest %s: hints not removed: %s", self.ref, exc)

    def _end(self) -> None:
        self._closed = True
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
                    self._store._remember_hasher(self._bref, st, self._hasher)
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
