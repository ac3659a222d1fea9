"""Refs are Unicode text (issue 9, bug 1).

containerd's refs travel in protobuf ``string`` fields, which must be valid UTF-8, so a
ref that is not UTF-8 can only come from a FUSE name or a command line (bytes). Such a
ref is refused (EINVAL, InvalidArgument, exit 3) before anything is written; an ingest
that already has one (made by hand or by an older release) lists, resumes and aborts on
every face without a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess

import grpc
import pytest

from store import InvalidArgument, LocalStore
from store.grpc.pb import content_pb2 as pb
from tests import fuse_util, grpc_util
from tests.fuse_util import Mount
from tests.grpc_util import InProcessServer, RawContent, ctr

from .rel_util import assert_clean_error, run_cli

mounter = fuse_util.mounter
inproc = pytest.fixture(grpc_util.inproc_server)

BAD = b"bad-\xff\xfe"  # not UTF-8
BAD_REF = os.fsdecode(BAD)  # as Python sees it in argv or a FUSE name
SHOWN = "bad-\\xff\\xfe"  # how listings show it


def _ingest_dirs(root: str) -> list[str]:
    try:
        return os.listdir(os.path.join(root, "ingest"))
    except FileNotFoundError:
        return []


def _ingest_rows(root: str) -> int:
    db = os.path.join(root, ".contentfs", "meta.db")
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM ingests").fetchone()[0])


def seed_legacy(root: str, data: bytes = b"legacy bytes") -> str:
    """An ingest whose ``ref`` file is not UTF-8, laid out as containerd does (by hand)."""
    path = os.path.join(root, "ingest", hashlib.sha256(BAD).hexdigest())
    os.makedirs(path)
    for name, value in (("ref", BAD), ("data", data),
                        ("startedat", b"2024-01-02T03:04:05.000000006Z"),
                        ("updatedat", b"2024-01-02T03:04:05.000000006Z")):
        with open(os.path.join(path, name), "wb") as f:
            f.write(value)
    return path


# store -----------------------------------------------------------------------------


def test_store_refuses_new_non_utf8_refs(store: LocalStore, store_root: str) -> None:
    with pytest.raises(InvalidArgument, match="not valid UTF-8"):
        store.writer(BAD_REF)
    assert _ingest_dirs(store_root) == []
    locks = os.path.join(store_root, ".contentfs", "locks")
    assert not os.path.isdir(locks) or not os.listdir(locks)
    with store.writer("good") as w:
        w.write(b"x")
    with pytest.raises(InvalidArgument):
        store.rename_ingest("good", BAD_REF)
    with pytest.raises(InvalidArgument):
        store.set_ingest_hints("good", labels={BAD_REF: "v"})
    assert [s.ref for s in store.list_statuses()] == ["good"]
    assert _ingest_rows(store_root) == 0


def test_store_lists_resumes_and_aborts_legacy_ref(store: LocalStore, store_root: str) -> None:
    seed_legacy(store_root)
    assert [s.ref for s in store.list_statuses()] == [BAD_REF]
    assert [s.ref for s in store.list_statuses("ref~=^bad-")] == [BAD_REF]
    assert store.status(BAD_REF).offset == len(b"legacy bytes")
    with store.writer(BAD_REF) as w:  # resumes it
        assert w.offset == len(b"legacy bytes")
        w.write(b", more")
    with pytest.raises(InvalidArgument):  # hints cannot be recorded for it
        store.set_ingest_hints(BAD_REF, expected="sha256:" + "0" * 64)
    store.rename_ingest(BAD_REF, "renamed")  # a way out: give it a UTF-8 ref
    assert store.status("renamed").offset == len(b"legacy bytes, more")
    seed_legacy(store_root, b"again")
    store.abort(BAD_REF)
    assert [s.ref for s in store.list_statuses()] == ["renamed"]
    seed_legacy(store_root, b"commit me")
    with store.writer(BAD_REF) as w:
        digest = w.commit(0, None)
    assert store.info(digest).size == len(b"commit me")
    assert [s.ref for s in store.list_statuses()] == ["renamed"]


# CLI -------------------------------------------------------------------------------


def test_cli_refuses_and_handles_legacy(store_root: str, tmp_path: os.PathLike[str]) -> None:
    src = os.path.join(os.fspath(tmp_path), "src")
    with open(src, "wb") as f:
        f.write(b"payload")
    proc = subprocess.run([fuse_util.CONTENTFS, "--root", store_root, "ingest", BAD, src],
                          capture_output=True, check=False, timeout=60)
    err = assert_clean_error(proc, 3)
    assert "not valid UTF-8" in err and SHOWN in err, err
    assert _ingest_dirs(store_root) == [] and _ingest_rows(store_root) == 0

    seed_legacy(store_root)
    table = run_cli(store_root, "active")
    assert table.returncode == 0, table.stderr
    assert SHOWN in table.stdout.decode(), table.stdout
    listed = run_cli(store_root, "active", "--json")
    assert listed.returncode == 0, listed.stderr
    # JSON keeps the ref whole (surrogate escapes: json.loads + os.fsencode give the bytes)
    assert [os.fsencode(s["ref"]) for s in json.loads(listed.stdout)] == [BAD]
    proc = subprocess.run([fuse_util.CONTENTFS, "--root", store_root, "abort", BAD],
                          capture_output=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _ingest_dirs(store_root) == []


# FUSE ------------------------------------------------------------------------------


def test_fuse_refuses_non_utf8_name_and_survives(mounter: fuse_util.MountFactory) -> None:
    m: Mount = mounter()
    ingest = os.fsencode(m.ingest(""))
    proc = subprocess.run([b"touch", ingest + BAD], capture_output=True, check=False)
    assert proc.returncode != 0 and b"Invalid argument" in proc.stderr, proc.stderr
    with pytest.raises(OSError) as exc:
        os.open(ingest + b"\xff", os.O_CREAT | os.O_WRONLY)
    assert exc.value.errno == errno.EINVAL
    with open(m.ingest("ok"), "wb") as f:
        f.write(b"fine")
    with pytest.raises(OSError) as exc:
        os.rename(m.ingest("ok"), ingest + BAD)
    assert exc.value.errno == errno.EINVAL
    # labels are UTF-8 text too (they are protobuf strings as well)
    for name, value in ((b"user." + BAD, b"v"), (b"user.k", BAD)):
        with pytest.raises(OSError) as exc:
            os.setxattr(m.ingest("ok"), name, value)
        assert exc.value.errno == errno.EINVAL
        proc = subprocess.run([b"setfattr", b"-n", name, b"-v", value,
                               os.fsencode(m.ingest("ok"))], capture_output=True)
        assert proc.returncode == 1 and b"Invalid argument" in proc.stderr, proc.stderr
    assert os.listdir(m.ingest("")) == ["ok"]  # the mount is alive
    assert _ingest_dirs(m.root) == [hashlib.sha256(b"ok").hexdigest()]
    assert _ingest_rows(m.root) == 0
    m.allowed_log.append(r"not valid UTF-8")
    m.unmount()


def test_fuse_lists_reads_resumes_and_removes_legacy(mounter: fuse_util.MountFactory,
                                                      tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(os.fspath(tmp_path), "root")
    os.makedirs(root)
    seed_legacy(root)
    m: Mount = mounter(root=root)
    ingest = os.fsencode(m.ingest(""))
    listing = subprocess.run(["ls", m.ingest("")], capture_output=True, check=True)
    assert listing.stdout.strip() == BAD, listing.stdout
    assert os.listdir(ingest) == [BAD]
    path = ingest + BAD
    with open(path, "rb") as f:
        assert f.read() == b"legacy bytes"
    with open(path, "ab") as f:  # resumes it
        f.write(b"!")
    assert os.stat(path).st_size == len(b"legacy bytes!")
    assert subprocess.run([b"rm", path], capture_output=True).returncode == 0
    assert os.listdir(ingest) == []
    assert _ingest_dirs(root) == []
    m.unmount()


# gRPC ------------------------------------------------------------------------------


def test_grpc_lists_legacy_ref(inproc: InProcessServer) -> None:
    seed_legacy(inproc.store.root)
    with inproc.store.writer("plain") as w:
        w.write(b"x")
    raw = RawContent(inproc.address)
    try:
        reply = raw.unary("ListStatuses", pb.ListStatusesRequest(), pb.ListStatusesResponse)
    finally:
        raw.close()
    assert reply.code == grpc.StatusCode.OK, reply.details
    assert sorted(s.ref for s in reply.responses[0].statuses) == [SHOWN, "plain"]
    proc = ctr(inproc.address, "content", "active")
    assert proc.returncode == 0, proc.stderr
    assert SHOWN in proc.stdout.decode() and "plain" in proc.stdout.decode()


def test_grpc_refuses_non_utf8_ref_on_the_wire(inproc: InProcessServer) -> None:
    """No protobuf client can build such a request; raw bytes get what containerd's Go
    server answers (INTERNAL, "error unmarshalling request"), and nothing is written."""
    channel = grpc.insecure_channel(f"unix:{inproc.socket}")
    field = b"\x12" + bytes([len(BAD)]) + BAD  # WriteContentRequest.ref (field 2)
    status_req = b"\x0a" + bytes([len(BAD)]) + BAD  # StatusRequest.ref (field 1)
    try:
        for name, kind, req in (("Write", "stream_stream", iter([field])),
                                ("Status", "unary_unary", status_req),
                                ("Abort", "unary_unary", status_req)):
            call = getattr(channel, kind)(grpc_util.SERVICE + name,
                                          request_serializer=lambda b: b,
                                          response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as exc:
                result = call(req, metadata=grpc_util.NS, timeout=30)
                if kind == "stream_stream":
                    list(result)
            assert exc.value.code() == grpc.StatusCode.INTERNAL, (name, exc.value)
    finally:
        channel.close()
    assert _ingest_dirs(inproc.store.root) == [] and _ingest_rows(inproc.store.root) == 0
