"""Helpers for tests that mount contentfs for real.

``Mount`` runs ``contentfs mount -f ROOT MNT`` in a subprocess, waits until the mount
answers, and on ``unmount()`` requires the daemon to exit 0 without logging an error or a
traceback (pyfuse3 turns a handler bug into a non-zero exit: that must fail the test). The
``mounter`` fixture makes mounts and always cleans them up; ``mnt`` is one default mount.
``FuseStore`` adapts a mounted directory to the store API for the conformance suite.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = [
    "CONTENTFS",
    "Mount",
    "is_mounted",
    "mnt",
    "mounter",
    "require_fuse",
    "run",
    "sha256",
]

CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
_BAD_LOG = re.compile(r" (ERROR|CRITICAL) |Traceback")


def require_fuse() -> None:
    """Fail (never skip) with a clear reason when FUSE cannot work here."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests need the fuse kernel module")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: install the Debian package fuse3")
    if not os.path.exists(CONTENTFS):
        pytest.fail(f"{CONTENTFS} is missing: pip install -e . into the venv")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def src_file(tmp_path: os.PathLike[str] | str, data: bytes, name: str = "src") -> str:
    """``data`` written to a file ``name`` in ``tmp_path`` (a source to copy in); its path."""
    path = os.path.join(os.fspath(tmp_path), name)
    write_bytes(path, data)
    return path


def run(*cmd: str, check: bool = True, stdin: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a real tool; on failure with ``check`` the assertion shows its stderr."""
    proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=120, env=env,
                          check=False)
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


def is_mounted(path: str) -> bool:
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return any(line.split()[4] == target for line in f)


class Mount:
    """One foreground ``contentfs mount`` daemon."""

    def __init__(self, root: str, path: str, options: tuple[str, ...], log_path: str,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.env = env
        self.root = root
        self.path = path
        self.options = options
        self.log_path = log_path
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        # regexes of error lines a test expects. pyfuse3 logs a failed reply to a RELEASE
        # or RELEASEDIR the kernel sent while unmounting (it no longer waits): harmless.
        self.allowed_log: list[str] = [
            r"fuse_release(dir)?\(\): fuse_reply_\* failed with No such"]

    # paths
    def blob(self, hexdigest: str, alg: str = "sha256") -> str:
        return os.path.join(self.path, "blobs", alg, hexdigest)

    def ingest(self, name: str) -> str:
        return os.path.join(self.path, "ingest", name)

    def start(self) -> Mount:
        cmd = [CONTENTFS, "mount", "-f", self.root, self.path, *self.extra]
        for opt in self.options:
            cmd += ["-o", opt]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(self.env or {})})
        self.wait_for_mount()
        return self

    def wait_for_mount(self, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"contentfs mount exited {self.proc.returncode}:\n{self.log()}")
            if is_mounted(self.path):
                try:
                    os.statvfs(self.path)  # a dead mount left behind fails this
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        pytest.fail(f"mount did not appear at {self.path} within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def bad_log_lines(self) -> list[str]:
        bad = []
        for line in self.log().splitlines():
            if _BAD_LOG.search(line) and not any(re.search(p, line) for p in self.allowed_log):
                bad.append(line)
        return bad

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def unmount(self, *, expect_code: int = 0) -> None:
        """Unmount (retrying while busy), then require exit ``expect_code`` and a clean log."""
        assert self.proc is not None
        deadline = time.monotonic() + 5
        while self.proc.poll() is None and is_mounted(self.path):
            proc = subprocess.run(["fusermount3", "-u", self.path], capture_output=True,
                                  check=False)
            if proc.returncode == 0:
                break
            if time.monotonic() > deadline:  # still busy: a test left a file open
                subprocess.run(["fusermount3", "-u", "-z", self.path], check=False,
                               capture_output=True)
                break
            time.sleep(0.1)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"contentfs daemon did not exit after unmount:\n{self.log()}")
        assert code == expect_code, f"daemon exited {code}:\n{self.log()}"
        bad = self.bad_log_lines()
        assert not bad, "daemon logged errors:\n" + "\n".join(bad)

    def cleanup(self) -> None:
        """Error path: make sure nothing is left running or mounted."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", self.path], check=False,
                           capture_output=True)


MountFactory = Callable[..., Mount]


@pytest.fixture
def mounter(tmp_path: os.PathLike[str]) -> Iterator[MountFactory]:
    """``mounter(*options, root=None, name="mnt")`` -> a started Mount. At teardown every
    mount still running is unmounted and must exit 0 with a clean log."""
    require_fuse()
    base = os.fspath(tmp_path)
    mounts: list[Mount] = []

    def make(*options: str, root: str | None = None, name: str = "mnt",
             extra: tuple[str, ...] = (), start: bool = True,
             env: dict[str, str] | None = None) -> Mount:
        if root is None:
            root = os.path.join(base, "root")
            os.makedirs(root, exist_ok=True)
        path = os.path.join(base, name)
        try:
            os.mkdir(path)
        except FileExistsError:  # (also a dead mount, which isdir/lexists deny)
            pass
        m = Mount(root, path, options, os.path.join(base, f"{name}.log"), extra, env)
        mounts.append(m)
        return m.start() if start else m

    try:
        yield make
        for m in mounts:
            if m.proc is not None and m.proc.poll() is None:
                m.unmount()
    finally:
        for m in mounts:
            m.cleanup()


@pytest.fixture
def mnt(mounter: MountFactory) -> Mount:
    """A default read-write mount of a fresh store at ``tmp_path/mnt``."""
    return mounter()


def errno_of(fn: Callable[[], object]) -> int:
    """The errno ``fn`` fails with (the test fails if it succeeds)."""
    try:
        fn()
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    pytest.fail("expected an OSError")


__all__ += ["errno_of", "ENOATTR"]
ENOATTR = errno.ENODATA


# The store API through a mount ----------------------------------------------------------

from collections.abc import Mapping  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from fusefs.view import decode_name, encode_ref  # noqa: E402
from store import (  # noqa: E402
    ALGORITHMS,
    MAX_LABEL_SIZE,
    AlreadyExists,
    DataLoss,
    Digest,
    FailedPrecondition,
    Info,
    InvalidArgument,
    NotFound,
    StoreError,
    Unavailable,
    parse_digest,
    parse_filters,
)
from store.types import Status, from_ns, parse_time  # noqa: E402

_FROM_ERRNO: dict[int, type[StoreError]] = {
    errno.ENOENT: NotFound,
    errno.ENODATA: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.EINVAL: InvalidArgument,
    errno.E2BIG: InvalidArgument,
    errno.EBADMSG: FailedPrecondition,
    errno.EBUSY: Unavailable,
    errno.EIO: DataLoss,
}


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn the errno of a file operation back into the store error it stands for."""
    try:
        yield
    except OSError as exc:
        cls = _FROM_ERRNO.get(exc.errno or 0)
        if cls is None:
            raise
        raise cls(f"{what} ({os.strerror(exc.errno or 0).lower()})") from None


def _xattr(path: str, name: str) -> str:
    return os.getxattr(path, f"user.{name}").decode("utf-8", "surrogateescape")


def _time(path: str, name: str) -> Any:
    return from_ns(parse_time(_xattr(path, f"contentfs.{name}")))


def _check_labels(labels: Mapping[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(f"label {k[:64]}: greater than maximum size")


class FuseReader:
    """ReaderAt over an open blob file of the mount."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size

    def read_at(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class FuseWriter:
    """A store Writer as an open file in ``ingest/`` (opened for writing = holding the ref).

    ``commit`` sets the labels as ``user.*`` xattrs, the size as ``user.contentfs.total``
    (restored if the commit fails, since the store's size argument is not persistent),
    closes the file and commits with ``setxattr user.contentfs.commit``; as the mount treats
    existing content as success, AlreadyExists is derived from the blob having existed.
    """

    def __init__(self, store: FuseStore, ref: str, fd: int, expected: Digest | None) -> None:
        self._store = store
        self.ref = ref
        self._path = store.ingest_path(ref)
        self._fd = fd
        self._expected = expected
        self._final: str | None = None
        with _mapped(f"ingest {ref}"):
            self._offset = int(_xattr(self._path, "contentfs.offset"))

    def write(self, data: bytes) -> int:
        if self._fd < 0:
            raise FailedPrecondition(f"ingest {self.ref}: writer is closed")
        with _mapped(f"write ingest {self.ref}"):
            n = os.pwrite(self._fd, data, self._offset)
        self._offset += n
        return n

    def digest(self) -> str:
        if self._final is not None:
            return self._final
        with _mapped(f"ingest {self.ref}"):
            return _xattr(self._path, "contentfs.digest")

    def status(self) -> Status:
        st = self._store.status(self.ref)
        return Status(st.ref, st.offset, st.total, self._expected, st.started_at, st.updated_at)

    def truncate(self, size: int) -> None:
        """Only 0, like the store (the mount also accepts the current size and larger)."""
        if size != 0:
            from store import NotImplemented as StoreNotImplemented

            raise StoreNotImplemented(f"ingest {self.ref}: truncate to {size} bytes")
        with _mapped(f"truncate ingest {self.ref}"):
            os.ftruncate(self._fd, 0)
        self._offset = 0

    def commit(self, size: int = 0, expected: str | None = None,
               labels: Mapping[str, str] | None = None) -> str:
        if self._fd < 0:
            raise FailedPrecondition("cannot commit on closed writer")
        path = self._path
        try:
            actual = self.digest()
            want = parse_digest(expected) if expected else None
            _check_labels(labels or {})
            with _mapped(f"commit ingest {self.ref}"):
                for k, v in (labels or {}).items():
                    os.setxattr(path, f"user.{k}", v.encode())
                old_total = _xattr(path, "contentfs.total")
                if size > 0:
                    os.setxattr(path, "user.contentfs.total", str(size).encode())
        finally:
            self.close()
        final = want or actual
        existed = os.path.exists(self._store.blob_path(final))
        try:
            os.setxattr(path, "user.contentfs.commit", (expected or "").encode())
        except OSError as exc:
            if exc.errno == errno.EBADMSG:
                message = _xattr(path, "contentfs.error")
                if size > 0:
                    os.setxattr(path, "user.contentfs.total", old_total.encode())
                raise FailedPrecondition(message) from None
            with _mapped(f"commit ingest {self.ref}"):
                raise
        self._final = final
        if existed:
            raise AlreadyExists(f"content {final}")
        return final

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class FuseStore:
    """The store API (as used by tests/suite.py) on top of a mounted directory, using only
    file operations and xattrs. Filters are parsed and matched here with the store's own
    filter language (``store.filters``), since the filesystem has no query operation."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint

    def close(self) -> None:
        """Nothing to release: the mount belongs to the fixture that made it."""

    def blob_path(self, digest: str) -> str:
        alg, _, hexpart = digest.partition(":")
        return os.path.join(self.mountpoint, "blobs", alg, hexpart)

    def ingest_path(self, ref: str) -> str:
        return os.path.join(self.mountpoint, "ingest", encode_ref(ref))

    def info(self, digest: str) -> Info:
        dgst = parse_digest(digest)
        path = self.blob_path(dgst)
        with _mapped(f"content {dgst}"):
            size = os.stat(path).st_size
            labels = {n[5:]: _xattr(path, n[5:]) for n in os.listxattr(path)
                      if n.startswith("user.")}
            return Info(dgst, size, _time(path, "createdat"), _time(path, "updatedat"), labels)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        dgst = parse_digest(info.digest)
        replace: dict[str, str] | None = None
        changes: dict[str, str] = {}
        for fp in fieldpaths or ("labels",):
            if fp == "labels":
                replace = dict(info.labels)
            elif fp.startswith("labels."):
                changes[fp[7:]] = info.labels.get(fp[7:], "")
            else:
                raise InvalidArgument(f'cannot update "{fp}" field on content info "{dgst}"')
        _check_labels({k: v for k, v in {**(replace or {}), **changes}.items() if v})
        current = self.info(dgst).labels
        path = self.blob_path(dgst)
        ops: list[tuple[str, str]] = []
        if replace is not None:
            ops += [(k, "") for k in current if k not in replace]
            ops += [(k, v) for k, v in replace.items()]
        ops += list(changes.items())
        with _mapped(f"content {dgst}"):
            for k, v in ops:
                if v:
                    os.setxattr(path, f"user.{k}", v.encode())
                else:
                    try:
                        os.removexattr(path, f"user.{k}")
                    except OSError as exc:
                        if exc.errno != errno.ENODATA:
                            raise
        return self.info(dgst)

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        flt = parse_filters(*filters)
        for alg in sorted(ALGORITHMS):
            for name in sorted(os.listdir(os.path.join(self.mountpoint, "blobs", alg))):
                try:
                    info = self.info(f"{alg}:{name}")
                except NotFound:
                    continue
                if flt.match(_adaptor(info)):
                    fn(info)

    def list(self, *filters: str) -> list[Info]:
        out: list[Info] = []
        self.walk(out.append, *filters)
        return out

    def delete(self, digest: str) -> None:
        dgst = parse_digest(digest)
        with _mapped(f"content {dgst}"):
            os.unlink(self.blob_path(dgst))

    def reader_at(self, digest: str) -> FuseReader:
        dgst = parse_digest(digest)
        with _mapped(f"content {dgst}"):
            return FuseReader(os.open(self.blob_path(dgst), os.O_RDONLY))

    def writer(self, ref: str, *, total: int = 0, expected: str | None = None) -> FuseWriter:
        if not ref:
            raise InvalidArgument("ref must not be empty")
        exp = parse_digest(expected) if expected else None
        if exp is not None and os.path.exists(self.blob_path(exp)):
            raise AlreadyExists(f"content {exp}")
        path = self.ingest_path(ref)
        with _mapped(f"ref {ref} locked"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if total:
                with _mapped(f"ingest {ref}"):
                    os.setxattr(path, "user.contentfs.total", str(total).encode())
            return FuseWriter(self, ref, fd, exp)
        except BaseException:
            os.close(fd)
            raise

    def status(self, ref: str) -> Status:
        path = self.ingest_path(ref)
        with _mapped(f"ingest {ref}"):
            expected = _xattr(path, "contentfs.expected")
            return Status(ref, int(_xattr(path, "contentfs.offset")),
                          int(_xattr(path, "contentfs.total")),
                          Digest(expected) if expected else None,
                          _time(path, "startedat"), _time(path, "updatedat"))

    def list_statuses(self, *filters: str) -> list[Status]:
        flt = parse_filters(*filters)
        out = []
        for name in os.listdir(os.path.join(self.mountpoint, "ingest")):
            ref = decode_name(name)
            if ref is None:
                continue
            try:
                st = self.status(ref)
            except NotFound:
                continue
            if flt.match(lambda fp, r=ref: (r, True) if tuple(fp) == ("ref",) else ("", False)):
                out.append(st)
        return sorted(out, key=lambda s: s.ref)

    def abort(self, ref: str) -> None:
        with _mapped(f"ingest {ref}"):
            os.unlink(self.ingest_path(ref))


def _adaptor(info: Info) -> Callable[..., tuple[str, bool]]:
    def adapt(fieldpath: tuple[str, ...]) -> tuple[str, bool]:
        if tuple(fieldpath) == ("digest",):
            return info.digest, True
        if fieldpath and fieldpath[0] == "labels" and len(fieldpath) > 1:
            key = ".".join(fieldpath[1:])
            if key in info.labels:
                return info.labels[key], True
        return "", False

    return adapt


__all__ += ["FuseReader", "FuseStore", "FuseWriter"]
