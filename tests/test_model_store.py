"""A hypothesis state machine drives the store API against an in-memory model and checks
the store and the model agree after every step."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from store import (
    AlreadyExists,
    Digest,
    FailedPrecondition,
    Info,
    LocalStore,
    LocalWriter,
    NotFound,
    NotImplemented,
    Unavailable,
)

REFS = ["a", "b", "layer/with/slash", "ü-ref"]
KEYS = ["k1", "k2", "containerd.io/gc.root"]
VALUES = ["v1", "v2", ""]
_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)

#: filter string -> model predicate on (digest, labels)
FILTERS: dict[str, Callable[[str, dict[str, str]], bool]] = {
    "": lambda d, lb: True,
    "labels.k1": lambda d, lb: "k1" in lb,
    "labels.k1==v1": lambda d, lb: lb.get("k1") == "v1",
    "labels.k1!=v1": lambda d, lb: lb.get("k1", "") != "v1",
    "digest~=^sha256:[0-7]": lambda d, lb: re.match(r"^sha256:[0-7]", d) is not None,
    'labels."containerd.io/gc.root"': lambda d, lb: "containerd.io/gc.root" in lb,
    "labels.k1==v1,labels.k2": lambda d, lb: lb.get("k1") == "v1" and "k2" in lb,
    "labels.k2~=^v": lambda d, lb: lb.get("k2", "").startswith("v"),
}
STATUS_FILTERS: dict[str, Callable[[str], bool]] = {
    "": lambda r: True,
    "ref==a": lambda r: r == "a",
    "ref~=^layer/": lambda r: r.startswith("layer/"),
    "ref!=b": lambda r: r != "b",
}

chunks = st.one_of(
    st.binary(max_size=64),
    st.integers(0, 3).map(lambda i: bytes([i]) * (300_000 + i)),
)


def _digest(data: bytes, alg: str = "sha256") -> str:
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="contentfs-model-")
        self.store = LocalStore(self.root)
        self.blobs: dict[str, bytes] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.ingests: dict[str, bytearray] = {}
        self.writers: dict[str, LocalWriter] = {}

    def teardown(self) -> None:
        for w in self.writers.values():
            w.close()
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # writers -------------------------------------------------------------------------

    @rule(ref=st.sampled_from(REFS))
    def open_writer(self, ref: str) -> None:
        if ref in self.writers:
            with pytest.raises(Unavailable):
                self.store.writer(ref)
            return
        w = self.store.writer(ref)
        have = bytes(self.ingests.setdefault(ref, bytearray()))
        assert w.offset == len(have)
        assert w.digest() == _digest(have)
        self.writers[ref] = w

    @precondition(lambda self: bool(self.blobs))
    @rule(data=st.data())
    def open_writer_for_existing(self, data: st.DataObject) -> None:
        dgst = data.draw(st.sampled_from(sorted(self.blobs)))
        ref = data.draw(st.sampled_from(REFS))
        with pytest.raises((AlreadyExists, Unavailable)):
            self.store.writer(ref, expected=dgst)

    @precondition(lambda self: bool(self.writers))
    @rule(data=st.data(), chunk=chunks)
    def write(self, data: st.DataObject, chunk: bytes) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        assert self.writers[ref].write(chunk) == len(chunk)
        self.ingests[ref] += chunk

    @precondition(lambda self: bool(self.writers))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        self.writers.pop(ref).close()

    @precondition(lambda self: bool(self.writers))
    @rule(data=st.data(), size=st.sampled_from([0, 0, 1, 100]))
    def truncate(self, data: st.DataObject, size: int) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        w = self.writers[ref]
        if size:
            with pytest.raises(NotImplemented):
                w.truncate(size)
        else:
            w.truncate(0)
            self.ingests[ref] = bytearray()
        assert w.offset == len(self.ingests[ref])

    @precondition(lambda self: bool(self.writers))
    @rule(
        data=st.data(),
        size_mode=st.sampled_from(["right", "zero", "wrong"]),
        digest_mode=st.sampled_from(["right", "none", "wrong", "sha512"]),
        labels=st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2),
    )
    def commit(
        self, data: st.DataObject, size_mode: str, digest_mode: str, labels: dict[str, str]
    ) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        w = self.writers.pop(ref)
        content = bytes(self.ingests[ref])
        size = {"right": len(content), "zero": 0, "wrong": len(content) + 1}[size_mode]
        expected = {
            "right": _digest(content),
            "none": None,
            "wrong": _digest(content + b"x"),
            "sha512": _digest(content, "sha512"),
        }[digest_mode]
        actual = expected if digest_mode in ("right", "sha512") else _digest(content)
        assert actual is not None
        if size_mode == "wrong" or digest_mode == "wrong":
            with pytest.raises(FailedPrecondition):
                w.commit(size, expected, labels=labels)
        elif actual in self.blobs:
            with pytest.raises(AlreadyExists):
                w.commit(size, expected, labels=labels)
            del self.ingests[ref]
        else:
            assert w.commit(size, expected, labels=labels) == actual
            del self.ingests[ref]
            self.blobs[actual] = content
            self.labels[actual] = {k: v for k, v in labels.items() if v}
        assert w.closed

    # ingests and blobs ---------------------------------------------------------------

    @rule(ref=st.sampled_from(REFS))
    def abort(self, ref: str) -> None:
        if ref in self.writers:
            return  # abort does not wait for a live writer; not modelled
        if ref in self.ingests:
            self.store.abort(ref)
            del self.ingests[ref]
        else:
            with pytest.raises(NotFound):
                self.store.abort(ref)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        dgst = data.draw(st.sampled_from(sorted(self.blobs) + [_digest(b"never")]))
        if dgst in self.blobs:
            self.store.delete(dgst)
            del self.blobs[dgst]
            del self.labels[dgst]
        else:
            with pytest.raises(NotFound):
                self.store.delete(dgst)

    @rule(
        data=st.data(),
        key=st.sampled_from(KEYS),
        value=st.sampled_from(VALUES),
        replace=st.booleans(),
    )
    def label(self, data: st.DataObject, key: str, value: str, replace: bool) -> None:
        dgst = data.draw(st.sampled_from(sorted(self.blobs) + [_digest(b"never")]))
        info = Info(Digest(dgst), 0, _EPOCH, _EPOCH, {key: value})
        paths = ("labels",) if replace else (f"labels.{key}",)
        if dgst not in self.blobs:
            with pytest.raises(NotFound):
                self.store.update(info, *paths)
            return
        got = self.store.update(info, *paths)
        if replace:
            self.labels[dgst] = {key: value} if value else {}
        elif value:
            self.labels[dgst][key] = value
        else:
            self.labels[dgst].pop(key, None)
        assert got.labels == self.labels[dgst]

    @precondition(lambda self: not self.writers)
    @rule()
    def reopen(self) -> None:
        """A new process (no cached hashers) sees the same store."""
        self.store.close()
        self.store = LocalStore(self.root)

    @rule(filters=st.lists(st.sampled_from(sorted(FILTERS)), max_size=2))
    def walk(self, filters: list[str]) -> None:
        got: list[str] = []
        self.store.walk(lambda i: got.append(i.digest), *filters)
        want = sorted(
            d for d in self.blobs
            if not filters or any(FILTERS[f](d, self.labels[d]) for f in filters)
        )
        assert got == want

    @rule(flt=st.sampled_from(sorted(STATUS_FILTERS)))
    def statuses(self, flt: str) -> None:
        got = [s.ref for s in self.store.list_statuses(flt)]
        assert got == sorted(r for r in self.ingests if STATUS_FILTERS[flt](r))

    # invariants ----------------------------------------------------------------------

    @invariant()
    def blobs_agree(self) -> None:
        infos: dict[str, Info] = {i.digest: i for i in self.store.list()}
        assert set(infos) == set(self.blobs)
        for dgst, content in self.blobs.items():
            assert infos[dgst].size == len(content)
            assert infos[dgst].labels == self.labels[dgst]
            with self.store.reader_at(dgst) as r:
                assert r.read_at(len(content) + 1, 0) == content

    @invariant()
    def ingests_agree(self) -> None:
        statuses = {s.ref: s.offset for s in self.store.list_statuses()}
        assert statuses == {r: len(d) for r, d in self.ingests.items()}
        for ref, w in self.writers.items():
            assert w.offset == len(self.ingests[ref])


@pytest.mark.timeout(1800)  # the --soak run is long
def test_store_model(soak: bool) -> None:
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=400 if soak else 40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
