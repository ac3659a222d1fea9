"""Security of the mount: other users cannot use it unless ``-o allow_other`` is given,
and even then blob files and directories grant no write."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests.fuse_util import Mount, require_fuse

from .rel_util import payload, sha256

NOBODY = 65534


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *cmd],
        capture_output=True, timeout=60, check=False,
    )


@pytest.fixture
def public_base() -> Iterator[str]:
    """A directory every user can traverse (pytest's tmp_path is 0700, which would make
    any "other users cannot read" check pass for the wrong reason)."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.fail("these tests run a command as another user: run them as root")
    base = tempfile.mkdtemp(prefix="contentfs-sec-", dir="/tmp")
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _mount(base: str, name: str, *options: str) -> Mount:
    root = os.path.join(base, "root")
    path = os.path.join(base, name)
    os.makedirs(root, mode=0o755, exist_ok=True)
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chmod(path, 0o755)
    return Mount(root, path, options, os.path.join(base, f"{name}.log")).start()


def _commit(m: Mount, ref: str, data: bytes) -> str:
    with open(m.ingest(ref), "wb") as f:
        f.write(data)
    os.setxattr(m.ingest(ref), "user.contentfs.commit", sha256(data).encode())
    return m.blob(sha256(data).split(":")[1])


def test_other_users_locked_out_by_default(public_base: str) -> None:
    m = _mount(public_base, "private")
    try:
        data = payload(1, 10_000)
        blob = _commit(m, "r", data)
        with open(blob, "rb") as f:
            assert f.read() == data  # root, the owner, reads it
        for cmd in (["cat", blob], ["ls", m.path], ["stat", m.path], ["ls", m.ingest("")]):
            proc = as_nobody(*cmd)
            assert proc.returncode != 0, (cmd, proc.stdout)
            assert b"Permission denied" in proc.stderr, proc.stderr
        # the same user reads the backing store (0755 dirs, 0444 blob): the lock-out is the
        # mount's doing, not the directory's
        backing = os.path.join(m.root, "blobs", "sha256", sha256(data).split(":")[1])
        assert as_nobody("cat", backing).stdout == data
    finally:
        m.unmount()


def test_allow_other_reads_but_never_writes_blobs(public_base: str) -> None:
    m = _mount(public_base, "shared", "allow_other")
    try:
        data = payload(2, 20_000)
        blob = _commit(m, "r", data)
        hexd = sha256(data).split(":")[1]
        proc = as_nobody("cat", blob)
        assert proc.returncode == 0 and proc.stdout == data, proc.stderr
        assert hexd in as_nobody("ls", os.path.dirname(blob)).stdout.decode()
        refused = [
            ["sh", "-c", f"echo x >> {blob}"],
            ["sh", "-c", f"echo x > {blob}"],
            ["truncate", "-s", "0", blob],
            ["rm", "-f", blob],
            ["touch", os.path.join(os.path.dirname(blob), "0" * 64)],
            ["mkdir", os.path.join(m.path, "blobs", "sha512")],
            ["setfattr", "-n", "user.k", "-v", "v", blob],
            ["mv", blob, m.ingest("stolen")],
            ["sh", "-c", f"echo x > {m.ingest('evil')}"],
        ]
        for cmd in refused:
            proc = as_nobody(*cmd)
            assert proc.returncode != 0, (cmd, proc.stderr)
        with open(blob, "rb") as f:
            assert f.read() == data
        assert os.listdir(m.ingest("")) == []
        assert os.listxattr(blob) == []
    finally:
        m.unmount()


def test_blob_files_and_dirs_grant_no_write(public_base: str) -> None:
    m = _mount(public_base, "modes")
    try:
        data = payload(3, 100)
        blob = _commit(m, "r", data)
        for path in (blob, os.path.join(m.path, "blobs")):
            mode = os.stat(path).st_mode
            assert mode & 0o222 == 0, (path, stat.filemode(mode))
        # blobs/<alg>/ keeps the owner's w bit: with default_permissions the kernel asks
        # for it before `mv ingest/x blobs/sha256/<hex>` (the commit); never group/other
        mode = os.stat(os.path.dirname(blob)).st_mode
        assert mode & 0o022 == 0, stat.filemode(mode)
        backing = os.path.join(m.root, "blobs", "sha256", sha256(data).split(":")[1])
        assert os.stat(backing).st_mode & 0o222 == 0, stat.filemode(os.stat(backing).st_mode)
    finally:
        m.unmount()
