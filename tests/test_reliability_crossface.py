"""Bugs found with a mount, a server and the CLI driven at once on one root, with
tampering on disk (issue 15): each test failed before its fix."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading
from typing import Any

import grpc
import pytest

from store import LocalStore, NotFound, digest_of
from store.grpc.pb import content_pb2 as pb
from tests import fuse_util
from tests.fuse_util import MountFactory, errno_of, run
from tests.grpc_util import CONTENTFS, RawContent, ServeProcess

EMPTY = digest_of(b"")
mounter = fuse_util.mounter


def cli(root: str, *args: str, data: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CONTENTFS, *args, "--root", root], input=data,
                          capture_output=True, timeout=timeout, check=False)


def _ingest_dirs(root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(root, "ingest")))


# 1. a commit after an abort -------------------------------------------------------------

def test_store_commit_never_recreates_an_aborted_ingest(store: LocalStore) -> None:
    with store.writer("r") as w:
        w.write(b"hello-world\n")
    store.abort("r")
    with pytest.raises(NotFound):
        store.writer("r", create=False)
    assert _ingest_dirs(store.root) == []
    # a writer opened before the abort cannot commit afterwards
    w = store.writer("r")
    w.write(b"data")
    store.abort("r")
    with pytest.raises(NotFound):
        w.commit()
    assert not store.list_statuses() and _ingest_dirs(store.root) == []
    with pytest.raises(NotFound):
        store.info(digest_of(b"data"))
    assert store.db.get_blob(digest_of(b"data")) is None


def test_abort_removes_an_ingest_dir_without_its_ref_file(store: LocalStore) -> None:
    """A directory cut short (no ``ref`` file) is not listed, but ``abort`` removes it."""
    path = store.layout.ingest_dir("half")
    os.makedirs(path)
    with open(os.path.join(path, "data"), "wb") as f:
        f.write(b"x")
    assert store.list_statuses() == []
    store.abort("half")
    assert not os.path.lexists(path)
    with pytest.raises(NotFound):
        store.abort("half")


def test_commit_after_cli_abort_is_enoent_not_the_empty_blob(
        mounter: MountFactory, tmp_path: Any) -> None:
    mnt = mounter()
    with open(mnt.ingest("det1"), "wb") as f:
        f.write(b"hello-world\n")
    run(CONTENTFS, "--root", mnt.root, "abort", "det1")
    p = run("setfattr", "-n", "user.contentfs.commit", mnt.ingest("det1"), check=False)
    assert p.returncode != 0 and b"No such file" in p.stderr, p
    assert errno_of(lambda: os.truncate(mnt.ingest("det1"), 0)) == errno.ENOENT
    assert not os.path.exists(mnt.blob(EMPTY.split(":")[1]))
    assert _ingest_dirs(mnt.root) == []
    mnt.allowed_log.append(r"ingest det1")


@pytest.mark.parametrize("how", ["setfattr", "mv"])
def test_mount_commit_races_abort(mounter: MountFactory, tmp_path: Any, how: str) -> None:
    """A mount commit (setfattr or mv) against a gRPC or CLI abort of the same ingest:
    exactly one of them succeeds, a commit stores exactly the bytes written, the empty
    blob never appears, and nothing is left under ingest/."""
    mnt = mounter()
    srv = ServeProcess(mnt.root, os.path.join(tmp_path, "s.sock"))
    raw = RawContent(srv.address)
    rounds = 24
    rng = random.Random(15)
    outcomes: list[tuple[bool, bool]] = []
    try:
        for i in range(rounds):
            ref = f"race{i}"
            data = f"round {i} of {how}\n".encode()
            dgst = digest_of(data)
            with open(mnt.ingest(ref), "wb") as f:
                f.write(data)
            result: dict[str, bool] = {}
            # a CLI abort starts a Python process (~0.3 s): the commit waits instead
            delay = rng.random() * (0.01 if i % 2 == 0 else 0.5)
            start = threading.Barrier(2)

            def abort(ref: str = ref, i: int = i, delay: float = delay,
                      result: dict[str, bool] = result,
                      start: threading.Barrier = start) -> None:
                start.wait()
                if i % 2 == 0:
                    threading.Event().wait(delay)
                if i % 2:
                    p = cli(mnt.root, "abort", ref)
                    assert p.returncode in (0, 4), p.stderr  # 4: not found
                    result["abort"] = p.returncode == 0
                else:
                    r = raw.unary("Abort", pb.AbortRequest(ref=ref), pb.AbortRequest)
                    assert r.code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), r
                    result["abort"] = r.code == grpc.StatusCode.OK

            t = threading.Thread(target=abort)
            t.start()
            start.wait()
            if i % 2:
                threading.Event().wait(delay)
            if how == "setfattr":
                p = run("setfattr", "-n", "user.contentfs.commit", mnt.ingest(ref),
                        check=False)
            else:
                p = run("mv", mnt.ingest(ref), mnt.blob(dgst.split(":")[1]), check=False)
            t.join(60)
            committed = p.returncode == 0
            if not committed:
                assert b"No such file" in p.stderr, p.stderr
            outcomes.append((committed, result["abort"]))
            assert committed != result["abort"], (i, p, result)
            assert os.path.exists(mnt.blob(dgst.split(":")[1])) == committed
            if committed:
                with open(mnt.blob(dgst.split(":")[1]), "rb") as f:
                    assert f.read() == data
            assert not os.path.exists(os.path.join(mnt.root, "blobs", "sha256",
                                                   EMPTY.split(":")[1]))
            assert _ingest_dirs(mnt.root) == [], (i, how)
        assert cli(mnt.root, "active", "--json").stdout.strip() == b"[]"
    finally:
        raw.close()
        assert srv.stop() == 0, srv.stderr
    print(f"{how}: {sum(c for c, _ in outcomes)} commits won, "
          f"{sum(a for _, a in outcomes)} aborts won of {rounds}")
    mnt.allowed_log.append(r"ingest race\d+")


# 5. a FIFO under blobs/, and blob files changed on disk ----------------------------------

def _faces(tmp_path: Any, mounter: MountFactory) -> tuple[Any, ServeProcess]:
    mnt = mounter()
    return mnt, ServeProcess(mnt.root, os.path.join(tmp_path, "s.sock"))


def test_fifo_under_blobs_is_not_found_on_every_face(
        mounter: MountFactory, tmp_path: Any) -> None:
    from tests.grpc_util import ctr
    mnt, srv = _faces(tmp_path, mounter)
    try:
        hexd = "ab" * 32
        os.makedirs(os.path.join(mnt.root, "blobs", "sha256"), exist_ok=True)
        os.mkfifo(os.path.join(mnt.root, "blobs", "sha256", hexd))
        p = cli(mnt.root, "get", f"sha256:{hexd}", timeout=20)  # hung before
        assert p.returncode == 4 and b"not found" in p.stderr, p
        p = ctr(srv.address, "content", "get", f"sha256:{hexd}", timeout=20)
        assert p.returncode != 0 and b"not found" in p.stderr, p
        assert errno_of(lambda: open(mnt.blob(hexd), "rb").close()) == errno.ENOENT
        p = cli(mnt.root, "verify", timeout=20)
        assert p.returncode == 4 and f"sha256:{hexd}: FAILED".encode() in p.stdout, p
    finally:
        assert srv.stop() == 0, srv.stderr


def test_full_verify_lists_what_is_not_a_blob(store: LocalStore) -> None:
    good = digest_of(b"good")
    with store.writer("g") as w:
        w.write(b"good")
        w.commit()
    blob_dir = os.path.join(store.root, "blobs", "sha256")
    strays = {"link": "11" * 32, "dir": "22" * 32, "fifo": "33" * 32}
    os.symlink("/etc/passwd", os.path.join(blob_dir, strays["link"]))
    os.mkdir(os.path.join(blob_dir, strays["dir"]))
    os.mkfifo(os.path.join(blob_dir, strays["fifo"]))
    p = cli(store.root, "verify", timeout=20)
    assert p.returncode == 4, p
    out = p.stdout.decode()
    assert f"{good}: OK" in out
    for hexd in strays.values():
        assert f"sha256:{hexd}: FAILED" in out and "not a regular file" in out, out
    assert b"3 of 4 blobs failed" in p.stderr


def test_blob_file_of_another_size_is_data_loss_on_every_face(
        mounter: MountFactory, tmp_path: Any) -> None:
    from tests.grpc_util import ctr
    mnt, srv = _faces(tmp_path, mounter)
    try:
        data = b"committed bytes\n"
        dgst = digest_of(data)
        assert cli(mnt.root, "ingest", "r", data=data).returncode == 0
        path = os.path.join(mnt.root, "blobs", "sha256", dgst.split(":")[1])
        os.chmod(path, 0o644)
        with open(path, "ab") as f:
            f.write(b"!")
        p = cli(mnt.root, "get", dgst)
        assert p.returncode == 8 and b"data loss" in p.stderr and not p.stdout, p
        p = ctr(srv.address, "content", "get", dgst)
        assert p.returncode != 0 and b"data loss" in p.stderr, p
        assert errno_of(lambda: open(mnt.blob(dgst.split(":")[1]), "rb").close()) == errno.EIO
        p = cli(mnt.root, "verify", dgst)
        assert p.returncode == 8, p
        mnt.allowed_log.append(r"data loss")
    finally:
        assert srv.stop() == 0, srv.stderr


# 2. the metadata database replaced under live processes ----------------------------------

def _remove_db(root: str) -> None:
    db = os.path.join(root, ".contentfs", "meta.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)


def _truncate_db(db: str) -> None:
    """Cut the database to 100 bytes, its pages checkpointed out of the log first (else
    the log alone still holds a whole database)."""
    import sqlite3
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    conn.close()
    os.truncate(db, 100)


def test_store_reopens_a_database_removed_or_moved_under_it(store: LocalStore) -> None:
    with store.writer("a") as w:
        w.write(b"a")
        da = w.commit()
    _remove_db(store.root)
    store.update(store.info(da).__class__(da, 1, store.info(da).created_at,
                                          store.info(da).updated_at, {"k": "v"}))
    with LocalStore(store.root) as other:  # a CLI: it sees what the daemon acknowledged
        assert other.info(da).labels == {"k": "v"}
    # truncated: the next process moves it aside and rebuilds; the daemon follows
    db = os.path.join(store.root, ".contentfs", "meta.db")
    _truncate_db(db)
    with LocalStore(store.root) as other:
        assert other.info(da).labels == {}
    assert any(n.startswith("meta.db.corrupt-") for n in os.listdir(os.path.dirname(db)))
    with store.writer("b") as w:
        w.write(b"b")
        db_ = w.commit(labels={"x": "y"})
    with LocalStore(store.root) as other:
        assert other.info(db_).labels == {"x": "y"}


def test_daemons_follow_a_replaced_database(mounter: MountFactory, tmp_path: Any) -> None:
    """Delete meta.db under a mount and a server: labels set through both afterwards are
    seen by the CLI and survive a restart. Truncate it: after the CLI rebuilds it, ingests
    through the mount and ctr go on working."""
    from tests.grpc_util import ctr
    mnt, srv = _faces(tmp_path, mounter)
    try:
        data = b"labelled after the database went\n"
        dgst = digest_of(data)
        hexd = dgst.split(":")[1]
        assert cli(mnt.root, "ingest", "r", data=data).returncode == 0
        _remove_db(mnt.root)
        run("setfattr", "-n", "user.by-mount", "-v", "1", mnt.blob(hexd))
        p = ctr(srv.address, "content", "label", dgst, "by-ctr=2")
        assert p.returncode == 0, p.stderr
        p = cli(mnt.root, "info", dgst, "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["labels"] == {"by-mount": "1", "by-ctr": "2"}, p.stdout

        db = os.path.join(mnt.root, ".contentfs", "meta.db")
        # whoever uses it first (the CLI, or a daemon's watcher) moves it aside, rebuilds
        mnt.allowed_log.append(r"meta\.db is unreadable .* moved to")
        _truncate_db(db)
        p = cli(mnt.root, "ls", "-q")
        assert p.returncode == 0, p
        assert any(n.startswith("meta.db.corrupt-") for n in os.listdir(os.path.dirname(db)))
        with open(mnt.ingest("after"), "wb") as f:
            f.write(b"through the mount\n")
        run("setfattr", "-n", "user.k", "-v", "m", mnt.ingest("after"))
        run("setfattr", "-n", "user.contentfs.commit", mnt.ingest("after"))
        p = ctr(srv.address, "content", "ingest", "after-ctr", input=b"through ctr\n")
        assert p.returncode == 0, p.stderr
        p = ctr(srv.address, "content", "label", digest_of(b"through ctr\n"), "k=c")
        assert p.returncode == 0, p.stderr
    finally:
        assert srv.stop() == 0, srv.stderr
    mnt.allowed_log.append(r"meta\.db")
    mnt.unmount()
    labels = {i["digest"]: i["labels"] for i in json.loads(cli(mnt.root, "ls", "--json").stdout)}
    assert labels[dgst] == {}, labels  # the rebuild lost them, as it says
    assert labels[digest_of(b"through the mount\n")] == {"k": "m"}
    assert labels[digest_of(b"through ctr\n")] == {"k": "c"}


def test_immutable_database_is_an_io_error_not_busy(store_root: str) -> None:
    """``chattr +i`` on meta.db: a change fails at once with its own message (EROFS/EIO,
    exit 1), not as a busy lock (exit 7, after a 10 s wait)."""
    with LocalStore(store_root) as s, s.writer("r") as w:
        w.write(b"x")
        dgst = w.commit()
    db = os.path.join(store_root, ".contentfs", "meta.db")
    p = run("chattr", "+i", db, check=False)
    assert p.returncode == 0, f"chattr +i needs an ext4-like filesystem: {p.stderr!r}"
    try:
        p = cli(store_root, "label", dgst, "a=b", timeout=60)
        err = p.stderr.decode()
        assert p.returncode == 1, p
        assert "cannot be written" in err and "unavailable" not in err, err
        assert "Traceback" not in err
    finally:
        run("chattr", "-i", db)
    assert cli(store_root, "label", dgst, "a=b").returncode == 0


# 3. idle Write streams must not starve other calls ----------------------------------------

class _StalledWriters:
    """``count`` Write streams over ``channels`` connections, each sending one chunk and
    then nothing until ``release()``."""

    def __init__(self, address: str, count: int, channels: int = 4) -> None:
        sock = address[len("unix://"):]
        # own subchannel pools: otherwise grpc shares one connection between the channels
        self.channels = [grpc.insecure_channel(f"unix:{sock}",
                                               options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(channels)]
        self.gate = threading.Event()
        self.calls: list[Any] = []
        for i in range(count):
            ch = self.channels[i % channels]
            write = ch.stream_stream(
                "/containerd.services.content.v1.Content/Write",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=pb.WriteContentResponse.FromString)
            self.calls.append(write(self._requests(f"stall{i}"),
                                    metadata=(("containerd-namespace", "default"),)))

    def _requests(self, ref: str) -> Any:
        yield pb.WriteContentRequest(action=pb.WRITE, ref=ref, data=b"first chunk")
        self.gate.wait(120)

    def release(self) -> None:
        self.gate.set()
        for call in self.calls:
            call.cancel()
        for ch in self.channels:
            ch.close()


def test_stalled_writers_do_not_starve_other_calls(tmp_path: Any) -> None:
    import time

    from tests.grpc_util import ctr
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    data = b"a blob to get\n"
    assert cli(root, "ingest", "g", data=data).returncode == 0
    srv = ServeProcess(root, os.path.join(tmp_path, "s.sock"), "--write-idle-timeout", "4")
    stalled = None
    try:
        stalled = _StalledWriters(srv.address, 200)
        # every stream has its first chunk on disk
        deadline = time.monotonic() + 60
        while len(cli(root, "active", "--json").stdout.split(b'"ref"')) - 1 < 200:
            assert time.monotonic() < deadline, "the 200 writers did not all start"
            time.sleep(0.2)
        t0 = time.monotonic()
        p = ctr(srv.address, "content", "ls", timeout=10)
        t_ls = time.monotonic() - t0
        assert p.returncode == 0 and digest_of(data).encode() in p.stdout, p
        t0 = time.monotonic()
        p = ctr(srv.address, "content", "get", digest_of(data), timeout=10)
        t_get = time.monotonic() - t0
        assert p.returncode == 0 and p.stdout == data, p
        p = ctr(srv.address, "content", "active", timeout=10)
        assert p.returncode == 0 and p.stdout.count(b"stall") == 200, p
        print(f"with 200 stalled writers: ctr content ls {t_ls:.2f} s, get {t_get:.2f} s")
        # idle streams are cancelled: their refs are free again, the ingests resumable
        raw = RawContent(srv.address)
        try:
            deadline = time.monotonic() + 60
            while True:
                r = raw.write([pb.WriteContentRequest(action=pb.STAT, ref="stall7")])
                if r.code == grpc.StatusCode.OK:
                    break
                assert r.code == grpc.StatusCode.UNAVAILABLE, r
                assert time.monotonic() < deadline, "the idle stream kept its ref lock"
                time.sleep(0.5)
            assert r.responses[0].offset == len(b"first chunk")
            more = b"first chunk, then the rest"
            r = raw.write([pb.WriteContentRequest(action=pb.COMMIT, ref="stall7",
                                                  offset=len(b"first chunk"),
                                                  data=more[len(b"first chunk"):])])
            assert r.code == grpc.StatusCode.OK, r
            assert r.responses[-1].digest == digest_of(more)
        finally:
            raw.close()
    finally:
        if stalled is not None:
            stalled.release()
        assert srv.stop() == 0, srv.stderr
    assert "sent nothing for 4 s: cancelled" in srv.stderr


# 4. memory after abandoned large writes ---------------------------------------------------

def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def abandon_large_writes(address: str, writers: int, rnd: int,
                         size: int = 15 << 20) -> None:
    """``writers`` Write streams at once, each sending one ``size`` chunk, then leaving
    without a commit (half-close, then the connection goes)."""
    sock = address[len("unix://"):]
    chunk = os.urandom(size)

    def one(i: int) -> None:
        ch = grpc.insecure_channel(f"unix:{sock}", options=[
            ("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 32 << 20)])
        write = ch.stream_stream(
            "/containerd.services.content.v1.Content/Write",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.WriteContentResponse.FromString)
        reqs = iter([pb.WriteContentRequest(action=pb.WRITE, ref=f"big{rnd}-{i}", data=chunk)])
        try:
            for _ in write(reqs, metadata=(("containerd-namespace", "default"),), timeout=60):
                pass
        except grpc.RpcError:
            pass
        ch.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_serve_memory_returns_after_abandoned_large_writes(tmp_path: Any) -> None:
    import time
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    srv = ServeProcess(root, os.path.join(tmp_path, "s.sock"))
    try:
        base = _rss_mb(srv.proc.pid)
        after = []
        for rnd in range(3):
            abandon_large_writes(srv.address, 16, rnd)
            deadline = time.monotonic() + 10  # the server trims once the streams ended
            while _rss_mb(srv.proc.pid) > base + 50 and time.monotonic() < deadline:
                time.sleep(0.2)
            after.append(_rss_mb(srv.proc.pid))
        print(f"serve RSS: {base:.0f} MB, after each round {[round(a) for a in after]} MB")
        assert max(after) <= base + 50, (base, after)
        assert len(cli(root, "active", "--json").stdout.split(b'"ref"')) - 1 == 48
    finally:
        assert srv.stop() == 0, srv.stderr


def test_fifo_planted_as_ingest_data_never_blocks(store: LocalStore) -> None:
    with store.writer("f") as w:
        w.write(b"abc")
    data = os.path.join(store.layout.ingest_dir("f"), "data")
    os.unlink(data)
    os.mkfifo(data)
    with pytest.raises(NotFound):
        store.ingest_reader_at("f")
    with store.writer("f") as w:  # not resumable: restarted empty, never blocked
        assert w.offset == 0
        w.write(b"new")
        assert w.commit() == digest_of(b"new")
