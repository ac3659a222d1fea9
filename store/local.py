"""LocalStore: containerd's local content store, with persistent labels and
cross-process ref locks.

Thread-safe: any method may be called from any thread. A Writer is used by one caller
at a time (it serialises its own calls).
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from .api import Changes
from .changes import InotifyChanges
from .digest import (
    ALGORITHMS,
    CANONICAL,
    Digest,
    hex_pattern,
    is_hex_name,
    parse_digest,
    split_digest,
)
from .errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StoreError,
)
from .filters import Filter, parse_filters
from .fsutil import ensure_dir, read_small, write_atomic
from .gc import collect
from .hashcache import HashCache
from .helpers import updated_hints
from .identifiers import DEFAULT_NAMESPACE, validate_identifier
from .labels import validate_labels
from .layout import Layout
from .locks import DEFAULT_WAIT, hold_lock, take_lock, try_lock
from .metadata import RAW, MetadataDB, NsMetadata
from .ondisk import (
    blob_dir_ok,
    blob_exists,
    is_dir,
    parse_time_file,
    read_time,
    read_total,
    write_total,
)
from .reader import FileReaderAt
from .text import is_text, printable_ref
from .types import GcResult, Info, Lease, Status, format_time, from_ns
from .writer import IngestState, LocalWriter

__all__ = ["MAX_REF_SIZE", "ROOT_MODE", "LocalStore", "NoStore", "prepare_root"]

log = logging.getLogger(__name__)

_WALK_BATCH = 256  # blobs per metadata query in walk
_CHUNK = 1 << 20
_VERIFY_CHUNK = 4 << 20  # large reads: fewer syscalls, and hashlib drops the GIL per call


#: Longest ref in UTF-8 bytes (the ingest's ``ref`` file is read back whole).
MAX_REF_SIZE = 4096


def _check_ref(ref: str) -> None:
    """Any ref an existing ingest may have: not empty, no NUL, at most 4096 bytes. New
    ingests also need valid UTF-8 (``_check_new_ref``)."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("ref must not be empty")
    if "\0" in ref:
        raise InvalidArgument(f"ref {ref!r}: must not contain NUL")
    size = len(ref.encode("utf-8", "surrogateescape"))
    if size > MAX_REF_SIZE:
        raise InvalidArgument(
            f"ref {ref[:64]!r}...: {size} bytes is longer than the maximum ({MAX_REF_SIZE})"
        )


def _check_new_ref(ref: str) -> None:
    """A ref a new ingest (or a rename, or a recorded hint) may take: valid UTF-8 text.

    containerd's refs travel in protobuf ``string`` fields, which must be UTF-8, so no
    containerd client can send anything else; from FUSE or argv such a name is refused
    before anything is written. An ingest made by hand (or by an older release) with a
    ref that is not UTF-8 still lists, resumes and aborts.
    """
    if not is_text(ref):
        raise InvalidArgument(f"ref {printable_ref(ref)}: not valid UTF-8")


#: Mode of a store root that contentfs creates (parents too), as containerd's 0755 dirs.
ROOT_MODE = 0o755


class NoStore(NotFound):
    """NotFound for a store root that is missing or no directory. Its message is said
    as it is, without the ``: not found`` suffix (it names the problem already)."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)


def prepare_root(root: str, *, create: bool) -> str:
    """Check (``create``: make, parents too) the store directory ``root``; return it.

    One wording for every face (CLI, mount, serve): a missing root is NotFound
    ``no store at ROOT`` unless ``create`` (commands that write make it, as containerd
    makes its root); a path that exists but is no directory is NotFound ``store root
    ROOT: not a directory``.
    """
    if os.path.isdir(root):
        return root
    if os.path.lexists(root):
        raise NoStore(f"store root {root}: not a directory")
    if not create:
        raise NoStore(f"no store at {root}")
    try:
        os.makedirs(root, mode=ROOT_MODE, exist_ok=True)
    except NotADirectoryError:  # a parent is a file
        raise NoStore(f"store root {root}: not a directory") from None
    except FileExistsError:  # a parent is a dangling symlink, or a race made a file
        raise NoStore(f"store root {root}: not a directory") from None
    if not os.path.isdir(root):
        raise NoStore(f"store root {root}: not a directory")
    return root


class LocalStore:
    """A content store rooted at a directory in containerd's local layout.

    Every instance is a view of one containerd namespace (DESIGN §6): its own blob
    records, labels, times, ingests and leases over bytes stored once.
    ``LocalStore(root)`` is namespace ``default`` (what the CLI and a mount show without
    ``-n``); ``namespace=None`` or ``.namespace(None)`` is the **raw** store: every blob
    file, the raw store's own labels (they claim nothing for any namespace), the
    ingests of ``default``: what a gRPC request without a namespace sees, as
    containerd's bare local store. ``.namespace(ns)`` returns another view over the same
    directory and database handle: close the store that opened it.

    ``readonly`` opens the metadata database read-only and refuses nothing else by
    itself: the adapters refuse changes on read-only mounts.
    """

    def __init__(
        self, root: str, *, readonly: bool = False, namespace: str | None = DEFAULT_NAMESPACE
    ) -> None:
        self.layout = Layout(root)
        self.root = self.layout.root
        prepare_root(self.root, create=False)
        self.readonly = readonly
        if namespace is not None:
            validate_identifier("namespace", namespace)
        self.meta = MetadataDB(self.layout.db, readonly=readonly)
        if not readonly:  # as containerd 1.6: ingest/ exists once the store is open
            os.makedirs(self.layout.ingest, mode=0o755, exist_ok=True)
            self._sweep_ingest_root()
        # lets a writer closed in this process resume without rehashing its data
        # (keyed by backend ref, shared by all views)
        self._hashes = HashCache()
        self._bind(namespace, None)

    def _bind(self, namespace: str | None, lease: str | None) -> None:
        #: The namespace of this view; None for the raw store.
        self.ns = namespace
        #: Writes of this view are held by this lease (containerd's ``containerd-lease``).
        self.lease = lease
        self._key = RAW if namespace is None else namespace
        self.db = NsMetadata(self.meta, self._key)

    def namespace(self, ns: str | None, *, lease: str | None = None) -> LocalStore:
        """The view of namespace ``ns`` (None: the raw store) over the same root and
        database; with ``lease``, its writes and commits are held by that lease.
        InvalidArgument for a malformed namespace."""
        if ns is not None:
            validate_identifier("namespace", ns)
        if lease is not None and ns is None:
            raise InvalidArgument("a lease needs a namespace")
        view = object.__new__(LocalStore)
        view.__dict__.update(self.__dict__)
        view._bind(ns, lease)
        return view

    def close(self) -> None:
        self.meta.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Provider -------------------------------------------------------------------------

    def reader_at(self, digest: str) -> FileReaderAt:
        """Open a blob for positional reads. NotFound if it is not committed (or not a
        regular file: a symlink, directory or FIFO planted in its place is never opened
        in a way that follows or blocks). DataLoss if the file's size differs from the
        size recorded at commit."""
        dgst = parse_digest(digest)
        if not blob_dir_ok(self.layout, dgst):
            raise NotFound(f"content {dgst}")
        try:
            fd = os.open(
                self.layout.blob_path(dgst),
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            )
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"content {dgst}") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                # a planted symlink; a FIFO or socket with no writer; a directory
                raise NotFound(f"content {dgst} (not a regular file)") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"content {dgst} (not a regular file)")
            self._check_size(dgst, st.st_size)
            if self.ns is not None and not self._visible(dgst, self.db.get_blob(dgst)):
                raise NotFound(f"content {dgst}")
        except BaseException:
            os.close(fd)
            raise
        return FileReaderAt(fd, st.st_size, dgst)

    def _check_size(self, dgst: Digest, size: int) -> None:
        """DataLoss if the metadata records another size for ``dgst`` (bytes appended or
        cut off on disk). A blob without a row, or an unreadable database, passes."""
        try:
            recorded = self.meta.committed_size(dgst)
        except (StoreError, OSError) as exc:
            log.debug("content %s: size not checked: %s", dgst, exc)
            return
        if recorded is not None and recorded != size:
            raise DataLoss(
                f"content {dgst}: file holds {size} bytes, {recorded} were committed"
            )

    # Manager --------------------------------------------------------------------------

    def info(self, digest: str) -> Info:
        """Info of a committed blob. InvalidArgument for a bad digest, NotFound if absent."""
        dgst = parse_digest(digest)
        st = self._stat_blob(dgst)
        row = self.db.get_blob(dgst)
        if not self._visible(dgst, row):
            raise NotFound(f"content {dgst}")
        return self._info(dgst, st, row)

    def _visible(self, dgst: Digest, row: object) -> bool:
        """A blob file is in this view: the raw store sees every file, a namespace its
        records, and ``default`` also the unclaimed files (no record in any namespace)."""
        if row is not None or self.ns is None:
            return True
        return self.ns == DEFAULT_NAMESPACE and not self.meta.claimed([dgst])

    def visible(self, digest: Digest) -> bool:
        """True if this view has the blob file of ``digest`` (whether or not it exists)."""
        return self._visible(digest, self.db.get_blob(digest))

    def _stat_blob(self, dgst: Digest) -> os.stat_result:
        if not blob_dir_ok(self.layout, dgst):
            raise NotFound(f"content {dgst}")
        try:
            st = os.lstat(self.layout.blob_path(dgst))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"content {dgst}") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"content {dgst} (not a regular file)")
        return st

    @staticmethod
    def _info(
        dgst: Digest, st: os.stat_result, row: tuple[int, int, int, dict[str, str]] | None
    ) -> Info:
        if row is not None and row[0] == st.st_size:
            return Info(dgst, st.st_size, from_ns(row[1]), from_ns(row[2]), row[3])
        return Info(dgst, st.st_size, from_ns(st.st_mtime_ns), from_ns(st.st_mtime_ns), {})

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change a blob's labels, as containerd's Update.

        No fieldpaths or ``labels``: replace all labels with ``info.labels``.
        ``labels.<key>``: set that key from ``info.labels``, or remove it when absent or
        empty. Any other path: InvalidArgument and nothing changes. Size, digest and
        times in ``info`` are ignored. UpdatedAt becomes now.
        """
        dgst = parse_digest(info.digest)
        replace: dict[str, str] | None = None
        changes: dict[str, str] = {}
        for path in fieldpaths or ("labels",):
            if path == "labels":
                replace = dict(info.labels)
            elif path.startswith("labels."):
                key = path[len("labels.") :]
                changes[key] = info.labels.get(key, "")
            else:
                raise InvalidArgument(f'cannot update "{path}" field on content info "{dgst}"')
        validate_labels({k: v for k, v in {**(replace or {}), **changes}.items() if v})
        # under the digest's commit lock, as gc unlinks: a blob gc is removing is either
        # still recorded here (gc then keeps it) or gone (NotFound), never a record
        # written back for a file that is no longer there
        if not self.readonly:  # (a read-only store fails at the database write below)
            self._ensure_private()
        lock = contextlib.nullcontext() if self.readonly else hold_lock(
            self.layout.commit_lock_path(dgst))
        with lock:
            st = self._stat_blob(dgst)
            row = self.db.get_blob(dgst)
            if not self._visible(dgst, row):
                raise NotFound(f"content {dgst}")
            created = row[1] if row is not None and row[0] == st.st_size else st.st_mtime_ns
            new = self.db.update_labels(
                dgst, st.st_size, created, time.time_ns(), replace, changes)
        return self._info(dgst, st, new)

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        """Call ``fn`` for each committed blob matching any filter, in digest order.

        Filters are parsed first (InvalidArgument on a syntax error). Fields: ``digest``
        and ``labels.<key>``. Blobs on disk without metadata are included.
        """
        for info in self.iter_infos(*filters):
            fn(info)

    def iter_infos(self, *filters: str) -> Iterator[Info]:
        """``walk`` as an iterator, for streaming listings (gRPC List): blobs in digest
        order, metadata read per batch, so memory stays flat however many blobs there
        are. Filters are parsed at the call (InvalidArgument on a syntax error)."""
        return self._iter_infos(parse_filters(*filters))

    def _iter_infos(self, flt: Filter) -> Iterator[Info]:
        for alg in sorted(self.algorithms()):
            batch: builtins.list[tuple[Digest, os.stat_result]] = []
            for name, st in self._scan_blobs(alg):
                batch.append((Digest(f"{alg}:{name}"), st))
                if len(batch) == _WALK_BATCH:
                    yield from self._infos_of(batch, flt)
                    batch = []
            yield from self._infos_of(batch, flt)

    def _infos_of(
        self, batch: Sequence[tuple[Digest, os.stat_result]], flt: Filter
    ) -> Iterator[Info]:
        """The matching Infos of one batch, with its metadata rows from one query."""
        if not batch:
            return
        rows = self.db.get_blobs([d for d, _ in batch])
        claimed: set[str] = set()
        if self.ns == DEFAULT_NAMESPACE:
            claimed = self.meta.claimed([d for d, _ in batch if d not in rows])
        for dgst, st in batch:
            row = rows.get(dgst)
            if row is None and self.ns is not None and (
                self.ns != DEFAULT_NAMESPACE or dgst in claimed
            ):
                continue
            info = self._info(dgst, st, row)
            if flt.match(_info_adaptor(info)):
                yield info

    def list(self, *filters: str) -> builtins.list[Info]:
        """Walk into a list."""
        out: builtins.list[Info] = []
        self.walk(out.append, *filters)
        return out

    def algorithms(self) -> builtins.list[str]:
        """Algorithm directories present under ``blobs/``."""
        if not is_dir(self.layout.blobs):
            return []
        try:
            names = os.listdir(self.layout.blobs)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [n for n in names if n in ALGORITHMS and is_dir(self.layout.blob_dir(n))]

    def _scan_blobs(self, alg: str) -> Iterator[tuple[str, os.stat_result]]:
        if not (is_dir(self.layout.blobs) and is_dir(self.layout.blob_dir(alg))):
            return
        blob_dir = self.layout.blob_dir(alg)
        try:
            # names only, not DirEntry objects: 100k blobs hold ~12 MB here instead of ~90
            names = sorted(os.listdir(blob_dir))
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if not is_hex_name(alg, name):
                log.debug("skipping %s/%s: not a digest", blob_dir, name)
                continue
            try:
                st = os.lstat(os.path.join(blob_dir, name))
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode):
                yield name, st

    def stray_names(self) -> Iterator[Digest]:
        """Digests whose blob path holds something other than a regular file (a symlink,
        directory, FIFO...): never served nor listed, but reported by a full verify."""
        for alg in ALGORITHMS:
            blob_dir = self.layout.blob_dir(alg)
            if not (is_dir(self.layout.blobs) and is_dir(blob_dir)):
                continue
            try:
                names = sorted(os.listdir(blob_dir))
            except OSError:
                continue
            for name in names:
                if not is_hex_name(alg, name):
                    continue
                try:
                    if not stat.S_ISREG(os.lstat(os.path.join(blob_dir, name)).st_mode):
                        yield Digest(f"{alg}:{name}")
                except OSError:
                    continue

    # BlobNames ---------------------------------------------------------------------

    def blob_names(self, algorithm: str) -> builtins.list[str]:
        """The well-formed hex names in ``blobs/<algorithm>/`` this view holds, unsorted,
        one listdir and at most one query (no stat: a name may still be something other
        than a regular file)."""
        if algorithm not in ALGORITHMS or not is_dir(self.layout.blobs):
            return []
        try:
            names = os.listdir(self.layout.blob_dir(algorithm))
        except (FileNotFoundError, NotADirectoryError):
            return []
        good = filter(hex_pattern(algorithm).fullmatch, names)
        prefix = f"{algorithm}:"
        if self.ns is None:
            return builtins.list(good)
        if self.ns == DEFAULT_NAMESPACE:
            hidden = self.meta.hidden_from(self._key)
            return [n for n in good if prefix + n not in hidden]
        mine = self.meta.digests_of(self._key)
        return [n for n in good if prefix + n in mine]

    def blob_names_stamp(self, algorithm: str) -> object:
        """``(st_ino, st_mtime_ns, st_ctime_ns)`` of ``blobs/<algorithm>/`` (zeros when
        it is missing): every blob added or removed there changes it; for a namespace,
        with the database's change stamp (records come and go there too)."""
        try:
            st = os.stat(self.layout.blob_dir(algorithm))
        except (FileNotFoundError, NotADirectoryError):
            return (0, 0, 0)
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        return stamp if self.ns is None else (stamp, self.meta.change_stamp())

    def blob_visible(self, digest: str) -> bool:
        """True if this view holds ``digest``, should its file exist (the raw store
        holds every file)."""
        return self.ns is None or self.visible(Digest(digest))

    # BlobFiles -----------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        """The path of a blob's file (it may be absent, or not a regular file)."""
        return self.layout.blob_path(Digest(digest))

    def blob_times(self, digests: Sequence[str]) -> dict[Digest, tuple[int, int, int]]:
        """``(size, created_ns, updated_ns)`` recorded for those of ``digests`` that have
        metadata, in one query (see :func:`store.api.blob_times_of`)."""
        rows = self.db.get_blob_times(builtins.list(digests))
        return {Digest(d): row for d, row in rows.items()}

    def blob_times_between(self, first: str,
                           last: str) -> builtins.list[tuple[str, int, int, int]]:
        """``(digest, size, created_ns, updated_ns)`` of the records with ``first <=
        digest <= last``, in digest order (see :meth:`store.api.BlobFiles`)."""
        return self.db.get_blob_times_between(first, last)

    def delete(self, digest: str) -> None:
        """Delete a committed blob from this view (DESIGN §6): its record goes at once,
        and the file too when no namespace holds it any longer (else it stays for the
        others). NotFound if this view does not have it. Open readers keep reading."""
        dgst = parse_digest(digest)
        path = self.layout.blob_path(dgst)
        if not blob_dir_ok(self.layout, dgst):
            raise NotFound(f"content {dgst}")
        self._ensure_private()
        with hold_lock(self.layout.commit_lock_path(dgst)):  # not while a commit claims it
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    raise NotFound(f"content {dgst}")
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"content {dgst}") from None
            if not self._visible(dgst, self.db.get_blob(dgst)):
                raise NotFound(f"content {dgst}")
            holders = self.meta.delete_blob(self._key, dgst, lease=self.lease)
            if any(h != RAW for h in holders):
                return  # another namespace holds it: the file stays for it
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _ensure_private(self) -> None:
        ensure_dir(self.layout.private, 0o700)
        ensure_dir(self.layout.locks, 0o700)

    def namespaces(self) -> builtins.list[str]:
        """Namespaces that hold blobs, leases or ingests, and always ``default``."""
        names = self.meta.namespaces()
        names.add(DEFAULT_NAMESPACE)
        for st in self.backend_statuses():
            if "\0" in st.ref:
                names.add(st.ref.split("\0", 1)[0])
        return sorted(names)

    def verify(self, digest: str, progress: Callable[[int], object] | None = None) -> Info:
        """Rehash a blob. DataLoss if its bytes no longer match its digest. ``progress``
        is called with the size of each chunk hashed (from the calling thread)."""
        dgst = parse_digest(digest)
        info = self.info(dgst)
        alg, want = split_digest(dgst)
        hasher = hashlib.new(alg)
        buf = bytearray(_VERIFY_CHUNK)
        view = memoryview(buf)
        with self.reader_at(dgst) as r:
            fd = r.fileno()
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            offset = 0
            # one buffer, reused: pread and update both release the GIL, so verifies in
            # several threads hash on several cores
            while n := os.preadv(fd, [buf], offset):
                hasher.update(view[:n])
                offset += n
                if progress is not None:
                    progress(n)
        if hasher.hexdigest() != want:
            raise DataLoss(
                f"content {dgst}: bytes on disk hash to {alg}:{hasher.hexdigest()}"
            )
        return info

    # IngestManager --------------------------------------------------------------------

    def _bref(self, ref: str) -> str:
        """The backend ref of this view's ``ref``: itself in ``default`` and the raw
        store (so ingests made before namespaces stay where they were), else
        ``<ns>\\0<ref>`` (NUL never occurs in a ref)."""
        if self.ns is None or self.ns == DEFAULT_NAMESPACE:
            return ref
        return f"{self.ns}\0{ref}"

    def _client_ref(self, bref: str) -> str | None:
        """``bref``'s ref in this view, or None if it belongs to another namespace."""
        ns, sep, ref = bref.rpartition("\0")
        if not sep:
            return bref if self.ns is None or self.ns == DEFAULT_NAMESPACE else None
        return ref if ns == self.ns else None

    def status(self, ref: str) -> Status:
        """Status of an active ingest; NotFound if there is none for ``ref``."""
        _check_ref(ref)
        bref = self._bref(ref)
        st = self._read_status(self.layout.ingest_dir(bref), bref)
        if st is None:
            raise NotFound(f"ingest {ref}")
        return dataclasses.replace(st, ref=ref)

    def backend_status(self, bref: str) -> Status | None:
        """The ingest of backend ref ``bref`` (any namespace), or None."""
        return self._read_status(self.layout.ingest_dir(bref), bref)

    def _read_status(self, path: str, ref: str | None) -> Status | None:
        """Status from an ingest directory, or None if it is missing or not an ingest."""
        if not (is_dir(self.layout.ingest) and is_dir(path)):
            return None
        try:
            data_st = os.lstat(os.path.join(path, "data"))
            if not stat.S_ISREG(data_st.st_mode):  # e.g. a planted symlink
                return None
            stored_ref = read_small(os.path.join(path, "ref")).decode("utf-8", "surrogateescape")
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("ingest %s unreadable: %s", path, exc)
            return None
        if ref is not None and stored_ref != ref:
            return None
        started = read_time(os.path.join(path, "startedat"))
        updated = max(read_time(os.path.join(path, "updatedat")), data_st.st_mtime_ns)
        total = read_total(os.path.join(path, "total"))
        expected, _ = self.db.get_ingest(stored_ref)
        return Status(
            stored_ref,
            data_st.st_size,
            total,
            Digest(expected) if expected else None,
            from_ns(started),
            from_ns(updated),
        )

    def list_statuses(self, *filters: str) -> builtins.list[Status]:
        """Statuses of active ingests matching any filter (field ``ref``), sorted by ref."""
        flt = parse_filters(*filters)
        out = []
        for st in self.backend_statuses():
            ref = self._client_ref(st.ref)
            if ref is not None and flt.match(_ref_adaptor(ref)):
                out.append(dataclasses.replace(st, ref=ref))
        return sorted(out, key=lambda s: s.ref)

    def backend_statuses(self) -> Iterator[Status]:
        """Every ingest of the root, each with its backend ref (``<ns>\\0<ref>`` outside
        ``default``): what gc looks at."""
        try:
            names = os.listdir(self.layout.ingest)
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            if name.startswith("."):  # being created or removed (see _aside_name)
                continue
            st = self._read_status(os.path.join(self.layout.ingest, name), None)
            if st is not None:
                yield st

    def abort(self, ref: str) -> None:
        """Remove an active ingest. NotFound if there is none. Does not wait for writers.

        The directory is first renamed aside, so a concurrent commit of the same ingest
        either moved its data out before (the abort is NotFound) or fails NotFound
        itself; never both succeed. A directory for ``ref`` whose ``ref`` file is
        missing or empty (a creation or removal cut short) is removed too."""
        _check_ref(ref)
        bref = self._bref(ref)
        path = self.layout.ingest_dir(bref)
        if not (is_dir(self.layout.ingest) and is_dir(path)):
            raise NotFound(f"ingest {ref}")
        try:
            stored = read_small(os.path.join(path, "ref")).decode("utf-8", "surrogateescape")
        except (FileNotFoundError, NotADirectoryError):
            stored = ""
        except OSError as exc:
            log.warning("ingest %s unreadable: %s", path, exc)
            raise NotFound(f"ingest {ref}") from None
        if stored and stored != bref:
            raise NotFound(f"ingest {ref}")
        aside = self._aside_name(self.layout.ref_key(bref), ".gone")
        try:
            os.rename(path, aside)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"ingest {ref}") from None
        try:
            had_data = stat.S_ISREG(os.lstat(os.path.join(aside, "data")).st_mode)
        except OSError:
            had_data = False
        shutil.rmtree(aside, ignore_errors=True)
        self._hashes.drop(bref)
        if not had_data:  # committed (or never complete) before we moved it
            raise NotFound(f"ingest {ref}")
        self.db.delete_ingest(bref)
        if self.ns is not None:
            self.meta.drop_lease_ingest(self.ns, ref)

    def _aside_name(self, key: str, kind: str) -> str:
        """A hidden name under ingest/ for a directory being created or removed: never
        listed as an ingest; left over by a crash, it is removed at the next open."""
        return os.path.join(self.layout.ingest, f"{kind}-{key}-{os.getpid()}-{time.time_ns()}")

    def _sweep_ingest_root(self) -> None:
        """Remove directories that creations and aborts cut short by a crash left under
        hidden names (a creation's only after a minute: it may be under way)."""
        try:
            names = os.listdir(self.layout.ingest)
        except OSError:
            return
        now = time.time()
        for name in names:
            if not name.startswith((".gone-", ".new-")):
                continue
            path = os.path.join(self.layout.ingest, name)
            try:
                if name.startswith(".new-") and now - os.lstat(path).st_mtime < 60:
                    continue
            except OSError:
                continue
            log.info("removing %s (left by an interrupted ingest creation or abort)", path)
            shutil.rmtree(path, ignore_errors=True)

    # Ingester -------------------------------------------------------------------------

    def writer(
        self,
        ref: str,
        *,
        total: int = 0,
        expected: str | None = None,
        create: bool = True,
        wait: float = DEFAULT_WAIT,
    ) -> LocalWriter:
        """Open the writer for ``ref``: a fresh ingest, or resume an existing one.

        ``create=False`` only resumes: NotFound when there is no ingest for ``ref`` (or
        none that can be resumed), never a fresh one (a commit or truncate of an ingest
        that was aborted must not bring it back empty).

        Raises InvalidArgument (empty ref, bad digest), AlreadyExists (``expected`` is
        already committed), Unavailable (another writer, in any process, still holds
        ``ref`` after ``wait`` seconds, about 1 s by default as containerd 1.6; ``wait=0``
        fails at once). A resumed writer starts at the ingest's offset with the digest of
        the bytes so far. An ingest that cannot be resumed (corrupt metadata, a
        different total) is restarted empty. The caller must ``close()`` or ``commit()``.
        """
        _check_ref(ref)
        bref = self._bref(ref)
        if not is_text(ref) and not is_dir(self.layout.ingest_dir(bref)):
            _check_new_ref(ref)  # only an existing (legacy) ingest may have such a ref
        exp = parse_digest(expected) if expected else None
        if total < 0:
            raise InvalidArgument(f"ingest {ref}: negative total {total}")
        lease = self.lease if self.ns is not None else None
        if lease is not None and self.meta.get_lease(self._key, lease) is None:
            raise NotFound(f"lease {lease}: lease does not exist")
        if exp is not None and blob_exists(self.layout, exp) and self.visible(exp):
            if lease is not None:
                self.meta.add_lease_resource(self._key, lease, "content", exp)
            raise AlreadyExists(f"content {exp}")
        self._ensure_private()
        ensure_dir(self.layout.ingest, 0o755)
        lock = take_lock(self.layout.lock_path(bref), ref, wait)
        try:
            algorithm = split_digest(exp)[0] if exp else CANONICAL
            path = self.layout.ingest_dir(bref)
            state = self._resume(path, bref, total, algorithm)
            if state is None:
                if not create:
                    raise NotFound(f"ingest {ref}")
                state = self._fresh(path, bref, total, algorithm)
            if lease is not None and is_text(ref):  # a legacy ref cannot be recorded
                self.meta.add_lease_resource(self._key, lease, "ingests", ref)
            writer = LocalWriter(self.layout, self.db, self._hashes, ref, lock, state, exp,
                                 bref=bref, visible=self.visible, lease=lease)
            if exp is not None and state.offset == 0 and self.ns is not None:
                self._try_share(writer, bref, exp, total)
            return writer
        except BaseException:
            lock.release()
            raise

    def open_writer(
        self, ref: str, *, total: int = 0, expected: str | None = None,
        create: bool = True, wait: float = 0.0,
    ) -> LocalWriter:
        """:meth:`writer` (the :class:`store.api.WriterOpener` capability)."""
        return self.writer(ref, total=total, expected=expected, create=create, wait=wait)

    def _try_share(self, writer: LocalWriter, bref: str, exp: Digest, total: int) -> None:
        """The ``shared`` policy (reference §5.3): ``exp`` is in the store but not in
        this namespace, so the writer starts complete, and a commit without new bytes
        only records the blob here. The expected digest is recorded (a gc root) under
        the digest's commit lock, so a gc either sees it or has already removed the
        file (then the writer stays an ordinary empty one)."""
        with hold_lock(self.layout.commit_lock_path(exp)):
            hint, labels = self.meta.get_ingest(bref)
            try:
                st = os.lstat(self.layout.blob_path(exp))
            except OSError:
                return
            if stat.S_ISREG(st.st_mode) and (total <= 0 or total == st.st_size):
                self.meta.put_ingest(bref, exp, labels)
                writer.share(exp, st.st_size, hint)

    def _resume(self, path: str, ref: str, total: int, algorithm: str) -> IngestState | None:
        try:
            if os.path.islink(path):
                os.unlink(path)
                return None
            if not os.path.isdir(path):
                return None
            stored_ref = read_small(os.path.join(path, "ref")).decode("utf-8", "surrogateescape")
            if stored_ref != ref:
                raise ValueError(f"ref file holds {stored_ref!r}")
            started = parse_time_file(os.path.join(path, "startedat"))
            updated = parse_time_file(os.path.join(path, "updatedat"))
            stored_total = read_total(os.path.join(path, "total"))
            if total and stored_total and total != stored_total:
                raise ValueError(f"provided total {total} differs from status {stored_total}")
            fd = os.open(
                os.path.join(path, "data"),
                os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            )
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # e.g. a FIFO planted as data
                os.close(fd)
                raise ValueError("data is not a regular file")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.info("ingest %s: failed to resume (%s); restarting it empty", ref, exc)
            return None
        try:
            st = os.fstat(fd)
            hasher = self._hashes.take(ref, st, algorithm)
            if hasher is None:
                hasher = hashlib.new(algorithm)
                offset = 0
                while chunk := os.pread(fd, _CHUNK, offset):
                    hasher.update(chunk)
                    offset += len(chunk)
            if stored_total == 0 and total > 0:
                write_atomic(os.path.join(path, "total"), str(total).encode(), sync=False)
            return IngestState(
                fd, hasher, st.st_size, total or stored_total, started,
                max(updated, st.st_mtime_ns),
            )
        except BaseException:
            os.close(fd)
            raise

    def _fresh(self, path: str, ref: str, total: int, algorithm: str) -> IngestState:
        """Create the ingest complete under a hidden name, then rename it into place,
        so no process ever sees an ingest directory without its ``ref`` file."""
        if not is_dir(path):
            _check_new_ref(ref)  # (a legacy ingest that cannot resume restarts in place)
        key = self.layout.ref_key(ref)
        tmp = self._aside_name(key, ".new")
        os.mkdir(tmp, 0o755)
        try:
            now = time.time_ns()
            ref_bytes = ref.encode("utf-8", "surrogateescape")
            write_atomic(os.path.join(tmp, "ref"), ref_bytes, sync=False)
            write_atomic(os.path.join(tmp, "startedat"), format_time(now).encode(), sync=False)
            write_atomic(os.path.join(tmp, "updatedat"), format_time(now).encode(), sync=False)
            if total > 0:
                write_atomic(os.path.join(tmp, "total"), str(total).encode(), sync=False)
            fd = os.open(
                os.path.join(tmp, "data"),
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
            try:
                if os.path.lexists(path):  # an ingest that cannot be resumed: replace it
                    old = self._aside_name(key, ".gone")
                    os.rename(path, old)
                    shutil.rmtree(old, ignore_errors=True)
                os.rename(tmp, path)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._hashes.drop(ref)
        self.db.delete_ingest(ref)  # hints of an earlier ingest of this ref do not carry over
        return IngestState(fd, hashlib.new(algorithm), 0, total, now, now)

    # Extensions beyond containerd ----------------------------------------------------

    def ingest_hints(self, ref: str) -> tuple[Digest | None, dict[str, str]]:
        """The expected digest and labels recorded for an ingest, applied at commit."""
        expected, labels = self.db.get_ingest(self._bref(ref))
        return (Digest(expected) if expected else None), labels

    def set_ingest_hints(
        self,
        ref: str,
        *,
        expected: str | None = None,
        labels: Mapping[str, str] | None = None,
        total: int | None = None,
        clear_expected: bool = False,
    ) -> None:
        """Record hints for an active ingest (NotFound if none): an expected digest,
        labels for the blob (replacing earlier ones) and/or the expected total size."""
        _check_ref(ref)
        bref = self._bref(ref)
        path = self.layout.ingest_dir(bref)
        if self._read_status(path, bref) is None:
            raise NotFound(f"ingest {ref}")
        if expected is not None or labels is not None:
            _check_new_ref(ref)  # hints live in the metadata database: UTF-8 only
        new_expected, new_labels = updated_hints(
            *self.db.get_ingest(bref), expected=expected, labels=labels,
            clear_expected=clear_expected)
        if expected is not None or labels is not None or clear_expected:
            self.db.put_ingest(bref, new_expected, new_labels)
        if total is not None:
            if total < 0:
                raise InvalidArgument(f"ingest {ref}: negative total {total}")
            write_total(os.path.join(path, "total"), total)

    def rename_ingest(self, old: str, new: str) -> None:
        """Give ingest ``old`` the ref ``new``, replacing an ingest already named ``new``.

        Unavailable if either ref is held by a writer; NotFound if ``old`` is not active.
        """
        _check_ref(old)
        _check_ref(new)
        _check_new_ref(new)
        if old == new:
            self.status(old)
            return
        self._ensure_private()
        bold, bnew = self._bref(old), self._bref(new)
        lock_old = try_lock(self.layout.lock_path(bold), old)
        try:
            lock_new = try_lock(self.layout.lock_path(bnew), new)
            try:
                src = self.layout.ingest_dir(bold)
                if self._read_status(src, bold) is None:
                    raise NotFound(f"ingest {old}")
                dst = self.layout.ingest_dir(bnew)
                if os.path.lexists(dst):
                    shutil.rmtree(dst, ignore_errors=True)
                    self.db.delete_ingest(bnew)
                write_atomic(os.path.join(src, "ref"), bnew.encode("utf-8", "surrogateescape"))
                os.rename(src, dst)
                self.db.rename_ingest(bold, bnew)
                if self.ns is not None:
                    self.meta.move_lease_ingest(self.ns, old, new)
                self._hashes.rename(bold, bnew)
            finally:
                lock_new.release()
        finally:
            lock_old.release()

    def ingest_data_path(self, ref: str) -> str:
        """Path of an ingest's data file (for read-only access by adapters)."""
        return os.path.join(self.layout.ingest_dir(self._bref(ref)), "data")

    def ingest_reader_at(self, ref: str) -> FileReaderAt:
        """A reader of the bytes written so far to ingest ``ref`` (it sees later
        appends). NotFound if there is no such ingest."""
        _check_ref(ref)
        try:
            fd = os.open(self.ingest_data_path(ref),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"ingest {ref}") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                raise NotFound(f"ingest {ref} (not a regular file)") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotFound(f"ingest {ref} (not a regular file)")
        return FileReaderAt(fd, st.st_size)

    # LeaseManager (containerd's leases.Manager) and gc ------------------------------

    def _lease_ns(self) -> str:
        if self.ns is None:
            raise FailedPrecondition("namespace is required")
        return self.ns

    def create_lease(
        self, lease_id: str | None = None, labels: Mapping[str, str] | None = None
    ) -> Lease:
        """Create a lease in this namespace (an id as containerd's clients make one when
        none is given). AlreadyExists if the id is taken. Any non-empty id is accepted:
        containerd 1.6 does not validate lease ids (verified: ``ctr leases create --id
        'bad id!'`` succeeds)."""
        ns = self._lease_ns()
        lease_id = lease_id or _new_lease_id()
        labels = dict(labels or {})
        validate_labels(labels)
        now = time.time_ns()
        if not self.meta.create_lease(ns, lease_id, now, labels):
            raise AlreadyExists(f"lease {lease_id!r}")
        return Lease(lease_id, from_ns(now), labels)

    def leases(self, *filters: str) -> builtins.list[Lease]:
        """This namespace's leases matching any filter (fields ``id``, ``labels.<k>``)."""
        ns = self._lease_ns()
        flt = parse_filters(*filters)
        out = []
        for lease_id, created, labels in self.meta.list_leases(ns):
            lease = Lease(lease_id, from_ns(created), labels)
            if flt.match(_lease_adaptor(lease)):
                out.append(lease)
        return out

    def delete_lease(self, lease_id: str, *, sync: bool = False) -> GcResult | None:
        """Delete a lease (NotFound if absent): what it held is no longer a root. ``sync``
        runs a gc before returning (containerd's synchronous delete) and returns it."""
        ns = self._lease_ns()
        if not self.meta.delete_lease(ns, lease_id):
            raise NotFound(f"lease {lease_id!r}")
        return self.gc() if sync else None

    def lease_resources(self, lease_id: str) -> builtins.list[tuple[str, str]]:
        """(type, id) of what a lease holds: ``content`` digests, ``ingests`` refs."""
        ns = self._lease_ns()
        if self.meta.get_lease(ns, lease_id) is None:
            raise NotFound(f"lease {lease_id!r}")
        return self.meta.lease_resources(ns, lease_id)

    def add_lease_resource(self, lease_id: str, rtype: str, rid: str) -> None:
        """Hold a resource by a lease. InvalidArgument for an unknown type or a bad id."""
        ns = self._lease_ns()
        _check_resource(rtype, rid)
        if not self.meta.add_lease_resource(ns, lease_id, rtype, rid):
            raise NotFound(f"lease {lease_id!r}")

    def delete_lease_resource(self, lease_id: str, rtype: str, rid: str) -> None:
        ns = self._lease_ns()
        _check_resource(rtype, rid)
        if not self.meta.delete_lease_resource(ns, lease_id, rtype, rid):
            raise NotFound(f"lease {lease_id!r}")

    def gc(self, *, dry_run: bool = False) -> GcResult:
        """Collect garbage over the whole root, every namespace (:mod:`store.gc`)."""
        return collect(self, dry_run=dry_run)

    # ChangeFeed ----------------------------------------------------------------------

    def updated_since(self, since_ns: int) -> builtins.list[tuple[Digest, int, int]]:
        """``(digest, created_ns, updated_ns)`` of blobs whose UpdatedAt is after
        ``since_ns``: a scan of the metadata (call it from a worker thread)."""
        return [(Digest(d), c, u) for d, c, u in self.db.blobs_updated_since(since_ns)]

    def open_changes(self) -> Changes:
        """Watch this root with inotify: blobs added or removed in ``blobs/<alg>/`` and
        changes to the metadata database (labels). OSError if inotify is unavailable."""
        return InotifyChanges(self.layout)


def _new_lease_id() -> str:
    """As containerd's clients: ``<unix nanoseconds>-<4 base64url characters>``."""
    return f"{time.time_ns()}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def _check_resource(rtype: str, rid: str) -> None:
    if rtype == "content":
        parse_digest(rid)
    elif rtype == "ingests" or rtype.startswith("snapshots/"):
        if not rid:
            raise InvalidArgument(f"resource {rtype}: empty id")
    else:
        raise InvalidArgument(f"unsupported resource type {rtype!r}")


def _adaptor(field: str, value: str, labels: Mapping[str, str]
             ) -> Callable[[Sequence[str]], tuple[str, bool]]:
    """A filter adaptor: ``field`` is ``value`` (as containerd, only the first element
    counts: ``digest.x`` is ``digest``), ``labels.<key>`` is that label."""
    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        if fieldpath[0] == field:
            return value, True
        if fieldpath[0] == "labels" and len(fieldpath) > 1:
            key = ".".join(fieldpath[1:])
            if key in labels:
                return labels[key], True
        return "", False

    return adapt


def _lease_adaptor(lease: Lease) -> Callable[[Sequence[str]], tuple[str, bool]]:
    return _adaptor("id", lease.id, lease.labels)


def _info_adaptor(info: Info) -> Callable[[Sequence[str]], tuple[str, bool]]:
    return _adaptor("digest", info.digest, info.labels)


def _ref_adaptor(ref: str) -> Callable[[Sequence[str]], tuple[str, bool]]:
    return _adaptor("ref", ref, {})


if TYPE_CHECKING:  # mypy checks that LocalStore has the interface and its capabilities

    def _conforms(s: LocalStore, w: LocalWriter) -> None:
        from . import api

        store: api.Store = s
        caps: tuple[api.InfoIterator, api.IngestReader, api.IngestHints, api.IngestRenamer,
                    api.ChangeFeed, api.BlobNames, api.BlobFiles, api.Namespaced,
                    api.LeaseManager, api.WriterOpener, api.BlobVisibility] = (
                        s, s, s, s, s, s, s, s, s, s, s)
        writer: tuple[api.Writer, api.SyncWriter, api.TotalWriter, api.IdleCloser] = (
            w, w, w, w)
        del store, caps, writer
