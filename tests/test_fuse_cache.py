"""The mount caches blob attributes and listings across `ls -l` (blobs are immutable):
what changes a blob's view (labels, deletion, new blobs), here or from another process,
still shows up in stat and in listings."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from store import Info, LocalStore
from tests import fuse_util
from tests.fuse_util import CONTENTFS, Mount, run, sha256

mounter = fuse_util.mounter
mnt = fuse_util.mnt


def _eventually(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Changes by other processes reach the mount asynchronously (inotify)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {within}s")
        time.sleep(0.01)


def _ls_l(mnt: Mount) -> dict[str, os.stat_result]:
    """What `ls -l` of blobs/sha256/ sees: every entry with its attributes."""
    d = os.path.join(mnt.path, "blobs", "sha256")
    with os.scandir(d) as it:
        return {e.name: e.stat(follow_symlinks=False) for e in it}


def _ingest_cli(mnt: Mount, data: bytes, ref: str) -> str:
    run(CONTENTFS, "--root", mnt.root, "ingest", ref, stdin=data)
    return sha256(data)


def test_label_from_another_process_moves_ctime_of_a_listed_blob(mnt: Mount) -> None:
    hexd = _ingest_cli(mnt, b"listed then relabelled\n", "a")
    _eventually(lambda: hexd in _ls_l(mnt))
    before = _ls_l(mnt)[hexd]
    assert _ls_l(mnt)[hexd].st_ctime_ns == before.st_ctime_ns  # listed twice: cached
    time.sleep(0.01)
    run(CONTENTFS, "--root", mnt.root, "label", f"sha256:{hexd}", "who=cli")
    _eventually(lambda: os.stat(mnt.blob(hexd)).st_ctime_ns > before.st_ctime_ns)
    _eventually(lambda: _ls_l(mnt)[hexd].st_ctime_ns > before.st_ctime_ns)
    after = os.stat(mnt.blob(hexd))
    assert (after.st_mtime_ns, after.st_ino, after.st_size) == (
        before.st_mtime_ns, before.st_ino, before.st_size)
    # and once more, removing the label
    time.sleep(0.01)
    run(CONTENTFS, "--root", mnt.root, "label", f"sha256:{hexd}", "who=")
    _eventually(lambda: _ls_l(mnt)[hexd].st_ctime_ns > after.st_ctime_ns)


def test_label_through_the_mount_moves_ctime_of_a_listed_blob(mnt: Mount) -> None:
    hexd = _ingest_cli(mnt, b"labelled here\n", "b")
    _eventually(lambda: hexd in _ls_l(mnt))
    before = _ls_l(mnt)[hexd]
    time.sleep(0.01)
    os.setxattr(mnt.blob(hexd), "user.k", b"v")
    assert os.stat(mnt.blob(hexd)).st_ctime_ns > before.st_ctime_ns
    assert _ls_l(mnt)[hexd].st_ctime_ns > before.st_ctime_ns
    assert _ls_l(mnt)[hexd].st_mtime_ns == before.st_mtime_ns


def test_blobs_deleted_or_added_elsewhere_leave_or_join_listings(mnt: Mount) -> None:
    gone = _ingest_cli(mnt, b"to be deleted elsewhere\n", "c")
    kept = _ingest_cli(mnt, b"stays\n", "d")
    _eventually(lambda: {gone, kept} <= set(_ls_l(mnt)))
    run(CONTENTFS, "--root", mnt.root, "rm", f"sha256:{gone}")
    _eventually(lambda: gone not in _ls_l(mnt))
    assert not os.path.exists(mnt.blob(gone))
    assert kept in _ls_l(mnt)
    # the same content committed again is a new blob: listed, with its new times
    again = _ingest_cli(mnt, b"to be deleted elsewhere\n", "e")
    _eventually(lambda: again in _ls_l(mnt))
    with open(mnt.blob(again), "rb") as f:
        assert f.read() == b"to be deleted elsewhere\n"
    # deleted through the mount: gone from the next listing at once
    os.unlink(mnt.blob(kept))
    assert kept not in _ls_l(mnt)
    assert kept not in os.listdir(os.path.join(mnt.path, "blobs", "sha256"))


def test_blob_added_while_the_change_feed_overflows_is_found(mnt: Mount) -> None:
    """A name the kernel was told is missing (cached an hour), committed by another
    process while the mount's change feed overflows (inotify's queue fills up while the
    daemon is stopped): after the overflow the mount must look again (stat, cat), as
    it does for blobs it holds that were deleted meanwhile."""
    data, gone_data = b"committed during an overflow\n", b"deleted during an overflow\n"
    hexd = sha256(data)
    blob_dir = os.path.join(mnt.root, "blobs", "sha256")
    gone = _ingest_cli(mnt, gone_data, "gone")
    kept = _ingest_cli(mnt, b"relabelled during an overflow\n", "kept")
    _eventually(lambda: os.path.exists(mnt.blob(gone)) and os.path.exists(mnt.blob(kept)))
    ctime = os.stat(mnt.blob(kept)).st_ctime_ns  # attributes the kernel keeps
    time.sleep(0.01)
    assert not os.path.exists(mnt.blob(hexd))  # a miss the kernel keeps
    assert mnt.proc is not None
    store = LocalStore(mnt.root)
    os.kill(mnt.proc.pid, signal.SIGSTOP)
    try:
        flood = os.path.join(blob_dir, "flood-a")
        with open(flood, "wb"):
            pass
        other = os.path.join(blob_dir, "flood-b")
        for _ in range(9000):  # 18,000 events: past max_queued_events (16,384)
            os.rename(flood, other)
            os.rename(other, flood)
        os.unlink(flood)
        w = store.writer("during-overflow")
        w.write(data)
        w.commit(len(data), f"sha256:{hexd}")
        store.delete(f"sha256:{gone}")
        info = store.info(f"sha256:{kept}")
        store.update(Info(info.digest, info.size, info.created_at, info.updated_at,
                          {"during": "overflow"}), "labels")
    finally:
        os.kill(mnt.proc.pid, signal.SIGCONT)
        store.close()
    _eventually(lambda: os.path.exists(mnt.blob(hexd)), within=10)
    with open(mnt.blob(hexd), "rb") as f:
        assert f.read() == data
    _eventually(lambda: not os.path.exists(mnt.blob(gone)), within=10)
    _eventually(lambda: os.stat(mnt.blob(kept)).st_ctime_ns > ctime, within=10)
    assert os.getxattr(mnt.blob(kept), "user.during") == b"overflow"
