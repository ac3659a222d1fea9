"""Bugs found with a mount, a server and the CLI driven at once on one root, with
tampering on disk (issue 15): each test failed before its fix."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
from typing import Any

import grpc
import pytest

from store import LocalStore, NotFound, digest_of
from store.grpc.pb import content_pb2 as pb
from tests import fuse_util
from tests.fuse_util import MountFactory, errno_of, run
from tests.grpc_util import CONTENTFS, RawContent, ServeProcess

EMPTY = digest_of(b"")
mounter = fuse_util.mounter


def cli(root: str, *args: str, data: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CONTENTFS, *args, "--root", root], input=data,
                          capture_output=True, timeout=timeout, check=False)


def _ingest_dirs(root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(root, "ingest")))


# 1. a commit after an abort -------------------------------------------------------------

def test_store_commit_never_recreates_an_aborted_ingest(store: LocalStore) -> None:
    with store.writer("r") as w:
        w.write(b"hello-world\n")
    store.abort("r")
    with pytest.raises(NotFound):
        store.writer("r", create=False)
    assert _ingest_dirs(store.root) == []
    # a writer opened before the abort cannot commit afterwards
    w = store.writer("r")
    w.write(b"data")
    store.abort("r")
    with pytest.raises(NotFound):
        w.commit()
    assert not store.list_statuses() and _ingest_dirs(store.root) == []
    with pytest.raises(NotFound):
        store.info(digest_of(b"data"))
    assert store.db.get_blob(digest_of(b"data")) is None


def test_abort_removes_an_ingest_dir_without_its_ref_file(store: LocalStore) -> None:
    """A directory cut short (no ``ref`` file) is not listed, but ``abort`` removes it."""
    path = store.layout.ingest_dir("half")
    os.makedirs(path)
    with open(os.path.join(path, "data"), "wb") as f:
        f.write(b"x")
    assert store.list_statuses() == []
    store.abort("half")
    assert not os.path.lexists(path)
    with pytest.raises(NotFound):
        store.abort("half")


def test_commit_after_cli_abort_is_enoent_not_the_empty_blob(
        mounter: MountFactory, tmp_path: Any) -> None:
    mnt = mounter()
    with open(mnt.ingest("det1"), "wb") as f:
        f.write(b"hello-world\n")
    run(CONTENTFS, "--root", mnt.root, "abort", "det1")
    p = run("setfattr", "-n", "user.contentfs.commit", mnt.ingest("det1"), check=False)
    assert p.returncode != 0 and b"No such file" in p.stderr, p
    assert errno_of(lambda: os.truncate(mnt.ingest("det1"), 0)) == errno.ENOENT
    assert not os.path.exists(mnt.blob(EMPTY.split(":")[1]))
    assert _ingest_dirs(mnt.root) == []
    mnt.allowed_log.append(r"ingest det1")


@pytest.mark.parametrize("how", ["setfattr", "mv"])
def test_mount_commit_races_abort(mounter: MountFactory, tmp_path: Any, how: str) -> None:
    """A mount commit (setfattr or mv) against a gRPC or CLI abort of the same ingest:
    exactly one of them succeeds, a commit stores exactly the bytes written, the empty
    blob never appears, and nothing is left under ingest/."""
    mnt = mounter()
    srv = ServeProcess(mnt.root, os.path.join(tmp_path, "s.sock"))
    raw = RawContent(srv.address)
    rounds = 24
    rng = random.Random(15)
    outcomes: list[tuple[bool, bool]] = []
    try:
        for i in range(rounds):
            ref = f"race{i}"
            data = f"round {i} of {how}\n".encode()
            dgst = digest_of(data)
            with open(mnt.ingest(ref), "wb") as f:
                f.write(data)
            result: dict[str, bool] = {}
            # a CLI abort starts a Python process (~0.3 s): the commit waits instead
            delay = rng.random() * (0.01 if i % 2 == 0 else 0.5)
            start = threading.Barrier(2)

            def abort(ref: str = ref, i: int = i, delay: float = delay,
                      result: dict[str, bool] = result,
                      start: threading.Barrier = start) -> None:
                start.wait()
                if i % 2 == 0:
                    threading.Event().wait(delay)
                if i % 2:
                    p = cli(mnt.root, "abort", ref)
                    assert p.returncode in (0, 4), p.stderr  # 4: not found
                    result["abort"] = p.returncode == 0
                else:
                    r = raw.unary("Abort", pb.AbortRequest(ref=ref), pb.AbortRequest)
                    assert r.code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), r
                    result["abort"] = r.code == grpc.StatusCode.OK

            t = threading.Thread(target=abort)
            t.start()
            start.wait()
            if i % 2:
                threading.Event().wait(delay)
            if how == "setfattr":
                p = run("setfattr", "-n", "user.contentfs.commit", mnt.ingest(ref),
                        check=False)
            else:
                p = run("mv", mnt.ingest(ref), mnt.blob(dgst.split(":")[1]), check=False)
            t.join(60)
            committed = p.returncode == 0
            if not committed:
                assert b"No such file" in p.stderr, p.stderr
            outcomes.append((committed, result["abort"]))
            assert committed != result["abort"], (i, p, result)
            assert os.path.exists(mnt.blob(dgst.split(":")[1])) == committed
            if committed:
                with open(mnt.blob(dgst.split(":")[1]), "rb") as f:
                    assert f.read() == data
            assert not os.path.exists(os.path.join(mnt.root, "blobs", "sha256",
                                                   EMPTY.split(":")[1]))
            assert _ingest_dirs(mnt.root) == [], (i, how)
        assert cli(mnt.root, "active", "--json").stdout.strip() == b"[]"
    finally:
        raw.close()
        assert srv.stop() == 0, srv.stderr
    print(f"{how}: {sum(c for c, _ in outcomes)} commits won, "
          f"{sum(a for _, a in outcomes)} aborts won of {rounds}")
    mnt.allowed_log.append(r"ingest race\d+")


# 5. a FIFO under blobs/, and blob files changed on disk ----------------------------------

def _faces(tmp_path: Any, mounter: MountFactory) -> tuple[Any, ServeProcess]:
    mnt = mounter()
    return mnt, ServeProcess(mnt.root, os.path.join(tmp_path, "s.sock"))


def test_fifo_under_blobs_is_not_found_on_every_face(
        mounter: MountFactory, tmp_path: Any) -> None:
    from tests.grpc_util import ctr
    mnt, srv = _faces(tmp_path, mounter)
    try:
        hexd = "ab" * 32
        os.makedirs(os.path.join(mnt.root, "blobs", "sha256"), exist_ok=True)
        os.mkfifo(os.path.join(mnt.root, "blobs", "sha256", hexd))
        p = cli(mnt.root, "get", f"sha256:{hexd}", timeout=20)  # hung before
        assert p.returncode == 4 and b"not found" in p.stderr, p
        p = ctr(srv.address, "content", "get", f"sha256:{hexd}", timeout=20)
        assert p.returncode != 0 and b"not found" in p.stderr, p
        assert errno_of(lambda: open(mnt.blob(hexd), "rb").close()) == errno.ENOENT
        p = cli(mnt.root, "verify", timeout=20)
        assert p.returncode == 4 and f"sha256:{hexd}: FAILED".encode() in p.stdout, p
    finally:
        assert srv.stop() == 0, srv.stderr


def test_full_verify_lists_what_is_not_a_blob(store: LocalStore) -> None:
    good = digest_of(b"good")
    with store.writer("g") as w:
        w.write(b"good")
        w.commit()
    blob_dir = os.path.join(store.root, "blobs", "sha256")
    strays = {"link": "11" * 32, "dir": "22" * 32, "fifo": "33" * 32}
    os.symlink("/etc/passwd", os.path.join(blob_dir, strays["link"]))
    os.mkdir(os.path.join(blob_dir, strays["dir"]))
    os.mkfifo(os.path.join(blob_dir, strays["fifo"]))
    p = cli(store.root, "verify", timeout=20)
    assert p.returncode == 4, p
    out = p.stdout.decode()
    assert f"{good}: OK" in out
    for hexd in strays.values():
        assert f"sha256:{hexd}: FAILED" in out and "not a regular file" in out, out
    assert b"3 of 4 blobs failed" in p.stderr


def test_blob_file_of_another_size_is_data_loss_on_every_face(
        mounter: MountFactory, tmp_path: Any) -> None:
    from tests.grpc_util import ctr
    mnt, srv = _faces(tmp_path, mounter)
    try:
        data = b"committed bytes\n"
        dgst = digest_of(data)
        assert cli(mnt.root, "ingest", "r", data=data).returncode == 0
        path = os.path.join(mnt.root, "blobs", "sha256", dgst.split(":")[1])
        os.chmod(path, 0o644)
        with open(path, "ab") as f:
            f.write(b"!")
        p = cli(mnt.root, "get", dgst)
        assert p.returncode == 8 and b"data loss" in p.stderr and not p.stdout, p
        p = ctr(srv.address, "content", "get", dgst)
        assert p.returncode != 0 and b"data loss" in p.stderr, p
        assert errno_of(lambda: open(mnt.blob(dgst.split(":")[1]), "rb").close()) == errno.EIO
        p = cli(mnt.root, "verify", dgst)
        assert p.returncode == 8, p
        mnt.allowed_log.append(r"data loss")
    finally:
        assert srv.stop() == 0, srv.stderr
