"""``contentfs serve`` as a process: addresses, the socket's safety checks, TCP, and a
clean stop on SIGTERM/SIGINT that leaves open ingests resumable."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
from typing import Any

import pytest

from store import LocalStore, Unavailable, digest_of
from store.grpc.client import RemoteStore
from tests.grpc_util import CONTENTFS, ServeProcess, ctr


def _root(tmp_path: Any) -> str:
    root = os.path.join(tmp_path, "root")
    os.makedirs(root, exist_ok=True)
    return root


def _serve_fails(root: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CONTENTFS, "serve", "--root", root, "--address", address],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_default_address_in_runtime_dir(tmp_path: Any) -> None:
    runtime = os.path.join(tmp_path, "run")
    os.mkdir(runtime, 0o700)
    proc = subprocess.Popen(
        [CONTENTFS, "serve", "--root", _root(tmp_path)],
        env={**os.environ, "XDG_RUNTIME_DIR": runtime}, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        sock = os.path.join(runtime, "contentfs", "contentfs.sock")
        assert line.strip() == f"contentfs: serving {_root(tmp_path)} on unix://{sock}"
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
        p = ctr(sock, "content", "ls", "-q")
        assert (p.returncode, p.stdout) == (0, b"")
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 0
    assert not os.path.exists(sock)  # removed on exit


def test_default_address_needs_a_private_directory(tmp_path: Any) -> None:
    runtime = os.path.join(tmp_path, "run")
    os.makedirs(os.path.join(runtime, "contentfs"))
    os.chmod(os.path.join(runtime, "contentfs"), 0o777)
    p = subprocess.run(
        [CONTENTFS, "serve", "--root", _root(tmp_path)], capture_output=True, text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": runtime}, timeout=60, check=False,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"contentfs: socket directory {runtime}/contentfs: writable by others"
    )
    assert os.listdir(os.path.join(runtime, "contentfs")) == []


def test_refuses_unsafe_socket_paths(tmp_path: Any) -> None:
    root = _root(tmp_path)
    plain = os.path.join(tmp_path, "plain")
    with open(plain, "w") as f:
        f.write("keep me")
    p = _serve_fails(root, f"unix://{plain}")
    assert p.returncode == 2
    assert p.stderr.strip() == f"contentfs: socket {plain}: exists and is not a socket"
    with open(plain) as f:
        assert f.read() == "keep me"

    # a socket someone else owns
    foreign = os.path.join(tmp_path, "foreign.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(foreign)
    s.close()
    os.chown(foreign, 65534, 65534)
    p = _serve_fails(root, f"unix://{foreign}")
    assert p.returncode == 2
    assert "owned by uid 65534" in p.stderr
    assert os.path.exists(foreign)

    # a live server's socket
    live = ServeProcess(root, os.path.join(tmp_path, "live.sock"))
    try:
        p = _serve_fails(root, live.address)
        assert p.returncode == 2
        assert "a server is already listening there" in p.stderr
        assert ctr(live.address, "content", "ls").returncode == 0  # still serving
    finally:
        assert live.stop() == 0

    for bad in ("http://127.0.0.1:1", "tcp://nohost", "unix://relative/path"):
        p = _serve_fails(root, bad)
        assert p.returncode == 2, bad
        assert p.stderr.startswith(f"contentfs: address {bad}: "), p.stderr


def test_stale_socket_is_replaced(tmp_path: Any) -> None:
    path = os.path.join(tmp_path, "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # nobody listens: what a killed server leaves behind
    srv = ServeProcess(_root(tmp_path), path)
    try:
        assert ctr(srv.address, "content", "ls").returncode == 0
    finally:
        assert srv.stop() == 0


def test_tcp_only_when_asked(tmp_path: Any) -> None:
    proc = subprocess.Popen(
        [CONTENTFS, "serve", "--root", _root(tmp_path), "--address", "tcp://127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.fullmatch(r"contentfs: serving .* on tcp://127\.0\.0\.1:(\d+)\n", line)
        assert m, line
        with RemoteStore(f"tcp://127.0.0.1:{m.group(1)}") as remote:
            w = remote.writer("over-tcp")
            w.write(b"tcp bytes")
            assert w.commit() == digest_of(b"tcp bytes")
            assert remote.info(digest_of(b"tcp bytes")).size == 9
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_open_writers(tmp_path: Any, sig: int) -> None:
    """A Write stream open at shutdown: the server exits 0, the ingest keeps its bytes and
    its ref is free, so a new writer resumes where it was."""
    root = _root(tmp_path)
    srv = ServeProcess(root, os.path.join(tmp_path, "s.sock"))
    remote = RemoteStore(srv.address)
    try:
        w = remote.writer("open-at-exit", total=10)
        w.write(b"12345")
        with LocalStore(root) as store:
            with pytest.raises(Unavailable):
                store.writer("open-at-exit")
        assert srv.stop(sig) == 0
        assert "contentfs: stopped" in srv.stderr
    finally:
        remote.close()
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)
    assert not os.path.exists(srv.socket)
    with LocalStore(root) as store:
        assert store.status("open-at-exit").offset == 5
        with store.writer("open-at-exit", total=10) as w2:
            assert w2.offset == 5
            assert w2.digest() == digest_of(b"12345")
            w2.write(b"67890")
            assert w2.commit() == digest_of(b"1234567890")
