"""LocalStore semantics beyond the conformance suite: digest validation (reference §3.1),
the label size limit (§6.2), Update fieldpaths (§6.1), walk order, error kinds."""

from __future__ import annotations

import datetime as dt
import os

import pytest

from store import (
    AlreadyExists,
    Digest,
    FailedPrecondition,
    Info,
    InvalidArgument,
    LocalStore,
    NotFound,
    NotImplemented,
    digest_of,
    parse_digest,
)
from store.types import EPOCH


def put(store: LocalStore, data: bytes, labels: dict[str, str] | None = None,
        ref: str | None = None, expected: str | None = None) -> Digest:
    w = store.writer(ref or f"put-{digest_of(data)}", expected=expected)
    w.write(data)
    return Digest(w.commit(len(data), expected, labels=labels))


# digests -------------------------------------------------------------------------------

HEX64 = "0123456789abcdef" * 4
VALID = [
    "sha256:" + HEX64,
    "sha384:" + ("ab" * 48),
    "sha512:" + ("cd" * 64),
]
INVALID = [
    "",
    "sha256",
    "sha256:",
    ":" + HEX64,
    "md5:" + "0" * 32,
    "SHA256:" + HEX64,
    "sha256:" + HEX64.upper(),
    "sha256:" + HEX64[:63],
    "sha256:" + HEX64 + "0",
    "sha256:" + "g" * 64,
    "sha256:" + HEX64[:62] + " 0",
    " sha256:" + HEX64,
    "sha256:" + HEX64 + "\n",
    "sha256::" + HEX64[1:],
    "sha384:" + HEX64,
    "sha512:" + "ab" * 48,
    "sha256:../../etc/passwd",
    "blake3:" + HEX64,
]


@pytest.mark.parametrize("value", VALID)
def test_valid_digest_parses_and_is_not_found(store: LocalStore, value: str) -> None:
    assert parse_digest(value) == value
    with pytest.raises(NotFound, match=f"^content {value}: not found$"):
        store.info(value)
    with pytest.raises(NotFound):
        store.reader_at(value)
    with pytest.raises(NotFound):
        store.delete(value)
    with pytest.raises(NotFound):
        store.update(Info(Digest(value), 0, EPOCH, EPOCH, {"a": "b"}))


@pytest.mark.parametrize("value", INVALID, ids=repr)
def test_invalid_digest_is_invalid_argument_everywhere(store: LocalStore, value: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_digest(value)
    with pytest.raises(InvalidArgument):
        store.info(value)
    with pytest.raises(InvalidArgument):
        store.reader_at(value)
    with pytest.raises(InvalidArgument):
        store.delete(value)
    with pytest.raises(InvalidArgument):
        store.update(Info(Digest(value), 0, EPOCH, EPOCH, {}))
    with pytest.raises(InvalidArgument):
        store.verify(value)
    if value == "":
        return  # writer(expected="") and commit(expected="") mean "no digest", as in containerd
    with pytest.raises(InvalidArgument):
        store.writer("r", expected=value)
    assert store.list_statuses() == []  # nothing was left behind
    w = store.writer("r")
    w.write(b"data")
    with pytest.raises(InvalidArgument):
        w.commit(4, value)
    assert store.status("r").offset == 4  # the ingest is kept
    store.abort("r")


def test_empty_expected_digest_means_none(store: LocalStore) -> None:
    w = store.writer("r", expected="")
    w.write(b"data")
    assert w.commit(4, "") == digest_of(b"data")


def test_sha512_and_sha384_content(store: LocalStore) -> None:
    data = b"x" * 1000
    d512 = digest_of(data, "sha512")
    d384 = digest_of(data, "sha384")
    assert put(store, data, ref="a", expected=d512) == d512
    assert put(store, data, ref="b", expected=d384) == d384
    d256 = put(store, data, ref="c")
    assert d256 == digest_of(data)
    assert [i.digest for i in store.list()] == [d256, d384, d512]  # digest-string order
    for d in (d256, d384, d512):
        alg, hexpart = d.split(":")
        assert os.path.isfile(os.path.join(store.root, "blobs", alg, hexpart))
        with store.reader_at(d) as r:
            assert r.read_at(2000, 0) == data
        assert store.verify(d).size == 1000


def test_wrong_algorithm_expected_digest_fails(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"abc")
    with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
        w.commit(3, digest_of(b"abd", "sha512"))
    assert store.status("r").offset == 3


# labels --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("k", "v" * 4095, True),
        ("k", "v" * 4096, False),
        ("k" * 4096, "", True),  # an empty value means "remove": never stored
        ("k" * 2048, "v" * 2048, True),
        ("k" * 2048, "v" * 2049, False),
        ("k", "é" * 2047, True),  # 1 + 4094 bytes: the limit counts UTF-8 bytes
        ("k", "é" * 2048, False),  # 1 + 4096 bytes
        ("k", "v" * 100_000, False),
    ],
    ids=["4096", "4097", "key-only", "2048+2048", "2048+2049", "utf8-4095", "utf8-4097", "huge"],
)
def test_label_size_limit(store: LocalStore, key: str, value: str, ok: bool) -> None:
    dgst = put(store, b"blob")
    before = store.info(dgst)
    update = Info(dgst, 0, EPOCH, EPOCH, {key: value})
    if ok:
        store.update(update, f"labels.{key}")
        assert store.info(dgst).labels.get(key, "") == value
    else:
        with pytest.raises(InvalidArgument, match="greater than maximum size"):
            store.update(update, f"labels.{key}")
        with pytest.raises(InvalidArgument):
            store.update(update)
        assert store.info(dgst) == before
    # at commit: an oversized label is InvalidArgument and keeps the ingest
    w = store.writer("labelled")
    w.write(b"other")
    if ok:
        d = w.commit(5, labels={key: value})
        assert store.info(d).labels.get(key, "") == value
    else:
        with pytest.raises(InvalidArgument):
            w.commit(5, labels={key: value})
        assert store.status("labelled").offset == 5
        w = store.writer("labelled")
        assert w.offset == 5
        w.commit(5)
    store.writer("hinted").close()
    if ok:
        store.set_ingest_hints("hinted", labels={key: value})
        assert store.ingest_hints("hinted")[1] == {key: value}
    else:
        with pytest.raises(InvalidArgument):
            store.set_ingest_hints("hinted", labels={key: value})
        assert store.ingest_hints("hinted") == (None, {})


def test_empty_label_key_is_invalid(store: LocalStore) -> None:
    dgst = put(store, b"blob")
    with pytest.raises(InvalidArgument):
        store.update(Info(dgst, 0, EPOCH, EPOCH, {"": "x"}))


def test_update_fieldpaths(store: LocalStore) -> None:
    dgst = put(store, b"blob", {"a": "1", "b": "2", "a.b": "3"})
    created = store.info(dgst).created_at

    def upd(labels: dict[str, str], *paths: str) -> dict[str, str]:
        info = store.update(Info(dgst, 999, EPOCH, EPOCH, labels), *paths)
        assert info.size == 4  # size, digest and times in the request are ignored
        assert info.created_at == created
        assert dict(store.info(dgst).labels) == dict(info.labels)
        return dict(info.labels)

    # labels.a.b is the key "a.b", not a nested path
    assert upd({"a.b": "x"}, "labels.a.b") == {"a": "1", "b": "2", "a.b": "x"}
    # absent from the sent labels, or empty: removed
    assert upd({}, "labels.a.b") == {"a": "1", "b": "2"}
    assert upd({"b": ""}, "labels.b") == {"a": "1"}
    # keys outside the paths are ignored
    assert upd({"c": "3", "a": "9"}, "labels.c") == {"a": "1", "c": "3"}
    # "labels" and no paths replace everything
    assert upd({"z": "26"}, "labels") == {"z": "26"}
    assert upd({"y": "25", "x": ""}) == {"y": "25"}
    assert upd({}) == {}
    # a key with '/' and '=' in it
    assert upd({"containerd.io/gc.ref.content.l.0": "sha256:x=y"},
               "labels.containerd.io/gc.ref.content.l.0") == {
        "containerd.io/gc.ref.content.l.0": "sha256:x=y"}


@pytest.mark.parametrize(
    "paths",
    [("size",), ("labels.z", "size"), ("digest",), ("created_at",), ("updated_at",),
     ("labelsx",), ("Labels.a",), ("",)],
    ids=repr,
)
def test_invalid_fieldpath_rejects_whole_update(store: LocalStore, paths: tuple[str, ...]) -> None:
    dgst = put(store, b"blob", {"a": "1"})
    before = store.info(dgst)
    bad = next(p for p in paths if not p.startswith("labels."))
    with pytest.raises(InvalidArgument, match=f'^cannot update "{bad}" field on content info'):
        store.update(Info(dgst, 0, EPOCH, EPOCH, {"z": "new"}), *paths)
    assert store.info(dgst) == before


def test_update_moves_updated_at_only(store: LocalStore) -> None:
    dgst = put(store, b"blob")
    first = store.info(dgst)
    assert first.created_at == first.updated_at
    before = dt.datetime.now(dt.UTC)
    store.update(Info(dgst, 0, EPOCH, EPOCH, {"a": "b"}))
    after = store.info(dgst)
    assert after.created_at == first.created_at
    assert before - dt.timedelta(milliseconds=1) <= after.updated_at
    assert after.updated_at > first.updated_at


def test_labels_and_times_persist_across_reopen(store_root: str) -> None:
    with LocalStore(store_root) as s:
        dgst = put(s, b"blob", {"k": "v"})
        s.update(Info(dgst, 0, EPOCH, EPOCH, {"k2": "v2"}), "labels.k2")
        info = s.info(dgst)
    with LocalStore(store_root) as s:
        assert s.info(dgst) == info
        assert dict(s.info(dgst).labels) == {"k": "v", "k2": "v2"}


def test_commit_labels_apply_only_when_the_commit_creates(store: LocalStore) -> None:
    dgst = put(store, b"blob", {"first": "1"})
    w = store.writer("again")
    w.write(b"blob")
    with pytest.raises(AlreadyExists, match=f"^content {dgst}: already exists$"):
        w.commit(4, labels={"second": "2"})
    assert dict(store.info(dgst).labels) == {"first": "1"}


def test_ingest_hints_become_labels_at_commit(store: LocalStore) -> None:
    store.writer("r").close()
    store.set_ingest_hints("r", labels={"a": "1", "b": "2"})
    w = store.writer("r")
    w.write(b"xyz")
    dgst = w.commit(labels={"b": "3"})
    assert dict(store.info(dgst).labels) == {"a": "1", "b": "3"}


# walk ----------------------------------------------------------------------------------


def test_walk_order_and_callback(store: LocalStore) -> None:
    digests = [put(store, os.urandom(64)) for _ in range(30)]
    seen: list[str] = []
    store.walk(lambda info: seen.append(info.digest))
    assert seen == sorted(digests)
    assert [i.digest for i in store.list()] == seen
    store.delete(digests[0])
    assert [i.digest for i in store.list()] == sorted(digests[1:])


def test_walk_parses_filters_before_walking(store: LocalStore) -> None:
    put(store, b"blob")
    calls: list[Info] = []
    with pytest.raises(InvalidArgument):
        store.walk(calls.append, "labels.a==b", "labels.a=b")
    assert calls == []


# errors and writer lifecycle -------------------------------------------------------------


def test_error_kinds_and_messages(store: LocalStore) -> None:
    missing = digest_of(b"missing")
    with pytest.raises(NotFound, match=f"^content {missing}: not found$"):
        store.delete(missing)
    with pytest.raises(NotFound, match="^ingest nope: not found$"):
        store.abort("nope")
    with pytest.raises(NotFound):
        store.status("nope")
    with pytest.raises(InvalidArgument, match="ref must not be empty"):
        store.writer("")
    with pytest.raises(InvalidArgument):
        store.status("")
    with pytest.raises(InvalidArgument):
        store.writer("r", total=-1)
    dgst = put(store, b"blob")
    with pytest.raises(AlreadyExists, match=f"^content {dgst}: already exists$"):
        store.writer("r", expected=dgst)
    assert store.list_statuses() == []


def test_truncate_only_to_zero(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"abcdef")
    for size in (3, 6, 10):
        with pytest.raises(NotImplemented):
            w.truncate(size)
    assert w.offset == 6
    w.truncate(0)
    assert w.offset == 0
    assert os.path.getsize(store.ingest_data_path("r")) == 0
    w.close()


def test_closed_writer(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"abc")
    w.close()
    w.close()
    with pytest.raises(FailedPrecondition, match="cannot commit on closed writer"):
        w.commit(3)
    with pytest.raises(FailedPrecondition):
        w.write(b"x")
    assert store.status("r").offset == 3


def test_commit_size_mismatch_keeps_ingest_and_total(store: LocalStore) -> None:
    w = store.writer("r", total=10)
    w.write(b"12345")
    with pytest.raises(FailedPrecondition, match="failed size validation: 5 != 10"):
        w.commit()  # the total given at open is checked
    st = store.status("r")
    assert (st.offset, st.total) == (5, 10)
    w = store.writer("r", total=10)
    w.write(b"67890")
    assert w.commit() == digest_of(b"1234567890")


def test_resume_with_other_total_restarts_empty(store: LocalStore) -> None:
    w = store.writer("r", total=10)
    w.write(b"12345")
    w.close()
    w = store.writer("r", total=20)
    assert w.offset == 0
    assert w.status().total == 20
    assert os.path.getsize(store.ingest_data_path("r")) == 0  # re-created and truncated
    w.close()


def test_resume_in_another_store_instance_rehashes(store_root: str) -> None:
    with LocalStore(store_root) as s1:
        w = s1.writer("r")
        w.write(b"hello ")
        w.close()
    with LocalStore(store_root) as s2:
        w = s2.writer("r")
        assert w.offset == 6
        assert w.digest() == digest_of(b"hello ")
        w.write(b"world")
        assert w.commit() == digest_of(b"hello world")


def test_resume_after_data_changed_behind_our_back(store: LocalStore) -> None:
    """The in-process digest cache must not be trusted once the data file changed."""
    w = store.writer("r")
    w.write(b"aaaa")
    w.close()
    with open(store.ingest_data_path("r"), "ab") as f:
        f.write(b"bb")
    w = store.writer("r")
    assert w.offset == 6
    assert w.digest() == digest_of(b"aaaabb")
    w.close()


def test_reader_survives_delete(store: LocalStore) -> None:
    data = os.urandom(100_000)
    dgst = put(store, data)
    with store.reader_at(dgst) as r:
        store.delete(dgst)
        with pytest.raises(NotFound):
            store.info(dgst)
        assert r.read_at(200_000, 0) == data
        assert r.read_at(10, 99_995) == data[-5:]
        with pytest.raises(ValueError):
            r.read_at(1, -1)
    assert store.list() == []


def test_abort_while_writer_open(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"abc")
    store.abort("r")
    with pytest.raises(NotFound):
        store.status("r")
    with pytest.raises(NotFound):
        w.commit(3)
    w = store.writer("r")  # the failed commit released the lock
    assert w.offset == 0
    w.close()


def test_commit_existing_removes_ingest_and_hints(store: LocalStore) -> None:
    dgst = put(store, b"blob")
    w = store.writer("dup")
    store.set_ingest_hints("dup", labels={"a": "b"}, expected=dgst)
    w.write(b"blob")
    with pytest.raises(AlreadyExists):
        w.commit()
    assert store.list_statuses() == []
    assert store.ingest_hints("dup") == (None, {})


def test_verify_detects_corruption(store: LocalStore) -> None:
    dgst = put(store, b"good bytes")
    assert store.verify(dgst).size == 10
    path = os.path.join(store.root, "blobs", "sha256", dgst.split(":")[1])
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"B")
    from store import DataLoss

    with pytest.raises(DataLoss, match=f"^content {dgst}: bytes on disk hash to sha256:"):
        store.verify(dgst)
