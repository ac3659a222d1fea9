"""The errno table of DESIGN §2, case by case, through os calls on a real mount."""

from __future__ import annotations

import errno
import os
import threading
import time

from tests import fuse_util
from tests.fuse_util import Mount, errno_of, run, sha256

mounter = fuse_util.mounter
mnt = fuse_util.mnt


def _blob(m: Mount, data: bytes) -> str:
    path = m.ingest("tmp-for-blob")
    with open(path, "wb") as f:
        f.write(data)
    os.setxattr(path, "user.contentfs.commit", b"")
    return m.blob(sha256(data))


def test_write_before_end_is_espipe_and_changes_nothing(mnt: Mount) -> None:
    fd = os.open(mnt.ingest("seq"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"abcdef") == 6
        assert errno_of(lambda: os.pwrite(fd, b"X", 2)) == errno.ESPIPE
        assert os.pwrite(fd, b"gh", 6) == 2
        assert os.pwrite(fd, b"z", 10) == 1  # forward gap: zero-filled
    finally:
        os.close(fd)
    with open(mnt.ingest("seq"), "rb") as f:
        assert f.read() == b"abcdefgh\0\0z"


def test_ftruncate_rules(mnt: Mount) -> None:
    fd = os.open(mnt.ingest("t"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"hello")
        os.ftruncate(fd, 5)  # current size: no-op
        os.ftruncate(fd, 7)  # larger: zero-extends
        assert errno_of(lambda: os.ftruncate(fd, 3)) == errno.EINVAL
        assert os.pread(fd, 100, 0) == b"hello\0\0"
        os.ftruncate(fd, 0)  # restart
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"new")
        assert os.pread(fd, 100, 0) == b"new"
    finally:
        os.close(fd)
    assert os.getxattr(mnt.ingest("t"), "user.contentfs.digest") == \
        f"sha256:{sha256(b'new')}".encode()


def test_second_writer_ebusy_but_back_to_back_opens_succeed(mnt: Mount) -> None:
    path = mnt.ingest("busy")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        assert errno_of(lambda: os.open(path, os.O_WRONLY | os.O_APPEND)) == errno.EBUSY
        assert time.monotonic() - start >= 0.5  # it waited for a RELEASE first
        # a reader is fine while the writer holds the ref
        os.close(os.open(path, os.O_RDONLY))
        # commit while a writer holds it (setfattr or mv into blobs/): EBUSY, never
        # fewer bytes than the writer wrote
        os.write(fd, b"held")
        assert errno_of(lambda: os.setxattr(path, "user.contentfs.commit", b"")) == errno.EBUSY
        blob = mnt.blob(sha256(b"held"))
        assert errno_of(lambda: os.rename(path, blob)) == errno.EBUSY
        assert not os.path.exists(blob)
        os.write(fd, b"!")
    finally:
        os.close(fd)
    for i in range(50):  # open/write/close loops never see EBUSY from a late RELEASE
        with open(path, "ab") as f:
            f.write(b"%d," % i)
    with open(path, "rb") as f:
        assert f.read() == b"held!" + b"".join(b"%d," % i for i in range(50))


def test_second_writer_gets_slot_when_first_closes_during_wait(mnt: Mount) -> None:
    path = mnt.ingest("handoff")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    threading.Timer(0.3, os.close, (fd,)).start()
    fd2 = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.close(fd2)


def test_blob_is_read_only_eperm(mnt: Mount) -> None:
    blob = _blob(mnt, b"immutable")
    assert errno_of(lambda: os.open(blob, os.O_WRONLY)) in (errno.EPERM, errno.EACCES)
    assert errno_of(lambda: os.open(blob, os.O_RDONLY | os.O_TRUNC)) in (errno.EPERM,
                                                                          errno.EACCES)
    assert errno_of(lambda: os.chmod(blob, 0o644)) == errno.EPERM
    assert errno_of(lambda: os.utime(blob, (1, 1))) == errno.EPERM
    assert errno_of(lambda: os.truncate(blob, 0)) in (errno.EPERM, errno.EACCES)
    assert errno_of(lambda: os.rename(blob, mnt.ingest("back"))) == errno.EPERM
    assert errno_of(lambda: os.setxattr(blob, "user.contentfs.digest", b"x")) == errno.EPERM
    with open(blob, "rb") as f:
        assert f.read() == b"immutable"


def test_tree_is_fixed_eperm(mnt: Mount) -> None:
    root = mnt.path
    assert errno_of(lambda: os.mkdir(os.path.join(root, "ingest", "d"))) == errno.EPERM
    assert errno_of(lambda: os.mkdir(os.path.join(root, "x"))) == errno.EPERM
    assert errno_of(lambda: os.symlink("/etc", mnt.ingest("l"))) == errno.EPERM
    assert errno_of(lambda: open(os.path.join(root, "newfile"), "wb")) == errno.EPERM
    assert errno_of(lambda: open(os.path.join(root, "blobs", "sha256", "x"), "wb")) == \
        errno.EPERM
    assert errno_of(lambda: os.rmdir(os.path.join(root, "ingest"))) == errno.EPERM
    with open(mnt.ingest("a"), "wb") as f:
        f.write(b"a")
    assert errno_of(lambda: os.link(mnt.ingest("a"), mnt.ingest("b"))) == errno.EPERM
    assert errno_of(lambda: os.rename(mnt.ingest("a"), os.path.join(root, "a"))) == \
        errno.EPERM
    # a commit target that is no digest: EPERM, never EINVAL
    assert errno_of(lambda: os.rename(mnt.ingest("a"), mnt.blob("abc"))) == errno.EPERM
    assert errno_of(lambda: os.rename(mnt.ingest("a"), mnt.blob("A" * 64))) == errno.EPERM


def test_commit_mismatch_ebadmsg_keeps_ingest_and_explains(mnt: Mount) -> None:
    path = mnt.ingest("m")
    with open(path, "wb") as f:
        f.write(b"actual")
    wrong = sha256(b"other")
    assert errno_of(lambda: os.rename(path, mnt.blob(wrong))) == errno.EBADMSG
    msg = os.getxattr(path, "user.contentfs.error").decode()
    assert "unexpected commit digest" in msg and wrong in msg
    assert errno_of(lambda: os.setxattr(path, "user.contentfs.commit",
                                        f"sha256:{wrong}".encode())) == errno.EBADMSG
    os.setxattr(path, "user.contentfs.total", b"99")
    assert errno_of(lambda: os.setxattr(path, "user.contentfs.commit", b"")) == errno.EBADMSG
    assert "size" in os.getxattr(path, "user.contentfs.error").decode()
    with open(path, "rb") as f:
        assert f.read() == b"actual"  # unchanged, still resumable
    os.setxattr(path, "user.contentfs.total", b"6")
    os.rename(path, mnt.blob(sha256(b"actual")))
    assert os.path.exists(mnt.blob(sha256(b"actual")))


def test_xattr_namespaces_sizes_and_missing(mnt: Mount) -> None:
    blob = _blob(mnt, b"xattrs")
    assert errno_of(lambda: os.getxattr(blob, "security.capability")) == errno.ENOTSUP
    for name in ("security.foo", "trusted.x", "system.posix_acl_access"):
        assert errno_of(lambda n=name: os.getxattr(blob, n)) == errno.ENOTSUP
        assert errno_of(lambda n=name: os.removexattr(blob, n)) == errno.ENOTSUP
    for name in ("security.foo", "trusted.x"):  # the kernel validates system.* values
        assert errno_of(lambda n=name: os.setxattr(blob, n, b"v")) == errno.ENOTSUP
    assert errno_of(lambda: os.getxattr(blob, "user.missing")) == errno.ENODATA
    assert errno_of(lambda: os.removexattr(blob, "user.missing")) == errno.ENODATA
    assert errno_of(lambda: os.getxattr(blob, "user.contentfs.nope")) == errno.ENODATA
    key = "k" * 96
    os.setxattr(blob, f"user.{key}", b"v" * (4096 - 96))  # exactly at the limit
    assert errno_of(lambda: os.setxattr(blob, f"user.{key}", b"v" * (4097 - 96))) == errno.E2BIG
    assert os.listxattr(blob) == [f"user.{key}"]
    assert errno_of(lambda: os.getxattr(mnt.path, "user.x")) == errno.ENODATA


def test_reserved_writes_on_ingest_are_ignored(mnt: Mount) -> None:
    path = mnt.ingest("r")
    with open(path, "wb") as f:
        f.write(b"r")
    os.setxattr(path, "user.contentfs.digest", b"sha256:whatever")  # accepted, ignored
    os.setxattr(path, "user.contentfs.startedat", b"x")
    assert os.getxattr(path, "user.contentfs.digest") == f"sha256:{sha256(b'r')}".encode()
    assert os.getxattr(path, "user.contentfs.offset") == b"1"
    assert errno_of(lambda: os.setxattr(path, "user.contentfs.expected", b"nodigest")) == \
        errno.EINVAL


def test_enoent_cases(mnt: Mount) -> None:
    assert errno_of(lambda: os.stat(mnt.blob("0" * 64))) == errno.ENOENT
    assert errno_of(lambda: os.stat(mnt.ingest("nothing"))) == errno.ENOENT
    assert errno_of(lambda: os.unlink(mnt.blob("0" * 64))) == errno.ENOENT
    assert errno_of(lambda: os.unlink(mnt.ingest("nothing"))) == errno.ENOENT
    assert errno_of(lambda: os.rename(mnt.ingest("nothing"), mnt.ingest("x"))) == errno.ENOENT


def test_read_only_mount_erofs(mounter: fuse_util.MountFactory) -> None:
    rw = mounter(name="rw")
    blob = _blob(rw, b"ro content")
    with open(rw.ingest("pending"), "wb") as f:
        f.write(b"p")
    rw.unmount()
    ro = mounter("ro", name="ro")
    blob = ro.blob(sha256(b"ro content"))
    with open(blob, "rb") as f:
        assert f.read() == b"ro content"
    with open(ro.ingest("pending"), "rb") as f:
        assert f.read() == b"p"
    assert errno_of(lambda: open(ro.ingest("new"), "wb")) == errno.EROFS
    assert errno_of(lambda: open(ro.ingest("pending"), "ab")) == errno.EROFS
    assert errno_of(lambda: os.unlink(blob)) == errno.EROFS
    assert errno_of(lambda: os.setxattr(blob, "user.a", b"b")) == errno.EROFS
    assert errno_of(lambda: os.rename(ro.ingest("pending"), ro.blob(sha256(b"p")))) == \
        errno.EROFS
    assert errno_of(lambda: os.mkdir(os.path.join(ro.path, "d"))) == errno.EROFS
    run("sha256sum", blob)
