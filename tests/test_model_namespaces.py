"""A hypothesis state machine drives namespaces, the shared policy, unclaimed blobs,
delete, leases and gc through the store API against a model (DESIGN §6), and checks every
namespace's listing, labels and the files on disk after each step."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from store import AlreadyExists, Digest, Info, LocalStore, NotFound
from store.gc import REF_PREFIX, ROOT_LABEL

NSS = ["default", "a", "b"]
DATA = [b"zero", b"one", b"two", b"three", b"four"]
DIGESTS = [f"sha256:{hashlib.sha256(d).hexdigest()}" for d in DATA]
LEASES = ["l1", "l2"]
_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)

blob = st.integers(0, len(DATA) - 1)
ns_st = st.sampled_from(NSS)


class NamespaceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="contentfs-nsmodel-")
        self.store = LocalStore(self.root)
        self.files: set[str] = set()  # digests whose file exists
        self.records: dict[str, dict[str, dict[str, str]]] = {ns: {} for ns in NSS}
        self.leases: dict[str, dict[str, set[str]]] = {ns: {} for ns in NSS}
        self.n = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # model helpers --------------------------------------------------------------------

    def claimed(self, d: str) -> bool:
        return any(d in recs for recs in self.records.values())

    def visible(self, ns: str, d: str) -> bool:
        if d not in self.files:
            return False
        return d in self.records[ns] or (ns == "default" and not self.claimed(d))

    def view(self, ns: str, lease: str | None = None) -> LocalStore:
        return self.store.namespace(ns, lease=lease)

    def ref(self) -> str:
        self.n += 1
        return f"r{self.n}"

    # rules ----------------------------------------------------------------------------

    @rule(ns=ns_st, i=blob, root=st.booleans(), lease=st.sampled_from([None, *LEASES]))
    def put(self, ns: str, i: int, root: bool, lease: str | None) -> None:
        d = DIGESTS[i]
        labels = {ROOT_LABEL: "x"} if root else {}
        if lease is not None and lease not in self.leases[ns]:
            with pytest.raises(NotFound):
                self.view(ns, lease).writer(self.ref())
            return
        w = self.view(ns, lease).writer(self.ref())
        w.write(DATA[i])
        if self.visible(ns, d):
            with pytest.raises(AlreadyExists):
                w.commit(len(DATA[i]), d, labels=labels)
        else:
            assert w.commit(len(DATA[i]), d, labels=labels) == d
            self.records[ns][d] = dict(labels)
            self.files.add(d)
        if lease is not None:
            self.leases[ns][lease].add(d)

    @rule(ns=ns_st, i=blob)
    def put_shared(self, ns: str, i: int) -> None:
        """A writer that expects bytes the store has: complete at once (shared policy)."""
        d = DIGESTS[i]
        if self.visible(ns, d):
            with pytest.raises(AlreadyExists):
                self.view(ns).writer(self.ref(), expected=d)
            return
        w = self.view(ns).writer(self.ref(), total=len(DATA[i]), expected=d)
        if d in self.files:
            assert w.offset == len(DATA[i]) and w.digest() == d
        else:
            assert w.offset == 0
            w.write(DATA[i])
        assert w.commit(len(DATA[i]), d) == d
        self.records[ns][d] = {}
        self.files.add(d)

    @rule(i=blob)
    def drop_in(self, i: int) -> None:
        """A file put under blobs/ behind the store's back (unclaimed unless recorded)."""
        d = DIGESTS[i]
        if d in self.files:
            return
        path = self.store.layout.blob_path(Digest(d))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(DATA[i])
        self.files.add(d)

    @rule(ns=ns_st, i=blob, kind=st.sampled_from(["root", "edge", "plain"]), j=blob,
          remove=st.booleans())
    def label(self, ns: str, i: int, kind: str, j: int, remove: bool) -> None:
        d = DIGESTS[i]
        key = {"root": ROOT_LABEL, "edge": f"{REF_PREFIX}m.{j}", "plain": "k"}[kind]
        value = "" if remove else (DIGESTS[j] if kind == "edge" else "v")
        info = Info(Digest(d), 0, _EPOCH, _EPOCH, {key: value})
        if not self.visible(ns, d):
            with pytest.raises(NotFound):
                self.view(ns).update(info, f"labels.{key}")
            return
        got = self.view(ns).update(info, f"labels.{key}")
        labels = self.records[ns].setdefault(d, {})  # labelling an unclaimed blob claims it
        if value:
            labels[key] = value
        else:
            labels.pop(key, None)
        assert dict(got.labels) == labels

    @rule(ns=ns_st, i=blob)
    def delete(self, ns: str, i: int) -> None:
        d = DIGESTS[i]
        if not self.visible(ns, d):
            with pytest.raises(NotFound):
                self.view(ns).delete(d)
            return
        self.view(ns).delete(d)
        self.records[ns].pop(d, None)
        if not self.claimed(d):
            self.files.discard(d)

    @rule(ns=ns_st, lease=st.sampled_from(LEASES))
    def create_lease(self, ns: str, lease: str) -> None:
        if lease in self.leases[ns]:
            with pytest.raises(AlreadyExists):
                self.view(ns).create_lease(lease)
            return
        assert self.view(ns).create_lease(lease).id == lease
        self.leases[ns][lease] = set()

    @rule(ns=ns_st, lease=st.sampled_from(LEASES))
    def delete_lease(self, ns: str, lease: str) -> None:
        if lease not in self.leases[ns]:
            with pytest.raises(NotFound):
                self.view(ns).delete_lease(lease)
            return
        self.view(ns).delete_lease(lease)
        del self.leases[ns][lease]

    @rule(dry=st.booleans())
    def gc(self, dry: bool) -> None:
        gone_files: set[str] = set()
        new_records = {}
        for ns in NSS:
            recs = self.records[ns]
            todo = [d for d, lb in recs.items() if ROOT_LABEL in lb]
            for held in self.leases[ns].values():
                todo += list(held)
            marked: set[str] = set()
            while todo:
                d = todo.pop()
                if d in marked:
                    continue
                marked.add(d)
                todo += [v for k, v in recs.get(d, {}).items() if k.startswith(REF_PREFIX)]
            new_records[ns] = {d: lb for d, lb in recs.items() if d in marked}
        for d in self.files:
            if self.claimed(d) and not any(d in r for r in new_records.values()):
                gone_files.add(d)
        result = self.store.gc(dry_run=dry)
        assert sorted(dg for dg, _ in result.removed) == sorted(gone_files)
        assert result.bytes_freed == sum(len(DATA[DIGESTS.index(d)]) for d in gone_files)
        if not dry:
            self.records = new_records
            self.files -= gone_files

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = LocalStore(self.root)

    # invariants -----------------------------------------------------------------------

    @invariant()
    def views_agree(self) -> None:
        for ns in NSS:
            infos = {i.digest: dict(i.labels) for i in self.view(ns).list()}
            want = {d: self.records[ns].get(d, {}) for d in self.files if self.visible(ns, d)}
            assert infos == want, ns
            assert sorted(x.id for x in self.view(ns).leases()) == sorted(self.leases[ns])
        on_disk = {f"sha256:{n}" for n in self.store.namespace(None).blob_names("sha256")}
        assert on_disk == self.files
        for d in self.files:
            with self.store.namespace(None).reader_at(d) as r:
                assert r.read_at(100, 0) == DATA[DIGESTS.index(d)]


@pytest.mark.timeout(1800)
def test_namespace_model(soak: bool) -> None:
    run_state_machine_as_test(
        NamespaceMachine,
        settings=settings(
            max_examples=300 if soak else 30,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
