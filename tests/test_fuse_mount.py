"""Mount lifecycle: daemonizing, umount, signals, auto_unmount, dead mounts, options,
mount(8)/fstab, remount persistence, and changes made by other processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from tests import fuse_util
from tests.fuse_util import CONTENTFS, Mount, errno_of, is_mounted, run, sha256

mounter = fuse_util.mounter
mnt = fuse_util.mnt


def _wait_unmounted(path: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        if time.monotonic() > deadline:
            pytest.fail(f"{path} still mounted after {timeout}s")
        time.sleep(0.05)


def _eventually(cond: Callable[[], bool], within: float = 5.0) -> None:
    """Changes by other processes reach the kernel's caches asynchronously (inotify)."""
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {within}s")
        time.sleep(0.01)


def _dirs(tmp_path: os.PathLike[str]) -> tuple[str, str]:
    root = os.path.join(os.fspath(tmp_path), "root")
    path = os.path.join(os.fspath(tmp_path), "mnt")
    os.makedirs(root, exist_ok=True)
    os.makedirs(path, exist_ok=True)
    return root, path


def test_daemon_mount_answers_at_once_and_umount_waits(tmp_path: os.PathLike[str]) -> None:
    fuse_util.require_fuse()
    root, path = _dirs(tmp_path)
    log = os.path.join(os.fspath(tmp_path), "daemon.log")
    try:
        # a script can use the mount on the very next line
        proc = run("sh", "-c", f"{CONTENTFS} mount --log-file {log} {root} {path}"
                               f" && ls {path} && echo hi > {path}/ingest/x && cat {path}/ingest/x")
        assert proc.stdout == b"blobs\ningest\nhi\n"
        line = next(x for x in open("/proc/mounts").read().splitlines() if f" {path} " in x)
        assert line.startswith(f"{root} {path} fuse.contentfs ")
        if os.geteuid() == 0:  # 1 MiB readahead, so reads arrive as 1 MiB requests
            dev = next(x.split()[2] for x in open("/proc/self/mountinfo")
                       if x.split()[4] == path)
            assert open(f"/sys/class/bdi/{dev}/read_ahead_kb").read().strip() == "1024"
        run(CONTENTFS, "umount", path)
        assert not is_mounted(path)  # umount returns after the daemon finished
        text = open(log).read()
        assert "answers" in text and "ERROR" not in text and "Traceback" not in text
        assert "closing open ingest" not in text
        status = json.loads(run(CONTENTFS, "--root", root, "active", "--json").stdout)
        assert [(s["ref"], s["offset"]) for s in status] == [("x", 3)]
    finally:
        if is_mounted(path):
            subprocess.run(["fusermount3", "-u", "-z", path], check=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_unmounts_and_keeps_open_ingest_resumable(
        mounter: fuse_util.MountFactory, signum: int) -> None:
    m = mounter()
    fd = os.open(m.ingest("open"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"first half ")
        m.signal(signum)
        assert m.wait(30) == 0
        _wait_unmounted(m.path)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert "closing open ingest open at offset 11" in m.log()
    assert not m.bad_log_lines(), m.log()
    m2 = mounter(root=m.root, name="again")
    with open(m2.ingest("open"), "ab") as f:
        f.write(b"second half")
    with open(m2.ingest("open"), "rb") as f:
        assert f.read() == b"first half second half"


def test_sigkill_auto_unmount_and_dead_mount_cleared(mounter: fuse_util.MountFactory) -> None:
    m = mounter()
    m.signal(signal.SIGKILL)
    m.wait()
    _wait_unmounted(m.path)  # auto_unmount: no dead mount left behind
    dead = mounter("noauto_unmount", root=m.root, name="dead")
    dead.signal(signal.SIGKILL)
    dead.wait()
    assert errno_of(lambda: os.listdir(dead.path)) == errno.ENOTCONN
    again = mounter(root=m.root, name="dead")  # clears the dead mount and mounts
    assert sorted(os.listdir(again.path)) == ["blobs", "ingest"]
    assert "clearing a dead mount" in again.log()


def test_options_generic_ignored_unknown_rejected(mounter: fuse_util.MountFactory,
                                                  tmp_path: os.PathLike[str]) -> None:
    m = mounter("rw,defaults,nofail,_netdev,noatime,x-systemd.automount,dev,suid",
                "default_permissions")
    assert os.listdir(m.path) == ["blobs", "ingest"] or sorted(os.listdir(m.path)) == [
        "blobs", "ingest"]
    root, _ = _dirs(tmp_path)
    bad = os.path.join(os.fspath(tmp_path), "bad")
    os.mkdir(bad)
    proc = run(CONTENTFS, "mount", "-f", root, bad, "-o", "max_read=4096", check=False)
    assert proc.returncode == 2 and b"max_read" in proc.stderr
    assert not is_mounted(bad)
    proc = run(CONTENTFS, "umount", bad, check=False)
    assert proc.returncode == 1 and b"not mounted" in proc.stderr
    proc = run(CONTENTFS, "umount", "/proc", check=False)
    assert proc.returncode == 1 and b"not a contentfs mount" in proc.stderr


def test_remount_keeps_blobs_labels_inodes_and_times(mounter: fuse_util.MountFactory) -> None:
    m = mounter()
    with open(m.ingest("p"), "wb") as f:
        f.write(b"persist")
    os.setxattr(m.ingest("p"), "user.kind", b"test")
    os.setxattr(m.ingest("p"), "user.contentfs.commit", b"")
    blob = m.blob(sha256(b"persist"))
    before = os.stat(blob)
    m.unmount()
    m2 = mounter(root=m.root, name="mnt2")
    after = os.stat(m2.blob(sha256(b"persist")))
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (
        before.st_ino, before.st_mtime_ns, before.st_ctime_ns, before.st_size)
    assert os.getxattr(m2.blob(sha256(b"persist")), "user.kind") == b"test"
    # a label change moves ctime (UpdatedAt), never mtime (CreatedAt)
    time.sleep(0.01)
    os.setxattr(m2.blob(sha256(b"persist")), "user.kind", b"changed")
    changed = os.stat(m2.blob(sha256(b"persist")))
    assert changed.st_mtime_ns == before.st_mtime_ns
    assert changed.st_ctime_ns > before.st_ctime_ns


def test_changes_by_other_processes_show_up(mnt: Mount, tmp_path: os.PathLike[str]) -> None:
    data = b"from the cli\n"
    hexd = sha256(data)
    assert not os.path.exists(mnt.blob(hexd))  # a cached negative entry
    run(CONTENTFS, "--root", mnt.root, "ingest", "cli-ref", "--label", "who=cli", stdin=data)
    _eventually(lambda: os.path.exists(mnt.blob(hexd)))  # inotify, at worst the 1 s miss
    with open(mnt.blob(hexd), "rb") as f:
        assert f.read() == data
    assert os.getxattr(mnt.blob(hexd), "user.who") == b"cli"
    run(CONTENTFS, "--root", mnt.root, "label", f"sha256:{hexd}", "who=changed")
    assert os.getxattr(mnt.blob(hexd), "user.who") == b"changed"
    run(CONTENTFS, "--root", mnt.root, "rm", f"sha256:{hexd}")
    # the hour-long positive entry is dropped by the inotify watch
    _eventually(lambda: not os.path.exists(mnt.blob(hexd)))
    # an ingest started elsewhere is listed, readable and resumable here
    src = os.path.join(os.fspath(tmp_path), "half")
    with open(src, "wb") as f:
        f.write(b"12345")
    from store import LocalStore

    with LocalStore(mnt.root) as store:
        w = store.writer("elsewhere")
        w.write(b"12345")
        assert errno_of(lambda: open(mnt.ingest("elsewhere"), "ab")) == errno.EBUSY
        w.close()
    assert "elsewhere" in os.listdir(os.path.join(mnt.path, "ingest"))
    with open(mnt.ingest("elsewhere"), "ab") as f:
        f.write(b"678")
    with open(mnt.ingest("elsewhere"), "rb") as f:
        assert f.read() == b"12345678"
    run(CONTENTFS, "--root", mnt.root, "abort", "elsewhere")
    _eventually(lambda: not os.path.exists(mnt.ingest("elsewhere")))  # cached for 1 s


def test_oci_layout_read_through_mount(mounter: fuse_util.MountFactory,
                                       tmp_path: os.PathLike[str]) -> None:
    for tool in ("umoci", "skopeo"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian package {tool}")
    base = os.fspath(tmp_path)
    layout = os.path.join(base, "layout")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:v1")
    payload = os.path.join(base, "payload.txt")
    with open(payload, "w") as f:
        f.write("hello from a layer\n")
    run("umoci", "insert", "--image", f"{layout}:v1", payload, "/payload.txt")
    m = mounter(root=layout)
    assert sorted(os.listdir(m.path)) == ["blobs", "index.json", "ingest", "oci-layout"]
    with open(os.path.join(m.path, "index.json"), "rb") as f:
        assert f.read() == open(os.path.join(layout, "index.json"), "rb").read()
    assert errno_of(lambda: open(os.path.join(m.path, "index.json"), "ab")) == errno.EPERM
    info = json.loads(run("skopeo", "inspect", f"oci:{m.path}:v1").stdout)
    assert len(info["Layers"]) == 1
    out = os.path.join(base, "copy")
    run("skopeo", "copy", f"oci:{m.path}:v1", f"oci:{out}:v1")
    assert json.loads(run("skopeo", "inspect", f"oci:{out}:v1").stdout)["Layers"] == \
        info["Layers"]
    for name in os.listdir(os.path.join(layout, "blobs", "sha256")):
        assert run("sha256sum", m.blob(name)).stdout.split()[0].decode() == name


def test_mount_helper_and_fstab(tmp_path: os.PathLike[str]) -> None:
    fuse_util.require_fuse()
    if not os.path.exists("/usr/local/sbin/contentfs"):
        pytest.fail("/usr/local/sbin/contentfs is missing: run scripts/setup as root")
    root, path = _dirs(tmp_path)
    run(CONTENTFS, "--root", root, "ingest", "r", stdin=b"via mount(8)\n")
    try:
        run("mount", "-t", "fuse.contentfs", "-o", "ro,nofail", root, path)
        assert run("cat", os.path.join(path, "blobs", "sha256",
                                       sha256(b"via mount(8)\n"))).stdout == b"via mount(8)\n"
        assert errno_of(lambda: open(os.path.join(path, "ingest", "x"), "wb")) == errno.EROFS
        run("umount", path)
        _wait_unmounted(path)
        fstab = os.path.join(os.fspath(tmp_path), "fstab")
        with open(fstab, "w") as f:
            f.write(f"{root} {path} fuse.contentfs defaults,_netdev,allow_other 0 0\n")
        run("mount", "-T", fstab, path)
        assert sorted(os.listdir(path)) == ["blobs", "ingest"]
        assert "allow_other" in next(x for x in open("/proc/mounts") if f" {path} " in x)
        run("umount", path)
        _wait_unmounted(path)
    finally:
        if is_mounted(path):
            subprocess.run(["fusermount3", "-u", "-z", path], check=False)


PARTIAL = 3 << 20  # more than ctr buffers before it sends


def _active_offset(sock: str, ref: str) -> bool:
    """True once ``ctr content active`` shows bytes received for ``ref``."""
    out = run("ctr", "-a", sock, "-n", "t", "content", "active").stdout.decode()
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == ref:
            return fields[1] not in ("0", "0B")  # a human-readable size
    return False


def test_containerd_content_directory(mounter: fuse_util.MountFactory,
                                      tmp_path: os.PathLike[str]) -> None:
    """A content directory written by a real containerd mounts as a store: its blobs
    read back and its unfinished ingest is listed and resumable."""
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian package containerd")
    base = os.fspath(tmp_path)
    config = os.path.join(base, "config.toml")
    with open(config, "w") as f:
        # no CRI; no garbage collector (it would delete our unreferenced test blobs)
        f.write('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri",'
                ' "io.containerd.gc.v1.scheduler"]\n')
    sock = os.path.join(base, "ctd.sock")
    with open(os.path.join(base, "containerd.log"), "wb") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", config, "--root", os.path.join(base, "ctd-root"),
             "--state", os.path.join(base, "ctd-state"), "--address", sock],
            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while run("ctr", "-a", sock, "version", check=False).returncode != 0:
            assert daemon.poll() is None and time.monotonic() < deadline, "containerd died"
            time.sleep(0.1)
        blobs = [b"first blob\n", os.urandom(300_000)]
        for i, data in enumerate(blobs):
            run("ctr", "-a", sock, "-n", "t", "content", "ingest", f"ref{i}", stdin=data)
        # an interrupted ingest: ctr killed after sending some bytes
        ctr = subprocess.Popen(["ctr", "-a", sock, "-n", "t", "content", "ingest", "partial"],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        assert ctr.stdin is not None
        ctr.stdin.write(b"p" * PARTIAL)
        ctr.stdin.flush()
        deadline = time.monotonic() + 30
        while not _active_offset(sock, "partial"):
            assert time.monotonic() < deadline, "ctr's ingest never became active"
            time.sleep(0.05)
        ctr.kill()
        ctr.wait()
    finally:
        daemon.terminate()
        daemon.wait(30)
    content = os.path.join(base, "ctd-root", "io.containerd.content.v1.content")
    m = mounter(root=content)
    for data in blobs:
        assert run("cat", m.blob(sha256(data))).stdout == data
    # containerd's metadata layer prefixes refs with "<namespace>/<sequence>/"
    [name] = os.listdir(os.path.join(m.path, "ingest"))
    assert name.startswith("t%2F") and name.endswith("%2Fpartial"), name
    with open(m.ingest(name), "rb") as f:
        got = f.read()
    assert got and got == b"p" * len(got)
    with open(m.ingest(name), "ab") as f:
        f.write(b"p" * (PARTIAL - len(got)))
    os.setxattr(m.ingest(name), "user.contentfs.commit", b"")
    assert os.path.exists(m.blob(sha256(b"p" * PARTIAL)))


def test_handler_bug_ends_daemon_nonzero_not_eio(mounter: fuse_util.MountFactory) -> None:
    m = mounter(env={"CONTENTFS_TEST_CRASH_LOOKUP": "boom"})
    code = errno_of(lambda: os.stat(os.path.join(m.path, "boom")))
    assert code != errno.EIO
    assert m.wait(30) == 1
    _wait_unmounted(m.path)  # auto_unmount cleans up after the crash
    assert "injected handler bug" in m.log() and "Traceback" in m.log()
