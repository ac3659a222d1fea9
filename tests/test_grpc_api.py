"""The gRPC adapter's own contracts: the one error mapping, List batches, Read framing,
Version and Introspection, RemoteStore's error classes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import empty_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from store import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplemented,
    StoreError,
    Unavailable,
    digest_of,
)
from store.grpc.client import RemoteStore
from store.grpc.errors import GrpcError, RemoteError, from_grpc, to_grpc
from store.grpc.pb import content_pb2 as pb
from store.grpc.pb import introspection_pb2, version_pb2
from store.grpc.wire import WireError, decode_write_request, encode_read_response
from tests.grpc_util import InProcessServer, RawContent, inproc_server

server = pytest.fixture(inproc_server)


@pytest.fixture
def remote(server: InProcessServer) -> Iterator[RemoteStore]:
    with RemoteStore(server.address) as r:
        yield r


CLASSES: list[tuple[type[StoreError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (NotImplemented, grpc.StatusCode.UNIMPLEMENTED),
]


@pytest.mark.parametrize(("cls", "code"), CLASSES)
def test_error_mapping_round_trip(cls: type[StoreError], code: grpc.StatusCode) -> None:
    got_code, message = to_grpc(cls("content sha256:ab"))
    assert got_code == code
    assert message == f"content sha256:ab: {cls.kind}"
    back = from_grpc(got_code, message)
    assert type(back) is cls
    assert str(back) == message  # the kind is not appended twice


def test_error_mapping_other_codes() -> None:
    assert to_grpc(DataLoss("content x"))[0] == grpc.StatusCode.DATA_LOSS
    assert to_grpc(OSError(28, "No space left on device"))[0] == grpc.StatusCode.UNKNOWN
    assert to_grpc(GrpcError(grpc.StatusCode.OUT_OF_RANGE, "read past"))[0] == (
        grpc.StatusCode.OUT_OF_RANGE
    )
    for code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS,
                 grpc.StatusCode.UNKNOWN):
        err = from_grpc(code, "boom")
        assert isinstance(err, RemoteError) and err.code == code


@pytest.mark.parametrize("offset", [0, 1, 127, 128, 1 << 20, (1 << 40) + 3])
@pytest.mark.parametrize("size", [0, 1, 200, 32768])
def test_read_response_encoding(offset: int, size: int) -> None:
    data = os.urandom(size)
    want = pb.ReadContentResponse(offset=offset, data=data).SerializeToString()
    assert encode_read_response(offset, data) == want


_int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@settings(max_examples=300, deadline=None)
@given(
    action=st.sampled_from([pb.STAT, pb.WRITE, pb.COMMIT]),
    ref=st.text(max_size=40),
    total=_int64,
    expected=st.text(max_size=80),
    offset=_int64,
    data=st.binary(max_size=3000),
    labels=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4),
    unknown=st.binary(max_size=0) | st.just(b"\x78\x05") | st.just(b"\x82\x01\x02hi"),
)
def test_write_request_decoding_matches_protobuf(
    action: pb.WriteAction, ref: str, total: int, expected: str, offset: int, data: bytes,
    labels: dict[str, str], unknown: bytes,
) -> None:
    msg = pb.WriteContentRequest(
        action=action, ref=ref, total=total, expected=expected, offset=offset, data=data,
        labels=labels,
    )
    raw = msg.SerializeToString() + unknown
    parsed = pb.WriteContentRequest.FromString(raw)
    got = decode_write_request(raw)
    assert (got.action, got.ref, got.total, got.expected, got.offset) == (
        parsed.action, parsed.ref, parsed.total, parsed.expected, parsed.offset
    )
    assert bytes(got.data) == parsed.data
    assert got.labels == dict(parsed.labels)


@pytest.mark.parametrize("raw", [b"\x08", b"\x12\x05abc", b"\x00\x01", b"\x0b", b"\x12\x01\xff"])
def test_write_request_decoding_rejects_malformed(raw: bytes) -> None:
    with pytest.raises((WireError, UnicodeDecodeError)):
        decode_write_request(raw)


def test_list_batches_and_read_chunks(server: InProcessServer, remote: RemoteStore) -> None:
    digests = []
    for i in range(250):
        data = b"blob %d" % i
        w = remote.writer(f"r{i}")
        w.write(data)
        digests.append(w.commit(labels={"i": str(i)}))
    raw = RawContent(server.address)
    try:
        r = raw.stream("List", pb.ListContentRequest(), pb.ListContentResponse)
        assert r.code == grpc.StatusCode.OK
        assert [len(m.info) for m in r.responses] == [100, 100, 50]
        listed = [i.digest for m in r.responses for i in m.info]
        assert listed == sorted(digests)
        first = r.responses[0].info[0]
        assert first.updated_at.seconds > 0 and first.created_at.seconds > 0
        r = raw.stream("List", pb.ListContentRequest(filters=["labels.i==7"]),
                       pb.ListContentResponse)
        assert [[i.digest for i in m.info] for m in r.responses] == [[digest_of(b"blob 7")]]

        big = os.urandom((3 << 20) + 5)
        w = remote.writer("big")
        w.write(big)  # one 4 MiB WRITE message at most
        dgst = w.commit()
        r = raw.stream("Read", pb.ReadContentRequest(digest=dgst, offset=7),
                       pb.ReadContentResponse)
        # 1 MiB chunks; offsets relative to the start of the read, as containerd 1.6
        assert [(m.offset, len(m.data)) for m in r.responses] == [
            (0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, (1 << 20) - 2)
        ]
        assert b"".join(m.data for m in r.responses) == big[7:]
        reader = remote.reader_at(dgst)
        assert reader.size == len(big)
        assert reader.read_at(10, len(big) - 4) == big[-4:]
        assert reader.read_at(10, len(big)) == b""
        assert remote._read_range(dgst, len(big), 1) == b""
        with pytest.raises(RemoteError) as exc:
            remote._read_range(dgst, len(big) + 1, 1)
        assert exc.value.code == grpc.StatusCode.OUT_OF_RANGE
        assert f"read past object length {len(big)} bytes" in str(exc.value)
    finally:
        raw.close()


def test_version_and_introspection(server: InProcessServer) -> None:
    ch = grpc.insecure_channel(f"unix:{server.socket}")
    try:
        version = ch.unary_unary(
            "/containerd.services.version.v1.Version/Version",
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=version_pb2.VersionResponse.FromString,
        )(empty_pb2.Empty(), timeout=30)
        assert version.version.startswith("contentfs ")
        info = ch.unary_unary(
            "/containerd.services.introspection.v1.Introspection/Server",
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=introspection_pb2.ServerResponse.FromString,
        )(empty_pb2.Empty(), timeout=30)
        assert info.pid == os.getpid() and len(info.uuid) == 36
        assert list(info.deprecations) == []
    finally:
        ch.close()


def test_remote_store_errors(remote: RemoteStore) -> None:
    unknown = "sha256:" + "0" * 64
    with pytest.raises(NotFound, match=f"content {unknown}: not found"):
        remote.info(unknown)
    with pytest.raises(InvalidArgument):
        remote.info("sha256:xyz")
    with pytest.raises(NotFound):
        remote.delete(unknown)
    with pytest.raises(NotFound):
        remote.status("nope")
    with pytest.raises(NotFound):
        remote.abort("nope")
    with pytest.raises(InvalidArgument):
        remote.list("labels.==(")
    w = remote.writer("one", total=3)
    try:
        with pytest.raises(Unavailable, match="ref one locked"):
            remote.writer("one")
        with pytest.raises(NotImplemented):
            w.truncate(2)
        w.write(b"abcd")
        with pytest.raises(FailedPrecondition, match="failed size validation: 4 != 3"):
            w.commit()
        assert w.closed
        with pytest.raises(FailedPrecondition):
            w.commit()
    finally:
        w.close()
    w = remote.writer("one")  # the failed commit released the ref
    assert w.offset == 4
    w.truncate(0)
    assert w.status().offset == 0
    w.write(b"abc")
    assert w.commit(3, digest_of(b"abc")) == digest_of(b"abc")
    with pytest.raises(AlreadyExists):
        remote.writer("two", expected=digest_of(b"abc"))


def test_no_namespace_header_is_the_raw_view(server: InProcessServer) -> None:
    """Without the header (containerd's proxy plugin sends none) every call works on the
    raw store; an empty header is FailedPrecondition and a malformed one InvalidArgument."""
    raw = RawContent(server.address)
    data = b"raw view"
    dgst = digest_of(data)
    try:
        r = raw.write([pb.WriteContentRequest(action=pb.STAT, ref="raw", total=len(data)),
                       pb.WriteContentRequest(action=pb.COMMIT, data=data, expected=dgst)],
                      md=())
        assert r.code == grpc.StatusCode.OK, r.details
        r = raw.unary("Info", pb.InfoRequest(digest=dgst), pb.InfoResponse, md=())
        assert (r.code, r.responses[0].info.size) == (grpc.StatusCode.OK, len(data))
        r = raw.stream("List", pb.ListContentRequest(), pb.ListContentResponse, md=())
        assert [i.digest for m in r.responses for i in m.info] == [dgst]
        r = raw.unary("Info", pb.InfoRequest(digest=dgst), pb.InfoResponse)  # a namespace
        assert r.code == grpc.StatusCode.OK  # sees it too, until namespaces are kept apart
        r = raw.unary("Delete", pb.DeleteContentRequest(digest=dgst), empty_pb2.Empty, md=())
        assert r.code == grpc.StatusCode.OK
        assert not os.path.exists(os.path.join(server.store.root, "blobs", "sha256",
                                               dgst.split(":")[1]))
        r = raw.unary("ListStatuses", pb.ListStatusesRequest(), pb.ListStatusesResponse,
                      md=(("containerd-namespace", ""),))
        assert r.code == grpc.StatusCode.FAILED_PRECONDITION
        assert r.details == "namespace is required: failed precondition"
        r = raw.unary("ListStatuses", pb.ListStatusesRequest(), pb.ListStatusesResponse,
                      md=(("containerd-namespace", "-x"),))
        assert r.code == grpc.StatusCode.INVALID_ARGUMENT
        assert r.details.startswith('namespace validation: identifier "-x" must match')
    finally:
        raw.close()


def test_namespaces_are_kept_apart(server: InProcessServer) -> None:
    """DESIGN §6: each namespace has its own ingests and records over shared bytes."""
    with RemoteStore(server.address, namespace="a") as a, RemoteStore(
        server.address, namespace="b.c-d_e"
    ) as b:
        w = a.writer("ns-ref")
        w.write(b"only in a")
        assert b.list_statuses() == []
        dgst = w.commit(labels={"k": "v"})
        with pytest.raises(NotFound):
            b.info(dgst)
        with pytest.raises(NotFound):
            b.delete(dgst)
        assert dict(a.info(dgst).labels) == {"k": "v"}
