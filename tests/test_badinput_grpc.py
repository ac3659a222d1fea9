"""Bad input over gRPC: hypothesis sends every Content RPC with fields out of range
(malformed digests, odd refs, negative and huge offsets and sizes, unknown actions,
oversized labels, bad filters, bad field masks) and Write streams that end early, to a
live ``contentfs serve``. Every call ends in a containerd status code that names a client
or state error (never UNKNOWN or INTERNAL, which would be a bug), the server stays up,
no ref stays locked after its stream ends, and committed blobs stay intact."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, field_mask_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store.grpc.pb import content_pb2 as pb
from tests.grpc_util import RawContent, ServeProcess

from .rel_util import check_blobs, payload, sha256

C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION,
           C.UNAVAILABLE, C.OUT_OF_RANGE, C.UNIMPLEMENTED, C.DATA_LOSS}
SEED = payload(1, 3000)

digests = st.sampled_from([
    "", "sha256", "sha256:", "md5:" + "a" * 32, "sha256:" + "A" * 64, "sha256:" + "a" * 63,
    "sha256:../../etc/passwd", "sha512:" + "a" * 64, "sha256:" + "a" * 64, sha256(SEED),
    sha256(b""), "sha256:" + "a" * 64 + "\n", "x" * 5000,
])
refs = st.sampled_from(["", "r", "r/../..", "..", "/etc/passwd", "%2F..%2F", "r" * 4096,
                        "r" * 4097, "é" * 3000, "ref with spaces", "\x7f"])
ints = st.sampled_from([0, 1, -1, 2, 3000, 2999, 3001, 1 << 31, (1 << 63) - 1, -(1 << 63)])
labels = st.dictionaries(
    st.sampled_from(["k", "", "containerd.io/gc.root", "x" * 5000]),
    st.sampled_from(["", "v", "v" * 5000]), max_size=2)
filters = st.lists(st.sampled_from(
    ["", "labels.", "digest~=(", 'labels."x', "digest==" + sha256(SEED), "labels.k", ",",
     "ref==r", "\x00", "a b"]), max_size=2)
masks = st.lists(st.sampled_from(["labels", "labels.k", "size", "digest", "", "labels."]),
                 max_size=2)
write_reqs = st.builds(
    pb.WriteContentRequest,
    action=st.sampled_from([0, 1, 2, 3, 99, -1]),  # STAT, WRITE, COMMIT, unknown
    ref=refs, total=ints, expected=digests, offset=ints,
    data=st.sampled_from([b"", SEED[:1000], SEED[1000:], SEED, b"x" * 70000]),
    labels=labels,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, Any]]:
    base = os.fspath(tmp_path_factory.mktemp("grpc-badinput"))
    root = os.path.join(base, "root")
    os.mkdir(root)
    srv = ServeProcess(root, os.path.join(base, "s.sock"))
    raw = RawContent(srv.address)
    try:
        r = raw.write([pb.WriteContentRequest(action=pb.STAT, ref="seed"),
                       pb.WriteContentRequest(action=pb.WRITE, ref="seed", data=SEED),
                       pb.WriteContentRequest(action=pb.COMMIT, ref="seed", total=len(SEED),
                                              offset=len(SEED), expected=sha256(SEED))])
        assert r.code == C.OK, r.details
        yield srv, raw
    finally:
        raw.close()
        assert srv.stop() == 0, srv.stderr
    blobs = check_blobs(root)
    assert blobs[sha256(SEED)] == SEED


def _ok(reply: Any, what: str) -> None:
    assert reply.code in ALLOWED, f"{what}: {reply.code} {reply.details}"


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(digest=digests, offset=ints, size=ints, lbl=labels, paths=masks, flt=filters)
def test_unary_calls(server: tuple[ServeProcess, Any], digest: str, offset: int, size: int,
                     lbl: dict[str, str], paths: list[str], flt: list[str]) -> None:
    srv, raw = server
    _ok(raw.unary("Info", pb.InfoRequest(digest=digest), pb.InfoResponse), "Info")
    _ok(raw.stream("Read", pb.ReadContentRequest(digest=digest, offset=offset, size=size),
                   pb.ReadContentResponse), "Read")
    _ok(raw.unary("Update", pb.UpdateRequest(
        info=pb.Info(digest=digest, size=size, labels=lbl),
        update_mask=field_mask_pb2.FieldMask(paths=paths)), pb.UpdateResponse), "Update")
    _ok(raw.stream("List", pb.ListContentRequest(filters=flt), pb.ListContentResponse), "List")
    _ok(raw.unary("ListStatuses", pb.ListStatusesRequest(filters=flt),
                  pb.ListStatusesResponse), "ListStatuses")
    if digest != sha256(SEED):
        _ok(raw.unary("Delete", pb.DeleteContentRequest(digest=digest), empty_pb2.Empty), "Delete")
    assert srv.proc.poll() is None


@SETTINGS
@given(reqs=st.lists(write_reqs, min_size=0, max_size=5), ref=refs)
def test_write_streams(server: tuple[ServeProcess, Any], reqs: list[Any], ref: str) -> None:
    """Any sequence of Write requests, the stream then ends (early or not): a clean code,
    and the refs it used are free again at once."""
    srv, raw = server
    _ok(raw.write(reqs), "Write")
    for r in {q.ref for q in reqs} | {ref}:
        _ok(raw.unary("Status", pb.StatusRequest(ref=r), pb.StatusResponse), "Status")
        again = raw.write([pb.WriteContentRequest(action=pb.STAT, ref=r)])
        assert again.code != C.UNAVAILABLE, f"ref {r[:20]!r} still locked: {again.details}"
        _ok(again, "Write STAT")
        _ok(raw.unary("Abort", pb.AbortRequest(ref=r), empty_pb2.Empty), "Abort")
    assert srv.proc.poll() is None
