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
                 extra: tuple[str, ...] = ()) -> None:
        self.root = root
        self.path = path
        self.options = options
        self.log_path = log_path
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        # regexes of error lines a test expects. pyfuse3 logs a failed reply to a RELEASE
        # the kernel sent while unmounting (it no longer waits for it): harmless.
        self.allowed_log: list[str] = [r"fuse_release\(\): fuse_reply_\* failed with No such"]

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
                                         stdin=subprocess.DEVNULL)
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
        deadline = time.monotonic() + 20
        while self.proc.poll() is None and is_mounted(self.path):
            proc = subprocess.run(["fusermount3", "-u", self.path], capture_output=True,
                                  check=False)
            if proc.returncode == 0 or time.monotonic() > deadline:
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
             extra: tuple[str, ...] = (), start: bool = True) -> Mount:
        if root is None:
            root = os.path.join(base, "root")
            os.makedirs(root, exist_ok=True)
        path = os.path.join(base, name)
        os.makedirs(path, exist_ok=True)
        m = Mount(root, path, options, os.path.join(base, f"{name}.log"), extra)
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
