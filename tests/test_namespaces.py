"""Namespaces (DESIGN §6, reference §5): per-namespace records over bytes stored once,
the ``shared`` policy, unclaimed blobs in ``default``, delete, stores made before
namespaces, identifiers; the CLI's ``-n`` and ``contentfs namespaces``."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable

import pytest

from store import AlreadyExists, Digest, Info, InvalidArgument, LocalStore, NotFound, digest_of
from store.types import EPOCH

from .fuse_util import CONTENTFS, Mount, MountFactory, mounter
from .test_cli import ok, run

mounter = mounter  # noqa: PLW0127 - the fixture, imported for this module


def put(store: LocalStore, data: bytes, labels: dict[str, str] | None = None,
        ref: str | None = None) -> Digest:
    w = store.writer(ref or f"put-{digest_of(data)}")
    w.write(data)
    return Digest(w.commit(len(data), None, labels=labels))


def blob_file(store: LocalStore, dgst: str) -> str:
    return store.layout.blob_path(Digest(dgst))


def test_namespaces_see_their_own_records(store: LocalStore) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    da = put(a, b"only in a", {"k": "a"})
    db = put(b, b"only in b")
    assert [i.digest for i in a.list()] == [da]
    assert [i.digest for i in b.list()] == [db]
    assert a.info(da).labels == {"k": "a"}
    with pytest.raises(NotFound):
        b.info(da)
    with pytest.raises(NotFound):
        b.reader_at(da)
    with pytest.raises(NotFound):
        b.update(Info(da, 0, EPOCH, EPOCH, {"x": "y"}), "labels.x")
    with pytest.raises(NotFound):
        b.delete(da)
    # the raw store sees every file
    assert {i.digest for i in store.namespace(None).list()} == {da, db}
    assert store.namespaces() == ["a", "b", "default"]


def test_same_bytes_in_two_namespaces_are_stored_once(store: LocalStore) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    d1 = put(a, b"shared bytes", {"who": "a"})
    ino = os.stat(blob_file(store, d1)).st_ino
    d2 = put(b, b"shared bytes", {"who": "b"})  # commits: not in b yet
    assert d1 == d2
    assert os.stat(blob_file(store, d1)).st_ino == ino  # bytes not moved
    assert a.info(d1).labels == {"who": "a"}
    assert b.info(d1).labels == {"who": "b"}
    with pytest.raises(AlreadyExists):  # in b now
        put(b, b"shared bytes", ref="again")
    # delete in a: the record goes, the file stays for b
    a.delete(d1)
    with pytest.raises(NotFound):
        a.info(d1)
    assert os.path.exists(blob_file(store, d1))
    assert b.info(d1).labels == {"who": "b"}
    # delete in b: nothing holds it any more, the file goes at once
    b.delete(d1)
    assert not os.path.exists(blob_file(store, d1))


def test_shared_policy_commits_without_bytes(store: LocalStore) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    data = b"x" * 1000
    dgst = put(a, data)
    w = b.writer("shared-ref", total=len(data), expected=dgst)
    assert w.offset == len(data)  # complete from the start (reference §5.3)
    assert w.status().offset == len(data)
    assert w.digest() == dgst
    assert w.commit(len(data), dgst, labels={"l": "v"}) == dgst
    assert b.info(dgst).labels == {"l": "v"}
    assert b.list_statuses() == []


def test_shared_writer_unshares_on_write(store: LocalStore) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    dgst = put(a, b"base")
    w = b.writer("grow", expected=dgst)
    assert w.offset == 4
    w.write(b"+more")  # copies the blob in first, then appends
    assert w.offset == 9
    got = w.commit(9, None)
    assert got == digest_of(b"base+more")
    with b.reader_at(got) as r:
        assert r.read_at(9, 0) == b"base+more"
    w2 = b.writer("restart", expected=dgst)
    w2.truncate(0)
    assert w2.offset == 0
    w2.close()


def test_ingests_are_per_namespace(store: LocalStore) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    with a.writer("ref") as w:
        w.write(b"in a")
    with b.writer("ref") as w:
        w.write(b"b's")
    assert [(s.ref, s.offset) for s in a.list_statuses()] == [("ref", 4)]
    assert [(s.ref, s.offset) for s in b.list_statuses()] == [("ref", 3)]
    assert store.namespace("default").list_statuses() == []
    a.abort("ref")
    assert a.list_statuses() == []
    assert b.status("ref").offset == 3


def test_unclaimed_blobs_show_in_default_and_labelling_claims(store: LocalStore) -> None:
    data = b"dropped in by hand"
    dgst = digest_of(data)
    path = blob_file(store, dgst)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    default, other = store.namespace("default"), store.namespace("other")
    info = default.info(dgst)
    assert info.labels == {} and info.created_at.year == 2020
    assert [i.digest for i in default.list()] == [dgst]
    assert other.list() == []
    other_digest = put(other, b"mine")  # claimed by `other`: not unclaimed
    assert [i.digest for i in default.list()] == [dgst]
    assert other_digest not in {i.digest for i in default.list()}
    default.update(Info(dgst, 0, EPOCH, EPOCH, {"claimed": "yes"}), "labels.claimed")
    assert store.meta.holders(dgst) == ["default"]
    assert default.info(dgst).labels == {"claimed": "yes"}
    # claimed by another namespace: no longer shown in default
    put(other, data)
    default.delete(dgst)
    with pytest.raises(NotFound):
        default.info(dgst)
    assert os.path.exists(path)  # other holds it


def test_old_store_opens_with_labels_in_default(store_root: str) -> None:
    """A store made before namespaces (the old database shape, built here by hand) opens
    with every label in namespace `default`; nothing to run."""
    data = b"old blob"
    dgst = digest_of(data)
    path = os.path.join(store_root, "blobs", "sha256", dgst.split(":")[1])
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(data)
    os.makedirs(os.path.join(store_root, ".contentfs"))
    db = sqlite3.connect(os.path.join(store_root, ".contentfs", "meta.db"))
    db.executescript(
        """
        CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL,
            created_ns INTEGER NOT NULL, updated_ns INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE labels (digest TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
            PRIMARY KEY (digest, key)) WITHOUT ROWID;
        CREATE TABLE ingests (ref TEXT PRIMARY KEY, expected TEXT, labels TEXT NOT NULL)
            WITHOUT ROWID;
        """
    )
    db.execute("INSERT INTO blobs VALUES (?, ?, ?, ?)", (dgst, len(data), 10**18, 2 * 10**18))
    db.execute("INSERT INTO labels VALUES (?, 'containerd.io/gc.root', 'x')", (dgst,))
    db.execute("INSERT INTO labels VALUES (?, 'team', 'infra')", (dgst,))
    db.commit()
    db.close()
    # a read-only open migrates a copy in memory and changes nothing on disk
    with LocalStore(store_root, readonly=True) as ro:
        assert ro.namespace("default").info(dgst).labels["team"] == "infra"
    with LocalStore(store_root) as s:
        info = s.namespace("default").info(dgst)
        assert info.labels == {"containerd.io/gc.root": "x", "team": "infra"}
        assert info.created_at.year == 2001 and info.updated_at.year == 2033
        assert s.namespaces() == ["default"]
        assert s.namespace("other").list() == []
    # again: already migrated, still there
    r = run("--root", store_root, "ls", "--json")
    assert r.code == 0 and '"team": "infra"' in r.text


@pytest.mark.parametrize("bad", ["", "a b", "-x", "x-", "a..b", "x" * 77, "ü"])
def test_namespace_identifiers(store: LocalStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        store.namespace(bad)


def test_cli_namespace_option_and_env(store_root: str) -> None:
    def cf(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None):  # noqa: ANN202
        return run("--root", store_root, *args, env=env, stdin=stdin)

    d = ok(cf("-n", "team-a", "ingest", "r", stdin=b"team a data")).text.strip()
    assert ok(cf("ls", "-q", "-n", "team-a")).text.split() == [d]
    assert ok(cf("ls", "-q", env={"CONTENTFS_NAMESPACE": "team-a"})).text.split() == [d]
    assert ok(cf("ls", "-q")).text.split() == []
    assert ok(cf("namespaces")).text.split() == ["default", "team-a"]
    assert ok(cf("namespaces", "--json")).text == '[\n  "default",\n  "team-a"\n]\n'
    r = cf("-n", "bad name", "ls")
    assert r.code == 3 and "namespace" in r.error_line()
    r = cf("info", d)
    assert r.code == 4
    ok(cf("-n", "team-a", "rm", d))
    assert not os.listdir(os.path.join(store_root, "blobs", "sha256"))


# the mount in two namespaces at once ----------------------------------------------------

def _eventually(cond: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {within}s")
        time.sleep(0.05)


def test_mounts_in_two_namespaces(mounter: MountFactory) -> None:
    """`-o namespace=NS`: each mount lists, looks up, labels and deletes in its own
    namespace over the same root; the CLI and the mount agree per namespace."""
    ma = mounter("namespace=a", name="ma")
    mb = mounter("namespace=b", name="mb", root=ma.root)
    mdef = mounter(name="mdef", root=ma.root)
    data = b"committed through mount a\n"
    hexd = hashlib.sha256(data).hexdigest()
    with open(ma.ingest("x"), "wb") as f:
        f.write(data)
    os.rename(ma.ingest("x"), ma.blob(hexd))
    assert os.listdir(os.path.join(ma.path, "blobs", "sha256")) == [hexd]
    assert os.listdir(os.path.join(mb.path, "blobs", "sha256")) == []
    assert os.listdir(os.path.join(mdef.path, "blobs", "sha256")) == []  # claimed by a
    assert not os.path.exists(mb.blob(hexd))
    os.setxattr(ma.blob(hexd), "user.who", b"a")
    r = run("--root", ma.root, "-n", "a", "label", f"sha256:{hexd}")
    assert r.text.strip() == "who=a"
    # the same bytes in b: a record there, no bytes moved; mount b sees it appear
    r = run("--root", ma.root, "-n", "b", "ingest", "y", "--label", "who=b", stdin=data)
    assert r.code == 0, r.err
    _eventually(lambda: os.path.exists(mb.blob(hexd)))
    assert os.getxattr(mb.blob(hexd), "user.who") == b"b"
    assert os.getxattr(ma.blob(hexd), "user.who") == b"a"
    with open(mb.blob(hexd), "rb") as f:
        assert f.read() == data
    # an ingest of one namespace is not the other's
    with open(mb.ingest("only-b"), "wb") as f:
        f.write(b"b's")
    assert os.listdir(os.path.join(mb.path, "ingest")) == ["only-b"]
    assert os.listdir(os.path.join(ma.path, "ingest")) == []
    # rm in a: a's record goes, the file stays for b
    os.unlink(ma.blob(hexd))
    assert not os.path.exists(ma.blob(hexd))
    assert os.path.exists(os.path.join(ma.root, "blobs", "sha256", hexd))
    with open(mb.blob(hexd), "rb") as f:
        assert f.read() == data


def test_mount_takes_the_namespace_as_every_command(mounter: MountFactory) -> None:
    """``contentfs -n NS mount`` / ``mount -n NS`` / ``$CONTENTFS_NAMESPACE`` mount NS
    (they were ignored: the mount showed ``default``); ``-o namespace=`` wins over the
    variable, and disagreeing with ``-n`` is a usage error."""
    plain = mounter()
    root = plain.root
    d = ok(run("--root", root, "-n", "team-a", "ingest", "r", stdin=b"team a only")).text.strip()

    def shows(m: Mount) -> bool:
        try:
            with open(m.blob(d[7:]), "rb") as f:
                return f.read() == b"team a only"
        except FileNotFoundError:
            return False

    assert not shows(plain)
    assert shows(mounter(name="flag", extra=("-n", "team-a")))
    assert shows(mounter(name="env", env={"CONTENTFS_NAMESPACE": "team-a"}))
    assert not shows(mounter("namespace=default", name="opt",
                             env={"CONTENTFS_NAMESPACE": "team-a"}))
    p = subprocess.run([CONTENTFS, "mount", "-n", "team-a", root, "/nonexistent-qa",
                        "-o", "namespace=team-b"], capture_output=True, check=False, timeout=60)
    assert p.returncode == 2 and b"-n team-a and -o namespace=team-b disagree" in p.stderr


def test_mount_drops_a_blob_another_process_deletes_from_its_namespace(
        mounter: MountFactory) -> None:
    """A blob two namespaces hold, deleted from one by another process (`contentfs rm`):
    its file stays for the other, so no inotify event on blobs/; the mount of that
    namespace must still stop showing it (stat, ls -l, open after the kernel held it),
    while the other namespace's mount keeps it."""
    ma = mounter("namespace=a", name="ma")
    mb = mounter("namespace=b", name="mb", root=ma.root)
    data = b"held by a and b\n"
    hexd = hashlib.sha256(data).hexdigest()
    for ns in ("a", "b"):
        assert run("--root", ma.root, "-n", ns, "ingest", f"in-{ns}", stdin=data).code == 0
    _eventually(lambda: os.path.exists(ma.blob(hexd)) and os.path.exists(mb.blob(hexd)))
    assert os.stat(ma.blob(hexd)).st_size == len(data)  # the kernel holds it now
    listing = subprocess.run(["ls", "-l", os.path.dirname(ma.blob(hexd))],
                             capture_output=True, text=True, check=True).stdout
    assert hexd in listing
    r = run("--root", ma.root, "-n", "a", "rm", f"sha256:{hexd}")
    assert r.code == 0, r.err
    assert os.path.exists(os.path.join(ma.root, "blobs", "sha256", hexd))  # b's
    _eventually(lambda: not os.path.exists(ma.blob(hexd)))
    listing = subprocess.run(["ls", "-l", os.path.dirname(ma.blob(hexd))],
                             capture_output=True, text=True, check=True).stdout
    assert hexd not in listing
    with open(mb.blob(hexd), "rb") as f:
        assert f.read() == data
    # and again after the kernel's caches were dropped and refilled by a listing
    assert run("--root", ma.root, "-n", "a", "ingest", "again", stdin=data).code == 0
    _eventually(lambda: os.path.exists(ma.blob(hexd)))
    subprocess.run(["ls", "-l", os.path.dirname(ma.blob(hexd))], capture_output=True,
                   check=True)
    assert run("--root", ma.root, "-n", "a", "rm", f"sha256:{hexd}").code == 0
    _eventually(lambda: not os.path.exists(ma.blob(hexd)))
