"""The store interface (store/api.py): both implementations have it, and LocalStore's
optional capabilities do what their Protocols promise."""

from __future__ import annotations

import os
import select

import pytest

from store import Info, InvalidArgument, LocalStore, NotFound, api, digest_of
from store.grpc.client import RemoteStore

CAPABILITIES = (api.InfoIterator, api.IngestReader, api.IngestHints, api.IngestRenamer,
                api.ChangeFeed, api.BlobNames, api.BlobFiles)


def _put(store: LocalStore, data: bytes, ref: str = "r") -> str:
    w = store.writer(ref)
    w.write(data)
    return w.commit(len(data), digest_of(data))


def test_local_store_has_the_interface_and_every_capability(store: LocalStore) -> None:
    assert isinstance(store, api.Store)
    for cap in CAPABILITIES:
        assert isinstance(store, cap), cap.__name__
    w = store.writer("w")
    try:
        assert isinstance(w, api.Writer)
        assert isinstance(w, api.SyncWriter) and isinstance(w, api.TotalWriter)
    finally:
        w.close()
    dgst = _put(store, b"x")
    with store.reader_at(dgst) as r:
        assert isinstance(r, api.ReaderAt) and isinstance(r, api.FileReader)


def test_remote_store_has_the_interface(tmp_path: os.PathLike[str]) -> None:
    remote = RemoteStore(f"unix://{os.fspath(tmp_path)}/nobody.sock")  # no call is made
    try:
        assert isinstance(remote, api.Store)
        assert isinstance(remote, api.InfoIterator)
        # what containerd's API cannot do is not claimed
        for cap in (api.IngestReader, api.IngestHints, api.IngestRenamer, api.BlobFiles):
            assert not isinstance(remote, cap), cap.__name__
    finally:
        remote.close()


def test_blob_names_and_stamp(store: LocalStore) -> None:
    assert store.blob_names("sha256") == []
    assert store.blob_names("md5") == []
    before = store.blob_names_stamp("sha256")
    dgst = _put(store, b"hello")
    after = store.blob_names_stamp("sha256")
    assert after != before
    assert store.blob_names("sha256") == [dgst.split(":")[1]]
    # a stray file with a name that is not a digest is not a blob name
    open(os.path.join(store.root, "blobs", "sha256", "not-a-digest"), "w").close()
    assert store.blob_names("sha256") == [dgst.split(":")[1]]
    assert store.blob_names_stamp("sha256") == store.blob_names_stamp("sha256")
    store.delete(dgst)
    assert store.blob_names("sha256") == []


def test_blob_files_and_times(store: LocalStore) -> None:
    dgst = _put(store, b"hello")
    assert os.path.isfile(store.blob_path(dgst))
    times = store.blob_times([dgst, digest_of(b"absent")])
    info = store.info(dgst)
    assert list(times) == [dgst]
    size, created, updated = times[dgst]
    assert size == 5 and created == updated
    st = os.lstat(store.blob_path(dgst))
    assert api.blob_times_of(st, times[dgst]) == (created, updated)
    assert api.blob_times_of(st, (6, 1, 2)) == (st.st_mtime_ns, st.st_mtime_ns)  # stale
    assert abs(created - int(info.created_at.timestamp() * 1e9)) < 1000


def test_ingest_reader_sees_appends(store: LocalStore) -> None:
    with pytest.raises(NotFound):
        store.ingest_reader_at("none")
    with pytest.raises(InvalidArgument):
        store.ingest_reader_at("")
    w = store.writer("r")
    try:
        w.write(b"abc")
        with store.ingest_reader_at("r") as r:
            assert r.size == 3 and r.read_at(10, 0) == b"abc"
            w.write(b"def")
            assert r.read_at(10, 2) == b"cdef"
    finally:
        w.close()


def _wait_changes(feed: api.Changes, want: int) -> list[api.Change]:
    got: list[api.Change] = []
    for _ in range(50):
        if len(got) >= want:
            break
        select.select([feed.fileno()], [], [], 0.1)
        got += feed.read()
    return got


def test_change_feed_reports_blobs_and_labels(store: LocalStore) -> None:
    _put(store, b"before", "r0")  # blobs/sha256/ exists before the watch starts
    feed = store.open_changes()
    try:
        assert feed.read() == []  # never blocks
        # another process's store object: the feed sees the files, not this object
        with LocalStore(store.root) as other:
            dgst = _put(other, b"watched")
        got = _wait_changes(feed, 1)
        assert api.Change(api.ChangeKind.BLOBS, dgst) in got
        mark = max(u for _, _, u in store.updated_since(0))
        with LocalStore(store.root) as other:
            info = other.info(dgst)
            other.update(Info(info.digest, info.size, info.created_at, info.updated_at,
                                  {"k": "v"}), "labels.k")
        got = _wait_changes(feed, 1)
        assert any(c.kind is api.ChangeKind.LABELS for c in got), got
        assert [d for d, _, _ in store.updated_since(mark)] == [dgst]
        os.unlink(store.blob_path(dgst))
        assert api.Change(api.ChangeKind.BLOBS, dgst) in _wait_changes(feed, 1)
    finally:
        feed.close()


def test_change_feed_watches_directories_created_later(store_root: str) -> None:
    with LocalStore(store_root) as s:
        feed = s.open_changes()  # no blobs/ yet
        try:
            dgst = _put(s, b"first")  # creates blobs/ and blobs/sha256/
            # inotify queued the events at once: reading them arms the new directory,
            # and what it held before its watch is reported
            assert api.Change(api.ChangeKind.BLOBS, dgst) in feed.read()
            dgst2 = _put(s, b"second", "r2")
            got = _wait_changes(feed, 1)
            assert api.Change(api.ChangeKind.BLOBS, dgst2) in got, got
        finally:
            feed.close()
