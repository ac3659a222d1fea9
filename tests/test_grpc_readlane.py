"""The Read lane (store/grpc/fastread.py) answers every Read exactly as the generic
handler does: the same messages, codes and details, side by side on one store; a client
that cancels a stream does not stall it; it stops with the server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from store import LocalStore
from store.grpc.pb import content_pb2 as pb
from store.grpc.server import Server, build_server
from tests.grpc_util import NS, SERVICE, RawContent, Reply


class _Pair:
    """Two in-process servers on one store: the lane (as served) and the generic handler."""

    def __init__(self, store: LocalStore, tmp: str) -> None:
        self.servers: list[tuple[Server, Any]] = []
        self.raws: list[RawContent] = []
        for lane in (True, False):
            server, pool = build_server(store, read_lane=lane)
            sock = os.path.join(tmp, f"lane-{lane}.sock")
            server.add_insecure_port(f"unix:{sock}")
            server.start()
            self.servers.append((server, pool))
            self.raws.append(RawContent(f"unix://{sock}"))
        assert self.servers[0][0].lane is not None, "this grpcio cannot host the read lane"
        assert self.servers[1][0].lane is None

    @property
    def lane(self) -> Server:
        return self.servers[0][0]

    def both(self, req: Any, md: Any = NS) -> Reply:
        fast, slow = (raw.stream("Read", req, pb.ReadContentResponse, md) for raw in self.raws)
        assert (fast.code, fast.details) == (slow.code, slow.details)
        assert fast.responses == slow.responses
        return fast

    def stop(self) -> None:
        for raw in self.raws:
            raw.close()
        for server, pool in self.servers:
            server.stop(0).wait()
            pool.shutdown(wait=True)


@pytest.fixture
def pair(tmp_path: Any) -> Iterator[_Pair]:
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    store = LocalStore(root)
    p = _Pair(store, str(tmp_path))
    try:
        yield p
    finally:
        p.stop()
        store.close()


def _put(store: LocalStore, data: bytes) -> str:
    w = store.writer(f"put-{len(data)}")
    w.write(data)
    w.commit(len(data), None)
    return str(w.digest())


def test_reads_match_the_generic_handler(pair: _Pair, tmp_path: Any) -> None:
    store = LocalStore(os.path.join(tmp_path, "root"))
    try:
        big = os.urandom((2 << 20) + 3)
        dgst = _put(store, big)
        empty = _put(store, b"")
    finally:
        store.close()
    r = pair.both(pb.ReadContentRequest(digest=dgst))
    assert r.code == grpc.StatusCode.OK
    assert [(m.offset, len(m.data)) for m in r.responses] == [
        (0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 3)
    ]
    assert b"".join(m.data for m in r.responses) == big
    r = pair.both(pb.ReadContentRequest(digest=dgst, offset=5, size=32 << 10))
    assert [m.data for m in r.responses] == [big[5 : 5 + (32 << 10)]]
    for offset, size in ((len(big), 0), (len(big) - 1, 10), (0, 1), (-3, 4), (7, -1)):
        r = pair.both(pb.ReadContentRequest(digest=dgst, offset=offset, size=size))
        assert r.code == grpc.StatusCode.OK
    assert pair.both(pb.ReadContentRequest(digest=empty)).responses == []
    failures = [
        (pb.ReadContentRequest(digest=dgst, offset=len(big) + 1), NS,
         grpc.StatusCode.OUT_OF_RANGE),
        (pb.ReadContentRequest(digest="sha256:" + "0" * 64), NS, grpc.StatusCode.NOT_FOUND),
        (pb.ReadContentRequest(digest="sha256:nothex"), NS, grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ReadContentRequest(digest=""), NS, grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ReadContentRequest(digest=dgst), (("containerd-namespace", ""),),
         grpc.StatusCode.FAILED_PRECONDITION),
        (pb.ReadContentRequest(digest=dgst), (("containerd-namespace", "a b"),),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for req, md, code in failures:
        r = pair.both(req, md)
        assert r.code == code, (req, md, r)
        assert r.responses == []
        assert r.details


def test_undecodable_request_as_grpcio(pair: _Pair) -> None:
    codes = []
    for raw in pair.raws:
        call = raw.channel.unary_stream(SERVICE + "Read")  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as exc:
            list(call(b"\x0a\xff", metadata=NS, timeout=30))  # a field longer than the data
        codes.append((exc.value.code(), exc.value.details()))
    assert codes[0] == codes[1]
    assert codes[0][0] == grpc.StatusCode.INTERNAL


def test_cancelled_stream_then_more_reads(pair: _Pair, tmp_path: Any) -> None:
    store = LocalStore(os.path.join(tmp_path, "root"))
    try:
        big = os.urandom(8 << 20)
        dgst = _put(store, big)
    finally:
        store.close()
    raw = pair.raws[0]
    call = raw.channel.unary_stream(
        SERVICE + "Read", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ReadContentResponse.FromString,
    )
    for _ in range(3):
        stream = call(pb.ReadContentRequest(digest=dgst), metadata=NS, timeout=30)
        first = next(stream)
        assert first.data == big[: 1 << 20]
        stream.cancel()
        with pytest.raises(grpc.RpcError) as exc:
            list(stream)
        assert exc.value.code() == grpc.StatusCode.CANCELLED
    r = pair.both(pb.ReadContentRequest(digest=dgst, offset=(8 << 20) - 10))
    assert [m.data for m in r.responses] == [big[-10:]]


def test_lane_stops_with_the_server(pair: _Pair) -> None:
    lane = pair.lane.lane
    assert lane is not None and lane.alive
    pair.lane.stop(0).wait()
    lane.join(10)
    assert not lane.alive


def test_kept_open_blob_deleted_then_committed_again(pair: _Pair, tmp_path: Any) -> None:
    store = LocalStore(os.path.join(tmp_path, "root"))
    try:
        data = os.urandom(100 << 10)
        dgst = _put(store, data)
        req = pb.ReadContentRequest(digest=dgst, offset=10, size=32 << 10)
        for _ in range(2):  # the second read is served from the blob the lane kept open
            assert [m.data for m in pair.both(req).responses] == [data[10 : 10 + (32 << 10)]]
        store.delete(dgst)
        r = pair.both(req)
        assert r.code == grpc.StatusCode.NOT_FOUND, r
        assert _put(store, data) == dgst
        for _ in range(2):
            assert [m.data for m in pair.both(req).responses] == [data[10 : 10 + (32 << 10)]]
        other = _put(store, b"x" * 5)
        r = pair.both(pb.ReadContentRequest(digest=other, size=3), (("containerd-namespace", ""),))
        assert r.code == grpc.StatusCode.FAILED_PRECONDITION  # namespace checked as before
        r = pair.both(pb.ReadContentRequest(digest=other, size=3), ())
        assert [m.data for m in r.responses] == [b"xxx"]  # no header: the raw view
    finally:
        store.close()


# -- the fallback: a grpcio without the internals the lane needs ---------------------------


def _serve_and_read(store: LocalStore, tmp: str, name: str) -> None:
    """A server built as ``contentfs serve`` builds it must have no lane and still serve
    Read (whole, ranged, missing) through the generic handler."""
    from store import NotFound
    from store.grpc.client import RemoteStore

    big = os.urandom((2 << 20) + 5)
    dgst = _put(store, big)
    server, pool = build_server(store)  # read_lane=True, as served
    sock = os.path.join(tmp, f"{name}.sock")
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    remote = RemoteStore(f"unix://{sock}")
    try:
        assert server.lane is None
        with remote.reader_at(dgst) as r:
            assert r.size == len(big)
            assert r.read_at(len(big), 0) == big
            assert r.read_at(100, (1 << 20) - 7) == big[(1 << 20) - 7:(1 << 20) + 93]
        with pytest.raises(NotFound):
            remote.reader_at("sha256:" + "0" * 64)
    finally:
        remote.close()
        server.stop(0).wait()
        pool.shutdown(wait=True)


def test_without_grpc_internals_read_falls_back(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import grpc._channel
    import grpc._server  # noqa: F401  (grpc's own modules hold the real internals)

    monkeypatch.setitem(sys.modules, "grpc._cython", None)  # the lane's import fails
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    with LocalStore(root) as store:
        _serve_and_read(store, str(tmp_path), "noimport")


def test_with_changed_grpc_internals_read_falls_back(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import grpc._channel
    import grpc._cython
    import grpc._server  # noqa: F401  (grpc's own modules keep the real internals)
    from grpc._cython import cygrpc

    # what the lane sees: a Cython layer that lost a name it uses
    changed = types.SimpleNamespace(**{n: getattr(cygrpc, n) for n in dir(cygrpc)
                                       if n != "ReceiveCloseOnServerOperation"})
    monkeypatch.setattr(grpc._cython, "cygrpc", changed)
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    with LocalStore(root) as store:
        _serve_and_read(store, str(tmp_path), "changed")


def test_namespace_visibility_follows_deletes(pair: _Pair, tmp_path: Any) -> None:
    """The lane trusts a blob's visibility in a namespace only while no metadata row
    changed: after the blob is removed from one namespace (its file stays: another
    namespace holds it), a Read there is NotFound at once, as in the generic handler."""
    data = os.urandom(100 << 10)
    store = LocalStore(os.path.join(tmp_path, "root"))
    try:
        for ns in ("one", "two"):
            w = store.namespace(ns).writer(f"put-{ns}")
            w.write(data)
            dgst = str(w.commit(len(data), None))
        in_one = (("containerd-namespace", "one"),)
        in_two = (("containerd-namespace", "two"),)
        req = pb.ReadContentRequest(digest=dgst, offset=0, size=32 << 10)
        for _ in range(3):  # the lane keeps the blob open and its visibility known
            assert pair.both(req, in_one).responses[0].data == data[: 32 << 10]
        store.namespace("one").delete(dgst)
        assert pair.both(req, in_one).code == grpc.StatusCode.NOT_FOUND
        assert pair.both(req, in_two).responses[0].data == data[: 32 << 10]
        # and back: committed again in "one", it is readable there again
        w = store.namespace("one").writer("again")
        w.write(data)
        w.commit(len(data), None)
        assert pair.both(req, in_one).responses[0].data == data[: 32 << 10]
    finally:
        store.close()
