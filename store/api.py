"""The store interface: containerd's ``content.Store`` as typed Protocols, plus the few
optional capabilities the adapters use when a store has them.

Everything that stands behind a face of contentfs (the FUSE view, the gRPC service, the
CLI, the conformance suite) is typed against these Protocols, never against a concrete
store. Two implementations exist: :class:`store.local.LocalStore` (containerd's local
layout on this machine) and :class:`store.grpc.client.RemoteStore` (containerd's Content
API over gRPC: a live containerd or another ``contentfs serve``).

The core, as containerd's ``core/content/content.go``::

    Store = Manager + Provider + IngestManager + Ingester (+ close)
      Provider       reader_at(digest) -> ReaderAt
      InfoProvider   info(digest) -> Info
      Manager        InfoProvider + update, walk, delete
      IngestManager  status, list_statuses, abort
      Ingester       writer(ref, total=, expected=) -> Writer
    Writer           write, digest, status, truncate, commit, close (+ ref, offset, closed)
    ReaderAt         read_at(n, offset), size, close

Lifecycle (containerd's): content being ingested is invisible to Provider and Manager
until it is committed; once committed it leaves the IngestManager. A ref has at most one
open Writer at a time, in any process; a second ``writer(ref)`` fails at once with
Unavailable (it never waits; retrying is the caller's policy).

Errors are the classes of :mod:`store.errors` (NotFound, AlreadyExists, InvalidArgument,
FailedPrecondition, Unavailable, DataLoss, NotImplemented) or a plain OSError for the
machine's own failures (ENOSPC, EACCES); callers branch on the class, never on the text.

Optional capabilities, each one Protocol, checked with ``isinstance`` (they are
``runtime_checkable``; only the method names are checked at run time, mypy checks the
signatures). An adapter degrades when a store lacks one, as its docstring says:

* :class:`InfoIterator`   ``iter_infos``: walk as a lazy iterator (streamed listings);
* :class:`IngestReader`   ``ingest_reader_at``: read back the bytes of an active ingest;
* :class:`IngestHints`    ``ingest_hints``/``set_ingest_hints``: an expected digest,
  labels and total recorded on an ingest and applied at commit (contentfs's extension,
  the way the mount's ``setfattr`` on an ingest reaches its commit);
* :class:`IngestRenamer`  ``rename_ingest``: give an active ingest another ref;
* :class:`ChangeFeed`     ``open_changes``/``updated_since``: being told of blobs added,
  deleted or relabelled by others (another process, containerd itself);
* :class:`BlobNames`      ``blob_names``/``blob_names_stamp``: cheap listing of the blob
  names of one algorithm, with a stamp that changes whenever a blob comes or goes;
* :class:`BlobFiles`      ``blob_path``/``blob_times``/``ingest_data_path``: blobs and ingests
  are files on this machine, which an adapter may stat and open directly (the view's fast
  path for attributes and reads);
* :class:`WriterOpener`   ``open_writer``: ``writer`` with the two choices containerd
  leaves to its callers (resume only; wait for a held ref) done atomically by the store
  (:func:`store.helpers.open_writer` does them for any store);
* :class:`ReadyReader`    a ReaderAt that can tell, without blocking, bytes it already
  holds (a remote reader's fetched blocks), so an event loop reads them inline;
* :class:`FileReader`     a ReaderAt over a local file descriptor (``fileno``), which an
  adapter may ``pread`` itself;
* :class:`SyncWriter`, :class:`TotalWriter`, :class:`IdleCloser`: a Writer that can make
  its bytes durable before commit, change its expected total, or be closed from another
  thread when no call on it is in progress;
* :class:`Namespaced`     ``namespace(ns, lease=)``: per-namespace views (DESIGN §6);
* :class:`BlobVisibility` ``blob_visible``: which existing blob files a view holds;
* :class:`LeaseManager`   leases and garbage collection in a view's namespace.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from .digest import Digest
from .types import GcResult, Info, Lease, Status

__all__ = [
    "BlobFiles",
    "BlobNames",
    "BlobVisibility",
    "Change",
    "ChangeFeed",
    "ChangeKind",
    "Changes",
    "FileReader",
    "IdleCloser",
    "InfoIterator",
    "InfoProvider",
    "IngestHints",
    "IngestManager",
    "IngestReader",
    "IngestRenamer",
    "Ingester",
    "LeaseManager",
    "Manager",
    "Namespaced",
    "Provider",
    "ReaderAt",
    "ReadyReader",
    "Store",
    "SyncWriter",
    "TotalWriter",
    "Writer",
    "WriterOpener",
    "blob_times_of",
]


# -- the core: containerd's content.Store ------------------------------------------------


@runtime_checkable
class ReaderAt(Protocol):
    """Positional reads of one committed blob (containerd's ``content.ReaderAt``).

    ``size`` is the blob's size, taken when the reader was opened. ``read_at(n, offset)``
    returns at most ``n`` bytes, fewer only at the end, ``b""`` at or past it; a negative
    offset is ValueError. The caller closes it; a reader keeps reading a blob deleted
    after it was opened where the store can (a local file; not a remote store).
    """

    @property
    def size(self) -> int: ...

    def read_at(self, n: int, offset: int) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class Writer(Protocol):
    """One open ingest, holding its ref until ``close`` or ``commit``
    (containerd's ``content.Writer``).

    ``write`` appends at ``offset`` and returns the count written (all of ``data``, or an
    error with nothing changed). ``digest()`` is the digest of the bytes so far.
    ``truncate(0)`` restarts the ingest empty; any other size is NotImplemented.
    ``commit(size, expected, labels)`` checks ``size`` (else the total given at open) and
    ``expected`` (FailedPrecondition on a mismatch, the ingest kept and resumable), makes
    the blob durable and visible, and returns its digest; AlreadyExists if the content is
    already committed (the ingest is removed). Commit always closes the writer, even on
    error. ``close()`` keeps the ingest for resuming; a second close does nothing.
    """

    @property
    def ref(self) -> str: ...

    @property
    def offset(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def digest(self) -> Digest: ...

    def status(self) -> Status: ...

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def truncate(self, size: int) -> None: ...

    def commit(
        self, size: int = 0, expected: str | None = None, labels: Mapping[str, str] | None = None
    ) -> Digest: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class Provider(Protocol):
    """Access to committed content (containerd's ``content.Provider``)."""

    def reader_at(self, digest: str) -> ReaderAt:
        """Open a blob for positional reads. InvalidArgument for a malformed digest,
        NotFound if it is not committed."""
        ...


@runtime_checkable
class InfoProvider(Protocol):
    """Information about committed content (containerd's ``content.InfoProvider``)."""

    def info(self, digest: str) -> Info:
        """The blob's size, times and labels. InvalidArgument for a malformed digest,
        NotFound if it is not committed."""
        ...


@runtime_checkable
class Manager(InfoProvider, Protocol):
    """Inspect, change and delete committed content (containerd's ``content.Manager``)."""

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change a blob's labels. No fieldpaths or ``labels``: replace them all with
        ``info.labels``; ``labels.<key>``: set that key, or remove it when absent or
        empty in ``info.labels``. Any other path is InvalidArgument and changes nothing;
        a label over 4096 bytes (key plus value) is InvalidArgument. UpdatedAt becomes
        now. Returns the new Info; NotFound if the blob is absent."""
        ...

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        """Call ``fn`` for each committed blob matching any of containerd's filter
        strings (fields ``digest``, ``labels.<key>``); no filter matches all.
        InvalidArgument on a filter syntax error, before ``fn`` is called."""
        ...

    def delete(self, digest: str) -> None:
        """Delete a committed blob. NotFound if it is absent."""
        ...


@runtime_checkable
class IngestManager(Protocol):
    """Active ingests (containerd's ``content.IngestManager``)."""

    def status(self, ref: str) -> Status:
        """Status of the ingest ``ref``; NotFound if there is none."""
        ...

    def list_statuses(self, *filters: str) -> list[Status]:
        """Statuses of the active ingests matching any filter (field ``ref``)."""
        ...

    def abort(self, ref: str) -> None:
        """Remove the ingest ``ref`` and its data. NotFound if there is none."""
        ...


@runtime_checkable
class Ingester(Protocol):
    """Opens writers (containerd's ``content.Ingester``)."""

    def writer(self, ref: str, *, total: int = 0, expected: str | None = None) -> Writer:
        """Open the writer for ``ref``: a new ingest, or resume the existing one at its
        offset. InvalidArgument for an empty ref or a malformed ``expected``;
        AlreadyExists if ``expected`` is committed already; Unavailable if another
        writer, in any process, holds ``ref`` (never waits). The caller must ``close()``
        or ``commit()`` it."""
        ...


@runtime_checkable
class Store(Manager, Provider, IngestManager, Ingester, Protocol):
    """A content store: containerd's ``content.Store``, plus ``close`` (releases the
    store's files or connection; nothing else may be called afterwards)."""

    def close(self) -> None: ...


# -- optional capabilities ---------------------------------------------------------------


@runtime_checkable
class InfoIterator(Protocol):
    """``walk`` as a lazy iterator, so a listing streams with flat memory (gRPC List).
    Without it, an adapter collects ``walk`` into a list."""

    def iter_infos(self, *filters: str) -> Iterator[Info]:
        """Matching Infos, lazily. InvalidArgument for a filter syntax error, raised at
        the call or at the first step at the latest."""
        ...


@runtime_checkable
class IngestReader(Protocol):
    """Reading back what an active ingest holds (containerd has no such call: a remote
    store may lack it; the view then refuses to open an ingest for reading)."""

    def ingest_reader_at(self, ref: str) -> ReaderAt:
        """A reader of the bytes written so far to the ingest ``ref``; it sees later
        appends (``size`` is the size at open; ``read_at`` reads up to the current end).
        NotFound if there is no such ingest."""
        ...


@runtime_checkable
class IngestHints(Protocol):
    """Hints recorded on an active ingest and applied when it is committed: an expected
    digest, labels for the blob, an expected total size. What ``setfattr`` on an ingest
    in the mount sets. Without it, the view keeps hints for the ingests it writes in
    memory and passes them at commit."""

    def ingest_hints(self, ref: str) -> tuple[Digest | None, dict[str, str]]:
        """The expected digest and the labels recorded for ``ref`` (none: ``(None,
        {})``)."""
        ...

    def set_ingest_hints(
        self,
        ref: str,
        *,
        expected: str | None = None,
        labels: Mapping[str, str] | None = None,
        total: int | None = None,
        clear_expected: bool = False,
    ) -> None:
        """Record hints for the active ingest ``ref`` (NotFound if none): ``expected``,
        ``labels`` (replacing earlier ones; InvalidArgument if one is over 4096 bytes),
        ``total`` (0: unknown); ``clear_expected`` forgets the expected digest."""
        ...


@runtime_checkable
class IngestRenamer(Protocol):
    """Renaming an active ingest (``mv`` within the mount's ``ingest/``)."""

    def rename_ingest(self, old: str, new: str) -> None:
        """Give the ingest ``old`` the ref ``new``, replacing an ingest named ``new``.
        NotFound if ``old`` is not active; Unavailable if either ref is held."""
        ...


class ChangeKind(enum.Enum):
    """What a :class:`Change` reports."""

    #: a blob was added or deleted (``Change.digest``; None: some blob, unknown which)
    BLOBS = "blobs"
    #: labels changed somewhere: ask ``ChangeFeed.updated_since`` which blobs
    LABELS = "labels"
    #: changes were lost (a queue overflowed): drop everything cached
    OVERFLOW = "overflow"


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One change made under the store, by anyone."""

    kind: ChangeKind
    digest: Digest | None = None


@runtime_checkable
class Changes(Protocol):
    """An open feed of changes. ``fileno()`` becomes readable when ``read()`` has
    something; ``read()`` never blocks and returns what arrived (maybe nothing)."""

    def fileno(self) -> int: ...

    def read(self) -> list[Change]: ...

    def close(self) -> None: ...


@runtime_checkable
class ChangeFeed(Protocol):
    """Being told of changes made by others (another process on the same root,
    containerd behind a remote store). Without it, an adapter that caches drops its
    caches after a short time instead."""

    def open_changes(self) -> Changes:
        """Start watching; the caller closes the feed. OSError if watching is not
        possible here (the caller then falls back to timeouts)."""
        ...

    def updated_since(self, since_ns: int) -> list[tuple[Digest, int, int]]:
        """``(digest, created_ns, updated_ns)`` of the blobs whose UpdatedAt is at or
        after ``since_ns`` (ns since the epoch). May scan all metadata: call it from a
        worker thread, after a LABELS change."""
        ...


@runtime_checkable
class BlobNames(Protocol):
    """Cheap listing of blob names, without reading any metadata."""

    def blob_names(self, algorithm: str) -> list[str]:
        """The hex names of the committed blobs of ``algorithm`` (``[]`` for an unknown
        one), in no particular order."""
        ...

    def blob_names_stamp(self, algorithm: str) -> object:
        """A value that changes whenever a blob of ``algorithm`` comes or goes; take it
        before ``blob_names`` and keep the names while it is unchanged. None when the
        store cannot tell (then never keep them)."""
        ...


@runtime_checkable
class WriterOpener(Protocol):
    """Opening a writer with the caller's policy applied inside the store."""

    def open_writer(
        self, ref: str, *, total: int = 0, expected: str | None = None,
        create: bool = True, wait: float = 0.0,
    ) -> Writer:
        """``writer(ref, total=, expected=)``, except: ``create=False`` only resumes an
        existing ingest (NotFound if there is none, decided under the ref's lock);
        ``wait`` seconds are spent waiting for a held ref before Unavailable."""
        ...


@runtime_checkable
class BlobFiles(Protocol):
    """Blobs and ingests are regular files on this machine, under the directory
    ``root`` in containerd's layout, which an adapter may stat and open read-only itself
    (the view's fast path). It never writes them: every change goes through the store."""

    @property
    def root(self) -> str: ...

    def blob_path(self, digest: str) -> str:
        """The path of a blob's file (whether or not the blob exists; check with
        ``lstat`` and ``S_ISREG``: anything else there is not a blob)."""
        ...

    def ingest_data_path(self, ref: str) -> str:
        """The path of an ingest's data file (whether or not the ingest exists)."""
        ...

    def blob_times(self, digests: Sequence[str]) -> dict[Digest, tuple[int, int, int]]:
        """``(size, created_ns, updated_ns)`` recorded for those of ``digests`` that
        have metadata, in one query. A record whose size differs from the file's is
        stale: use the file's mtime for both times then (:func:`blob_times_of`)."""
        ...

    def blob_times_between(self, first: str,
                           last: str) -> list[tuple[str, int, int, int]]:
        """``(digest, size, created_ns, updated_ns)`` of the records with ``first <=
        digest <= last`` (as strings), in digest order: a run of a sorted listing in one
        query."""
        ...


@runtime_checkable
class ReadyReader(Protocol):
    """A ReaderAt that may already hold the bytes asked for (fetched ahead)."""

    def read_ready(self, n: int, offset: int) -> bytes | None:
        """``read_at(n, offset)`` if that needs no waiting (then it never blocks, so an
        event loop may call it), else None."""
        ...


@runtime_checkable
class FileReader(Protocol):
    """A ReaderAt whose bytes are a local file: ``fileno()`` is its open descriptor, for
    ``os.pread``/``os.fstat`` by the caller (owned by the reader: never close it)."""

    def fileno(self) -> int: ...


@runtime_checkable
class SyncWriter(Protocol):
    """A Writer that can make the bytes written so far durable before commit (fsync at
    the mount's FLUSH). Without it, durability comes at commit."""

    def sync(self) -> None: ...


@runtime_checkable
class TotalWriter(Protocol):
    """A Writer whose expected total can change while it is open (0: unknown)."""

    def set_total(self, total: int) -> None: ...


@runtime_checkable
class IdleCloser(Protocol):
    """A Writer that another thread may close when no call on it is in progress (the gRPC
    service closes the writer of a stream that ended while its handler waits). Without
    it, such a writer is closed when its handler is collected."""

    def close_if_idle(self) -> None:
        """``close()`` unless a call on this writer is in progress; never blocks."""
        ...


@runtime_checkable
class BlobVisibility(Protocol):
    """For a store whose blob files (``BlobFiles``) are shared with views that must not
    see all of them: a namespace sees its own records (and ``default`` the unclaimed
    files), so a file at ``blob_path`` may exist and still not be this view's."""

    def blob_visible(self, digest: str) -> bool:
        """True if this view holds ``digest``, should its file exist."""
        ...


@runtime_checkable
class Namespaced(Protocol):
    """Views of one containerd namespace each over the same bytes (DESIGN §6)."""

    def namespace(self, ns: str | None, *, lease: str | None = None) -> Self:
        """The view of namespace ``ns`` (None: the raw store, beneath every namespace);
        with ``lease``, what it writes and commits is held by that lease (containerd's
        ``containerd-lease`` header). InvalidArgument for a malformed namespace."""
        ...


@runtime_checkable
class LeaseManager(Protocol):
    """containerd's ``leases.Manager`` for the view's namespace, and its gc
    (FailedPrecondition on a view without a namespace)."""

    def create_lease(
        self, lease_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> Lease: ...

    def leases(self, *filters: str) -> list[Lease]: ...

    def delete_lease(self, lease_id: str, *, sync: bool = False) -> GcResult | None: ...

    def lease_resources(self, lease_id: str) -> list[tuple[str, str]]: ...

    def add_lease_resource(self, lease_id: str, rtype: str, rid: str) -> None: ...

    def delete_lease_resource(self, lease_id: str, rtype: str, rid: str) -> None: ...

    def gc(self, *, dry_run: bool = False) -> GcResult:
        """Collect garbage over every namespace of the root (DESIGN §6)."""
        ...


def blob_times_of(
    st: os.stat_result, row: tuple[int, int, int] | None
) -> tuple[int, int]:
    """``(created_ns, updated_ns)`` of a blob file: the recorded times when the record's
    size matches the file's, else the file's mtime for both (a blob written behind the
    store's back, or a record left by a crash)."""
    if row is not None and row[0] == st.st_size:
        return row[1], row[2]
    return st.st_mtime_ns, st.st_mtime_ns
