"""Directories not made by us open as stores as they are: blobs on disk without database
rows, an OCI image layout made by umoci, ingests in containerd's on-disk format, and
foreign files, which are left alone."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
from collections.abc import Iterator

import pytest

from store import Digest, Info, LocalStore, NotFound, digest_of
from store.types import EPOCH, from_ns


def blob_path(root: str, dgst: str) -> str:
    alg, hexpart = dgst.split(":")
    return os.path.join(root, "blobs", alg, hexpart)


def plant_blob(root: str, data: bytes, alg: str = "sha256") -> Digest:
    """A blob file as another tool would leave it: no database row."""
    dgst = digest_of(data, alg)
    path = blob_path(root, dgst)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o444)
    return dgst


def snapshot(root: str) -> dict[str, tuple[int, int, bytes | None]]:
    """Every path under root except our private directory: (mode, mtime, bytes)."""
    out: dict[str, tuple[int, int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".contentfs"]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    data = f.read()
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_mtime_ns, data)
    return out


# blobs without database rows -----------------------------------------------------------


def test_blobs_without_rows_are_listed_with_file_times(store_root: str) -> None:
    d1 = plant_blob(store_root, b"one")
    d2 = plant_blob(store_root, b"two" * 100, "sha512")
    mtime = dt.datetime(2020, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    ns = int(mtime.timestamp()) * 10**9 + 123456000
    os.utime(blob_path(store_root, d1), ns=(ns, ns))
    with LocalStore(store_root) as s:
        infos = {i.digest: i for i in s.list()}
        assert sorted(infos) == sorted([d1, d2])
        info = s.info(d1)
        assert (info.size, dict(info.labels)) == (3, {})
        assert info.created_at == info.updated_at == mtime
        assert infos[d1] == info
        with s.reader_at(d2) as r:
            assert r.read_at(1000, 0) == b"two" * 100
        assert s.verify(d2).size == 300
        # a label gives it a row; the created time stays the file's
        s.update(Info(d1, 0, EPOCH, EPOCH, {"k": "v"}))
        info = s.info(d1)
        assert info.created_at == mtime and info.updated_at > mtime
        assert dict(info.labels) == {"k": "v"}
        s.delete(d1)
        assert [i.digest for i in s.list()] == [d2]


def test_crash_between_rename_and_row(store: LocalStore) -> None:
    """A committed blob whose row was never written is still listed, with file times."""
    w = store.writer("r")
    w.write(b"payload")
    dgst = w.commit(labels={"a": "b"})
    conn = sqlite3.connect(os.path.join(store.root, ".contentfs", "meta.db"))
    with conn:
        conn.execute("DELETE FROM blobs")
        conn.execute("DELETE FROM labels")
    conn.close()
    info = store.info(dgst)
    st = os.stat(blob_path(store.root, dgst))
    assert info.size == 7 and dict(info.labels) == {}
    assert info.created_at == from_ns(st.st_mtime_ns)
    assert [i.digest for i in store.list()] == [dgst]


def test_row_without_blob_is_not_listed(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"payload")
    dgst = w.commit(labels={"a": "b"})
    path = blob_path(store.root, dgst)
    os.chmod(os.path.dirname(path), 0o755)
    os.unlink(path)  # removed by another tool: the files are the truth
    assert store.list() == []
    with pytest.raises(NotFound):
        store.info(dgst)


def test_replaced_blob_does_not_inherit_stale_row(store: LocalStore) -> None:
    w = store.writer("r")
    w.write(b"payload")
    dgst = w.commit(labels={"a": "b"})
    path = blob_path(store.root, dgst)
    os.chmod(path, 0o644)
    with open(path, "ab") as f:
        f.write(b"+garbage")  # corrupted by someone: size no longer matches the row
    info = store.info(dgst)
    assert info.size == 15 and dict(info.labels) == {}


# foreign files -------------------------------------------------------------------------


def test_foreign_files_are_skipped_and_left_alone(store_root: str) -> None:
    good = plant_blob(store_root, b"good")
    hexlike = "f" * 64
    foreign = {
        "blobs/README": b"not a blob",
        "blobs/md5/" + "0" * 32: b"unknown algorithm",
        "blobs/sha256/notadigest": b"x",
        "blobs/sha256/" + good.split(":")[1] + ".tmp": b"partial",
        "blobs/sha256/" + "A" * 64: b"uppercase",
        "blobs/sha256/" + hexlike[:63]: b"short",
        "ingest/stray-file": b"stray",
        "ingest/" + "e" * 64 + "/notes": b"a dir without data or ref",
        "lost+found/x": b"y",
        "index.json": b"{}",
    }
    for rel, data in foreign.items():
        os.makedirs(os.path.dirname(os.path.join(store_root, rel)), exist_ok=True)
        with open(os.path.join(store_root, rel), "wb") as f:
            f.write(data)
    os.mkdir(os.path.join(store_root, "blobs", "sha256", "d" * 64))  # a directory, hex-named
    os.symlink("/etc/passwd", os.path.join(store_root, "blobs", "sha256", "c" * 64))
    before = snapshot(store_root)
    with LocalStore(store_root) as s:
        assert [i.digest for i in s.list()] == [good]
        assert s.list_statuses() == []
        for name in ("d" * 64, "c" * 64):
            with pytest.raises(NotFound):
                s.info("sha256:" + name)
            with pytest.raises(NotFound):
                s.reader_at("sha256:" + name)
        # work around them: ingest, commit, label, delete, abort
        w = s.writer("r1")
        w.write(b"new blob")
        new = w.commit(labels={"k": "v"})
        s.writer("r2").close()
        s.abort("r2")
        s.delete(good)
        assert [i.digest for i in s.list()] == [new]
    after = snapshot(store_root)
    for rel in before:
        if rel in (os.path.relpath(blob_path(store_root, good), store_root),):
            assert rel not in after
            continue
        if rel in ("blobs/sha256", "ingest"):  # directories we changed entries of
            continue
        assert after.get(rel) == before[rel], rel


# OCI image layout --------------------------------------------------------------------


def _umoci(*args: str) -> None:
    umoci = shutil.which("umoci")
    assert umoci, "umoci is not installed (apt-get install umoci)"
    subprocess.run([umoci, *args], check=True, capture_output=True)


def _skopeo_digest(layout: str) -> str:
    skopeo = shutil.which("skopeo")
    assert skopeo, "skopeo is not installed (apt-get install skopeo)"
    out = subprocess.run([skopeo, "inspect", f"oci:{layout}:latest"], check=True,
                         capture_output=True, text=True).stdout
    return str(json.loads(out)["Digest"])


def test_oci_layout_made_by_umoci(tmp_path: os.PathLike[str]) -> None:
    layout = os.path.join(os.fspath(tmp_path), "image")
    _umoci("init", "--layout", layout)
    _umoci("new", "--image", f"{layout}:latest")
    layer = os.path.join(os.fspath(tmp_path), "layer.tar")
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("hello.txt")
        payload = b"hello from a layer\n"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    _umoci("raw", "add-layer", "--image", f"{layout}:latest", layer)
    manifest = _skopeo_digest(layout)
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    assert index["manifests"][0]["digest"] == manifest
    on_disk = sorted("sha256:" + n for n in os.listdir(os.path.join(layout, "blobs", "sha256")))
    before = snapshot(layout)

    # read-only open changes nothing at all, not even our private directory
    with LocalStore(layout, readonly=True) as s:
        assert [i.digest for i in s.list()] == on_disk
    assert not os.path.exists(os.path.join(layout, ".contentfs"))
    assert snapshot(layout) == before

    with LocalStore(layout) as s:
        infos = s.list()
        assert [i.digest for i in infos] == on_disk
        for i in infos:
            assert s.verify(i.digest).size == i.size
            assert i.labels == {}
            assert i.created_at == from_ns(os.stat(blob_path(layout, i.digest)).st_mtime_ns)
        with s.reader_at(manifest) as r:
            doc = json.loads(r.read_at(r.size, 0))
        for desc in [doc["config"], *doc["layers"]]:
            assert s.info(desc["digest"]).size == desc["size"]
        assert len(doc["layers"]) == 1
        # new content lands beside the image's blobs, which stay as they were
        w = s.writer("extra")
        w.write(b"an extra blob")
        extra = w.commit(labels={"containerd.io/gc.root": "now"})
        s.update(Info(Digest(manifest), 0, EPOCH, EPOCH, {"note": "labelled"}))
    after = snapshot(layout)
    for rel, value in before.items():
        if rel not in ("blobs/sha256",):
            assert after[rel] == value, rel
    assert os.path.isfile(blob_path(layout, extra))
    assert _skopeo_digest(layout) == manifest  # still a valid layout for OCI tools


# ingests left by containerd -----------------------------------------------------------


def write_containerd_ingest(root: str, ref: str, data: bytes, *, started: str,
                            updated: str, total: int | None) -> str:
    """An ingest directory byte for byte as containerd 1.6 writes it (reference §1.2)."""
    path = os.path.join(root, "ingest", hashlib.sha256(ref.encode()).hexdigest())
    os.makedirs(path, mode=0o755)
    for name, content in (("ref", ref), ("startedat", started), ("updatedat", updated)):
        with open(os.path.join(path, name), "w") as f:
            f.write(content)  # no newline
    if total:
        with open(os.path.join(path, "total"), "w") as f:
            f.write(str(total))
    with open(os.path.join(path, "data"), "wb") as f:
        f.write(data)
    old = 1_600_000_000 * 10**9
    os.utime(os.path.join(path, "data"), ns=(old, old))
    return path


def test_containerd_ingests_are_listed_and_resume(store_root: str) -> None:
    payload = os.urandom(3000)
    full = digest_of(payload)
    ref1 = f"default/1/layer-{full}"
    write_containerd_ingest(store_root, ref1, payload[:1000],
                            started="2026-11-27T22:46:38.520067374Z",
                            updated="2026-11-27T22:46:39.5Z", total=3000)
    ref2 = "default/1/e2-trunc"
    write_containerd_ingest(store_root, ref2, b"", started="2026-11-27T23:46:38+01:00",
                            updated="0001-01-01T00:00:00Z", total=None)
    before = snapshot(store_root)
    with LocalStore(store_root) as s:
        sts = {st.ref: st for st in s.list_statuses()}
        assert sorted(sts) == sorted([ref1, ref2])
        st1 = sts[ref1]
        assert (st1.offset, st1.total, st1.expected) == (1000, 3000, None)
        assert st1.started_at == dt.datetime(2026, 11, 27, 22, 46, 38, 520067, tzinfo=dt.UTC)
        assert st1.updated_at == dt.datetime(2026, 11, 27, 22, 46, 39, 500000, tzinfo=dt.UTC)
        st2 = sts[ref2]
        assert (st2.offset, st2.total) == (0, 0)
        assert st2.started_at == dt.datetime(2026, 11, 27, 22, 46, 38, tzinfo=dt.UTC)
        assert st2.updated_at == dt.datetime(2020, 9, 13, 12, 26, 40, tzinfo=dt.UTC)  # data mtime
        assert s.status(ref1) == st1
        assert [x.ref for x in s.list_statuses("ref~=layer-")] == [ref1]
        assert snapshot(store_root) == before  # listing changed nothing

        w = s.writer(ref1, total=3000)
        assert w.offset == 1000
        assert w.digest() == digest_of(payload[:1000])
        assert w.status().started_at == st1.started_at
        w.write(payload[1000:])
        assert w.commit(3000, full) == full
        assert s.info(full).size == 3000
        assert [x.ref for x in s.list_statuses()] == [ref2]
        s.abort(ref2)
        assert s.list_statuses() == []


def test_containerd_ingest_with_mismatched_ref_is_not_that_ref(store_root: str) -> None:
    """The ref file decides: a directory whose ref file names another ref is not resumed
    for this one (containerd treats it as a hash collision and recreates it)."""
    path = write_containerd_ingest(store_root, "a", b"old", started="2026-01-01T00:00:00Z",
                                   updated="2026-01-01T00:00:00Z", total=None)
    os.rename(path, os.path.join(store_root, "ingest", hashlib.sha256(b"b").hexdigest()))
    with LocalStore(store_root) as s:
        with pytest.raises(NotFound):
            s.status("b")
        assert [x.ref for x in s.list_statuses()] == ["a"]
        w = s.writer("b")
        assert w.offset == 0
        w.close()
        assert sorted(x.ref for x in s.list_statuses()) == ["b"]


def test_unparsable_ingest_is_restarted_empty(store_root: str) -> None:
    write_containerd_ingest(store_root, "r", b"stale bytes", started="yesterday",
                            updated="2026-01-01T00:00:00Z", total=5)
    with LocalStore(store_root) as s:
        assert s.status("r").started_at == EPOCH  # listed, unparsable time as zero
        w = s.writer("r", total=5)
        assert w.offset == 0  # could not resume: restarted, and truncated (unlike 1.6)
        w.write(b"fresh")
        assert w.commit(5) == digest_of(b"fresh")


# read-only media ------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_view(src: str, where: str) -> Iterator[str]:
    """``src`` bind-mounted read-only at ``where`` (a read-only medium, as root can have)."""
    os.mkdir(where)
    subprocess.run(["mount", "--bind", "-o", "ro", src, where], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True, capture_output=True)
        os.rmdir(where)


def test_readonly_store_on_read_only_media(store_root: str,
                                           tmp_path: os.PathLike[str]) -> None:
    """A store of ours (WAL database included) on a read-only filesystem opens read-only
    with its labels; an OCI layout without our database too."""
    with LocalStore(store_root) as s:
        w = s.writer("r")
        w.write(b"on read-only media")
        dgst = w.commit(labels={"k": "v"})
        w = s.writer("partial")
        w.write(b"half")
        w.close()
    with read_only_view(store_root, os.path.join(os.fspath(tmp_path), "ro")) as ro:
        with LocalStore(ro, readonly=True) as s:
            assert [(i.digest, dict(i.labels)) for i in s.list()] == [(dgst, {"k": "v"})]
            with s.reader_at(dgst) as r:
                assert r.read_at(100, 0) == b"on read-only media"
            assert [(x.ref, x.offset) for x in s.list_statuses()] == [("partial", 4)]
            assert s.verify(dgst).size == 18
