"""A store is made by naming it: commands that write (ingest, label, fetch, lease create,
serve, a read-write mount) create a missing root, parents too; commands that only read
say ``no store at ROOT`` (exit 4) and create nothing; ``not a directory`` is kept for a
path that is a file. The same wording on every face."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from store import LocalStore, NotFound, digest_of, prepare_root

from .fuse_util import MountFactory, is_mounted, mounter
from .grpc_util import ServeProcess, ctr

mounter = mounter  # noqa: PLW0127 - the fixture, imported for this module

CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
NO_STORE = 4


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "CONTENTFS_ROOT"}
    return subprocess.run([CONTENTFS, *args], input=stdin, capture_output=True, env=env,
                          timeout=120, check=False)


def err(p: subprocess.CompletedProcess[bytes]) -> str:
    return p.stderr.decode().strip()


def test_writing_commands_create_the_root(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(os.fspath(tmp_path), "new", "deeper", "store")
    p = cli("--root", root, "ingest", "r1", stdin=b"hello")
    assert p.returncode == 0, err(p)
    assert p.stdout.decode().strip() == digest_of(b"hello")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    assert os.path.isfile(os.path.join(root, "blobs", "sha256", digest_of(b"hello")[7:]))
    # label, after the command too
    root2 = os.path.join(os.fspath(tmp_path), "label-root")
    p = cli("label", digest_of(b"x"), "a=b", "--root", root2)
    assert p.returncode == NO_STORE  # the blob is not there, but the store now is
    assert err(p) == f"contentfs: content {digest_of(b'x')}: not found"
    assert os.path.isdir(root2)
    # lease create writes a lease: it makes the store too
    root3 = os.path.join(os.fspath(tmp_path), "lease-root")
    p = cli("--root", root3, "lease", "create", "--id", "l1")
    assert (p.returncode, p.stdout.decode().strip()) == (0, "l1"), err(p)
    assert ok_ls_leases(root3) == ["l1"]


def ok_ls_leases(root: str) -> list[str]:
    p = cli("--root", root, "lease", "ls", "-q")
    assert p.returncode == 0, err(p)
    return p.stdout.decode().split()


@pytest.mark.parametrize("args", [
    ("ls",), ("info", digest_of(b"x")), ("get", digest_of(b"x")), ("active",),
    ("verify",), ("rm", digest_of(b"x")), ("abort", "r"),
])
def test_reading_commands_say_no_store(tmp_path: os.PathLike[str], args: tuple[str, ...]) -> None:
    root = os.path.join(os.fspath(tmp_path), "missing")
    p = cli("--root", root, *args)
    assert (p.returncode, err(p)) == (NO_STORE, f"contentfs: no store at {root}")
    assert not os.path.lexists(root)


@pytest.mark.parametrize("args", [("ls",), ("ingest", "r"), ("label", digest_of(b"x"))])
def test_a_file_is_not_a_directory(tmp_path: os.PathLike[str], args: tuple[str, ...]) -> None:
    root = os.path.join(os.fspath(tmp_path), "file")
    with open(root, "w") as f:
        f.write("not a store")
    p = cli("--root", root, *args, stdin=b"data")
    assert (p.returncode, err(p)) == (NO_STORE, f"contentfs: store root {root}: not a directory")
    under = os.path.join(root, "sub")  # a file as a parent: nothing there for a reader
    p = cli("--root", under, *args, stdin=b"data")
    want = "no store at {}" if args == ("ls",) else "store root {}: not a directory"
    assert (p.returncode, err(p)) == (NO_STORE, "contentfs: " + want.format(under))
    with open(root) as f:
        assert f.read() == "not a store"


def test_store_api_wording(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(os.fspath(tmp_path), "m")
    with pytest.raises(NotFound, match=f"^no store at {missing}$"):
        LocalStore(missing)
    assert prepare_root(os.path.join(missing, "a"), create=True) == os.path.join(missing, "a")
    LocalStore(os.path.join(missing, "a")).close()


def test_serve_creates_the_root(tmp_path: os.PathLike[str]) -> None:
    base = os.fspath(tmp_path)
    root = os.path.join(base, "srv", "root")
    srv = ServeProcess(root, os.path.join(base, "s.sock"))
    try:
        p = ctr(srv.address, "content", "ingest", "r", input=b"served")
        assert p.returncode == 0, p.stderr
        assert os.path.isfile(os.path.join(root, "blobs", "sha256", digest_of(b"served")[7:]))
    finally:
        assert srv.stop() == 0, srv.stderr
    file_root = os.path.join(base, "file")
    open(file_root, "w").close()
    p = cli("serve", "--root", file_root, "--address", f"unix://{base}/t.sock")
    assert (p.returncode, err(p)) == (
        NO_STORE, f"contentfs: store root {file_root}: not a directory")


def test_mount_read_write_creates_read_only_says_no_store(
    tmp_path: os.PathLike[str], mounter: MountFactory
) -> None:
    base = os.fspath(tmp_path)
    root = os.path.join(base, "made", "root")
    m = mounter(root=root)
    with open(m.ingest("x"), "wb") as f:
        f.write(b"through the mount")
    os.rename(m.ingest("x"), m.blob(digest_of(b"through the mount")[7:]))
    assert os.path.isfile(os.path.join(root, "blobs", "sha256",
                                       digest_of(b"through the mount")[7:]))
    m.unmount()
    mp = os.path.join(base, "mp")
    os.mkdir(mp)
    missing = os.path.join(base, "missing")
    p = cli("mount", "-o", "ro", missing, mp)
    assert (p.returncode, err(p)) == (NO_STORE, f"contentfs: no store at {missing}")
    assert not os.path.lexists(missing)
    file_root = os.path.join(base, "file")
    open(file_root, "w").close()
    p = cli("mount", file_root, mp)
    assert (p.returncode, err(p)) == (
        NO_STORE, f"contentfs: store root {file_root}: not a directory")
    assert not is_mounted(mp)
    # a mistyped mount point: said so, and no root is made for it
    p = cli("mount", missing, mp + "-typo")
    assert (p.returncode, err(p)) == (1, f"contentfs: mount point {mp}-typo: no such directory")
    assert not os.path.lexists(missing)

