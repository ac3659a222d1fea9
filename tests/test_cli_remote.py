"""``contentfs --address ADDR`` against a real containerd 1.6 (own root, state and socket)
and against ``contentfs serve``: the store commands with the contract and exit codes of a
local root, what a CLI ingest leaves for containerd's garbage collection, and a store that
is down or does not answer (one line, the Unavailable exit code, within the deadline)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fusefs.exits import EXIT_CODES
from store import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unreachable,
    digest_of,
)
from store.grpc.client import RemoteStore
from tests.grpc_util import Containerd, ServeProcess, containerd_daemon, ctr, serve_process
from tests.test_cli import Run, ok, run

_namespaces = itertools.count()


containerd = pytest.fixture(scope="module")(containerd_daemon)
serve = pytest.fixture(serve_process)


class Remote:
    """One remote store for a test: an address and a namespace of its own."""

    def __init__(self, kind: str, address: str, namespace: str) -> None:
        self.kind = kind
        self.address = address
        self.namespace = namespace

    def cf(self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
           ) -> Run:
        """``contentfs --address ADDR ARGS`` in this test's namespace."""
        return run("--address", self.address, *args, stdin=stdin,
                   env={"CONTENTFS_NAMESPACE": self.namespace, "CONTENTFS_TIMEOUT": "30",
                        **(env or {})})

    def ctr(self, *args: str, input: bytes | None = None  # noqa: A002
            ) -> subprocess.CompletedProcess[bytes]:
        return ctr(self.address, *args, input=input, namespace=self.namespace)

    def store(self) -> RemoteStore:
        return RemoteStore(self.address, namespace=self.namespace)


@pytest.fixture(params=["containerd", "serve"])
def remote(request: pytest.FixtureRequest) -> Iterator[Remote]:
    if request.param == "containerd":
        daemon: Containerd = request.getfixturevalue("containerd")
        yield Remote("containerd", daemon.address, f"cli{next(_namespaces)}")
        return
    srv: ServeProcess = request.getfixturevalue("serve")
    yield Remote("serve", srv.address, "default")


def _fails(r: Run, cls: type[Exception]) -> str:
    assert r.code == EXIT_CODES[cls], (r.code, r.err)  # type: ignore[index]
    return r.error_line()


def test_store_commands(remote: Remote, tmp_path: Any) -> None:
    cf = remote.cf
    data = os.urandom((3 << 20) + 12345)  # several Read calls, one short
    path = os.path.join(tmp_path, "blob")
    with open(path, "wb") as f:
        f.write(data)
    dgst = digest_of(data)
    assert ok(cf("ingest", "from-file", path, "--label", "team=infra")).text == dgst + "\n"
    small = b"from stdin\n"
    d_small = digest_of(small)
    assert ok(cf("ingest", "from-stdin", stdin=small)).text == d_small + "\n"
    # existing content is success, its labels merged
    assert ok(cf("ingest", "again", "--expected-digest", d_small, "--label", "k=v",
                 stdin=small)).text == d_small + "\n"

    assert sorted(ok(cf("ls", "-q")).text.split()) == sorted([dgst, d_small])
    assert sorted(remote.ctr("content", "ls", "-q").stdout.decode().split()) == sorted(
        [dgst, d_small])
    assert ok(cf("ls", "-q", "labels.team==infra")).text.split() == [dgst]
    listed = {i["digest"]: i for i in json.loads(ok(cf("ls", "--json")).text)}
    assert listed[dgst]["size"] == len(data)
    assert listed[dgst]["labels"] == {"team": "infra"}
    assert listed[d_small]["labels"] == {"k": "v"}
    info = json.loads(ok(cf("info", dgst, "--json")).text)
    assert set(info) == {"digest", "size", "created_at", "updated_at", "labels"}
    assert ok(cf("get", dgst)).out == data
    assert remote.ctr("content", "get", dgst).stdout == data

    assert ok(cf("label", dgst, "env=prod", "team=")).text == "env=prod\n"
    assert remote.ctr("content", "label", dgst).stdout.decode().strip() == "env=prod"
    assert ok(cf("verify")).text.count(": OK") == 2

    # the error classes and their exit codes, as with a root
    unknown = "sha256:" + "0" * 64
    assert "not found" in _fails(cf("info", unknown), NotFound)
    _fails(cf("get", unknown), NotFound)
    _fails(cf("info", "sha256:nothex"), InvalidArgument)
    _fails(cf("label", dgst, "k=" + "v" * 5000), InvalidArgument)
    r = cf("rm", unknown)
    assert r.code == EXIT_CODES[NotFound]
    _fails(cf("abort", "no-such-ref"), NotFound)
    r = cf("ingest", "wrong", "--expected-digest", digest_of(b"other"), stdin=b"some bytes")
    assert "unexpected commit digest" in _fails(r, FailedPrecondition)
    active = json.loads(ok(cf("active", "--json")).text)
    assert [(a["ref"], a["offset"]) for a in active] == [("wrong", 10)]  # kept, resumable
    assert "wrong" in remote.ctr("content", "active").stdout.decode()
    ok(cf("abort", "wrong"))
    assert json.loads(ok(cf("active", "--json")).text) == []

    assert ok(cf("rm", dgst, d_small)).text.split() == [dgst, d_small]
    assert ok(cf("ls", "-q")).text == ""


def test_ingest_resumes_a_remote_ingest(remote: Remote, tmp_path: Any) -> None:
    """An ingest left half-written resumes: the input's first bytes are checked against
    the digest the server reports for the bytes it holds."""
    data = os.urandom(2 << 20)
    held = (1 << 20) + 7
    with remote.store() as s:
        w = s.writer("half")
        w.write(data[:held])
        w.close()
    dgst = digest_of(data)
    r = remote.cf("ingest", "half", stdin=b"x" * len(data))  # a stream that differs
    assert "differs from the" in _fails(r, FailedPrecondition)
    r = remote.cf("ingest", "half", stdin=data[:100])  # and one that is too short
    assert "shorter" in _fails(r, FailedPrecondition)
    assert ok(remote.cf("ingest", "half", stdin=data)).text == dgst + "\n"
    assert ok(remote.cf("get", dgst)).out == data
    # a file that differs starts over
    with remote.store() as s:
        w = s.writer("file")
        w.write(b"stale bytes")
        w.close()
    path = os.path.join(tmp_path, "f")
    with open(path, "wb") as f:
        f.write(b"fresh bytes, longer than the stale ones")
    r = ok(remote.cf("ingest", "file", path))
    assert r.text == digest_of(b"fresh bytes, longer than the stale ones") + "\n"
    assert "starting over" in r.err


def test_ingested_blobs_survive_containerds_gc(containerd: Containerd) -> None:
    """containerd collects what nothing references (`ctr content ingest` output included,
    the control here); a CLI ingest is held by the lease `contentfs`, and so is an ingest
    left unfinished."""
    remote = Remote("containerd", containerd.address, f"gc{next(_namespaces)}")
    kept = b"ingested with contentfs"
    d_kept = ok(remote.cf("ingest", "kept", stdin=kept)).text.strip()
    lost = b"ingested with ctr"
    assert remote.ctr("content", "ingest", "lost", input=lost).returncode == 0
    with remote.store() as s:
        w = RemoteStore(remote.address, namespace=remote.namespace, lease="contentfs")
        try:
            half = w.writer("half")
            half.write(b"unfinished")
            half.close()
        finally:
            w.close()
        assert {i.digest for i in s.list()} == {d_kept, digest_of(lost)}
        leases = remote.ctr("leases", "ls", "-q").stdout.decode().split()
        assert leases == ["contentfs"]
        p = remote.ctr("content", "prune", "references")
        assert p.returncode == 0, p.stderr
        assert [i.digest for i in s.list()] == [d_kept]  # GC ran: ctr's blob is gone
        assert [st.ref for st in s.list_statuses()] == ["half"]
        assert s.status("half").offset == len(b"unfinished")
    assert ok(remote.cf("get", d_kept)).out == kept
    # the lease is recreated when someone removed it
    assert remote.ctr("leases", "rm", "contentfs").returncode == 0
    d2 = ok(remote.cf("ingest", "after", stdin=b"after the lease went")).text.strip()
    assert remote.ctr("content", "prune", "references").returncode == 0
    # the first blob lost its hold with the lease; the new one is held by a new lease
    assert remote.ctr("content", "ls", "-q").stdout.decode().split() == [d2]


def test_root_and_address_are_exclusive(tmp_path: Any, store_root: str) -> None:
    addr = f"unix://{tmp_path}/none.sock"
    for args in (["--root", store_root, "--address", addr, "ls"],
                 ["--address", addr, "ls", "--root", store_root],
                 ["ls", "--root", store_root, "--address", addr]):
        r = run(*args)
        assert r.code == 2, (args, r.err)
        assert "--root and --address are mutually exclusive" in r.err
    r = run("ls", env={"CONTENTFS_ROOT": store_root, "CONTENTFS_ADDRESS": addr})
    assert r.code == 2 and "both set" in r.err, r.err
    # an option wins over the other one's variable
    ok(run("ls", "--root", store_root, env={"CONTENTFS_ADDRESS": addr}))
    r = run("ls", env={"CONTENTFS_ADDRESS": addr})
    assert r.code == EXIT_CODES[Unavailable], r.err
    r = run("--address", addr, "serve", "--root", store_root)
    assert r.code == 2 and "serve serves a root" in r.err, r.err


def test_unreachable_store_is_one_line_and_unavailable(tmp_path: Any) -> None:
    addr = f"unix://{tmp_path}/none.sock"
    for args in (["ls"], ["info", "sha256:" + "0" * 64], ["ingest", "r"], ["active"]):
        r = run("--address", addr, *args, stdin=b"data")
        line = _fails(r, Unavailable)
        assert addr in line, line
        # in a few words, not gRPC's "failed to connect to all addresses; last error: ..."
        assert line.endswith(": cannot connect: No such file or directory: unavailable"), line


def _stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(st in "Tt" for st in states):
            return
        assert time.monotonic() < deadline, states
        time.sleep(0.01)


def test_store_that_does_not_answer(containerd: Containerd) -> None:
    """A stopped (SIGSTOP) containerd: every command fails with the Unavailable code
    once the deadline has passed, instead of waiting; it works again once resumed."""
    remote = Remote("containerd", containerd.address, f"stop{next(_namespaces)}")
    env = {"CONTENTFS_TIMEOUT": "1.5"}
    d = ok(remote.cf("ingest", "r", stdin=b"before the stop")).text.strip()
    _stop(containerd.proc.pid)
    try:
        for args in (["ls"], ["get", d], ["ingest", "r2"], ["verify"]):
            start = time.monotonic()
            r = remote.cf(*args, stdin=b"more", env=env)
            took = time.monotonic() - start
            # a new connection times out in its handshake, or a call finds no answer
            assert remote.address in _fails(r, Unavailable), args
            assert took < 30, (args, took)  # the deadline, not a hang (slack: shared CPUs)
    finally:
        os.kill(containerd.proc.pid, signal.SIGCONT)
    assert ok(remote.cf("get", d)).out == b"before the stop"


def test_timeout_variable_is_checked() -> None:
    r = run("--address", "unix:///nonexistent.sock", "ls", env={"CONTENTFS_TIMEOUT": "soon"})
    assert r.code == 2 and "CONTENTFS_TIMEOUT" in r.err, r.err



def test_remote_store_deadlines_on_a_live_connection(containerd: Containerd) -> None:
    """RemoteStore (under the CLI and the mount) with its connection up when containerd
    stops answering: unary calls, List batches and Write exchanges each give up at the
    deadline with Unreachable, an open writer included, and all work again after."""
    ns = f"live{next(_namespaces)}"
    with RemoteStore(containerd.address, namespace=ns, timeout=1.0) as s:
        w0 = s.writer("w0")
        d = w0.commit() if w0.write(b"abc") else None
        w = s.writer("open")
        w.write(b"first")
        _stop(containerd.proc.pid)
        try:
            for call in (lambda: s.info(str(d)), s.list, lambda: w.write(b"second"),
                         lambda: s.writer("another"), lambda: s.read_chunks(str(d))):
                start = time.monotonic()
                with pytest.raises(Unreachable, match="no answer within 1 s"):
                    out = call()
                    if isinstance(out, Iterator):
                        list(out)
                assert time.monotonic() - start < 30
            assert w.closed
        finally:
            os.kill(containerd.proc.pid, signal.SIGCONT)
        w.close()
        assert s.info(str(d)).size == 3
        deadline = time.monotonic() + 30
        while True:  # the cancelled stream lets go of the ref once containerd sees it
            try:
                w = s.writer("open")
                break
            except Unavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert w.offset == len(b"first")
        w.write(b"second")
        assert w.commit() == digest_of(b"firstsecond")


def test_remote_reader_blocks_and_readahead(containerd: Containerd) -> None:
    """RemoteReaderAt (the mount's reads) against containerd: any read, sequential or
    random, across block edges and past the end, returns the blob's bytes."""
    ns = f"read{next(_namespaces)}"
    data = os.urandom((5 << 20) + 333)
    rng = random.Random(11)
    with RemoteStore(containerd.address, namespace=ns) as s:
        w = s.writer("big")
        w.write(data)
        dgst = w.commit()
        with s.reader_at(dgst) as r:
            assert r.size == len(data)
            out = bytearray()
            while len(out) < len(data):
                out += r.read_at(128 << 10, len(out))
            assert bytes(out) == data
            for _ in range(200):
                off = rng.randrange(0, len(data) + 10)
                n = rng.choice([1, 4096, 1 << 20, 3 << 20])
                assert r.read_at(n, off) == data[off : off + n], (off, n)
            with pytest.raises(ValueError):
                r.read_at(1, -1)
            # read_ready (the mount's read without a thread hop): bytes only when fetched
            assert r.read_ready(4096, 100) is None or r.read_ready(4096, 100) == data[100:4196]
            r.read_at(10, 0)
            assert r.read_ready(4096, 100) == data[100:4196]
            assert r.read_ready(10, len(data) - 5) in (None, data[-5:])
