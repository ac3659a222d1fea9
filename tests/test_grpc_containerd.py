"""Side by side with a real containerd 1.6 daemon: the same raw gRPC call sequences get the
same codes and the same fields (times aside) from containerd and from our server, for the
error cases of reference §4 and §8.

Each scenario is a function of a :class:`Side` returning a list of observations; the test
runs it against both servers and compares the lists. Scenarios use random content, so
they do not see each other's blobs (``ctx["rng"]`` gives both sides the same bytes); List
scenarios filter on a label of their own. Known, deliberate differences are left out:
every namespace sees the same blobs here, and a call without the namespace header works
on the raw store (containerd: FailedPrecondition; tests/test_grpc_api.py covers it).
Blobs carry ``containerd.io/gc.root`` so that containerd's GC keeps them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from store import LocalStore, digest_of
from store.grpc.client import RemoteStore
from store.grpc.pb import content_pb2 as pb
from tests.grpc_util import Containerd, InProcessServer, RawContent, Reply

OK = grpc.StatusCode.OK
NS = "sidebyside"
MD = (("containerd-namespace", NS),)
ROOT_LABEL = {"containerd.io/gc.root": "2030-01-01T00:00:00Z"}


class Side:
    """One server under test: raw calls plus a RemoteStore (to hold writers open)."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.raw = RawContent(address)
        self.remote = RemoteStore(address, namespace=NS)

    def close(self) -> None:
        self.raw.close()
        self.remote.close()

    # raw calls, reduced to comparable observations ----------------------------------

    def info(self, digest: str, md: Any = MD) -> tuple[Any, ...]:
        r = self.raw.unary("Info", pb.InfoRequest(digest=digest), pb.InfoResponse, md)
        if r.code != OK:
            return (r.code,)
        i = r.responses[0].info
        return (r.code, i.digest, i.size, dict(i.labels))

    def update(self, digest: str, labels: dict[str, str], *paths: str,
               mask: bool = True) -> tuple[Any, ...]:
        req = pb.UpdateRequest(info=pb.Info(digest=digest, labels=labels, size=999))
        if mask:
            req.update_mask.paths.extend(paths)
        r = self.raw.unary("Update", req, pb.UpdateResponse, MD)
        if r.code != OK:
            return (r.code,)
        i = r.responses[0].info
        return (r.code, i.digest, i.size, dict(i.labels))

    def delete(self, digest: str) -> tuple[Any, ...]:
        r = self.raw.unary("Delete", pb.DeleteContentRequest(digest=digest), empty_pb2.Empty, MD)
        return (r.code,)

    def read(self, digest: str, offset: int = 0, size: int = 0) -> tuple[Any, ...]:
        r = self.raw.stream(
            "Read", pb.ReadContentRequest(digest=digest, offset=offset, size=size),
            pb.ReadContentResponse, MD,
        )
        data = b"".join(m.data for m in r.responses)
        return (r.code, [(m.offset, len(m.data)) for m in r.responses], digest_of(data))

    def list(self, *filters: str) -> tuple[Any, ...]:
        r = self.raw.stream(
            "List", pb.ListContentRequest(filters=filters), pb.ListContentResponse, MD
        )
        return (r.code, [[(i.digest, i.size, dict(i.labels)) for i in m.info]
                         for m in r.responses])

    def status(self, ref: str) -> tuple[Any, ...]:
        r = self.raw.unary("Status", pb.StatusRequest(ref=ref), pb.StatusResponse, MD)
        if r.code != OK:
            return (r.code,)
        s = r.responses[0].status
        return (r.code, s.ref, s.offset, s.total)

    def list_statuses(self, *filters: str) -> tuple[Any, ...]:
        r = self.raw.unary(
            "ListStatuses", pb.ListStatusesRequest(filters=filters), pb.ListStatusesResponse, MD
        )
        if r.code != OK:
            return (r.code,)
        return (r.code, sorted((s.ref, s.offset) for s in r.responses[0].statuses))

    def abort(self, ref: str) -> tuple[Any, ...]:
        return (self.raw.unary("Abort", pb.AbortRequest(ref=ref), empty_pb2.Empty, MD).code,)

    def write(self, *reqs: pb.WriteContentRequest, md: Any = MD) -> tuple[Any, ...]:
        r: Reply = self.raw.write(list(reqs), md)
        return (r.code, [(m.action, m.offset, m.total, m.digest, _zero(m.started_at),
                          _zero(m.updated_at)) for m in r.responses])


def _zero(ts: Any) -> bool | None:
    """Whether a timestamp is Go's zero time (None when absent from the wire)."""
    if not ts.seconds and not ts.nanos:
        return None
    return bool(ts.seconds == -62135596800)


def W(action: pb.WriteAction = pb.STAT, **kw: Any) -> pb.WriteContentRequest:  # noqa: N802
    return pb.WriteContentRequest(action=action, **kw)


def commit_blob(side: Side, data: bytes, ref: str, labels: dict[str, str] | None = None) -> None:
    obs = side.write(
        W(pb.STAT, ref=ref, total=len(data)),
        W(pb.WRITE, data=data),
        W(pb.COMMIT, total=len(data), offset=len(data), expected=digest_of(data),
          labels={**ROOT_LABEL, **(labels or {})}),
    )
    assert obs[0] == OK, (side.name, obs)


# scenarios ----------------------------------------------------------------------------

Scenario = Callable[[Side, dict[str, Any]], list[Any]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def namespaces(s: Side, c: dict[str, Any]) -> list[Any]:
    d = digest_of(c["blob"])
    return [
        s.info(d, md=(("containerd-namespace", ""),)),
        s.info(d, md=(("containerd-namespace", "bad ns!"),)),
        s.info(d, md=(("containerd-namespace", "a" * 77),)),
        s.info("sha256:" + "0" * 64, md=(("containerd-namespace", "a" * 76),)),  # valid
        s.info(d, md=(("containerd-namespace", "a..b"),)),
        s.info("sha256:00", md=()),  # the digest is checked first
        s.write(W(pb.STAT), md=()),  # so is the first message's ref
        s.write(W(pb.STAT, ref="x"), md=(("containerd-namespace", ""),)),
    ]


@scenario
def digests(s: Side, c: dict[str, Any]) -> list[Any]:
    hex64 = "a" * 64
    bad = ["md5:" + "a" * 32, "sha256:" + hex64.upper(), "sha256:" + "a" * 63,
           "SHA256:" + hex64, "sha256", ":" + hex64, ""]
    good_unknown = ["sha256:" + "0" * 64, "sha384:" + "0" * 96, "sha512:" + "0" * 128]
    out: list[Any] = []
    for d in bad + good_unknown:
        out += [s.info(d), s.delete(d), s.read(d)[0], s.update(d, {"a": "b"}, "labels.a")]
    return out


@scenario
def read_rules(s: Side, c: dict[str, Any]) -> list[Any]:
    d = digest_of(c["big"])
    n = len(c["big"])
    return [
        s.read(d),
        s.read(d, offset=n),
        s.read(d, offset=n + 1),
        s.read(d, offset=-5),
        s.read(d, offset=100, size=10),
        s.read(d, offset=n - 3, size=10),
        s.read(d, offset=1 << 20, size=0),
        s.read(d, offset=5, size=-1),
    ]


@scenario
def write_first_message(s: Side, c: dict[str, Any]) -> list[Any]:
    data = c["blob"]
    ref = c["ref"]
    return [
        s.write(W(pb.WRITE, data=b"x")),  # no ref
        s.write(W(pb.STAT, ref=ref + "-a", expected=digest_of(data))),  # exists
        s.status(ref + "-a"),
        s.write(W(pb.STAT, ref=ref + "-b", total=3)),  # EOF: the response is repeated
        s.status(ref + "-b"),
        s.write(W(pb.WRITE, ref=ref + "-c", data=b"abc")),  # WRITE first
        s.status(ref + "-c"),
        s.abort(ref + "-b"),
        s.abort(ref + "-c"),
    ]


@scenario
def write_offsets(s: Side, c: dict[str, Any]) -> list[Any]:
    ref = c["ref"]
    return [
        s.write(W(ref=ref), W(pb.WRITE, data=b"hello"), W(pb.WRITE, offset=3, data=b"x")),
        s.status(ref),
        s.write(W(ref=ref), W(pb.WRITE, offset=5, data=b" world"), W(pb.WRITE, offset=-1,
                                                                      data=b"!")),
        s.status(ref),
        # offset 0 after data truncates, for WRITE and for COMMIT
        s.write(W(ref=ref), W(pb.WRITE, offset=0, data=b"new")),
        s.status(ref),
        s.write(W(ref=ref), W(pb.COMMIT, offset=0, data=b"final-" + ref.encode(),
                              labels=ROOT_LABEL)),
        s.status(ref),
        s.info(digest_of(b"final-" + ref.encode())),
    ]


@scenario
def commit_errors(s: Side, c: dict[str, Any]) -> list[Any]:
    ref = c["ref"]
    data = c["rng"].randbytes(1000)
    d = digest_of(data)
    existing = digest_of(c["blob"])
    return [
        # wrong digest: kept, with the bytes of the COMMIT message too
        s.write(W(ref=ref), W(pb.WRITE, data=data[:600]),
                W(pb.COMMIT, offset=600, data=data[600:], expected="sha256:" + "1" * 64)),
        s.status(ref),
        # wrong size at commit
        s.write(W(ref=ref), W(pb.COMMIT, offset=1000, total=999)),
        s.status(ref),
        s.write(W(ref=ref), W(pb.COMMIT, offset=1000, total=1001)),
        s.status(ref),
        # a COMMIT at offset 0 truncates first, then commits what it carries
        s.write(W(ref=ref + "-t"), W(pb.WRITE, data=b"abc"), W(pb.COMMIT, total=3)),
        s.status(ref + "-t"),
        s.abort(ref + "-t"),
        # labels too big: kept
        s.write(W(ref=ref), W(pb.COMMIT, offset=1000, labels={"k": "v" * 4096})),
        s.status(ref),
        # exactly 4096 bytes of key plus value is fine
        s.write(W(ref=ref), W(pb.COMMIT, offset=1000, expected=d,
                              labels={**ROOT_LABEL, "k": "v" * 4095})),
        s.status(ref),
        s.info(d),
        # an expected digest that exists, on a later message: the ingest is aborted
        s.write(W(ref=ref + "-x"), W(pb.WRITE, data=b"abc"),
                W(pb.COMMIT, offset=3, expected=existing)),
        s.status(ref + "-x"),
        # content that turns out to exist, no expected digest: AlreadyExists, ingest removed
        s.write(W(ref=ref + "-y"), W(pb.WRITE, data=c["blob"]),
                W(pb.COMMIT, offset=len(c["blob"]))),
        s.status(ref + "-y"),
        s.list_statuses(f"ref=={ref}"),
    ]


@scenario
def locked_ref(s: Side, c: dict[str, Any]) -> list[Any]:
    ref = c["ref"]
    w = s.remote.writer(ref, total=0)
    try:
        w.write(b"held")
        locked = s.write(W(ref=ref))
    finally:
        w.close()
    return [locked, s.write(W(ref=ref)), s.abort(ref), s.abort(ref)]


@scenario
def status_abort_errors(s: Side, c: dict[str, Any]) -> list[Any]:
    return [
        s.status("no-such-ref-" + c["ref"]),
        s.status(""),
        s.abort("no-such-ref-" + c["ref"]),
        s.abort(""),
        s.list_statuses("ref==("),
        s.list_statuses(f"ref=={c['ref']}-none"),
    ]


@scenario
def update_labels(s: Side, c: dict[str, Any]) -> list[Any]:
    data = c["rng"].randbytes(64)
    d = digest_of(data)
    commit_blob(s, data, c["ref"], {"k1": "v1", "k2": "v2"})
    return [
        s.info(d),
        s.update(d, {**ROOT_LABEL, "k1": "new", "k3": "v3"}),  # no paths: replace all
        s.update(d, {**ROOT_LABEL, "k1": "v1"}, "labels.k3", "labels.k1"),
        s.update(d, {"a.b": "dots"}, "labels.a.b"),
        s.update(d, {"z": "1"}, "labels.z", "size"),  # one bad path rejects all
        s.update(d, {"big": "v" * 4094}, "labels.big"),  # 3 + 4094 > 4096
        s.update(d, {}, "labels.k1"),  # absent: removed
        s.update(d, {**ROOT_LABEL, "only": "1"}, mask=False),
        s.update(d, {**ROOT_LABEL}, "labels"),
        s.info(d),
    ]


@scenario
def list_batches(s: Side, c: dict[str, Any]) -> list[Any]:
    tag = {"scenario": c["ref"]}
    for i in range(105):
        commit_blob(s, c["rng"].randbytes(16) + bytes([i]), f"{c['ref']}-{i}", tag)
    return [
        s.list(f"labels.scenario=={c['ref']}"),
        s.list(f"labels.scenario=={c['ref']}-none"),
        s.list("labels.scenario=="),
        s.list("digest~=["),
    ]


# fixtures and the test ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    base = str(tmp_path_factory.mktemp("sbs"))
    daemon = Containerd(os.path.join(base, "containerd"))
    root = os.path.join(base, "root")
    os.mkdir(root)
    store = LocalStore(root)
    ours = InProcessServer(store, os.path.join(base, "contentfs.sock")).start()
    theirs_side, ours_side = Side("containerd", daemon.address), Side("contentfs", ours.address)
    try:
        yield theirs_side, ours_side
    finally:
        theirs_side.close()
        ours_side.close()
        ours.stop()
        store.close()
        daemon.stop()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_as_containerd(sides: tuple[Side, Side], name: str) -> None:
    theirs, ours = sides
    blob = b"shared blob for " + name.encode() + os.urandom(8)
    big = os.urandom(2 * 1024 * 1024 + 512 * 1024)
    results = []
    for side in (theirs, ours):
        commit_blob(side, blob, f"{name}-setup-blob")
        commit_blob(side, big, f"{name}-setup-big")
        seed = int.from_bytes(blob[-8:], "big")
        ctx = {"blob": blob, "big": big, "ref": f"{name}-ref", "rng": random.Random(seed)}
        results.append(SCENARIOS[name](side, ctx))
    want, got = results
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert g == w, f"{name} step {i}: containerd {w!r}, contentfs {g!r}"
