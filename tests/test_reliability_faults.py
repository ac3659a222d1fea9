"""Faults: a full backing filesystem, blobs corrupted on disk, and a metadata database
that is locked, missing or corrupt. Nothing is half-committed, errors are one clean
line, and committed blobs stay listed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest

from store import DataLoss, FailedPrecondition, LocalStore, Unavailable

from .rel_util import (
    CONTENTFS,
    assert_clean_error,
    assert_no_traceback,
    check_blobs,
    check_ingests,
    kill9,
    payload,
    run_cli,
    sha256,
    wait_for,
)

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: str) -> Iterator[str]:
    """A 16 MiB tmpfs the test can fill up; unmounted at the end."""
    mnt = os.path.join(tmp_path, "small")
    os.mkdir(mnt)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", mnt],
                          capture_output=True, check=False)
    assert proc.returncode == 0, f"cannot mount a tmpfs (root needed): {proc.stderr!r}"
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)


def _fill(path: str, leave: int) -> None:
    """Create ``path`` so that about ``leave`` bytes stay free on its filesystem."""
    st = os.statvfs(os.path.dirname(path))
    free = st.f_bavail * st.f_frsize
    with open(path, "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _commit(root: str, ref: str, data: bytes, labels: dict[str, str]) -> str:
    with LocalStore(root) as s:
        w = s.writer(ref)
        w.write(data)
        return w.commit(len(data), sha256(data), labels=labels)


def test_enospc_mid_ingest_then_resume(small_fs: str) -> None:
    root = os.path.join(small_fs, "root")
    os.mkdir(root)
    base = payload(1, MiB + 3)
    base_dgst = _commit(root, "base", base, {"keep": "me"})
    small = payload(2, 100)
    with LocalStore(root) as s:  # a complete small ingest, committed once the disk is full
        w = s.writer("small")
        w.write(small)
        w.close()
    ballast = os.path.join(small_fs, "ballast")
    _fill(ballast, 3 * MiB)
    data = payload(3, 6 * MiB + 1)

    with LocalStore(root) as s:
        w = s.writer("big", total=len(data))
        with pytest.raises(OSError) as exc_info:
            for off in range(0, len(data), 256 * 1024):
                w.write(data[off : off + 256 * 1024])
        assert exc_info.value.errno == errno.ENOSPC
        stored = w.offset
        assert 0 < stored < len(data)
        w.close()  # keeps the ingest even though updatedat cannot be written
        # commit on a full disk: done completely or refused with the ingest kept
        w = s.writer("small")
        try:
            assert w.commit(100, sha256(small)) == sha256(small)
        except Unavailable:
            assert s.status("small").offset == 100
        # a commit of the short ingest is refused, and keeps it
        w = s.writer("big")
        assert w.offset == stored
        with pytest.raises(FailedPrecondition):
            w.commit(len(data), sha256(data))

    blobs = check_blobs(root)
    assert blobs[base_dgst] == base
    assert sha256(data) not in blobs
    assert check_ingests(root, {"big": data, "small": small})["big"] == stored
    for dirpath, _, files in os.walk(os.path.join(root, "ingest")):
        assert not [f for f in files if f.endswith(".tmp")], (dirpath, files)

    src = os.path.join(small_fs, "..", "input")
    with open(src, "wb") as f:
        f.write(data)
    # the CLI on the full disk: one clean line, and the ingest is kept as a true prefix
    err = assert_clean_error(run_cli(root, "ingest", "big", src), 1)
    assert "No space left on device" in err
    assert check_ingests(root, {"big": data})["big"] >= stored

    os.unlink(ballast)
    done = run_cli(root, "ingest", "big", src, "--label", "after=enospc")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == sha256(data)
    if "small" in check_ingests(root, {"small": small}):
        assert run_cli(root, "ingest", "small", "-", stdin=small).returncode == 0
    blobs = check_blobs(root)
    assert blobs[sha256(data)] == data and blobs[sha256(small)] == small
    assert check_ingests(root, {}) == {}
    with LocalStore(root) as s:
        assert s.info(base_dgst).labels == {"keep": "me"}
        assert s.info(sha256(data)).labels == {"after": "enospc"}


def test_corrupt_blob_reported_by_verify(store_root: str) -> None:
    good = _commit(store_root, "good", payload(1, 5000), {})
    flipped = _commit(store_root, "flipped", payload(2, 3 * MiB), {})
    short = _commit(store_root, "short", payload(3, 4096), {})
    path = os.path.join(store_root, "blobs", "sha256", flipped.split(":")[1])
    with open(path, "r+b") as f:
        f.seek(2 * MiB)
        byte = f.read(1)
        f.seek(2 * MiB)
        f.write(bytes([byte[0] ^ 1]))
    os.truncate(os.path.join(store_root, "blobs", "sha256", short.split(":")[1]), 4000)

    proc = run_cli(store_root, "verify")
    assert_clean_error(proc, 8)
    out = proc.stdout.decode()
    assert f"{good}: OK" in out
    assert f"{flipped}: FAILED" in out and f"{short}: FAILED" in out
    assert run_cli(store_root, "verify", good).returncode == 0
    assert_clean_error(run_cli(store_root, "verify", flipped), 8)
    assert_clean_error(run_cli(store_root, "verify", sha256(b"absent")), 4)
    with LocalStore(store_root) as s, pytest.raises(DataLoss):
        s.verify(flipped)


def _labelled_store(root: str) -> dict[str, dict[str, str]]:
    out = {}
    for i in range(20):
        labels = {f"k{j}": "v" * 300 for j in range(4)}
        out[_commit(root, f"r{i}", payload(i, 10 + i), labels)] = labels
    return out


def _ls(root: str) -> dict[str, dict[str, str]]:
    proc = run_cli(root, "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    return {b["digest"]: b["labels"] for b in json.loads(proc.stdout)}


def _db(root: str) -> str:
    return os.path.join(root, ".contentfs", "meta.db")


def test_db_missing_is_recreated(store_root: str) -> None:
    blobs = _labelled_store(store_root)
    live = LocalStore(store_root)  # a process that has the database open
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(_db(store_root) + suffix):
            os.unlink(_db(store_root) + suffix)
    assert set(_ls(store_root)) == set(blobs)  # listed, labels gone with the database
    d = next(iter(blobs))
    assert run_cli(store_root, "label", d, "new=1").returncode == 0
    assert _ls(store_root)[d] == {"new": "1"}
    assert {i.digest for i in live.list()} == set(blobs)  # the old handle still works
    live.close()


@pytest.mark.parametrize("damage", ["garbage", "labels-page"])
def test_db_corrupt_is_rebuilt(store_root: str, damage: str) -> None:
    blobs = _labelled_store(store_root)
    db = _db(store_root)
    if damage == "garbage":
        with open(db, "wb") as f:
            f.write(os.urandom(64 * 1024))
    else:  # a valid header; only the labels table is destroyed
        conn = sqlite3.connect(db)
        (page,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name='labels'").fetchone()
        (size,) = conn.execute("PRAGMA page_size").fetchone()
        conn.close()
        with open(db, "r+b") as f:
            f.seek((page - 1) * size)
            f.write(os.urandom(size))
    proc = run_cli(store_root, "ls", "-q")
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    assert "moved to" in proc.stderr.decode()
    assert set(proc.stdout.decode().split()) == set(blobs)
    aside = [n for n in os.listdir(os.path.dirname(db)) if n.startswith("meta.db.corrupt-")]
    assert aside, "the corrupt database is kept aside"
    d = next(iter(blobs))
    assert run_cli(store_root, "label", d, "a=b").returncode == 0
    assert _ls(store_root)[d] == {"a": "b"}


_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "exclusive":
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO ingests(ref, expected, labels) VALUES ('holder', NULL, '{}')")
print("locked", flush=True)
time.sleep(3600)
"""


def _hold_db(root: str, mode: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, _db(root), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"locked\n", proc.stderr.read() if proc.stderr else line
    return proc


def test_db_write_locked_by_another_process(store_root: str, tmp_path: str) -> None:
    blobs = _labelled_store(store_root)
    data = payload(7, 2 * MiB)
    src = os.path.join(tmp_path, "input")
    with open(src, "wb") as f:
        f.write(data)
    d = next(iter(blobs))
    holder = _hold_db(store_root, "write")
    try:
        assert _ls(store_root) == blobs  # readers are not blocked (WAL)
        label = subprocess.Popen(
            [CONTENTFS, "--root", store_root, "label", d, "x=y"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ingest = run_cli(store_root, "ingest", "locked-ref", src, "--label", "a=b")
        out, err = label.communicate(timeout=120)
        assert_clean_error(ingest, 7)
        assert "locked" in ingest.stderr.decode()
        assert_clean_error(subprocess.CompletedProcess(label.args, label.returncode, out, err), 7)
        # nothing half-committed: no blob, and at most a true prefix in the ingest
        assert sha256(data) not in check_blobs(store_root)
        check_ingests(store_root, {"locked-ref": data})
    finally:
        kill9(holder)
    done = run_cli(store_root, "ingest", "locked-ref", src, "--label", "a=b")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == sha256(data)
    assert _ls(store_root)[sha256(data)] == {"a": "b"}
    assert _ls(store_root)[d] == blobs[d]


def test_db_exclusively_locked(store_root: str) -> None:
    blobs = _labelled_store(store_root)
    holder = _hold_db(store_root, "exclusive")
    try:
        proc = run_cli(store_root, "ls")
        assert_clean_error(proc, 7)
        assert "locked" in proc.stderr.decode()
    finally:
        kill9(holder)
    wait_for(lambda: _ls(store_root) == blobs, what="database unlocked")


def test_corrupt_blob_read_through_mount_ends_in_eio(tmp_path: str) -> None:
    """The rule: a blob whose backing file changed after its commit (no metadata row, an
    mtime other than the commit time, or a later ctime) is hashed on its first whole
    sequential read through an open; on a mismatch the read that completes it fails with
    EIO. An unchanged blob is trusted (no hashing, full read speed)."""
    from tests.fuse_util import Mount, require_fuse

    require_fuse()
    base = os.fspath(tmp_path)
    root, path = os.path.join(base, "root"), os.path.join(base, "mnt")
    os.makedirs(root)
    os.makedirs(path)
    good = payload(1, 3 * MiB + 5)
    bad = payload(2, 3 * MiB + 5)
    for ref, data in (("good", good), ("bad", bad)):
        _commit(root, ref, data, {})
    backing = os.path.join(root, "blobs", "sha256", sha256(bad).split(":")[1])
    with open(backing, "r+b") as f:
        f.seek(MiB)
        f.write(b"\0rot")
    m = Mount(root, path, (), os.path.join(base, "mount.log"))
    m.start()
    try:
        with open(m.blob(sha256(good).split(":")[1]), "rb") as f:
            assert f.read() == good
        proc = subprocess.run(["cat", m.blob(sha256(bad).split(":")[1])],
                              capture_output=True, check=False)
        assert proc.returncode != 0 and b"Input/output error" in proc.stderr, proc.stderr
        for tool in (["sha256sum"], ["cat"], ["cp", "--"]):  # later opens fail as well
            dst = [os.path.join(base, "copy")] if tool[0] == "cp" else []
            proc = subprocess.run([*tool, m.blob(sha256(bad).split(":")[1]), *dst],
                                  capture_output=True, check=False)
            assert proc.returncode != 0 and b"Input/output error" in proc.stderr, tool
        assert_clean_error(run_cli(root, "verify", sha256(bad)), 8)
        assert run_cli(root, "verify", sha256(good)).returncode == 0
    finally:
        m.unmount()
    assert "bytes on disk hash to" in m.log()


def test_db_write_locked_under_a_mount(tmp_path: str) -> None:
    """While another process holds the database's write lock, the mount keeps serving
    reads; label and commit requests fail with EBUSY after the database's busy timeout,
    the ingest is kept, and everything works again once the lock is gone."""
    from tests.fuse_util import Mount, require_fuse

    require_fuse()
    base = os.fspath(tmp_path)
    root, path = os.path.join(base, "root"), os.path.join(base, "mnt")
    os.makedirs(root)
    os.makedirs(path)
    blobs = _labelled_store(root)
    d = next(iter(blobs))
    m = Mount(root, path, (), os.path.join(base, "mount.log"))
    m.start()
    try:
        data = payload(9, 100_000)
        with open(m.ingest("r"), "wb") as f:
            f.write(data)
        holder = _hold_db(root, "write")
        try:
            blob = m.blob(d.split(":")[1])
            with open(blob, "rb") as f:
                assert sha256(f.read()) == d
            assert os.getxattr(blob, "user.k0") == b"v" * 300
            with pytest.raises(OSError) as info:
                os.setxattr(blob, "user.new", b"1")
            assert info.value.errno == errno.EBUSY
            with pytest.raises(OSError) as info:
                os.setxattr(m.ingest("r"), "user.contentfs.commit", sha256(data).encode())
            assert info.value.errno == errno.EBUSY
            assert os.path.getsize(m.ingest("r")) == len(data)
        finally:
            kill9(holder)
        os.setxattr(m.ingest("r"), "user.contentfs.commit", sha256(data).encode())
        with open(m.blob(sha256(data).split(":")[1]), "rb") as f:
            assert f.read() == data
        os.setxattr(m.blob(d.split(":")[1]), "user.new", b"1")
    finally:
        m.unmount()


def test_enospc_through_the_mount(small_fs: str) -> None:
    """A write through the mount on a full backing filesystem fails with ENOSPC (not
    EIO), the ingest keeps a true prefix, and after space is freed appending the rest
    and committing works."""
    from tests.fuse_util import Mount, require_fuse

    require_fuse()
    root = os.path.join(small_fs, "root")
    os.mkdir(root)
    path = os.path.join(os.path.dirname(small_fs), "mnt")
    os.mkdir(path)
    m = Mount(root, path, (), os.path.join(os.path.dirname(small_fs), "mount.log"))
    m.start()
    try:
        ballast = os.path.join(small_fs, "ballast")
        _fill(ballast, 2 * MiB)
        data = payload(4, 5 * MiB + 3)
        fd = os.open(m.ingest("full"), os.O_WRONLY | os.O_CREAT)
        try:
            off = 0
            with pytest.raises(OSError) as info:
                while off < len(data):
                    off += os.write(fd, data[off : off + 256 * 1024])
                os.fsync(fd)
            assert info.value.errno == errno.ENOSPC
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        stored = os.path.getsize(m.ingest("full"))
        assert 0 < stored <= off < len(data)
        with open(m.ingest("full"), "rb") as f:
            assert f.read() == data[:stored]
        os.unlink(ballast)
        with open(m.ingest("full"), "ab") as f:
            f.write(data[stored:])
        os.setxattr(m.ingest("full"), "user.contentfs.commit", sha256(data).encode())
        with open(m.blob(sha256(data).split(":")[1]), "rb") as f:
            assert f.read() == data
    finally:
        m.unmount()
    assert check_blobs(root)[sha256(data)] == data
