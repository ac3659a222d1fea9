"""A conformance suite for anything with the store API: containerd's content test suite
(``content/testsuite/testsuite.go``, reference §10) plus the local-store tests worth porting
(``content/local/store_test.go``), written anew in Python.

Every case is a function taking a :class:`Target`: a :class:`store.api.Store` (the
interface every implementation has; ``Target`` checks it) for a fresh, empty store, plus
what the suite may ask of it. Cases are registered in :data:`CASES` with the capabilities
they need.

Capabilities (:data:`ALL_CAPS`):

``labels``    commit labels and ``update`` (Writer, UpdateStatus, Labels need them);
``truncate``  ``writer.truncate(0)`` restarts an ingest;
``filters``   ``walk``/``list_statuses`` take containerd filter strings beyond ``""``;
``layout``    ``Target.root`` is the backing directory in containerd's layout, so cases may
              look at ``blobs/`` and ``ingest/`` on disk.

Adding a store factory (a FUSE mount, a gRPC client): write a pytest fixture that yields a
``Target`` for a fresh empty store and stops whatever it started, make it visible to
``tests/test_store_suite.py`` (define it in ``tests/conftest.py`` or import it into that
module), and add one line to ``STORE_FACTORIES`` there::

    STORE_FACTORIES["fuse"] = Factory("fuse_target", caps=ALL_CAPS - {"layout"})

Every registered case whose ``requires`` is within ``caps`` then runs against it. Cases the
adapter cannot express are not skipped silently: ``test_store_suite.py`` lists them per
factory in one test (``test_unsupported_cases_are_declared``) that fails unless the factory
names them in ``Factory.unsupported``, with a reason. (The mount and the gRPC client run
every case from their own modules, ``test_fuse_suite.py`` and ``test_grpc_suite.py``.)

Cases: containerd's ContentSuite (Writer, UpdateStatus, CommitExists, Resume,
ResumeTruncate, ResumeDiscard, ResumeCopy, ResumeCopySeeker, ResumeCopyReaderAt, SmallBlob,
Labels, CommitErrorState), its local-store tests (ContentWriter, ContentWriterLayout,
WalkBlobs, WriterTruncateRecoversFromIncompleteWrite, WriteReadEmptyFileTimestamp), and
edges every adapter must map alike (Filters, Errors, AbortAndRestart, LabelLimit,
UpdateFieldpaths).

Times are checked inside windows as containerd does: a time must lie in ``[before, after]``
taken around the operation, widened by ``Target.slack`` (1 ms by default: the store keeps
microseconds, and an adapter may keep less).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import os
import random
import stat
from collections.abc import Callable, Mapping
from typing import Any

from store import (
    AlreadyExists,
    Digest,
    FailedPrecondition,
    Info,
    InvalidArgument,
    NotFound,
    StoreError,
    Unavailable,
    digest_of,
)
from store.api import Store, Writer
from store.types import EPOCH

__all__ = [
    "ALL_CAPS",
    "CASES",
    "EMPTY_DIGEST",
    "Case",
    "Target",
    "copy_into",
    "write_blob",
]

UTC = dt.UTC
ALL_CAPS = frozenset({"labels", "truncate", "filters", "layout"})
EMPTY_DIGEST = digest_of(b"")


@dataclasses.dataclass
class Target:
    """What a case runs against: a fresh empty store and what it can do."""

    store: Store
    caps: frozenset[str] = ALL_CAPS
    root: str | None = None
    slack: dt.timedelta = dt.timedelta(milliseconds=1)

    def __post_init__(self) -> None:
        if not isinstance(self.store, Store):  # every case runs through the interface
            raise TypeError(f"{type(self.store).__name__} lacks the store.api.Store methods")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[[Target], None]
    requires: frozenset[str]

    def __call__(self, target: Target) -> None:
        missing = self.requires - target.caps
        if missing:
            raise AssertionError(f"case {self.name} needs {sorted(missing)}")
        self.fn(target)


#: Every case, by name (containerd's test name where it ports one).
CASES: dict[str, Case] = {}


CaseFn = Callable[[Target], None]


def case(name: str, *requires: str) -> Callable[[CaseFn], CaseFn]:
    def register(fn: CaseFn) -> CaseFn:
        assert name not in CASES, name
        assert set(requires) <= ALL_CAPS, requires
        CASES[name] = Case(name, fn, frozenset(requires))
        return fn

    return register


# helpers ------------------------------------------------------------------------------


def now() -> dt.datetime:
    return dt.datetime.now(UTC)


def content(size: int) -> tuple[bytes, Digest]:
    """Random bytes and their digest (containerd's createContent)."""
    data = os.urandom(size)
    return data, digest_of(data)


def expect_error(
    kind: type[StoreError], fn: Callable[..., object], *args: Any, **kw: Any
) -> StoreError:
    """Call ``fn`` and return the error it raises, which must be a ``kind``."""
    try:
        result = fn(*args, **kw)
    except kind as exc:
        return exc
    except StoreError as exc:
        raise AssertionError(f"{fn.__name__}: want {kind.__name__}, got {exc!r}") from exc
    if hasattr(result, "close"):
        result.close()
    raise AssertionError(f"{fn.__name__}: want {kind.__name__}, got success ({result!r})")


def check_window(what: str, when: dt.datetime, lo: dt.datetime, hi: dt.datetime,
                 slack: dt.timedelta) -> None:
    assert when.tzinfo is not None, f"{what}: naive datetime {when!r}"
    if not lo - slack <= when <= hi + slack:
        raise AssertionError(
            f"{what} {when.isoformat()} outside [{lo.isoformat()}, {hi.isoformat()}]"
        )


def check_info(
    t: Target,
    dgst: str,
    size: int,
    labels: Mapping[str, str] | None,
    created: tuple[dt.datetime, dt.datetime],
    updated: tuple[dt.datetime, dt.datetime],
    info: Info | None = None,
) -> None:
    """containerd's checkInfo: digest, size, exact labels, both times in their windows."""
    info = info if info is not None else t.store.info(dgst)
    assert info.digest == dgst, (info.digest, dgst)
    assert info.size == size, (info.size, size)
    assert dict(info.labels) == dict(labels or {}), (dict(info.labels), labels)
    check_window("created_at", info.created_at, *created, t.slack)
    check_window("updated_at", info.updated_at, *updated, t.slack)


def check_status(
    t: Target,
    w: Writer,
    ref: str,
    offset: int,
    total: int,
    dgst: str,
    started: tuple[dt.datetime, dt.datetime],
    updated: tuple[dt.datetime, dt.datetime],
) -> None:
    """containerd's checkStatus: the writer's digest, ref, offset, total and times.
    Expected is not compared (the local store never fills it in)."""
    assert w.digest() == dgst, (w.digest(), dgst)
    st = w.status()
    assert (st.ref, st.offset, st.total) == (ref, offset, total), st
    check_window("started_at", st.started_at, *started, t.slack)
    check_window("updated_at", st.updated_at, *updated, t.slack)


def check_locked(t: Target, ref: str) -> None:
    """A second writer on a held ref fails with Unavailable (after the store's wait of
    about a second, as containerd 1.6; it does not block beyond it)."""
    expect_error(Unavailable, t.store.writer, ref)


def write_blob(store: Store, ref: str, data: bytes, *, size: int = 0,
               expected: str | None = None, labels: Mapping[str, str] | None = None) -> None:
    """containerd's content.WriteBlob: content that already exists is success."""
    try:
        w = store.writer(ref, total=size, expected=expected)
    except AlreadyExists:
        return
    copy_into(w, io.BytesIO(data), size, expected, labels)


class _PlainReader:
    """A source that can only read: resuming must read and discard."""

    def __init__(self, data: bytes) -> None:
        self._r = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._r.read(n)


class _ReaderAt:
    """A source that can only read at positions."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read_at(self, n: int, offset: int) -> bytes:
        return self._data[offset : offset + n]


def copy_into(w: Writer, source: Any, size: int, expected: str | None,
              labels: Mapping[str, str] | None = None) -> None:
    """containerd's content.Copy: continue at the writer's offset, positioning ``source``
    by ``read_at``, ``seek`` or reading and discarding (in that order of preference), then
    commit. AlreadyExists at commit counts as success."""
    offset = w.status().offset
    buf = 32 << 10
    try:
        if hasattr(source, "read_at"):
            pos = offset
            while chunk := source.read_at(buf, pos):
                w.write(chunk)
                pos += len(chunk)
        else:
            if offset:
                if hasattr(source, "seek"):
                    source.seek(offset, io.SEEK_SET)
                else:
                    left = offset
                    while left:
                        skipped = source.read(min(left, buf))
                        assert skipped, f"source ended {left} bytes before the resume offset"
                        left -= len(skipped)
            while chunk := source.read(buf):
                w.write(chunk)
    except BaseException:
        w.close()
        raise
    try:
        w.commit(size, expected, labels=labels)
    except AlreadyExists:
        pass


def walk_all(store: Store, *filters: str) -> list[Info]:
    out: list[Info] = []
    store.walk(out.append, *filters)
    return out


# ContentSuite -------------------------------------------------------------------------


@case("Writer", "labels")
def writer_hints(t: Target) -> None:
    """Four writers open at once with each combination of hints; 32-byte copies; commit
    with size 0, no digest and a gc.root label."""
    s = t.store
    labels = {"containerd.io/gc.root": now().strftime("%Y-%m-%dT%H:%M:%SZ")}
    c1, d1 = content(256)
    w1 = s.writer("c1")
    c2, d2 = content(256)
    w2 = s.writer("c2", total=len(c2))
    c3, d3 = content(256)
    w3 = s.writer("c3", expected=d3)
    c4, d4 = content(256)
    w4 = s.writer("c4", total=len(c4), expected=d4)
    for data, dgst, w in ((c1, d1, w1), (c2, d2, w2), (c3, d3, w3), (c4, d4, w4)):
        for i in range(0, len(data), 32):
            assert w.write(data[i : i + 32]) == 32
        before = now()
        w.commit(0, None, labels=labels)
        after = now()
        assert w.digest() == dgst, (w.digest(), dgst)
        check_info(t, dgst, len(data), labels, (before, after), (before, after))


@case("UpdateStatus", "labels")
def update_status(t: Target) -> None:
    """Status follows each write: offset, running digest, UpdatedAt in the write's window."""
    s = t.store
    c1, d1 = content(256)
    pre_start = now()
    w = s.writer("c1", total=256, expected=d1)
    post_start = now()
    start = (pre_start, post_start)
    check_status(t, w, "c1", 0, 256, EMPTY_DIGEST, start, start)
    offset = 0
    for n in (64, 128, 64):
        pre = now()
        assert w.write(c1[offset : offset + n]) == n
        post = now()
        offset += n
        check_status(t, w, "c1", offset, 256, digest_of(c1[:offset]), start, (pre, post))
        st = s.status("c1")
        assert (st.ref, st.offset, st.total) == ("c1", offset, 256), st
    labels = {"k1": "v1", "k2": "v2", "containerd.io/gc.root": now().isoformat()}
    before = now()
    w.commit(0, None, labels=labels)
    after = now()
    check_info(t, d1, 256, labels, (before, after), (before, after))
    expect_error(NotFound, s.status, "c1")


@case("CommitExists")
def commit_exists(t: Target) -> None:
    """Committing bytes that are already stored gives AlreadyExists, with or without the
    expected digest, and leaves no ingest behind."""
    s = t.store
    c1, d1 = content(256)
    write_blob(s, "c1", c1, expected=d1)
    for i, expected in enumerate((d1, None)):
        ref = f"c1-commitexists-{i}"
        w = s.writer(ref)
        assert w.write(c1) == len(c1)
        expect_error(AlreadyExists, w.commit, len(c1), expected)
        expect_error(NotFound, s.status, ref)
    assert [i.digest for i in walk_all(s)] == [d1]


@case("Resume")
def resume(t: Target) -> None:
    """Close after half; reopening gives the same status; finish and commit."""
    s = t.store
    c1, d1 = content(256)
    pre_start = now()
    w1 = s.writer("c1", total=256, expected=d1)
    post_start = now()
    start = (pre_start, post_start)
    check_status(t, w1, "c1", 0, 256, EMPTY_DIGEST, start, start)
    pre = now()
    assert w1.write(c1[:128]) == 128
    post = now()
    half = digest_of(c1[:128])
    check_status(t, w1, "c1", 128, 256, half, start, (pre, post))
    w1.close()
    w2 = s.writer("c1", total=256, expected=d1)
    check_status(t, w2, "c1", 128, 256, half, start, (pre, post))
    pre = now()
    assert w2.write(c1[128:]) == 128
    post = now()
    check_status(t, w2, "c1", 256, 256, d1, start, (pre, post))
    before = now()
    w2.commit(0, None)
    after = now()
    w2.close()  # close after commit is harmless
    w1.close()  # so is a second close
    check_info(t, d1, 256, {}, (before, after), (before, after))


_RESUME_SIZES = (500, 5000, 50000)
_RESUME_FRACTIONS = (0.0, 0.1, 0.5, 0.9, 1.0)


def _resume_matrix(t: Target, finish: Callable[[Writer, bytes, int, int, str], None]) -> None:
    """containerd's checkResume: write a prefix, close, reopen with size and digest, check
    the offset, let ``finish`` complete and commit, then check Info."""
    s = t.store
    for i, size in enumerate(_RESUME_SIZES):
        for j, fraction in enumerate(_RESUME_FRACTIONS):
            data, dgst = content(size)
            limit = int(size * fraction)
            ref = f"ref-{i}-{j}"
            w = s.writer(ref, total=size, expected=dgst)
            assert w.write(data[:limit]) == limit
            w.close()
            w = s.writer(ref, total=size, expected=dgst)
            assert w.status().offset == limit, (ref, w.status(), limit)
            assert w.digest() == digest_of(data[:limit]), ref
            before = now()
            finish(w, data, limit, size, dgst)
            after = now()
            check_info(t, dgst, size, {}, (before, after), (before, after))
            expect_error(NotFound, s.status, ref)


@case("ResumeTruncate", "truncate")
def resume_truncate(t: Target) -> None:
    def finish(w: Writer, data: bytes, limit: int, size: int, dgst: str) -> None:
        w.truncate(0)
        assert w.status().offset == 0
        assert w.digest() == EMPTY_DIGEST
        assert w.write(data) == size
        w.commit(size, dgst)

    _resume_matrix(t, finish)


@case("ResumeDiscard")
def resume_discard(t: Target) -> None:
    def finish(w: Writer, data: bytes, limit: int, size: int, dgst: str) -> None:
        assert w.write(data[limit:]) == size - limit
        w.commit(size, dgst)

    _resume_matrix(t, finish)


@case("ResumeCopy")
def resume_copy(t: Target) -> None:
    _resume_matrix(t, lambda w, data, limit, size, dgst: copy_into(
        w, _PlainReader(data), size, dgst))


@case("ResumeCopySeeker")
def resume_copy_seeker(t: Target) -> None:
    _resume_matrix(t, lambda w, data, limit, size, dgst: copy_into(
        w, io.BytesIO(data), size, dgst))


@case("ResumeCopyReaderAt")
def resume_copy_reader_at(t: Target) -> None:
    _resume_matrix(t, lambda w, data, limit, size, dgst: copy_into(
        w, _ReaderAt(data), size, dgst))


@case("SmallBlob")
def small_blob(t: Target) -> None:
    """A read of 7 bytes from the 6-byte blob returns the 6 bytes; at the end, nothing."""
    s = t.store
    blob = b"foobar"
    dgst = digest_of(blob)
    w = s.writer("SmallBlob", total=len(blob), expected=dgst)
    assert w.write(blob) == len(blob)
    w.commit(len(blob), dgst)
    w.close()
    r = s.reader_at(dgst)
    try:
        assert r.size == len(blob)
        assert r.read_at(len(blob) + 1, 0) == blob
        assert r.read_at(4, 3) == b"bar"
        assert r.read_at(1, len(blob)) == b""
    finally:
        r.close()


@case("Labels", "labels")
def labels(t: Target) -> None:
    """Commit labels; Update with no fieldpaths replaces all; ``labels.<k>`` paths set or
    remove single keys and leave the rest alone."""
    s = t.store
    c1, d1 = content(256)
    w = s.writer("c1", total=256, expected=d1)
    assert w.write(c1) == 256
    root_time = now().strftime("%Y-%m-%dT%H:%M:%SZ")
    lbls = {"k1": "v1", "k2": "v2", "containerd.io/gc.root": root_time}
    pre_commit = now()
    w.commit(0, None, labels=lbls)
    post_commit = now()
    committed = (pre_commit, post_commit)
    check_info(t, d1, 256, lbls, committed, committed)

    lbls = {"k1": "newvalue", "k3": "v3", "containerd.io/gc.root": root_time}
    pre = now()
    returned = s.update(Info(d1, 256, EPOCH, EPOCH, lbls))
    post = now()
    check_info(t, d1, 256, lbls, committed, (pre, post), info=returned)
    check_info(t, d1, 256, lbls, committed, (pre, post))

    sent = {"k1": "v1", "containerd.io/gc.root": root_time}
    pre = now()
    returned = s.update(Info(d1, 256, EPOCH, EPOCH, sent), "labels.k3", "labels.k1")
    post = now()
    want = {"k1": "v1", "containerd.io/gc.root": root_time}
    check_info(t, d1, 256, want, committed, (pre, post), info=returned)
    check_info(t, d1, 256, want, committed, (pre, post))

    # stronger than the Go suite: labels outside the paths are neither set nor removed
    sent = {"k2": "v2", "k4": "not-in-paths"}
    returned = s.update(Info(d1, 256, EPOCH, EPOCH, sent), "labels.k2", "labels.k1")
    want = {"k2": "v2", "containerd.io/gc.root": root_time}
    assert dict(returned.labels) == want, returned.labels
    assert dict(s.info(d1).labels) == want


@case("CommitErrorState")
def commit_error_state(t: Target) -> None:
    """containerd's error-state sequence on one ref (reference §10)."""
    s = t.store
    c1, d1 = content(256)
    _, d2 = content(256)
    write_blob(s, "c1", c1, expected=d1)
    ref = "c1-commiterror-state"

    # 1. a second writer is refused at once; commit of existing content: AlreadyExists
    w = s.writer(ref)
    assert w.write(c1) == 256
    check_locked(t, ref)
    expect_error(AlreadyExists, w.commit, len(c1), d1)

    # 2. the failed commit released the lock and removed the ingest
    w = s.writer(ref)
    check_locked(t, ref)
    assert w.status().offset == 0, w.status()
    assert w.write(c1) == 256
    expect_error(AlreadyExists, w.commit, len(c1), None)

    # 3. wrong digest: FailedPrecondition, data kept
    w = s.writer(ref)
    check_locked(t, ref)
    more = c1 + b"more"
    assert w.write(more) == len(more)
    expect_error(FailedPrecondition, w.commit, len(more), d2)

    # 4. resumes with the data; wrong size: FailedPrecondition
    w = s.writer(ref)
    check_locked(t, ref)
    assert w.status().offset == len(more), w.status()
    assert w.digest() == digest_of(more)
    expect_error(FailedPrecondition, w.commit, len(c1), None)

    # 5. right size, no digest: succeeds
    w = s.writer(ref)
    check_locked(t, ref)
    w.commit(len(more), None)
    assert t.store.info(digest_of(more)).size == len(more)

    # 6. a fresh ingest of existing content: AlreadyExists
    w = s.writer(ref)
    check_locked(t, ref)
    assert w.status().offset == 0, w.status()
    assert w.write(c1) == 256
    expect_error(AlreadyExists, w.commit, len(c1), d1)

    # 7-8. close keeps the ingest and frees the ref
    w = s.writer(ref)
    check_locked(t, ref)
    w.close()
    w = s.writer(ref)
    w.close()


# local-store tests (content/local/store_test.go) ---------------------------------------


@case("ContentWriter")
def content_writer(t: Target) -> None:
    """TestContentWriter through the API: a held ref refuses a second writer, the ingest is
    listed at offset 0, a 4 MiB blob commits, identical bytes under another ref give
    AlreadyExists, and the blob reads back."""
    s = t.store
    w = s.writer("myref")
    w.close()
    w = s.writer("myref")
    check_locked(t, "myref")
    got = [(st.ref, st.offset, st.total) for st in s.list_statuses("")]
    assert got == [("myref", 0, 0)], got
    assert [(st.ref, st.offset) for st in s.list_statuses()] == [("myref", 0)]
    data, dgst = content(4 << 20)
    for i in range(0, len(data), 1 << 20):
        w.write(data[i : i + (1 << 20)])
    w.commit(len(data), dgst)
    w.close()
    assert s.list_statuses("") == []
    w = s.writer("aref")
    w.write(data)
    expect_error(AlreadyExists, w.commit, len(data), dgst)
    r = s.reader_at(dgst)
    try:
        assert r.size == len(data)
        got_data = b"".join(r.read_at(1 << 20, off) for off in range(0, len(data), 1 << 20))
        assert got_data == data
    finally:
        r.close()


@case("ContentWriterLayout", "layout")
def content_writer_layout(t: Target) -> None:
    """TestContentWriter on disk: ``ingest/`` exists once the store is open, an ingest is
    ``ingest/<sha256(ref)>/``, and a blob is ``blobs/sha256/<hex>`` with no write or
    execute bit."""
    assert t.root is not None
    assert os.path.isdir(os.path.join(t.root, "ingest")), "ingest/ missing after open"
    import hashlib

    w = t.store.writer("myref")
    key = hashlib.sha256(b"myref").hexdigest()
    ingest = os.path.join(t.root, "ingest", key)
    with open(os.path.join(ingest, "ref"), "rb") as f:
        assert f.read() == b"myref"
    data, dgst = content(4096)
    w.write(data)
    w.commit(len(data), dgst)
    assert not os.path.exists(ingest)
    path = os.path.join(t.root, "blobs", "sha256", dgst.split(":", 1)[1])
    st = os.stat(path)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_mode & 0o333 == 0, oct(st.st_mode)
    with open(path, "rb") as f:
        assert f.read() == data


@case("WalkBlobs")
def walk_blobs(t: Target) -> None:
    """TestWalkBlobs: walk visits exactly the 79 stored blobs, once each, in digest order."""
    s = t.store
    rng = random.Random(79)
    want: dict[str, int] = {}
    for i in range(79):
        data, dgst = content(rng.randint(1, 4096))
        write_blob(s, f"blob-{i}", data, size=len(data), expected=dgst)
        want[dgst] = len(data)
    seen = walk_all(s)
    assert [i.digest for i in seen] == sorted(want)
    assert {i.digest: i.size for i in seen} == want


@case("WriterTruncateRecoversFromIncompleteWrite", "truncate")
def writer_truncate_recovers(t: Target) -> None:
    """Bad data written and closed; reopen, truncate(0), write the real bytes, commit."""
    s = t.store
    good = b"this is the content"
    w = s.writer("ref", total=len(good))
    w.write(b"bad data")
    w.close()
    w = s.writer("ref", total=len(good))
    assert w.status().offset == len(b"bad data")
    w.truncate(0)
    w.write(good)
    w.commit(len(good), digest_of(good))
    r = s.reader_at(digest_of(good))
    try:
        assert r.read_at(100, 0) == good
    finally:
        r.close()


@case("WriteReadEmptyFileTimestamp", "layout")
def write_read_empty_timestamp(t: Target) -> None:
    """A zero time in an ingest's timestamp files (Go writes 0001-01-01T00:00:00Z) reads
    back as the zero time, and the ingest still resumes."""
    import hashlib

    from store.types import format_time, parse_time

    assert format_time(0) == "0001-01-01T00:00:00Z"
    assert parse_time("0001-01-01T00:00:00Z") == 0
    assert t.root is not None
    w = t.store.writer("zero")
    w.write(b"abc")
    w.close()
    ingest = os.path.join(t.root, "ingest", hashlib.sha256(b"zero").hexdigest())
    for name in ("startedat", "updatedat"):
        with open(os.path.join(ingest, name), "w") as f:
            f.write("0001-01-01T00:00:00Z")
    st = t.store.status("zero")
    assert st.started_at == EPOCH, st
    assert st.offset == 3
    w = t.store.writer("zero")
    assert w.status().offset == 3
    assert w.status().started_at == EPOCH
    w.write(b"def")
    w.commit(6, digest_of(b"abcdef"))


# beyond the Go suite: the filter fields of the Content API -----------------------------


@case("Filters", "filters", "labels")
def filters(t: Target) -> None:
    """Walk filters on ``digest`` and ``labels.<key>``; ListStatuses filters on ``ref``."""
    s = t.store
    a, da = content(10)
    b, db = content(10)
    write_blob(s, "a", a, labels={"team": "infra", "containerd.io/gc.root": "x"})
    write_blob(s, "b", b, labels={"team": "web"})

    def digests(*flt: str) -> list[str]:
        return [i.digest for i in walk_all(s, *flt)]

    assert digests() == sorted([da, db])
    assert digests("") == sorted([da, db])
    assert digests("labels.team==infra") == [da]
    assert digests('labels."containerd.io/gc.root"') == [da]
    assert digests(f"digest=={db}") == [db]
    assert digests("labels.team==infra", "labels.team==web") == sorted([da, db])
    assert digests("labels.team==infra,labels.team==web") == []
    assert digests("labels.nope!=z") == sorted([da, db])
    expect_error(InvalidArgument, s.walk, lambda i: None, "labels.team=")
    for ref in ("layer-1", "layer-2", "config-1"):
        s.writer(ref).close()
    assert sorted(st.ref for st in s.list_statuses("ref~=^layer-")) == ["layer-1", "layer-2"]
    assert [st.ref for st in s.list_statuses("ref==config-1")] == ["config-1"]
    assert len(s.list_statuses()) == 3


# beyond the Go suite: errors and edges every adapter must map the same way ---------------


@case("Errors")
def errors(t: Target) -> None:
    """Missing things are NotFound, malformed digests and refs InvalidArgument, and
    opening a writer for content that exists AlreadyExists, with nothing left behind."""
    s = t.store
    missing = digest_of(b"missing")
    for fn in (s.info, s.reader_at, s.delete):
        expect_error(NotFound, fn, missing)
        expect_error(InvalidArgument, fn, "sha256:" + "A" * 64)
        expect_error(InvalidArgument, fn, "md5:" + "0" * 32)
    expect_error(NotFound, s.update, Info(missing, 0, EPOCH, EPOCH, {"a": "b"}))
    expect_error(NotFound, s.status, "no-such-ref")
    expect_error(NotFound, s.abort, "no-such-ref")
    expect_error(InvalidArgument, s.writer, "")
    data, dgst = content(100)
    write_blob(s, "present", data)
    expect_error(AlreadyExists, s.writer, "again", expected=dgst)
    assert s.list_statuses() == []
    s.delete(dgst)
    expect_error(NotFound, s.info, dgst)
    expect_error(NotFound, s.delete, dgst)
    assert walk_all(s) == []


@case("AbortAndRestart")
def abort_and_restart(t: Target) -> None:
    """Abort discards an ingest; the same ref then starts empty."""
    s = t.store
    w = s.writer("r", total=10)
    w.write(b"12345")
    w.close()
    assert s.status("r").offset == 5
    s.abort("r")
    expect_error(NotFound, s.status, "r")
    assert s.list_statuses() == []
    w = s.writer("r")
    assert w.status().offset == 0
    assert w.digest() == EMPTY_DIGEST
    w.write(b"fresh")
    assert w.commit(5, digest_of(b"fresh")) in (None, digest_of(b"fresh"))


@case("LabelLimit", "labels")
def label_limit(t: Target) -> None:
    """Key plus value of 4096 bytes passes, 4097 is InvalidArgument: at commit (the ingest
    is kept) and in update (nothing changes)."""
    s = t.store
    ok_labels = {"k": "v" * 4095}
    too_big = {"k": "v" * 4096}
    w = s.writer("big-label")
    w.write(b"labelled")
    expect_error(InvalidArgument, w.commit, 8, None, labels=too_big)
    assert s.status("big-label").offset == 8
    w = s.writer("big-label")
    dgst = digest_of(b"labelled")
    w.commit(8, dgst, labels=ok_labels)
    assert dict(s.info(dgst).labels) == ok_labels
    expect_error(InvalidArgument, s.update, Info(dgst, 0, EPOCH, EPOCH, too_big), "labels.k")
    expect_error(InvalidArgument, s.update, Info(dgst, 0, EPOCH, EPOCH, {"j": "w" * 4096}))
    assert dict(s.info(dgst).labels) == ok_labels


@case("UpdateFieldpaths", "labels")
def update_fieldpaths(t: Target) -> None:
    """``labels.a.b`` is the key ``a.b``; a path other than ``labels``/``labels.<key>``
    rejects the whole update."""
    s = t.store
    data, dgst = content(50)
    write_blob(s, "r", data, labels={"a": "1", "a.b": "2"})
    got = s.update(Info(dgst, 0, EPOCH, EPOCH, {"a.b": "3"}), "labels.a.b")
    assert dict(got.labels) == {"a": "1", "a.b": "3"}
    for paths in (("size",), ("labels.z", "created_at"), ("digest",)):
        expect_error(InvalidArgument, s.update, Info(dgst, 0, EPOCH, EPOCH, {"z": "9"}), *paths)
    assert dict(s.info(dgst).labels) == {"a": "1", "a.b": "3"}
