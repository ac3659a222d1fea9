"""The real ``ctr`` (containerd 1.6) against ``contentfs serve``: every ``ctr content``
command the issue names, with outputs and exit codes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from typing import Any

import pytest

from store import LocalStore, digest_of
from tests.grpc_util import CTR, ServeProcess, ctr, require, serve_process

serve = pytest.fixture(serve_process)

UNKNOWN = "sha256:" + "0" * 64


def ingest(
    srv: ServeProcess, ref: str, data: bytes, *args: str
) -> subprocess.CompletedProcess[bytes]:
    """``ctr content ingest`` from a regular file, so that ctr can seek to resume."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        return subprocess.run(
            [CTR, "-a", srv.socket, "content", "ingest", *args, ref],
            stdin=f, capture_output=True, timeout=120, check=False,
        )


def test_ingest_ls_get(serve: ServeProcess) -> None:
    data = os.urandom(3 * 1024 * 1024 + 12345)  # several 1 MiB WRITEs, ~100 32 KiB Reads
    dgst = digest_of(data)
    assert ctr(serve.address, "content", "ls").stdout.decode().split() == [
        "DIGEST", "SIZE", "AGE", "LABELS"
    ]
    p = ingest(serve, "blob-1", data)
    assert p.returncode == 0, p.stderr
    p = ctr(serve.address, "content", "ls")
    assert p.returncode == 0, p.stderr
    rows = [line.split("\t") for line in p.stdout.decode().splitlines()[1:]]
    assert [(r[0], r[1].strip()) for r in rows] == [(dgst, "3.158MB")]
    assert ctr(serve.address, "content", "ls", "-q").stdout.decode().split() == [dgst]
    p = ctr(serve.address, "content", "get", dgst)
    assert p.returncode == 0, p.stderr
    assert hashlib.sha256(p.stdout).hexdigest() == dgst.split(":")[1]
    assert p.stdout == data
    # the blob is in the served root, where the store sees it
    with LocalStore(serve.root) as store:
        assert store.info(dgst).size == len(data)
    # filters go through: a digest that matches and one that does not
    p = ctr(serve.address, "content", "ls", "-q", f"digest=={dgst}")
    assert p.stdout.decode().split() == [dgst]
    p = ctr(serve.address, "content", "ls", "-q", f"digest=={UNKNOWN}")
    assert p.returncode == 0 and p.stdout == b""


def test_version(serve: ServeProcess) -> None:
    p = ctr(serve.address, "version")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    assert "Server:" in out and "contentfs" in out.split("Server:")[1]


def test_ingest_expected_digest(serve: ServeProcess) -> None:
    data = b"hello world\n"
    p = ingest(serve, "r-wrong", data, "--expected-digest", UNKNOWN)
    assert p.returncode == 1
    assert b"unexpected commit digest " + digest_of(data).encode() in p.stderr
    assert b"failed precondition" in p.stderr
    # the ingest is kept, with all its bytes
    assert _active(serve) == {"r-wrong": "12B"}
    # a second ingest with the right digest resumes at the end and commits
    p = ingest(serve, "r-wrong", data, "--expected-digest", digest_of(data))
    assert p.returncode == 0, p.stderr
    assert _active(serve) == {}
    assert ctr(serve.address, "content", "ls", "-q").stdout.decode().split() == [digest_of(data)]
    # too few bytes for the expected size: ctr notices, the 5 bytes stay resumable
    p = ingest(serve, "r-size", b"12345", "--expected-size", "6")
    assert p.returncode == 1
    assert b"unexpected EOF" in p.stderr
    assert _active(serve) == {"r-size": "5B"}


def test_ingest_existing_digest_is_success(serve: ServeProcess) -> None:
    data = b"already here\n"
    assert ingest(serve, "first", data).returncode == 0
    # ctr stops at the first STAT (AlreadyExists) without reading its input
    p = ingest(serve, "second", b"other bytes", "--expected-digest", digest_of(data))
    assert p.returncode == 0, p.stderr
    assert _active(serve) == {}
    # same bytes under another ref without an expected digest: ctr reports AlreadyExists
    p = ingest(serve, "third", data)
    assert p.returncode == 0, p.stderr
    assert ctr(serve.address, "content", "ls", "-q").stdout.decode().split() == [digest_of(data)]
    assert _active(serve) == {}


def _active(srv: ServeProcess) -> dict[str, str]:
    """``ctr content active`` as ref -> SIZE column (human units)."""
    p = ctr(srv.address, "content", "active")
    assert p.returncode == 0, p.stderr
    return {
        cols[0]: cols[1]
        for cols in (line.split("\t") for line in p.stdout.decode().splitlines()[1:])
    }


def _offset(srv: ServeProcess, ref: str) -> int | None:
    """The exact offset of an ingest, read from the served root."""
    with LocalStore(srv.root) as store:
        statuses = {s.ref: s.offset for s in store.list_statuses()}
    return statuses.get(ref)


def test_partial_ingest_resumed(serve: ServeProcess, tmp_path: Any) -> None:
    """A ctr ingest killed half-way leaves a resumable ingest; a second ctr ingest (from a
    file, so ctr can seek) continues at its offset instead of starting over."""
    require(CTR, "ctr")
    data = os.urandom(1536 * 1024)
    half = 1024 * 1024
    first = subprocess.Popen(
        [CTR, "-a", serve.socket, "content", "ingest", "--expected-size", str(len(data)), "part"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert first.stdin is not None
    first.stdin.write(data[:half])
    first.stdin.flush()
    deadline = time.monotonic() + 60
    while _offset(serve, "part") != half:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "ctr never wrote the first half"
        time.sleep(0.1)
    first.kill()
    first.communicate()
    assert _active(serve) == {"part": "1.049MB"}
    # The first half of this file is garbage: only a resumed ingest (which seeks past it)
    # can produce the right digest.
    src = os.path.join(tmp_path, "src")
    with open(src, "wb") as f:
        f.write(b"\xff" * half + data[half:])
    with open(src, "rb") as f:
        p = subprocess.run(
            [CTR, "-a", serve.socket, "content", "ingest", "--expected-size", str(len(data)),
             "--expected-digest", digest_of(data), "part"],
            stdin=f, capture_output=True, timeout=120, check=False,
        )
    assert p.returncode == 0, p.stderr
    assert ctr(serve.address, "content", "get", digest_of(data)).stdout == data
    assert _active(serve) == {}


def test_unknown_and_invalid_digests(serve: ServeProcess) -> None:
    p = ctr(serve.address, "content", "get", UNKNOWN)
    assert p.returncode == 1
    assert p.stderr.decode().strip() == f"ctr: content {UNKNOWN}: not found"
    p = ctr(serve.address, "content", "get", "sha256:00")
    assert p.returncode == 1
    assert b"invalid" in p.stderr
    p = ctr(serve.address, "content", "label", UNKNOWN, "a=b")
    assert p.returncode == 1
    assert f"content {UNKNOWN}: not found".encode() in p.stderr
    # rm ignores NotFound, as against containerd
    p = ctr(serve.address, "content", "rm", UNKNOWN)
    assert (p.returncode, p.stdout) == (0, b"")
    p = ctr(serve.address, "content", "ls", namespace="bad ns!")
    assert p.returncode == 1
    assert b'namespace validation: identifier "bad ns!" must match' in p.stderr


def test_locked_ref(serve: ServeProcess) -> None:
    """A ref held by a store writer in this process: ctr retries UNAVAILABLE until its
    timeout, then fails; once the writer closes, ctr resumes after its bytes.

    The server waits about 1 s for a held ref before it answers UNAVAILABLE (containerd's
    local store does the same), so ctr's deadline may expire inside that wait: ctr then
    reports the deadline instead of the lock, as it does against containerd."""
    with LocalStore(serve.root) as store:
        w = store.writer("held")
        w.write(b"abc")
        try:
            p = ctr(serve.address, "--timeout", "2s", "content", "ingest", "held", input=b"def")
            assert p.returncode == 1
            locked = b"ref held locked" in p.stderr and b"unavailable" in p.stderr
            assert locked or b"context deadline exceeded" in p.stderr, p.stderr
        finally:
            w.close()
        assert store.status("held").offset == 3
    p = ctr(serve.address, "content", "active")
    assert p.stdout.decode().splitlines()[1].split("\t")[:2] == ["held", "3B"]


def test_label_rm(serve: ServeProcess) -> None:
    data = b"label me\n"
    dgst = digest_of(data)
    assert ingest(serve, "l", data).returncode == 0
    p = ctr(serve.address, "content", "label", dgst, "a=1", "b=2")
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.decode().strip().split(",")) == ["a=1", "b=2"]
    p = ctr(serve.address, "content", "label", dgst, "a=")
    assert p.stdout.decode().strip() == "b=2"
    p = ctr(serve.address, "content", "label", dgst)
    assert p.stdout.decode().strip() == "b=2"
    rows = ctr(serve.address, "content", "ls").stdout.decode().splitlines()[1:]
    assert rows[0].split("\t")[0] == dgst and rows[0].endswith("b=2")
    with LocalStore(serve.root) as store:
        assert dict(store.info(dgst).labels) == {"b": "2"}
    p = ctr(serve.address, "content", "label", dgst, "k=" + "v" * 4096)
    assert p.returncode == 1 and b"invalid argument" in p.stderr
    p = ctr(serve.address, "content", "rm", dgst, UNKNOWN)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().split() == [dgst]
    assert ctr(serve.address, "content", "ls", "-q").stdout == b""
    assert ctr(serve.address, "content", "get", dgst).returncode == 1


def test_edit(serve: ServeProcess, tmp_path: Any) -> None:
    data = b"original\n"
    assert ingest(serve, "e", data).returncode == 0
    editor = os.path.join(tmp_path, "editor")
    with open(editor, "w") as f:
        f.write('#!/bin/sh\necho appended >> "$1"\n')
    os.chmod(editor, 0o755)
    p = ctr(serve.address, "content", "edit", digest_of(data), env={"EDITOR": editor})
    assert p.returncode == 0, p.stderr
    new = digest_of(data + b"appended\n")
    assert p.stdout.decode().strip() == new
    assert ctr(serve.address, "content", "get", new).stdout == data + b"appended\n"
    assert sorted(ctr(serve.address, "content", "ls", "-q").stdout.decode().split()) == sorted(
        [digest_of(data), new]
    )
