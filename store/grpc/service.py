"""containerd's Content service (1.6 server behaviour) over any store, free of any
server framework: each RPC is a plain method taking decoded requests and returning (or
yielding) responses, raising StoreError or GrpcError. ``server`` binds them to grpcio.

Deliberate departures from containerd 1.6, all invisible to ``ctr``:

* a shared ingest (reference §5.3) is a real, empty ingest directory, so Status and
  ListStatuses show it (offset 0) where 1.6 answers NotFound and hides it;
* a request without the ``containerd-namespace`` header works on the raw store (containerd
  1.6 answers FailedPrecondition): containerd sends no header to a content proxy plugin,
  so that is how containerd uses contentfs as its store (DESIGN §4, reference §14);
* List fills ``updated_at`` (1.6 sends the zero time; main fills it);
* Status and ListStatuses fill ``expected`` when an expected digest is recorded;
* a Write stream's writer is let go as soon as the client half-closes or the stream
  ends, cancelled or not, and a second writer on a held ref waits up to about a second
  (the store's wait, as 1.6's local store), so containerd's close-then-reopen works.

Kept on purpose: ReadContentResponse.offset is relative to the start of the read, and a
Write stream that ends without error repeats its last response once (reference §8.5,
§8.6). Timestamps are always encoded; "unset" is Go's zero time.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from store.api import IdleCloser, InfoIterator, Namespaced, Store, Writer
from store.digest import Digest, parse_digest
from store.errors import InvalidArgument, NotFound, StoreError
from store.text import printable_ref
from store.types import EPOCH, Info, Status, to_ns

from .errors import GrpcError
from .pb import content_pb2 as pb
from .wire import WriteRequest, encode_read_response

__all__ = [
    "LIST_BATCH",
    "NAMESPACE_KEY",
    "READ_CHUNK",
    "ContentService",
    "check_namespace",
    "encode_read_response",
    "info_to_pb",
    "status_to_pb",
    "timestamp",
]

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace"
LEASE_KEY = "containerd-lease"
LIST_BATCH = 100
READ_CHUNK = 1 << 20
#: Go's zero time (0001-01-01T00:00:00Z) in Unix seconds: what 1.6 encodes for "unset".
ZERO_SECONDS = -62135596800
_IDENTIFIER = re.compile(r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$")
_IDENTIFIER_MAX = 76

STAT, WRITE, COMMIT = pb.STAT, pb.WRITE, pb.COMMIT


def check_namespace(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The request's namespace (first ``containerd-namespace`` value), validated as
    containerd's identifiers; None when the header is absent (the raw view).
    FailedPrecondition when present but empty, InvalidArgument when malformed."""
    for key, value in metadata:
        if key == NAMESPACE_KEY:
            ns = value if isinstance(value, str) else value.decode("utf-8", "replace")
            break
    else:
        return None
    if not ns:
        raise GrpcError(
            grpc.StatusCode.FAILED_PRECONDITION, "namespace is required: failed precondition"
        )
    if len(ns) > _IDENTIFIER_MAX:
        raise GrpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'namespace validation: identifier "{ns}" greater than maximum length'
            f" ({_IDENTIFIER_MAX} characters): invalid argument",
        )
    if not _IDENTIFIER.fullmatch(ns):
        raise GrpcError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'namespace validation: identifier "{ns}" must match'
            f" {_IDENTIFIER.pattern}: invalid argument",
        )
    return ns


def timestamp(when: dt.datetime) -> Timestamp:
    """A Timestamp that is always set; the zero time becomes Go's zero (reference §8.3)."""
    ns = to_ns(when)
    if ns <= 0:
        return Timestamp(seconds=ZERO_SECONDS)
    secs, nanos = divmod(ns, 10**9)
    return Timestamp(seconds=secs, nanos=nanos)


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        digest=info.digest,
        size=info.size,
        created_at=timestamp(info.created_at),
        updated_at=timestamp(info.updated_at),
        labels=dict(info.labels),
    )


def status_to_pb(st: Status) -> pb.Status:
    return pb.Status(
        started_at=timestamp(st.started_at),
        updated_at=timestamp(st.updated_at),
        # protobuf strings are UTF-8: a legacy ref that is not shows its bytes as \xNN
        ref=printable_ref(st.ref),
        offset=st.offset,
        total=st.total,
        expected=st.expected or "",
    )


def _validated(digest: str) -> Digest:
    """Info and Update check the digest themselves, with containerd's message."""
    try:
        return parse_digest(digest)
    except InvalidArgument:
        raise GrpcError(
            grpc.StatusCode.INVALID_ARGUMENT, f'"{digest}" failed validation'
        ) from None


class ContentService:
    """The nine Content RPCs over one store. ``metadata`` is the call's invocation metadata:
    :meth:`view` turns it into the store the call works on, where containerd's store
    would check the namespace (after the server's own argument checks)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def view(self, metadata: Iterable[tuple[str, str | bytes]]) -> Store:
        """The store a call works on, from its metadata. The one place that decides:

        * no ``containerd-namespace`` header: the raw store, the layer beneath any
          namespace (what containerd's proxy plugin talks to);
        * a valid header: that namespace's view (DESIGN §6), holding its writes by the
          ``containerd-lease`` header's lease when there is one;
        * a malformed header: InvalidArgument (empty: FailedPrecondition, as containerd).
        """
        ns = check_namespace(metadata)
        if ns is None:
            return self._raw_view()
        lease = None
        for key, value in metadata:
            if key == LEASE_KEY:
                lease = value if isinstance(value, str) else value.decode("utf-8", "replace")
                break
        return self._namespace_view(ns, lease or None)

    def _raw_view(self) -> Store:
        if isinstance(self.store, Namespaced):
            return self.store.namespace(None)
        return self.store

    def _namespace_view(self, ns: str, lease: str | None) -> Store:
        if isinstance(self.store, Namespaced):
            return self.store.namespace(ns, lease=lease)
        return self.store  # a store without namespaces (a remote one): its own

    def info(self, req: pb.InfoRequest, metadata: Sequence[tuple[str, str]]) -> pb.InfoResponse:
        dgst = _validated(req.digest)
        store = self.view(metadata)
        return pb.InfoResponse(info=info_to_pb(store.info(dgst)))

    def update(
        self, req: pb.UpdateRequest, metadata: Sequence[tuple[str, str]]
    ) -> pb.UpdateResponse:
        dgst = _validated(req.info.digest)
        store = self.view(metadata)
        wanted = Info(dgst, req.info.size, EPOCH, EPOCH, dict(req.info.labels))
        updated = store.update(wanted, *req.update_mask.paths)
        return pb.UpdateResponse(info=info_to_pb(updated))

    def list(
        self, req: pb.ListContentRequest, metadata: Sequence[tuple[str, str]]
    ) -> Iterator[pb.ListContentResponse]:
        store = self.view(metadata)
        infos: Iterator[Info]
        if isinstance(store, InfoIterator):  # streamed: flat memory for any count
            infos = store.iter_infos(*req.filters)
        else:
            found: list[Info] = []
            store.walk(found.append, *req.filters)
            infos = iter(found)
        while batch := list(itertools.islice(infos, LIST_BATCH)):
            yield pb.ListContentResponse(info=[info_to_pb(i) for i in batch])

    def delete(self, req: pb.DeleteContentRequest, metadata: Sequence[tuple[str, str]]) -> None:
        dgst = parse_digest(req.digest)
        store = self.view(metadata)
        store.delete(dgst)

    def read(
        self, req: pb.ReadContentRequest, metadata: Sequence[tuple[str, str]]
    ) -> Iterator[bytes]:
        """Yield serialized ReadContentResponse messages (the hot path of ``ctr content
        get``, one call per 32 KiB: no Info lookup beyond the open, no message objects)."""
        try:
            dgst = parse_digest(req.digest)
        except InvalidArgument as exc:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{req.digest}: {exc}") from None
        store = self.view(metadata)
        reader = store.reader_at(dgst)
        try:
            size = reader.size
            offset = max(0, req.offset)
            if offset > size:
                raise GrpcError(
                    grpc.StatusCode.OUT_OF_RANGE, f"read past object length {size} bytes"
                )
            end = size if req.size <= 0 or offset + req.size > size else offset + req.size
            pos = offset
            while pos < end:
                data = reader.read_at(min(READ_CHUNK, end - pos), pos)
                if not data:
                    break  # the file shrank under us: end as a short read
                yield encode_read_response(pos - offset, data)
                pos += len(data)
        finally:
            reader.close()

    def status(
        self, req: pb.StatusRequest, metadata: Sequence[tuple[str, str]]
    ) -> pb.StatusResponse:
        store = self.view(metadata)
        try:
            if not req.ref:
                raise NotFound(f"reference {req.ref}")
            st = store.status(req.ref)
        except StoreError as exc:
            raise type(exc)(f'could not get status for ref "{req.ref}": {exc}') from None
        return pb.StatusResponse(status=status_to_pb(st))

    def list_statuses(
        self, req: pb.ListStatusesRequest, metadata: Sequence[tuple[str, str]]
    ) -> pb.ListStatusesResponse:
        store = self.view(metadata)
        statuses = store.list_statuses(*req.filters)
        return pb.ListStatusesResponse(statuses=[status_to_pb(s) for s in statuses])

    def abort(self, req: pb.AbortRequest, metadata: Sequence[tuple[str, str]]) -> None:
        store = self.view(metadata)
        if not req.ref:
            raise NotFound(f"ingest {req.ref}")
        store.abort(req.ref)

    def write(
        self,
        requests: Iterator[WriteRequest],
        metadata: Sequence[tuple[str, str]],
        on_end: Callable[[Callable[[], None]], object] | None = None,
    ) -> Iterator[pb.WriteContentResponse]:
        """The Write stream state machine (reference §8.6). The writer is closed (ingest
        kept, resumable) whenever the stream ends without a commit: client EOF, an error,
        cancellation or server shutdown. ``on_end`` (grpc's ``add_callback``) registers a
        callback run when the call ends: it closes the writer at once if no message is
        being handled, even while this generator waits to be resumed (a cancelled
        stream's generator is otherwise only closed when it is collected)."""
        req = next(requests, None)
        if req is None:
            return
        if not req.ref:
            raise GrpcError(
                grpc.StatusCode.INVALID_ARGUMENT, "first message must have a reference"
            )
        store = self.view(metadata)
        ref = req.ref
        total = req.total
        expected = req.expected
        writer = store.writer(ref, total=max(0, total), expected=expected or None)
        if on_end is not None and isinstance(writer, IdleCloser):
            on_end(writer.close_if_idle)
        # 1.6 always encodes both times: Go's zero time until a STAT fills them in
        zero = Timestamp(seconds=ZERO_SECONDS)
        msg = pb.WriteContentResponse(started_at=zero, updated_at=zero)
        try:
            while True:
                if req.action not in (STAT, WRITE, COMMIT):
                    raise GrpcError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"unknown write action {req.action}"
                    )
                msg.action = cast("pb.WriteAction", req.action)
                msg.offset = writer.offset
                if req.expected:
                    expected = req.expected
                    if self._exists(store, req.expected):
                        writer.close()
                        try:
                            store.abort(ref)
                        except NotFound:
                            pass
                        raise GrpcError(
                            grpc.StatusCode.ALREADY_EXISTS,
                            f"blob with expected digest {req.expected} exists",
                        )
                if req.total > 0:
                    total = req.total
                if req.action == STAT:
                    st = writer.status()
                    msg.digest = writer.digest()
                    msg.started_at.CopyFrom(timestamp(st.started_at))
                    msg.updated_at.CopyFrom(timestamp(st.updated_at))
                    msg.total = total
                else:
                    self._write(writer, req, msg)
                    if req.action == COMMIT:
                        writer.commit(max(0, total), expected or None, dict(req.labels) or None)
                    msg.digest = writer.digest()
                yield msg
                if req.action == COMMIT:
                    break
                nxt = next(requests, None)
                if nxt is None:
                    writer.close()
                    break
                req = nxt
        finally:
            writer.close()
        yield msg  # containerd 1.6 repeats the last response when the stream ends cleanly

    @staticmethod
    def _write(
        writer: Writer, req: WriteRequest, msg: pb.WriteContentResponse
    ) -> None:
        current = writer.offset
        if req.offset > 0 and req.offset != current:
            raise GrpcError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"write @{req.offset} must occur at current offset {current}",
            )
        if req.offset == 0 and current > 0:
            writer.truncate(0)
            msg.offset = 0
        data = req.data  # a view into the received message: never copied
        if data:
            n = writer.write(data)
            if n != len(data):
                raise GrpcError(grpc.StatusCode.DATA_LOSS, f"wrote {n} of {len(data)} bytes")
            msg.offset += n

    @staticmethod
    def _exists(store: Store, digest: str) -> bool:
        try:
            store.info(digest)
        except (NotFound, InvalidArgument):
            return False
        return True

