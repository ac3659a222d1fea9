"""RemoteStore: the store API (as LocalStore's) over containerd's gRPC Content API.

Talks to ``contentfs serve`` or to containerd itself. gRPC status codes come back as the
store's error classes (:func:`store.grpc.errors.from_grpc`); codes with no class
(OUT_OF_RANGE, UNKNOWN, ...) as :class:`~store.grpc.errors.RemoteError`.

A :class:`RemoteWriter` is one Write stream, used as containerd's Go proxy writer does:
open = STAT, each ``write`` = one WRITE (split to stay under the message limit), commit =
COMMIT then half-close, close = half-close. ``close`` and ``commit`` return only once the
server has ended the stream, so the ref lock is free when they return.
"""

from __future__ import annotations

import builtins
import datetime as dt
import queue
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from store.digest import Digest
from store.errors import FailedPrecondition
from store.errors import NotImplemented as NotSupported
from store.types import EPOCH, Info, Status, from_ns

from .errors import RemoteError, from_grpc
from .pb import content_pb2 as pb

__all__ = ["RemoteReaderAt", "RemoteStore", "RemoteWriter", "channel_target"]

SERVICE = "/containerd.services.content.v1.Content/"
MAX_MESSAGE = 16 << 20
#: Largest data payload per WRITE message (the Go client sends its callers' buffers, at
#: most 1 MiB from content.Copy; bigger buffers are split here).
WRITE_CHUNK = 4 << 20
_ZERO_SECONDS = -62135596800


def channel_target(address: str) -> str:
    """A grpcio target for ``unix:///PATH``, ``/PATH`` or ``tcp://HOST:PORT``."""
    if address.startswith("unix://"):
        return "unix:" + address[len("unix://") :]
    if address.startswith("/"):
        return "unix:" + address
    if address.startswith("tcp://"):
        return address[len("tcp://") :]
    return address


def _time(ts: Timestamp) -> dt.datetime:
    if ts.seconds <= _ZERO_SECONDS:
        return EPOCH
    return from_ns(ts.seconds * 10**9 + ts.nanos)


def _info(msg: pb.Info) -> Info:
    return Info(
        Digest(msg.digest), msg.size, _time(msg.created_at), _time(msg.updated_at),
        dict(msg.labels),
    )


def _status(msg: pb.Status) -> Status:
    return Status(
        msg.ref, msg.offset, msg.total, Digest(msg.expected) if msg.expected else None,
        _time(msg.started_at), _time(msg.updated_at),
    )


def _raise(exc: grpc.RpcError) -> NoReturn:
    raise from_grpc(exc.code(), exc.details()) from None


class RemoteStore:
    """The store API over gRPC, in ``namespace`` (every call carries it)."""

    def __init__(self, address: str, *, namespace: str = "default") -> None:
        self.address = address
        self.namespace = namespace
        self._channel = grpc.insecure_channel(
            channel_target(address),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._md: tuple[tuple[str, str], ...] = (("containerd-namespace", namespace),)
        ch = self._channel
        self._info = ch.unary_unary(
            SERVICE + "Info", pb.InfoRequest.SerializeToString, pb.InfoResponse.FromString
        )
        self._update = ch.unary_unary(
            SERVICE + "Update", pb.UpdateRequest.SerializeToString, pb.UpdateResponse.FromString
        )
        self._list = ch.unary_stream(
            SERVICE + "List",
            pb.ListContentRequest.SerializeToString,
            pb.ListContentResponse.FromString,
        )
        self._delete = ch.unary_unary(
            SERVICE + "Delete", pb.DeleteContentRequest.SerializeToString, lambda b: b
        )
        self._read = ch.unary_stream(
            SERVICE + "Read",
            pb.ReadContentRequest.SerializeToString,
            pb.ReadContentResponse.FromString,
        )
        self._status = ch.unary_unary(
            SERVICE + "Status", pb.StatusRequest.SerializeToString, pb.StatusResponse.FromString
        )
        self._list_statuses = ch.unary_unary(
            SERVICE + "ListStatuses",
            pb.ListStatusesRequest.SerializeToString,
            pb.ListStatusesResponse.FromString,
        )
        self._write = ch.stream_stream(
            SERVICE + "Write",
            pb.WriteContentRequest.SerializeToString,
            pb.WriteContentResponse.FromString,
        )
        self._abort = ch.unary_unary(
            SERVICE + "Abort", pb.AbortRequest.SerializeToString, lambda b: b
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, metadata=self._md)
        except grpc.RpcError as exc:
            _raise(exc)

    # Manager / Provider ------------------------------------------------------------

    def info(self, digest: str) -> Info:
        return _info(self._call(self._info, pb.InfoRequest(digest=digest)).info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        req = pb.UpdateRequest(
            info=pb.Info(digest=info.digest, labels=dict(info.labels)),
            update_mask=FieldMask(paths=list(fieldpaths)),
        )
        return _info(self._call(self._update, req).info)

    def walk(self, fn: Callable[[Info], object], *filters: str) -> None:
        for info in self.list(*filters):
            fn(info)

    def list(self, *filters: str) -> list[Info]:
        return builtins.list(self.iter_infos(*filters))

    def iter_infos(self, *filters: str) -> Iterator[Info]:
        """The List stream, decoded as it arrives (flat memory for any count)."""
        try:
            for batch in self._list(pb.ListContentRequest(filters=filters), metadata=self._md):
                yield from (_info(i) for i in batch.info)
        except grpc.RpcError as exc:
            _raise(exc)

    def delete(self, digest: str) -> None:
        self._call(self._delete, pb.DeleteContentRequest(digest=digest))

    def reader_at(self, digest: str) -> RemoteReaderAt:
        """A reader for a blob (NotFound if absent); its size is taken now."""
        return RemoteReaderAt(self, digest, self.info(digest).size)

    def _read_range(self, digest: str, offset: int, size: int) -> bytes:
        try:
            chunks = self._read(
                pb.ReadContentRequest(digest=digest, offset=offset, size=size),
                metadata=self._md,
            )
            return b"".join(c.data for c in chunks)
        except grpc.RpcError as exc:
            _raise(exc)

    # IngestManager / Ingester --------------------------------------------------------

    def status(self, ref: str) -> Status:
        return _status(self._call(self._status, pb.StatusRequest(ref=ref)).status)

    def list_statuses(self, *filters: str) -> builtins.list[Status]:
        resp = self._call(self._list_statuses, pb.ListStatusesRequest(filters=filters))
        return [_status(s) for s in resp.statuses]

    def abort(self, ref: str) -> None:
        self._call(self._abort, pb.AbortRequest(ref=ref))

    def writer(self, ref: str, *, total: int = 0, expected: str | None = None) -> RemoteWriter:
        """Open a Write stream for ``ref``: Unavailable if it is held, AlreadyExists if
        ``expected`` is committed. The caller must ``close()`` or ``commit()``."""
        return RemoteWriter(
            lambda requests: self._write(requests, metadata=self._md), ref, total, expected
        )


class RemoteReaderAt:
    """Positional reads of one blob, one Read call each (containerd's remote ReaderAt)."""

    def __init__(self, store: RemoteStore, digest: str, size: int) -> None:
        self._store = store
        self.digest = digest
        self.size = size

    def read_at(self, n: int, offset: int) -> bytes:
        if offset < 0:
            raise ValueError("negative offset")
        if n <= 0 or offset >= self.size:
            return b""
        return self._store._read_range(self.digest, offset, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> RemoteReaderAt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Requests:
    """The request side of a Write stream: messages put here are sent; ``None`` half-closes."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[pb.WriteContentRequest | None] = queue.SimpleQueue()

    def put(self, req: pb.WriteContentRequest | None) -> None:
        self._q.put(req)

    def __iter__(self) -> Iterator[pb.WriteContentRequest]:
        return self

    def __next__(self) -> pb.WriteContentRequest:
        req = self._q.get()
        if req is None:
            raise StopIteration
        return req


class RemoteWriter:
    """One Write stream (containerd's proxy writer)."""

    def __init__(
        self, open_call: Callable[[_Requests], Any], ref: str, total: int, expected: str | None
    ) -> None:
        self._requests = _Requests()
        self._call = open_call(self._requests)
        self.ref = ref
        self._total = total
        self._expected = expected
        self._closed = False
        self._digest = ""
        self._offset = 0
        self._last: pb.WriteContentResponse | None = None
        self._stat()

    def _exchange(self, req: pb.WriteContentRequest) -> pb.WriteContentResponse:
        if self._closed:
            raise FailedPrecondition(f"ingest {self.ref}: writer is closed")
        self._requests.put(req)
        try:
            resp: pb.WriteContentResponse = next(self._call)
        except StopIteration:
            self._closed = True
            raise RemoteError(grpc.StatusCode.UNKNOWN, "write stream ended early") from None
        except grpc.RpcError as exc:
            self._closed = True
            _raise(exc)
        self._offset = resp.offset
        self._digest = resp.digest
        self._last = resp
        return resp

    def _stat(self) -> pb.WriteContentResponse:
        return self._exchange(
            pb.WriteContentRequest(
                action=pb.STAT, ref=self.ref, total=self._total, expected=self._expected or ""
            )
        )

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def closed(self) -> bool:
        return self._closed

    def digest(self) -> Digest:
        """Digest of the bytes written so far, as of the last response."""
        return Digest(self._digest)

    def status(self) -> Status:
        resp = self._stat()
        return Status(
            self.ref, resp.offset, resp.total,
            Digest(self._expected) if self._expected else None,
            _time(resp.started_at), _time(resp.updated_at),
        )

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            chunk = bytes(view[start : start + WRITE_CHUNK])
            self._exchange(pb.WriteContentRequest(action=pb.WRITE, offset=self._offset, data=chunk))
        return len(view)

    def truncate(self, size: int) -> None:
        """Only ``truncate(0)``: a WRITE at offset 0 restarts the ingest (reference §8.6)."""
        if size != 0:
            raise NotSupported(
                f"ingest {self.ref}: truncate to {size} bytes is not supported, only to 0"
            )
        self._exchange(pb.WriteContentRequest(action=pb.WRITE, offset=0))

    def commit(
        self, size: int = 0, expected: str | None = None, labels: Mapping[str, str] | None = None
    ) -> Digest:
        """COMMIT, then end the stream. The writer is closed afterwards in every case."""
        if self._closed:
            raise FailedPrecondition("cannot commit on closed writer")
        try:
            resp = self._exchange(
                pb.WriteContentRequest(
                    action=pb.COMMIT, total=size, offset=self._offset,
                    expected=expected or "", labels=dict(labels or {}),
                )
            )
        finally:
            self._finish()
        return Digest(resp.digest)

    def _finish(self) -> None:
        """Half-close and drain, so the server has released the ref when this returns."""
        self._closed = True
        self._requests.put(None)
        try:
            for _ in self._call:
                pass  # containerd repeats its last response once
        except grpc.RpcError:
            pass  # an error ending the stream was raised by the exchange that caused it

    def close(self) -> None:
        """Keep the ingest for resuming. A second close, or one after commit, does nothing."""
        if not self._closed:
            self._finish()

    def __enter__(self) -> RemoteWriter:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"offset={self._offset}"
        return f"<RemoteWriter ref={self.ref!r} {state}>"


if TYPE_CHECKING:  # mypy checks that RemoteStore has the store interface

    def _conforms(s: RemoteStore, w: RemoteWriter, r: RemoteReaderAt) -> None:
        from store import api

        checked: tuple[api.Store, api.InfoIterator, api.Writer, api.ReaderAt] = (s, s, w, r)
        del checked
