"""A model-based test: random sequences of store operations against a plain-Python model
(blobs as bytes plus labels, ingests as bytes so far, one writer per ref), with invariants
comparing walk, info, read_at and list_statuses to the model after every step."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from store import (
    AlreadyExists,
    FailedPrecondition,
    Info,
    LocalStore,
    NotFound,
    Unavailable,
    digest_of,
)
from store.types import EPOCH

REFS = st.sampled_from(["a", "b", "layer/c", "d%2F"])
CHUNKS = st.binary(max_size=64) | st.sampled_from([b"same", b"", b"x" * 300])
KEYS = st.sampled_from(["k", "containerd.io/gc.root", "x.y"])
VALUES = st.sampled_from(["", "v", "w"])


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="model-")
        self.store = LocalStore(self.root)
        self.blobs: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.ingests: dict[str, bytes] = {}
        self.writers: dict[str, Any] = {}

    @initialize()
    def start(self) -> None:
        pass

    def teardown(self) -> None:
        for w in self.writers.values():
            w.close()
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # writers -----------------------------------------------------------------------

    @rule(ref=REFS)
    def open_writer(self, ref: str) -> None:
        if ref in self.writers:
            try:
                self.store.writer(ref)
            except Unavailable:
                return
            raise AssertionError(f"second writer on {ref} was not refused")
        w = self.store.writer(ref)
        data = self.ingests.setdefault(ref, b"")
        assert w.offset == len(data), (ref, w.offset, len(data))
        assert w.digest() == digest_of(data)
        self.writers[ref] = w

    @precondition(lambda self: self.writers)
    @rule(data=st.data(), chunk=CHUNKS)
    def write(self, data: st.DataObject, chunk: bytes) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        assert self.writers[ref].write(chunk) == len(chunk)
        self.ingests[ref] += chunk

    @precondition(lambda self: self.writers)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        self.writers[ref].truncate(0)
        self.ingests[ref] = b""

    @precondition(lambda self: self.writers)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        self.writers.pop(ref).close()

    @precondition(lambda self: self.writers)
    @rule(data=st.data(),
          mode=st.sampled_from(["plain", "size", "digest", "bad-size", "bad-digest"]),
          key=KEYS, value=VALUES)
    def commit(self, data: st.DataObject, mode: str, key: str, value: str) -> None:
        ref = data.draw(st.sampled_from(sorted(self.writers)))
        w = self.writers.pop(ref)
        content = self.ingests[ref]
        dgst = digest_of(content)
        size = {"size": len(content), "bad-size": len(content) + 1}.get(mode, 0)
        expected = {"digest": dgst, "bad-digest": digest_of(content + b"!")}.get(mode)
        labels = {key: value}
        if mode.startswith("bad"):
            try:
                w.commit(size, expected, labels=labels)
            except FailedPrecondition:
                return  # the ingest is kept as it was
            raise AssertionError(f"commit {mode} succeeded")
        if dgst in self.blobs:
            try:
                w.commit(size, expected, labels=labels)
            except AlreadyExists:
                del self.ingests[ref]
                return
            raise AssertionError("commit of existing content succeeded")
        assert w.commit(size, expected, labels=labels) == dgst
        del self.ingests[ref]
        self.blobs[dgst] = (content, {k: v for k, v in labels.items() if v})

    # ingests and blobs ----------------------------------------------------------------

    @rule(ref=REFS)
    def abort(self, ref: str) -> None:
        if ref in self.writers:
            return  # aborting under an open writer is covered elsewhere
        if ref in self.ingests:
            self.store.abort(ref)
            del self.ingests[ref]
        else:
            try:
                self.store.abort(ref)
            except NotFound:
                return
            raise AssertionError(f"abort of unknown {ref} succeeded")

    @rule(old=REFS, new=REFS)
    def rename(self, old: str, new: str) -> None:
        """rename_ingest (used by the mount for rsync's temp-file-then-rename)."""
        if old == new:
            return
        if old in self.writers or new in self.writers:
            try:
                self.store.rename_ingest(old, new)
            except Unavailable:
                return
            raise AssertionError(f"rename {old} -> {new} under an open writer succeeded")
        if old not in self.ingests:
            try:
                self.store.rename_ingest(old, new)
            except NotFound:
                return
            raise AssertionError(f"rename of unknown {old} succeeded")
        self.store.rename_ingest(old, new)
        self.ingests[new] = self.ingests.pop(old)

    @precondition(lambda self: self.blobs)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        dgst = data.draw(st.sampled_from(sorted(self.blobs)))
        self.store.delete(dgst)
        del self.blobs[dgst]
        try:
            self.store.delete(dgst)
        except NotFound:
            return
        raise AssertionError("second delete succeeded")

    @precondition(lambda self: self.blobs)
    @rule(data=st.data(), key=KEYS, value=VALUES, replace=st.booleans())
    def update(self, data: st.DataObject, key: str, value: str, replace: bool) -> None:
        dgst = data.draw(st.sampled_from(sorted(self.blobs)))
        content, labels = self.blobs[dgst]
        info = Info(digest_of(content), 0, EPOCH, EPOCH, {key: value})
        if replace:
            got = self.store.update(info)
            labels = {key: value} if value else {}
        else:
            got = self.store.update(info, f"labels.{key}")
            labels = dict(labels)
            if value:
                labels[key] = value
            else:
                labels.pop(key, None)
        self.blobs[dgst] = (content, labels)
        assert dict(got.labels) == labels

    @precondition(lambda self: not self.writers)
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = LocalStore(self.root)

    # invariants -------------------------------------------------------------------

    @invariant()
    def blobs_match(self) -> None:
        infos = self.store.list()
        assert [i.digest for i in infos] == sorted(self.blobs)
        for info in infos:
            content, labels = self.blobs[info.digest]
            assert info.size == len(content)
            assert dict(info.labels) == labels
            with self.store.reader_at(info.digest) as r:
                assert r.read_at(len(content) + 1, 0) == content

    @invariant()
    def ingests_match(self) -> None:
        got = {s.ref: s.offset for s in self.store.list_statuses()}
        assert got == {ref: len(data) for ref, data in self.ingests.items()}


StoreModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreModel = StoreModel.TestCase
