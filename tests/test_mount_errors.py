"""``contentfs mount`` tells the user about failures in one plain line, as the other
commands do (issue 9): ``contentfs: ...``, no log format, no traceback."""

from __future__ import annotations

import os
import subprocess

from tests import fuse_util
from tests.fuse_util import CONTENTFS, Mount, is_mounted

mounter = fuse_util.mounter


def _one_plain_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("contentfs: "), err
    assert " ERROR " not in err and "Traceback" not in err, err
    return lines[0]


def test_mount_on_a_mount_point(mounter: fuse_util.MountFactory,
                                tmp_path: os.PathLike[str]) -> None:
    m: Mount = mounter()
    other = os.path.join(os.fspath(tmp_path), "other")
    os.mkdir(other)
    for extra in ((), ("-f",)):
        proc = subprocess.run([CONTENTFS, "mount", *extra, other, m.path], capture_output=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 1
        line = _one_plain_line(proc)
        assert f"{m.path} is already a mount point" in line, line
        assert "contentfs umount" in line, line
    assert is_mounted(m.path)
    assert os.listdir(m.path) == ["blobs", "ingest"]  # the first mount is untouched
    proc = subprocess.run([CONTENTFS, "mount", other, m.path + "-x", "-o", "bogus"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert "mount option 'bogus'" in _one_plain_line(proc)
    m.unmount()
