"""The mount over a remote store: ``contentfs mount --address`` a real containerd 1.6
(own root, state and socket), each test in a namespace of its own (``-o namespace=NS``).
The conformance suite through the mount, the tools table, what `ctr` sees of a blob
copied in (labels set with setfattr, kept through containerd's GC), and containerd
killed under a live mount: calls fail within the deadline, nothing hangs, and the mount
works again once containerd is back."""

from __future__ import annotations

import datetime as dt
import errno
import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import fuse_util
from tests.fuse_util import (
    CONTENTFS,
    FuseStore,
    Mount,
    MountFactory,
    read_bytes,
    run,
    sha256,
    src_file,
    write_bytes,
)
from tests.grpc_util import Containerd, containerd_daemon, ctr

pytest.register_assert_rewrite("tests.suite")

from tests.suite import ALL_CAPS, CASES, Target  # noqa: E402

mounter = fuse_util.mounter
_namespaces = itertools.count()
DATA = os.urandom((3 << 20) + 12345)
HEX = sha256(DATA)


containerd = pytest.fixture(scope="module")(containerd_daemon)


class RemoteMount:
    """A mount of one containerd namespace, with ``ctr`` and the CLI on the same one."""

    def __init__(self, mount: Mount, address: str, namespace: str) -> None:
        self.m = mount
        self.path = mount.path
        self.address = address
        self.namespace = namespace

    def blob(self, hexdigest: str) -> str:
        return self.m.blob(hexdigest)

    def ingest(self, name: str) -> str:
        return self.m.ingest(name)

    def ctr(self, *args: str, input: bytes | None = None  # noqa: A002
            ) -> subprocess.CompletedProcess[bytes]:
        return ctr(self.address, *args, input=input, namespace=self.namespace)

    def cf(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([CONTENTFS, "--address", self.address, "-n", self.namespace,
                               *args], input=stdin, capture_output=True, timeout=120,
                              check=False)


def mount_remote(mounter: MountFactory, address: str, *options: str,
                 name: str = "mnt") -> RemoteMount:
    ns = f"m{next(_namespaces)}"
    if not any(o.startswith("timeout=") for o in options):
        options = (*options, "timeout=30")  # generous: the test machine may be loaded
    m = mounter(f"namespace={ns}", *options, root=address, name=name)
    return RemoteMount(m, address, ns)


@pytest.fixture
def rmnt(mounter: MountFactory, containerd: Containerd) -> RemoteMount:
    return mount_remote(mounter, containerd.address)


def _src(tmp_path: Any, data: bytes = DATA, name: str = "src") -> str:
    return src_file(tmp_path, data, name)


_read = read_bytes


# the conformance suite through a mount over containerd -----------------------------------


@pytest.fixture
def remote_fuse_target(rmnt: RemoteMount) -> Iterator[Target]:
    yield Target(FuseStore(rmnt.path), ALL_CAPS - {"layout"},
                 slack=dt.timedelta(milliseconds=1))


#: Every case but those that look into the store's directory ("layout": containerd's own
#: is not the test's to look at).
REMOTE_CASES = sorted(n for n, c in CASES.items() if "layout" not in c.requires)


@pytest.mark.parametrize("case_name", REMOTE_CASES)
def test_conformance_through_mount_over_containerd(
        remote_fuse_target: Target, case_name: str) -> None:
    CASES[case_name](remote_fuse_target)


# the tools table -----------------------------------------------------------------------------


def test_read_tools(rmnt: RemoteMount, tmp_path: Any) -> None:
    """cat, sha256sum, dd, cp and du of a blob ingested elsewhere (ctr)."""
    assert rmnt.ctr("content", "ingest", "r", input=DATA).returncode == 0
    assert rmnt.ctr("content", "label", f"sha256:{HEX}",
                    "containerd.io/gc.root=x").returncode == 0  # keep it through GC
    blob = rmnt.blob(HEX)
    assert run("cat", blob).stdout == DATA
    assert run("sha256sum", blob).stdout.decode().split()[0] == HEX
    assert run("dd", f"if={blob}", "bs=4096", "skip=3", "count=2", "status=none").stdout == \
        DATA[3 * 4096:5 * 4096]
    out = os.path.join(os.fspath(tmp_path), "out")
    run("cp", blob, out)
    assert _read(out) == DATA
    st = os.stat(blob)
    assert st.st_size == len(DATA)
    assert st.st_blocks * 512 >= len(DATA)
    assert int(run("du", "-k", blob).stdout.split()[0]) >= len(DATA) // 1024
    listing = run("ls", "-l", os.path.join(rmnt.path, "blobs", "sha256")).stdout.decode()
    assert HEX in listing and str(len(DATA)) in listing
    found = run("find", rmnt.path, "-type", "f").stdout.decode().split()
    assert rmnt.blob(HEX) in found


def test_cp_setfattr_mv_commit_seen_by_ctr_and_kept_through_gc(
        rmnt: RemoteMount, tmp_path: Any) -> None:
    src = _src(tmp_path)
    run("cp", src, rmnt.ingest("layer"))
    run("setfattr", "-n", "user.team", "-v", "infra", rmnt.ingest("layer"))
    active = rmnt.ctr("content", "active").stdout.decode()
    assert "layer" in active  # an ingest in containerd, resumable by any client
    run("mv", rmnt.ingest("layer"), rmnt.blob(HEX))
    assert not os.path.exists(rmnt.ingest("layer"))
    assert run("getfattr", "-n", "user.team", "--only-values", rmnt.blob(HEX)).stdout == \
        b"infra"
    listed = rmnt.ctr("content", "ls").stdout.decode()
    assert f"sha256:{HEX}" in listed and "team=infra" in listed
    # the control: what ctr ingests without a lease or gc.root goes at the next GC
    assert rmnt.ctr("content", "ingest", "lost", input=b"unreferenced").returncode == 0
    assert rmnt.ctr("content", "prune", "references").returncode == 0
    kept = rmnt.ctr("content", "ls", "-q").stdout.decode().split()
    assert kept == [f"sha256:{HEX}"]
    assert run("sha256sum", rmnt.blob(HEX)).stdout.decode().split()[0] == HEX


def test_cp_p_rsync_x_and_setfattr_commit(rmnt: RemoteMount, tmp_path: Any) -> None:
    src = _src(tmp_path, b"rsync me\n" * 1000, "rs")
    os.setxattr(src, "user.origin", b"laptop")
    # no rename of ingests on a remote store: rsync writes in place
    run("rsync", "-X", "--inplace", src, rmnt.ingest("rs"))
    run("setfattr", "-n", "user.contentfs.commit", rmnt.ingest("rs"))
    dgst = sha256(b"rsync me\n" * 1000)
    assert run("getfattr", "-d", rmnt.blob(dgst)).stdout.decode().count("user.origin") == 1
    plain = _src(tmp_path, b"cp -p keeps times\n", "cpp")
    run("cp", "-p", plain, rmnt.ingest("cpp"))
    run("mv", rmnt.ingest("cpp"), rmnt.blob(sha256(b"cp -p keeps times\n")))
    # labels out again with cp --preserve=xattr
    out = os.path.join(os.fspath(tmp_path), "back")
    run("cp", "--preserve=xattr", rmnt.blob(dgst), out)
    assert os.getxattr(out, "user.origin") == b"laptop"


def test_rm_and_labels(rmnt: RemoteMount) -> None:
    data = b"label me"
    dgst = rmnt.cf("ingest", "r", stdin=data).stdout.decode().strip()
    hexd = dgst.split(":")[1]
    run("setfattr", "-n", "user.env", "-v", "prod", rmnt.blob(hexd))
    assert rmnt.ctr("content", "label", dgst).stdout.decode().strip() == "env=prod"
    run("setfattr", "-x", "user.env", rmnt.blob(hexd))
    assert rmnt.ctr("content", "label", dgst).stdout.decode().strip() == ""
    with open(rmnt.ingest("gone"), "wb") as f:
        f.write(b"partial")
    run("rm", rmnt.ingest("gone"))
    assert "gone" not in rmnt.ctr("content", "active").stdout.decode()
    run("rm", rmnt.blob(hexd))
    assert rmnt.ctr("content", "ls", "-q").stdout.decode().split() == []
    assert fuse_util.errno_of(lambda: os.stat(rmnt.blob(hexd))) == errno.ENOENT


def test_changes_by_others_reach_the_mount(rmnt: RemoteMount) -> None:
    """Listing and attributes are cached for a short time only: a blob added and
    relabelled through ctr shows up, deleted through ctr goes."""
    blobs = os.path.join(rmnt.path, "blobs", "sha256")
    assert os.listdir(blobs) == []
    data = b"added by ctr"
    assert rmnt.ctr("content", "ingest", "x", input=data).returncode == 0
    hexd = sha256(data)
    _eventually(lambda: os.listdir(blobs) == [hexd])
    assert rmnt.ctr("content", "label", f"sha256:{hexd}", "k=v").returncode == 0
    _eventually(lambda: os.getxattr(rmnt.blob(hexd), "user.k") == b"v")
    assert rmnt.ctr("content", "rm", f"sha256:{hexd}").returncode == 0
    _eventually(lambda: os.listdir(blobs) == [])


def _eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "never became true"
        time.sleep(0.2)


# containerd killed under a live mount --------------------------------------------------------


def _bounded(fn: Callable[[], object], limit: float) -> tuple[object, float]:
    """Run ``fn`` in a thread; its outcome (value or OSError) and how long it took. Fails
    the test if it has not finished within ``limit`` seconds (a hang)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["out"] = fn()
        except OSError as exc:
            box["out"] = exc

    start = time.monotonic()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"{fn} still running after {limit} s"
    return box["out"], time.monotonic() - start


def test_containerd_killed_under_a_live_mount(mounter: MountFactory, tmp_path: Any) -> None:
    base = os.path.join(os.fspath(tmp_path), "ctrd")
    daemon = Containerd(base)
    try:
        rm = mount_remote(mounter, daemon.address, "timeout=2")
        dgst = rm.cf("ingest", "before", stdin=DATA).stdout.decode().strip()
        assert dgst == f"sha256:{HEX}"
        blobs = os.path.join(rm.path, "blobs", "sha256")
        assert os.listdir(blobs) == [HEX]
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait()
        daemon.log.close()
        # within the deadline (2 s, plus slack for a loaded machine): an answer from the
        # caches, or EIO; never a hang, never ENOTCONN (the mount stays alive)
        for what, fn in (
            ("ls", lambda: os.listdir(blobs)),
            ("stat", lambda: os.stat(rm.blob(HEX))),
            ("cat", lambda: _read(rm.blob(HEX))),
            ("getfattr", lambda: os.listxattr(rm.blob(HEX))),
            ("ingest", lambda: _write(rm.ingest("during"), b"while containerd is down")),
            ("stat missing", lambda: os.stat(rm.blob("0" * 64))),
        ):
            out, took = _bounded(fn, 60)
            if isinstance(out, OSError):
                assert out.errno in (errno.EIO, errno.ENOENT), (what, out)
            assert took < 30, (what, took)
        out, _ = _bounded(lambda: _write(rm.ingest("during2"), b"x"), 60)
        assert isinstance(out, OSError) and out.errno == errno.EIO, out
        assert rm.m.proc is not None and rm.m.proc.poll() is None  # the mount lives on
        daemon = Containerd(base)  # same root: containerd's content is still there
        _eventually(lambda: os.listdir(blobs) == [HEX])
        assert _read(rm.blob(HEX)) == DATA
        _write(rm.ingest("after"), b"containerd is back")
        run("setfattr", "-n", "user.contentfs.commit", rm.ingest("after"))
        assert sha256(b"containerd is back") in os.listdir(blobs)
        rm.m.allowed_log.append(r"store at unix://")  # the failures above are logged
    finally:
        daemon.stop()


_write = write_bytes


def test_mount_options_and_cli_forms(mounter: MountFactory, containerd: Containerd,
                                     tmp_path: Any) -> None:
    """``--address`` or a ``unix://`` source; timeout= needs an address."""
    base = os.fspath(tmp_path)
    os.mkdir(os.path.join(base, "x"))
    r = subprocess.run([CONTENTFS, "mount", os.path.join(base, "root"), os.path.join(base, "x"),
                        "-o", "timeout=2"], capture_output=True, check=False, timeout=60)
    assert r.returncode == 2 and b"needs a store address" in r.stderr, r.stderr
    r = subprocess.run([CONTENTFS, "mount", "--address", containerd.address, base, base],
                       capture_output=True, check=False, timeout=60)
    assert r.returncode == 2 and b"mutually exclusive" in r.stderr, r.stderr
    # a store that cannot be reached fails the mount at once, with the reason
    r = subprocess.run([CONTENTFS, "mount", "--address", f"unix://{base}/none.sock",
                        os.path.join(base, "x")], capture_output=True, check=False, timeout=60)
    assert r.returncode == 7 and b"none.sock" in r.stderr, r.stderr  # Unavailable, as the CLI
    assert not fuse_util.is_mounted(os.path.join(base, "x"))
    # the background form returns once the mount answers, and `contentfs umount` ends it
    path = os.path.join(base, "bg")
    os.mkdir(path)
    r = subprocess.run([CONTENTFS, "mount", "--address", containerd.address, "-o",
                        "namespace=bg", path], capture_output=True, check=False, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(path)) == ["blobs", "ingest"]
        entry = [ln for ln in open("/proc/mounts").read().splitlines() if f" {path} " in ln]
        assert entry and entry[0].split()[0] == containerd.address, entry
    finally:
        u = subprocess.run([CONTENTFS, "umount", path], capture_output=True, check=False,
                           timeout=60)
    assert u.returncode == 0, u.stderr


def test_mount_over_contentfs_serve(mounter: MountFactory, tmp_path: Any) -> None:
    """The same view over another ``contentfs serve``: cp + setfattr + mv commit through
    its Writer, reads, labels, rm; ctr and the served root agree."""
    from tests.grpc_util import ServeProcess

    root = os.path.join(os.fspath(tmp_path), "served")
    os.mkdir(root)
    srv = ServeProcess(root, os.path.join(os.fspath(tmp_path), "s.sock"))
    try:
        rm = mount_remote(mounter, srv.address, name="over-serve")
        run("cp", _src(tmp_path), rm.ingest("layer"))
        run("setfattr", "-n", "user.team", "-v", "infra", rm.ingest("layer"))
        run("mv", rm.ingest("layer"), rm.blob(HEX))
        assert run("sha256sum", rm.blob(HEX)).stdout.decode().split()[0] == HEX
        assert os.getxattr(rm.blob(HEX), "user.team") == b"infra"
        listed = rm.ctr("content", "ls").stdout.decode()
        assert f"sha256:{HEX}" in listed and "team=infra" in listed
        assert os.path.isfile(os.path.join(root, "blobs", "sha256", HEX))
        run("rm", rm.blob(HEX))
        assert rm.ctr("content", "ls", "-q").stdout.decode().split() == []
        rm.m.unmount()
    finally:
        assert srv.stop() == 0, srv.stderr
