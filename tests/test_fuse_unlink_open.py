"""A file removed through the mount stays usable through the handles already open on it
(issue 9, bug 2): reads and fstat keep working, with st_nlink 0, until the last close,
as on every Unix filesystem."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from tests import fuse_util
from tests.fuse_util import Mount

from .rel_util import sha256

mnt = fuse_util.mnt
mounter = fuse_util.mounter


def _commit(m: Mount, data: bytes) -> str:
    with open(m.ingest("new"), "wb") as f:
        f.write(data)
    hexd = sha256(data).split(":")[1]
    os.rename(m.ingest("new"), m.blob(hexd))
    return m.blob(hexd)


def test_shell_reads_blob_after_rm(mnt: Mount) -> None:
    blob = _commit(mnt, b"still here\n")
    script = f'exec 4<"{blob}"; rm "{blob}" || exit 9; cat <&4; stat -L -c %h:%s /dev/fd/4'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"still here\n0:11\n"
    assert not os.path.exists(blob)


def test_fstat_and_read_blob_after_rm(mnt: Mount) -> None:
    data = os.urandom(300_000)
    blob = _commit(mnt, data)
    fd = os.open(blob, os.O_RDONLY)
    fd2 = os.open(blob, os.O_RDONLY)
    try:
        before = os.fstat(fd)
        os.unlink(blob)
        with pytest.raises(FileNotFoundError):
            os.stat(blob)
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size, st.st_ino, st.st_mtime_ns) == (
            0, len(data), before.st_ino, before.st_mtime_ns)
        assert os.pread(fd, len(data) + 1, 0) == data
        os.close(fd2)  # not the last close: still usable
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 10, 5) == data[5:15]
    finally:
        os.close(fd)
        if fd2 >= 0:
            try:
                os.close(fd2)
            except OSError:
                pass
    assert not os.path.exists(blob)
    blob = _commit(mnt, data)  # the same blob again: a live file
    assert os.stat(blob).st_nlink == 1


def test_ingest_open_for_reading_after_rm(mnt: Mount) -> None:
    path = mnt.ingest("part")
    with open(path, "wb") as f:
        f.write(b"partial ingest")
    script = f'exec 4<"{path}"; rm "{path}" || exit 9; cat <&4; stat -L -c %h:%s /dev/fd/4'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"partial ingest0:14\n"
    fd = os.open(mnt.ingest("again"), os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"abc")
    os.close(fd)
    fd = os.open(mnt.ingest("again"), os.O_RDONLY)
    try:
        os.unlink(mnt.ingest("again"))
        assert os.fstat(fd).st_nlink == 0
        assert os.fstat(fd).st_size == 3
        assert os.read(fd, 10) == b"abc"
        # a new ingest of the same name is a different file
        with open(mnt.ingest("again"), "wb") as f:
            f.write(b"longer one")
        assert os.stat(mnt.ingest("again")).st_nlink == 1
        assert os.fstat(fd).st_size == 3
    finally:
        os.close(fd)
    with pytest.raises(OSError) as exc:
        os.stat(mnt.ingest("part"))
    assert exc.value.errno == errno.ENOENT


def test_open_ingest_aborted_by_another_process(mnt: Mount) -> None:
    """The same when the CLI aborts it: once the kernel asks again (ingest attributes
    are cached for a second), the open file answers, not ENOENT."""
    path = mnt.ingest("elsewhere")
    with open(path, "wb") as f:
        f.write(b"12345")
    fd = os.open(path, os.O_RDONLY)
    try:
        fuse_util.run(fuse_util.CONTENTFS, "--root", mnt.root, "abort", "elsewhere")
        deadline = time.monotonic() + 10
        while os.path.exists(path):  # until the kernel's entry has expired
            assert time.monotonic() < deadline, "ingest still listed after abort"
            time.sleep(0.1)
        time.sleep(1.2)  # and its attributes
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size) == (0, 5)
        assert os.pread(fd, 10, 0) == b"12345"
    finally:
        os.close(fd)


def test_rm_blob_open_through_its_commit_by_mv(mnt: Mount) -> None:
    """``mv ingest/X blobs/sha256/HEX`` leaves the ingest's inode at the blob's name until
    the kernel drops that entry (the mount asks it to, asynchronously): a file opened
    before that shows the blob through the ingest's inode. ``rm`` of the blob must give it
    st_nlink 0 as well (seen once under load: fstat after rm said 1, from the kernel's
    attribute cache of that inode)."""
    data = os.urandom(5000)
    path = mnt.ingest("moved")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)  # the ingest's inode, whatever the kernel does later
    try:
        blob = mnt.blob(sha256(data).split(":")[1])
        os.rename(path, blob)
        assert os.fstat(fd).st_nlink == 1  # (and cached by the kernel)
        os.unlink(blob)
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size) == (0, len(data))
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)
    assert not os.path.exists(blob)
