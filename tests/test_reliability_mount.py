"""Crash at any moment, mount daemon: SIGKILL ``contentfs mount`` in the middle of an
ingest through the mount (before any write, mid-stream, after close, during commit),
clear the dead mount, remount, and check blobs, the ingest's true prefix and that the
ingest completes by appending the rest through the new mount."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.fuse_util import Mount, is_mounted, require_fuse

from .rel_util import check_blobs, check_ingests, payload, sha256, wait_for

MiB = 1 << 20
SIZE = 6 * MiB + 17


class Mounts:
    """Mounts of one root at one path, one after another; all cleaned up at the end."""

    def __init__(self, base: str, *options: str) -> None:
        self.root = os.path.join(base, "root")
        self.path = os.path.join(base, "mnt")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.path, exist_ok=True)
        self.base = base
        self.options = options
        self.all: list[Mount] = []

    def start(self, *options: str) -> Mount:
        log = os.path.join(self.base, f"mount{len(self.all)}.log")
        m = Mount(self.root, self.path, options or self.options, log)
        self.all.append(m)
        return m.start()

    def kill(self, m: Mount) -> None:
        m.signal(signal.SIGKILL)
        m.wait()

    def close(self) -> None:
        for m in reversed(self.all):
            if m.proc is not None and m.proc.poll() is None:
                m.unmount()
        for m in self.all:
            m.cleanup()


@pytest.fixture
def mounts(tmp_path: str) -> Iterator[Mounts]:
    require_fuse()
    ms = Mounts(os.fspath(tmp_path))
    try:
        yield ms
    finally:
        ms.close()


def _base_blobs(m: Mount) -> dict[str, bytes]:
    """Blobs committed through the mount before the crash, with a label each."""
    out = {}
    for i, n in enumerate((0, 5, 2 * MiB + 1)):
        data = payload(500 + i, n)
        name = f"base-{i}"
        with open(m.ingest(name), "wb") as f:
            f.write(data)
        os.setxattr(m.ingest(name), "user.base", str(i).encode())
        os.setxattr(m.ingest(name), "user.contentfs.commit", sha256(data).encode())
        out[sha256(data)] = data
    return out


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):  # ENOTCONN from a dead daemon
        os.close(fd)


def _check_and_resume(ms: Mounts, base: dict[str, bytes], ref: str, data: bytes,
                      written: int) -> int:
    """After the kill: invariants on the backing store, then remount, append the rest
    through the mount, commit and read back. Returns the offset found."""
    blobs = check_blobs(ms.root)
    for dgst, want in base.items():
        assert blobs[dgst] == want
    offsets = check_ingests(ms.root, {ref: data})
    committed = sha256(data) in blobs
    offset = offsets.get(ref, 0)
    assert offset <= written
    m = ms.start()  # clears a dead mount if one was left
    assert sorted(os.listdir(m.path)) == ["blobs", "ingest"]
    for i, dgst in enumerate(base):
        assert os.getxattr(m.blob(dgst.split(":")[1]), "user.base") == str(i).encode()
    if not committed:
        fd = os.open(m.ingest(ref), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            assert os.fstat(fd).st_size == offset
            view = memoryview(data)[offset:]
            while view:
                view = view[os.write(fd, view[: MiB]) :]
        finally:
            os.close(fd)
        os.setxattr(m.ingest(ref), "user.contentfs.commit", sha256(data).encode())
    assert not os.path.exists(m.ingest(ref))
    with open(m.blob(sha256(data).split(":")[1]), "rb") as f:
        assert f.read() == data
    return offset


def _wait_dead_mount_gone(ms: Mounts, auto_unmount: bool) -> None:
    if auto_unmount:
        wait_for(lambda: not is_mounted(ms.path), what="auto_unmount after SIGKILL")
    else:
        with pytest.raises(OSError) as info:
            os.listdir(ms.path)
        assert info.value.errno == errno.ENOTCONN


@pytest.mark.parametrize(
    "point", ["open", "mid:1", f"mid:{MiB}", f"mid:{3 * MiB + 5}", f"mid:{SIZE}", "closed",
              "closed-noauto"])
def test_daemon_killed_mid_ingest(mounts: Mounts, point: str) -> None:
    auto = not point.endswith("-noauto")
    m = mounts.start() if auto else mounts.start("noauto_unmount")
    base = _base_blobs(m)
    ref = "crash-ref"
    data = payload(42, SIZE)
    stop = SIZE if point.startswith("closed") else int(point.split(":")[1]) if ":" in point else 0
    fd = os.open(m.ingest(ref), os.O_WRONLY | os.O_CREAT)
    try:
        off = 0
        while off < stop:
            off += os.write(fd, data[off : min(stop, off + MiB)])
        if point.startswith("closed"):
            os.close(fd)
            fd = -1
        mounts.kill(m)
    finally:
        if fd >= 0:
            _close_quietly(fd)
    _wait_dead_mount_gone(mounts, auto)
    offset = _check_and_resume(mounts, base, ref, data, stop)
    if point.startswith("closed"):
        assert offset == SIZE  # close(2) returned: the data reached the store
    elif point == "open":
        assert offset == 0


def test_daemon_killed_during_commit(mounts: Mounts, soak: bool) -> None:
    """Kill the daemon at random moments while setfattr commits a large ingest."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    m = mounts.start()
    base = _base_blobs(m)
    outcomes = []
    done: dict[str, bytes] = {}
    for i in range(12 if soak else 3):
        ref = f"commit-{i}"
        data = payload(seed + i, 24 * MiB + i)
        with open(m.ingest(ref), "wb") as f:
            f.write(data)
        setfattr = subprocess.Popen(
            ["setfattr", "-n", "user.contentfs.commit", "-v", sha256(data), m.ingest(ref)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.choice([0, 0.001, 0.002, 0.004, 0.008, 0.016]))
        mounts.kill(m)
        setfattr.wait(60)
        wait_for(lambda: not is_mounted(mounts.path), what="auto_unmount after SIGKILL")
        outcomes.append(sha256(data) in check_blobs(mounts.root))
        _check_and_resume(mounts, base, ref, data, len(data))
        done[sha256(data)] = data
        blobs = check_blobs(mounts.root)
        assert all(blobs[d] == b for d, b in done.items()), f"seed {seed}"
        m = mounts.all[-1]
    print(f"seed {seed}: committed before the kill: {outcomes}")
