"""Bad input through a live mount: every hostile or malformed request gets its errno,
changes nothing, and the daemon stays up and exits cleanly (the ``mnt`` fixture requires
a clean log and exit 0 at unmount)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from tests import fuse_util
from tests.fuse_util import Mount

from .rel_util import check_blobs, sha256

mnt = fuse_util.mnt
mounter = fuse_util.mounter

Case = tuple[str, Callable[[], object], int]


def _errno(fn: Callable[[], object]) -> int:
    """0 if ``fn`` succeeds, else the errno it fails with."""
    try:
        fn()
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    return 0


def _check(cases: list[Case]) -> None:
    wrong = []
    for name, fn, want in cases:
        got = _errno(fn)
        if got != want:
            wrong.append(f"{name}: got {errno.errorcode.get(got, got)},"
                         f" want {errno.errorcode.get(want, want)}")
    assert not wrong, "\n".join(wrong)


def _create(path: str) -> Callable[[], None]:
    return lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY))


def _open(path: str, flags: int) -> Callable[[], None]:
    return lambda: os.close(os.open(path, flags))


def _seed(m: Mount) -> tuple[str, str]:
    data = b"hello"
    with open(m.ingest("seed"), "wb") as f:
        f.write(data)
    os.setxattr(m.ingest("seed"), "user.contentfs.commit", sha256(data).encode())
    with open(m.ingest("r"), "wb") as f:
        f.write(b"abc")
    return m.blob(sha256(data).split(":")[1]), m.ingest("r")


def test_names(mnt: Mount) -> None:
    blob, _ = _seed(mnt)
    hexd = os.path.basename(blob)
    sha = os.path.dirname(blob)
    ing = mnt.ingest("")
    _check([
        ("uppercase digest", lambda: os.stat(os.path.join(sha, hexd.upper())), errno.ENOENT),
        ("short digest", lambda: os.stat(os.path.join(sha, hexd[:10])), errno.ENOENT),
        ("unknown algorithm dir", lambda: os.stat(mnt.path + "/blobs/md5"), errno.ENOENT),
        ("sha512 name in sha256", lambda: os.stat(os.path.join(sha, "a" * 128)), errno.ENOENT),
        ("..-prefixed name", lambda: os.stat(os.path.join(sha, "..x")), errno.ENOENT),
        ("%2F..%2F ingest", _create(ing + "%2F..%2F"), 0),
        ("%2F..%2F..%2Fetc ingest", _create(ing + "..%2F..%2Fetc"), 0),
        ("non-canonical %", _create(ing + "a%zz"), errno.EINVAL),
        ("lowercase %2f", _create(ing + "a%2f"), errno.EINVAL),
        ("create ..", _create(ing + ".."), errno.EISDIR),
        ("255-byte name", _create(ing + "n" * 255), 0),
        ("256-byte name", _create(ing + "n" * 256), errno.ENAMETOOLONG),
        ("4000-byte name", _create(ing + "n" * 4000), errno.ENAMETOOLONG),
        ("create in blobs/sha256", _create(os.path.join(sha, "x")), errno.EPERM),
        ("create blob-named file", _create(os.path.join(sha, "b" * 64)), errno.EPERM),
        ("create in blobs", _create(mnt.path + "/blobs/x"), errno.EPERM),
        ("create in root", _create(mnt.path + "/x"), errno.EPERM),
        ("mkdir in ingest", lambda: os.mkdir(ing + "d"), errno.EPERM),
        ("mkdir algorithm", lambda: os.mkdir(mnt.path + "/blobs/sha1"), errno.EPERM),
        ("symlink", lambda: os.symlink("/etc/passwd", ing + "l"), errno.EPERM),
        ("hard link of a blob", lambda: os.link(blob, ing + "hl"), errno.EPERM),
        ("mkfifo", lambda: os.mkfifo(ing + "fifo"), errno.EPERM),
        ("rmdir blobs/sha256", lambda: os.rmdir(sha), errno.EPERM),
        ("rmdir ingest", lambda: os.rmdir(mnt.path + "/ingest"), errno.EPERM),
    ])
    assert sorted(os.listdir(ing)) == sorted(
        ["%2F..%2F", "..%2F..%2Fetc", "n" * 255, "r"])
    for name in ("%2F..%2F", "..%2F..%2Fetc", "n" * 255):
        os.unlink(ing + name)
    assert check_blobs(mnt.root).keys() == {sha256(b"hello")}


def test_blobs_are_not_writable(mnt: Mount) -> None:
    blob, _ = _seed(mnt)
    _check([
        ("open O_WRONLY", _open(blob, os.O_WRONLY), errno.EPERM),
        ("open O_RDWR", _open(blob, os.O_RDWR), errno.EPERM),
        ("open O_TRUNC", _open(blob, os.O_RDONLY | os.O_TRUNC), errno.EPERM),
        ("open O_APPEND", _open(blob, os.O_WRONLY | os.O_APPEND), errno.EPERM),
        ("truncate", lambda: os.truncate(blob, 0), errno.EPERM),
        ("chmod", lambda: os.chmod(blob, 0o666), errno.EPERM),
        ("utime", lambda: os.utime(blob, (0, 0)), errno.EPERM),
    ])
    with open(blob, "rb") as f:
        assert f.read() == b"hello"


def test_renames_in_every_direction(mnt: Mount, tmp_path: str) -> None:
    blob, r = _seed(mnt)
    sha = os.path.dirname(blob)
    ing = mnt.ingest("")
    _check([
        ("ingest -> ingest", lambda: os.rename(r, ing + "r2"), 0),
        ("ingest -> bad blob name", lambda: os.rename(ing + "r2", sha + "/bad"), errno.EPERM),
        ("ingest -> uppercase digest", lambda: os.rename(ing + "r2", sha + "/" + "A" * 64),
         errno.EPERM),
        ("ingest -> blobs/", lambda: os.rename(ing + "r2", mnt.path + "/blobs/r2"),
         errno.EPERM),
        ("ingest -> root", lambda: os.rename(ing + "r2", mnt.path + "/r2"), errno.EPERM),
        ("ingest -> sha512 dir, sha256 hex",
         lambda: os.rename(ing + "r2", mnt.path + "/blobs/sha512/" + "a" * 64), errno.EPERM),
        ("ingest -> wrong digest", lambda: os.rename(ing + "r2", sha + "/" + "a" * 64),
         errno.EBADMSG),
        ("ingest -> non-canonical name", lambda: os.rename(ing + "r2", ing + "x%zz"),
         errno.EPERM),
        ("ingest -> 256-byte name", lambda: os.rename(ing + "r2", ing + "n" * 256),
         errno.ENAMETOOLONG),
        ("ingest -> outside the mount",
         lambda: os.rename(ing + "r2", os.path.join(tmp_path, "out")), errno.EXDEV),
        ("blob -> ingest", lambda: os.rename(blob, ing + "stolen"), errno.EPERM),
        ("blob -> other blob", lambda: os.rename(blob, sha + "/" + "b" * 64), errno.EPERM),
        ("blob -> root", lambda: os.rename(blob, mnt.path + "/x"), errno.EPERM),
        ("outside -> ingest", lambda: os.rename(_outside(tmp_path), ing + "in"), errno.EXDEV),
        ("rename blobs/", lambda: os.rename(mnt.path + "/blobs", mnt.path + "/b2"),
         errno.EPERM),
        ("rename ingest/", lambda: os.rename(mnt.path + "/ingest", mnt.path + "/blobs/i"),
         errno.EPERM),
        ("rename blobs/sha256", lambda: os.rename(sha, ing + "x"), errno.EPERM),
        ("missing ingest", lambda: os.rename(ing + "nope", ing + "x"), errno.ENOENT),
    ])
    assert os.listdir(ing) == ["r2"]
    with open(ing + "r2", "rb") as f:
        assert f.read() == b"abc"
    assert check_blobs(mnt.root).keys() == {sha256(b"hello")}


def _outside(tmp_path: str) -> str:
    path = os.path.join(tmp_path, "outside-file")
    with open(path, "wb") as f:
        f.write(b"x")
    return path


def test_xattrs(mnt: Mount) -> None:
    blob, r = _seed(mnt)

    def setx(path: str, name: str, value: bytes) -> Callable[[], None]:
        return lambda: os.setxattr(path, name, value)

    _check([
        ("name of 255 bytes", setx(r, "user." + "k" * 250, b"v"), 0),
        ("name over 255 bytes", setx(r, "user." + "k" * 251, b"v"), errno.ERANGE),
        ("key+value over 4096", setx(r, "user.k", b"v" * 4096), errno.E2BIG),
        ("value over 64 KiB", setx(r, "user.k", b"v" * 65537), errno.E2BIG),
        ("blob key+value over 4096", setx(blob, "user.k", b"v" * 5000), errno.E2BIG),
        ("empty key", setx(r, "user.", b"v"), errno.EINVAL),
        ("get security.*", lambda: os.getxattr(blob, "security.x"), errno.ENOTSUP),
        ("set trusted.*", setx(blob, "trusted.x", b"1"), errno.ENOTSUP),
        ("set unknown namespace", setx(blob, "foo.x", b"1"), errno.ENOTSUP),
        ("remove security.*", lambda: os.removexattr(blob, "security.x"), errno.ENOTSUP),
        ("garbage ACL (kernel)", setx(blob, "system.posix_acl_access", b"1"), errno.EINVAL),
        ("get missing", lambda: os.getxattr(blob, "user.x"), errno.ENODATA),
        ("remove missing", lambda: os.removexattr(blob, "user.x"), errno.ENODATA),
        ("reserved on a blob", setx(blob, "user.contentfs.digest", b"x"), errno.EPERM),
        ("commit malformed digest", setx(r, "user.contentfs.commit", b"sha256:XYZ"),
         errno.EINVAL),
        ("commit unknown algorithm", setx(r, "user.contentfs.commit", b"md5:" + b"a" * 32),
         errno.EINVAL),
        ("expected malformed", setx(r, "user.contentfs.expected", b"nope"), errno.EINVAL),
        ("total negative", setx(r, "user.contentfs.total", b"-5"), errno.EINVAL),
        ("total not a number", setx(r, "user.contentfs.total", b"abc"), errno.EINVAL),
        ("commit wrong digest", setx(r, "user.contentfs.commit", sha256(b"x").encode()),
         errno.EBADMSG),
    ])
    fd = os.open(r, os.O_WRONLY | os.O_APPEND)
    try:
        assert _errno(setx(r, "user.contentfs.commit", b"")) == errno.EBUSY
    finally:
        os.close(fd)
    assert sorted(os.listxattr(r)) == ["user." + "k" * 250]
    assert os.listxattr(blob) == []
    assert check_blobs(mnt.root).keys() == {sha256(b"hello")}


def test_writes_that_cannot_be_appends(mnt: Mount) -> None:
    _, r = _seed(mnt)
    fd = os.open(r, os.O_WRONLY)
    try:
        _check([
            ("write before the end", lambda: os.pwrite(fd, b"x", 0), errno.ESPIPE),
            ("write in the middle", lambda: os.pwrite(fd, b"x", 2), errno.ESPIPE),
            ("truncate smaller, non-zero", lambda: os.ftruncate(fd, 1), errno.EINVAL),
            ("truncate negative", lambda: os.ftruncate(fd, -1), errno.EINVAL),
            ("truncate to the size", lambda: os.ftruncate(fd, 3), 0),
        ])
    finally:
        os.close(fd)
    with open(r, "rb") as f:
        assert f.read() == b"abc"
