"""Security at store level: symlinks planted in the backing directory never make the
store read, write or delete anything outside its root."""

from __future__ import annotations

import hashlib
import os

import pytest

from store import (
    FailedPrecondition,
    LocalStore,
    NotFound,
)

from .rel_util import check_blobs, payload, run_cli, sha256

SECRET = b"outside the root\n"


@pytest.fixture
def outside(tmp_path: str) -> str:
    """A directory beside the root, with a file and a fake store layout in it."""
    out = os.path.join(tmp_path, "outside")
    os.makedirs(os.path.join(out, "sha256"))
    os.makedirs(os.path.join(out, "dir"))
    with open(os.path.join(out, "secret"), "wb") as f:
        f.write(SECRET)
    with open(os.path.join(out, "sha256", hashlib.sha256(SECRET).hexdigest()), "wb") as f:
        f.write(SECRET)
    return out


def _snapshot(path: str) -> dict[str, bytes | None]:
    """Every path under ``path`` with its content (None for directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.join(dirpath, d)] = None
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.join(dirpath, name)] = f.read()
    return out


def test_blob_symlink_to_outside_file(store: LocalStore, outside: str) -> None:
    before = _snapshot(outside)
    dgst = sha256(SECRET)
    os.makedirs(os.path.join(store.root, "blobs", "sha256"), exist_ok=True)
    link = os.path.join(store.root, "blobs", "sha256", dgst.split(":")[1])
    os.symlink(os.path.join(outside, "secret"), link)
    for call in (lambda: store.info(dgst), lambda: store.reader_at(dgst),
                 lambda: store.verify(dgst)):
        with pytest.raises(NotFound):
            call()
    assert store.list() == []
    assert run_cli(store.root, "get", dgst).stdout == b""
    assert run_cli(store.root, "ls", "-q").stdout == b""
    # committing those bytes replaces the planted link with a real blob
    w = store.writer("r")
    w.write(SECRET)
    assert w.commit(len(SECRET), dgst) == dgst
    assert not os.path.islink(link)
    assert check_blobs(store.root) == {dgst: SECRET}
    store.delete(dgst)
    assert _snapshot(outside) == before


def test_blob_symlink_deleted_not_followed(store: LocalStore, outside: str) -> None:
    before = _snapshot(outside)
    dgst = sha256(SECRET)
    os.makedirs(os.path.join(store.root, "blobs", "sha256"), exist_ok=True)
    link = os.path.join(store.root, "blobs", "sha256", dgst.split(":")[1])
    os.symlink(os.path.join(outside, "secret"), link)
    run_cli(store.root, "rm", dgst)
    assert _snapshot(outside) == before


@pytest.mark.parametrize("planted", ["blobs", "blobs/sha256"])
def test_blob_dir_symlink_to_outside(store: LocalStore, outside: str, planted: str) -> None:
    """A symlinked blobs/ or blobs/sha256/ is never read through nor committed into."""
    before = _snapshot(outside)
    target = outside if planted == "blobs" else os.path.join(outside, "sha256")
    if planted == "blobs/sha256":
        os.makedirs(os.path.join(store.root, "blobs"))
    os.symlink(target, os.path.join(store.root, planted))
    dgst = sha256(SECRET)
    assert store.list() == []
    with pytest.raises(NotFound):
        store.reader_at(dgst)
    with pytest.raises(NotFound):
        store.info(dgst)
    with pytest.raises(NotFound):
        store.delete(dgst)
    data = payload(5, 1000)
    w = store.writer("r")
    w.write(data)
    with pytest.raises(FailedPrecondition):
        w.commit(1000, sha256(data))
    assert store.status("r").offset == 1000  # refused, ingest kept
    assert _snapshot(outside) == before


@pytest.mark.parametrize("planted", ["ingest", ".contentfs/locks"])
def test_store_dir_symlink_refuses_writers(store_root: str, outside: str, planted: str) -> None:
    before = _snapshot(outside)
    with LocalStore(store_root) as s:
        s.close()
    path = os.path.join(store_root, planted)
    if os.path.lexists(path):
        os.rename(path, path + ".old")
    os.symlink(os.path.join(outside, "dir"), path)
    with LocalStore(store_root) as s:
        with pytest.raises(FailedPrecondition):
            s.writer("r")
        with pytest.raises((FailedPrecondition, NotFound)):
            s.rename_ingest("a", "b")
        assert s.list_statuses() == []
    assert _snapshot(outside) == before


def test_private_dir_symlink(store_root: str, outside: str) -> None:
    before = _snapshot(outside)
    os.symlink(os.path.join(outside, "dir"), os.path.join(store_root, ".contentfs"))
    with pytest.raises(FailedPrecondition):
        LocalStore(store_root)
    proc = run_cli(store_root, "ls")
    assert proc.returncode == 6 and b"Traceback" not in proc.stderr, proc.stderr
    assert _snapshot(outside) == before


def test_ingest_dir_symlink_to_outside(store: LocalStore, outside: str) -> None:
    """An ingest/<H> symlink to an outside directory holding a fake ingest."""
    before = _snapshot(outside)
    fake = os.path.join(outside, "dir")
    with open(os.path.join(fake, "data"), "wb") as f:
        f.write(b"outside data")
    with open(os.path.join(fake, "ref"), "w") as f:
        f.write("evil")
    before = _snapshot(outside)
    os.symlink(fake, os.path.join(store.root, "ingest", store.layout.ref_key("evil")))
    with pytest.raises(NotFound):
        store.status("evil")
    assert store.list_statuses() == []
    with pytest.raises(NotFound):
        store.abort("evil")
    with pytest.raises(NotFound):
        store.set_ingest_hints("evil", total=5)
    w = store.writer("evil")
    assert w.offset == 0  # the link is replaced by a fresh ingest, never resumed
    w.write(b"inside")
    w.commit()
    assert check_blobs(store.root) == {sha256(b"inside"): b"inside"}
    assert _snapshot(outside) == before


def test_ingest_data_symlink_to_outside(store: LocalStore, outside: str) -> None:
    before = _snapshot(outside)
    w = store.writer("r")
    w.write(b"abc")
    w.close()
    data = store.ingest_data_path("r")
    os.unlink(data)
    os.symlink(os.path.join(outside, "secret"), data)
    with pytest.raises(NotFound):
        store.status("r")  # not reported with the link's size
    assert store.list_statuses() == []
    w = store.writer("r")
    assert w.offset == 0  # restarted empty, the outside file neither read nor written
    w.write(b"new")
    assert w.commit() == sha256(b"new")
    assert _snapshot(outside) == before


@pytest.mark.parametrize("name", ["ref", "startedat", "updatedat", "total", "updatedat.tmp"])
def test_ingest_metadata_symlinks(store: LocalStore, outside: str, name: str) -> None:
    before = _snapshot(outside)
    w = store.writer("r", total=3)
    w.write(b"ab")
    w.close()
    path = os.path.join(store.layout.ingest_dir("r"), name)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(os.path.join(outside, "secret"), path)
    try:
        w = store.writer("r", total=3)
    except OSError:
        pass  # refusing is fine; following is not
    else:
        w.write(b"c"[: 3 - w.offset] if w.offset < 3 else b"")
        w.close()
    store.list_statuses()
    assert _snapshot(outside) == before


def test_refs_never_escape(store: LocalStore, outside: str) -> None:
    before = _snapshot(outside)
    for ref in ("../outside/secret", "/" + outside.lstrip("/") + "/secret", "../../..", "."):
        w = store.writer(ref)
        w.write(b"x")
        w.close()
        store.abort(ref)
    for entry in os.listdir(os.path.join(store.root, "ingest")):
        assert len(entry) == 64
    assert _snapshot(outside) == before
