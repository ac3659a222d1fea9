"""Crash at any moment, gRPC server: SIGKILL ``contentfs serve`` in the middle of a Write
stream (after STAT, mid-stream, after the stream is closed, during COMMIT), restart it,
and check blobs, the ingest's true prefix and that the ingest resumes over gRPC. Also:
the socket is 0600, so another user cannot connect."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from store import StoreError
from store.grpc.client import RemoteStore, RemoteWriter
from tests.grpc_util import CTR, ServeProcess, require

from .rel_util import check_blobs, check_ingests, payload, sha256

MiB = 1 << 20
SIZE = 5 * MiB + 3


class Server:
    """``contentfs serve`` on one root and socket, restartable; stopped at the end."""

    def __init__(self, base: str) -> None:
        self.root = os.path.join(base, "root")
        self.socket = os.path.join(base, "s.sock")
        os.makedirs(self.root, exist_ok=True)
        self.proc: ServeProcess | None = None

    def start(self) -> RemoteStore:
        self.proc = ServeProcess(self.root, self.socket)
        return RemoteStore(self.proc.address)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait(60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            assert self.proc.stop() == 0, self.proc.stderr


@pytest.fixture
def server(tmp_path: str) -> Iterator[Server]:
    s = Server(os.fspath(tmp_path))
    try:
        yield s
    finally:
        s.stop()


def _base(rs: RemoteStore) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for i, n in enumerate((0, 7, MiB + 1)):
        data = payload(700 + i, n)
        w = rs.writer(f"base-{i}")
        w.write(data)
        out[w.commit(n, sha256(data), labels={"base": str(i)})] = data
    return out


def _check_and_resume(server: Server, base: dict[str, bytes], ref: str, data: bytes) -> int:
    blobs = check_blobs(server.root)
    assert all(blobs[d] == b for d, b in base.items())
    offsets = check_ingests(server.root, {ref: data})
    committed = sha256(data) in blobs
    rs = server.start()  # a stale socket left by the killed server is replaced
    try:
        for i, d in enumerate(base):
            assert rs.info(d).labels == {"base": str(i)}
        if not committed:
            w = rs.writer(ref, total=len(data))
            assert w.offset == offsets.get(ref, 0)
            w.write(data[w.offset :])
            assert w.commit(len(data), sha256(data)) == sha256(data)
        assert rs.list_statuses() == []
        with rs.reader_at(sha256(data)) as r:
            assert r.read_at(len(data) + 1, 0) == data
    finally:
        rs.close()
    return -1 if committed else offsets.get(ref, 0)


@pytest.mark.parametrize("point", ["stat", "mid:1", f"mid:{MiB}", f"mid:{3 * MiB + 1}",
                                   f"mid:{SIZE}", "closed"])
def test_server_killed_mid_ingest(server: Server, point: str) -> None:
    rs = server.start()
    base = _base(rs)
    ref = "grpc-crash"
    data = payload(3, SIZE)
    w = rs.writer(ref, total=SIZE)
    stop = SIZE if point == "closed" else int(point.split(":")[1]) if ":" in point else 0
    w.write(data[:stop])
    if point == "closed":
        w.close()
    server.kill()
    rs.close()
    offset = _check_and_resume(server, base, ref, data)
    assert offset == stop  # every acknowledged WRITE reached the store


def test_server_killed_during_commit(server: Server, soak: bool) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    rs = server.start()
    base = _base(rs)
    outcomes = []
    for i in range(12 if soak else 3):
        ref = f"commit-{i}"
        data = payload(seed + i, 16 * MiB + i)
        w = rs.writer(ref, total=len(data))
        w.write(data)

        def commit(w: RemoteWriter, data: bytes) -> None:
            with contextlib.suppress(StoreError, grpc.RpcError):
                w.commit(len(data), sha256(data))

        t = threading.Thread(target=commit, args=(w, data))
        t.start()
        time.sleep(rng.choice([0, 0.003, 0.01, 0.03, 0.1, 0.3]))
        server.kill()
        t.join(60)
        assert not t.is_alive(), "commit hung after the server died"
        rs.close()
        outcomes.append(_check_and_resume(server, base, ref, data) == -1)
        assert server.proc is not None
        rs = RemoteStore(server.proc.address)  # the server it restarted
    rs.close()
    print(f"seed {seed}: committed before the kill: {outcomes}")


def test_socket_is_private(tmp_path: str) -> None:
    """An explicit socket path is 0600 too, and another user cannot use it."""
    require(CTR, "ctr")
    if os.geteuid() != 0:
        pytest.fail("this test runs ctr as another user: run it as root")
    base = tempfile.mkdtemp(prefix="contentfs-sock-", dir="/tmp")
    os.chmod(base, 0o755)  # traversable by all: the socket's own mode must refuse them
    root = os.path.join(os.fspath(tmp_path), "root")
    os.mkdir(root)
    srv = ServeProcess(root, os.path.join(base, "s.sock"))
    try:
        assert stat.S_IMODE(os.stat(srv.socket).st_mode) == 0o600
        ok = subprocess.run([CTR, "-a", srv.socket, "content", "ls"], capture_output=True,
                            timeout=60, check=False)
        assert ok.returncode == 0, ok.stderr
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
             CTR, "--timeout", "5s", "-a", srv.socket, "content", "ls"],
            capture_output=True, timeout=60, check=False)
        assert proc.returncode != 0
        assert b"permission denied" in proc.stderr.lower(), proc.stderr
    finally:
        assert srv.stop() == 0, srv.stderr
        shutil.rmtree(base, ignore_errors=True)
