"""RemoteStore: the store API (as LocalStore's) over containerd's gRPC Content API.

Talks to ``contentfs serve`` or to containerd itself. gRPC status codes come back as the
store's error classes (:func:`store.grpc.errors.from_grpc`); codes with no class
(OUT_OF_RANGE, UNKNOWN, ...) as :class:`~store.grpc.errors.RemoteError`.

Every call has a deadline (``timeout``, seconds): a unary call as a whole, a stream per
message (a List batch, a Write exchange), so a long ingest or listing is fine while a
server that stops answering is not waited for. A server that cannot be reached, or does
not answer in time, is :class:`~store.errors.Unreachable` (an Unavailable): the
connection's failures come back as UNAVAILABLE with grpc's own text, while a server's
Unavailable (a locked ref) ends with containerd's sentinel ``: unavailable``. The channel
reconnects within about a second once the server is back.

With ``lease`` set, writes, deletes and aborts carry the ``containerd-lease`` header for
that lease, created on first use without expiry: containerd keeps what a live lease holds
through garbage collection, ingests included, and moves an ingest's hold to its blob at
commit (reference §5.3, §5.6). A server without the Leases service (an older ``contentfs
serve``) collects nothing behind its users' backs, so there the header is left off.

A :class:`RemoteWriter` is one Write stream, used as containerd's Go proxy writer does:
open = STAT, each ``write`` = one WRITE (split to stay under the message limit), commit =
COMMIT then half-close, close = half-close. ``close`` and ``commit`` return only once the
server has ended the stream, so the ref lock is free when they return.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from store.digest import Digest, parse_digest, split_digest
from store.errors import (
    DataLoss,
    FailedPrecondition,
    NotFound,
    StoreError,
    Unavailable,
    Unreachable,
)
from store.errors import NotImplemented as NotSupported
from store.types import EPOCH, Info, Status, from_ns

from .errors import RemoteError, from_grpc
from .pb import content_pb2 as pb
from .pb import leases_pb2 as lpb

__all__ = [
    "DEFAULT_TIMEOUT",
    "KEEP_LEASE",
    "RemoteReaderAt",
    "RemoteStore",
    "RemoteWriter",
    "channel_target",
]

log = logging.getLogger("store.grpc.client")
_Metadata = tuple[tuple[str, str], ...]

SERVICE = "/containerd.services.content.v1.Content/"
LEASES = "/containerd.services.leases.v1.Leases/"
#: Seconds a call (or one message of a stream) may take before it fails as Unreachable.
DEFAULT_TIMEOUT = 10.0
#: The lease the CLI and the mount hold what they write in (see the module docstring).
KEEP_LEASE = "contentfs"
#: Bytes per Read call when a whole blob is read (``read_chunks``, ``verify``).
READ_CHUNK = 4 << 20
#: A reader's Read calls: blocks of this size (at least the 1 MiB a mount's reader wants),
#: and how many blocks a sequential reader fetches ahead.
READ_BLOCK = 2 << 20
READ_AHEAD = 3
#: Read calls in flight at once, for all readers of a store.
READ_WORKERS = 4
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


class _Alarm:
    """One armed deadline of the watchdog; ``fired`` once it cancelled its call."""

    __slots__ = ("call", "deadline", "fired", "seconds")

    def __init__(self, call: Any, seconds: float) -> None:
        self.call = call
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.fired = False


class _Watchdog:
    """Cancels stream calls that get no answer within their deadline: one daemon thread
    for every call of a store, sleeping until the earliest deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Alarm]] = []
        self._armed: set[_Alarm] = set()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, call: Any, seconds: float) -> _Alarm:
        alarm = _Alarm(call, seconds)
        with self._cond:
            self._armed.add(alarm)
            heapq.heappush(self._heap, (alarm.deadline, next(self._seq), alarm))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="contentfs-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return alarm

    def touch(self, alarm: _Alarm) -> None:
        """Restart ``alarm``'s deadline (a stream that made progress)."""
        with self._cond:
            alarm.deadline = time.monotonic() + alarm.seconds
            heapq.heappush(self._heap, (alarm.deadline, next(self._seq), alarm))

    def disarm(self, alarm: _Alarm) -> None:
        with self._cond:
            self._armed.discard(alarm)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and (
                        self._heap[0][2] not in self._armed
                        or self._heap[0][0] != self._heap[0][2].deadline
                    ):
                        heapq.heappop(self._heap)  # disarmed, or touched since
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                alarm = heapq.heappop(self._heap)[2]
                self._armed.discard(alarm)
                alarm.fired = True
            alarm.call.cancel()


def _connect_reason(details: str) -> str:
    """gRPC's connection failure in a few words: ``failed to connect to all addresses;
    last error: FAILED_PRECONDITION: unix:/x: connect failed: addr: ... error: No such
    file or directory`` becomes ``cannot connect: No such file or directory`` (its code
    and the address repeated say nothing to a user); other details are kept."""
    if not details.startswith("failed to connect to all addresses"):
        return details
    return "cannot connect: " + details.rsplit(": ", 1)[-1].strip()


class RemoteStore:
    """The store API over gRPC, in ``namespace`` (every call carries it), each call with
    a deadline of ``timeout`` seconds; with ``lease``, what it writes is held by that
    lease (see the module docstring)."""

    def __init__(
        self,
        address: str,
        *,
        namespace: str = "default",
        timeout: float = DEFAULT_TIMEOUT,
        lease: str | None = None,
    ) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self.lease = lease
        self._channel = grpc.insecure_channel(
            channel_target(address),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                # back within about a second once a restarted server listens again
                # (grpc's default backoff grows to two minutes). Not the minimum: grpc
                # uses it as the connect timeout too, which a loaded server needs.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._md: _Metadata = (("containerd-namespace", namespace),)
        self._lease_lock = threading.Lock()
        self._lease_state = "unknown" if lease else "none"  # -> "held" | "unsupported"
        self._watchdog = _Watchdog()
        self._pool: ThreadPoolExecutor | None = None
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
        self._lease_create = ch.unary_unary(
            LEASES + "Create", lpb.CreateRequest.SerializeToString, lpb.CreateResponse.FromString
        )

    def close(self) -> None:
        with self._lease_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._channel.close()

    def _fetcher(self) -> ThreadPoolExecutor:
        """The threads readers fetch blocks in (started on first use)."""
        if self._pool is None:
            with self._lease_lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        READ_WORKERS, thread_name_prefix="contentfs-read"
                    )
        return self._pool

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def error(self, exc: grpc.RpcError, alarm: _Alarm | None = None) -> StoreError:
        """The store error for a failed call (Unreachable for the connection's failures
        and missed deadlines, else by its code)."""
        code, details = exc.code(), exc.details() or ""
        if (alarm is not None and alarm.fired) or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unreachable(f"store at {self.address}: no answer within {self.timeout:g} s")
        if code == grpc.StatusCode.UNAVAILABLE and not details.endswith(
            ": " + Unavailable.kind
        ):
            return Unreachable(f"store at {self.address}: {_connect_reason(details)}")
        return from_grpc(code, details)

    def _call(
        self, method: Callable[..., Any], request: Any, md: _Metadata | None = None
    ) -> Any:
        try:
            return method(request, metadata=md or self._md, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def _next(self, call: Any, alarm: _Alarm) -> Any:
        """The next message of a stream within the deadline; StopIteration at its end."""
        self._watchdog.touch(alarm)
        try:
            return next(call)
        except grpc.RpcError as exc:
            raise self.error(exc, alarm) from None

    # Leases --------------------------------------------------------------------------

    def _write_md(self) -> _Metadata:
        """Metadata for calls that change what the lease holds: with the lease header
        once the lease exists (created here on first use)."""
        if self._lease_state == "unknown":
            with self._lease_lock:
                if self._lease_state == "unknown":
                    self._create_lease()
        if self._lease_state == "held":
            assert self.lease is not None
            return (*self._md, ("containerd-lease", self.lease))
        return self._md

    def _create_lease(self) -> None:
        try:
            self._lease_create(
                lpb.CreateRequest(id=self.lease), metadata=self._md, timeout=self.timeout
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.debug("store at %s has no Leases service: writing without a lease",
                          self.address)
                self._lease_state = "unsupported"
                return
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise self.error(exc) from None
        self._lease_state = "held"

    def _lease_lost(self) -> None:
        """The server said the lease does not exist (someone removed it): create it again
        on the next call."""
        with self._lease_lock:
            if self._lease_state == "held":
                self._lease_state = "unknown"

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
        """The List stream, decoded as it arrives (flat memory for any count); each batch
        within the deadline."""
        call = self._list(pb.ListContentRequest(filters=filters), metadata=self._md)
        alarm = self._watchdog.arm(call, self.timeout)
        try:
            while True:
                try:
                    batch = self._next(call, alarm)
                except StopIteration:
                    break
                yield from (_info(i) for i in batch.info)
        finally:
            self._watchdog.disarm(alarm)
            call.cancel()  # a consumer that stopped early ends the stream

    def delete(self, digest: str) -> None:
        """Delete a blob (NotFound if absent); it also leaves the lease."""
        try:
            self._call(self._delete, pb.DeleteContentRequest(digest=digest), self._write_md())
        except NotFound as exc:
            if self._lease_state == "held" and "lease" in str(exc):
                self._lease_lost()
                self._call(self._delete, pb.DeleteContentRequest(digest=digest), self._write_md())
            else:
                raise

    def reader_at(self, digest: str) -> RemoteReaderAt:
        """A reader for a blob (NotFound if absent); its size is taken now."""
        return RemoteReaderAt(self, digest, self.info(digest).size)

    def _read_range(self, digest: str, offset: int, size: int) -> bytes:
        try:
            chunks = self._read(
                pb.ReadContentRequest(digest=digest, offset=offset, size=size),
                metadata=self._md,
                timeout=self.timeout,
            )
            return b"".join(c.data for c in chunks)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def read_chunks(self, digest: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """A blob's bytes in order, ``chunk`` bytes per Read call (NotFound if absent).
        DataLoss if the blob ends before the size its Info gave."""
        size = self.info(digest).size
        offset = 0
        while offset < size:
            data = self._read_range(digest, offset, min(chunk, size - offset))
            if not data:
                raise DataLoss(f"content {digest}: ends at {offset} of {size} bytes")
            offset += len(data)
            yield data

    def verify(self, digest: str, progress: Callable[[int], object] | None = None) -> Info:
        """Read a blob back and rehash it. DataLoss if its bytes do not match its digest.
        ``progress`` is called with the size of each chunk hashed."""
        dgst = parse_digest(digest)
        info = self.info(dgst)
        alg, want = split_digest(dgst)
        hasher = hashlib.new(alg)
        for data in self.read_chunks(dgst):
            hasher.update(data)
            if progress is not None:
                progress(len(data))
        if hasher.hexdigest() != want:
            raise DataLoss(f"content {dgst}: bytes read hash to {alg}:{hasher.hexdigest()}")
        return info

    # IngestManager / Ingester --------------------------------------------------------

    def status(self, ref: str) -> Status:
        return _status(self._call(self._status, pb.StatusRequest(ref=ref)).status)

    def list_statuses(self, *filters: str) -> builtins.list[Status]:
        resp = self._call(self._list_statuses, pb.ListStatusesRequest(filters=filters))
        return [_status(s) for s in resp.statuses]

    def abort(self, ref: str) -> None:
        self._call(self._abort, pb.AbortRequest(ref=ref), self._write_md())

    def writer(self, ref: str, *, total: int = 0, expected: str | None = None) -> RemoteWriter:
        """Open a Write stream for ``ref``: Unavailable if it is held, AlreadyExists if
        ``expected`` is committed. The caller must ``close()`` or ``commit()``."""
        try:
            return RemoteWriter(self, self._write_md(), ref, total, expected)
        except NotFound as exc:  # only a lease can be missing when a stream opens
            if self._lease_state != "held" or "lease" not in str(exc):
                raise
        self._lease_lost()
        return RemoteWriter(self, self._write_md(), ref, total, expected)


class RemoteReaderAt:
    """Positional reads of one blob over Read calls of whole blocks (``block`` bytes,
    aligned), each within the store's deadline. The last blocks read are kept, and a
    read that continues where the last one ended fetches the next ``ahead`` blocks in
    the background, so a sequential reader (``cat``, the kernel's readahead through the
    mount) finds them fetched. A failed fetch is raised by the read that needs it and
    tried again by the next. Safe to call from several threads."""

    def __init__(
        self, store: RemoteStore, digest: str, size: int, *, block: int = READ_BLOCK,
        ahead: int = READ_AHEAD,
    ) -> None:
        self._store = store
        self.digest = digest
        self.size = size
        self._block = block
        self._ahead = ahead
        self._lock = threading.Lock()
        self._blocks: dict[int, Future[bytes]] = {}  # insertion order: oldest first
        self._end = -1  # where the last read ended

    def _get(self, index: int) -> Future[bytes]:
        """The block ``index``, fetching it unless kept or on its way (lock held)."""
        fut = self._blocks.pop(index, None)
        if fut is None or fut.cancelled() or (fut.done() and fut.exception() is not None):
            start = index * self._block
            fut = self._store._fetcher().submit(
                self._store._read_range, self.digest, start, min(self._block, self.size - start)
            )
        self._blocks[index] = fut  # now the newest
        return fut

    def read_ready(self, n: int, offset: int) -> bytes | None:
        """``read_at`` if the blocks it needs are fetched already (it then never blocks,
        so an event loop may call it), else None."""
        if offset < 0 or n <= 0 or offset >= self.size:
            return None
        end = min(self.size, offset + n)
        first, last = offset // self._block, (end - 1) // self._block
        with self._lock:
            for i in range(first, last + 1):
                fut = self._blocks.get(i)
                if fut is None or not fut.done() or fut.cancelled() or fut.exception():
                    return None
        return self.read_at(n, offset)

    def read_at(self, n: int, offset: int) -> bytes:
        if offset < 0:
            raise ValueError("negative offset")
        if n <= 0 or offset >= self.size:
            return b""
        end = min(self.size, offset + n)
        first, last = offset // self._block, (end - 1) // self._block
        with self._lock:
            wanted = [self._get(i) for i in range(first, last + 1)]
            if offset == self._end:
                count = -(-self.size // self._block)
                for i in range(last + 1, min(count, last + 1 + self._ahead)):
                    if i not in self._blocks:
                        self._get(i)
            self._end = end
            while len(self._blocks) > self._ahead + (last - first) + 2:
                oldest = next(iter(self._blocks))
                self._blocks.pop(oldest).cancel()
        parts = []
        for index, fut in enumerate(wanted, first):
            try:
                parts.append(fut.result())
            except CancelledError:  # dropped by a reader in another thread: fetch here
                start = index * self._block
                parts.append(self._store._read_range(
                    self.digest, start, min(self._block, self.size - start)))
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        skip = offset - first * self._block
        return data[skip : skip + (end - offset)]

    def close(self) -> None:
        with self._lock:
            for fut in self._blocks.values():
                fut.cancel()
            self._blocks.clear()

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
    """One Write stream (containerd's proxy writer); each exchange within the store's
    deadline (a missed one ends the stream: Unreachable, the ingest kept for resuming)."""

    def __init__(
        self,
        store: RemoteStore,
        md: _Metadata,
        ref: str,
        total: int,
        expected: str | None,
    ) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._requests = _Requests()
        self._call = store._write(self._requests, metadata=md)
        self._alarm = store._watchdog.arm(self._call, store.timeout)
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
        with self._lock:  # one exchange at a time: responses answer requests in order
            return self._exchange_locked(req)

    def _exchange_locked(self, req: pb.WriteContentRequest) -> pb.WriteContentResponse:
        if self._closed:
            raise FailedPrecondition(f"ingest {self.ref}: writer is closed")
        self._requests.put(req)
        try:
            resp: pb.WriteContentResponse = self._store._next(self._call, self._alarm)
        except StopIteration:
            self._end()
            raise RemoteError(grpc.StatusCode.UNKNOWN, "write stream ended early") from None
        except StoreError:
            self._end()
            raise
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

    def _end(self) -> None:
        self._closed = True
        self._store._watchdog.disarm(self._alarm)

    def _finish(self) -> None:
        """Half-close and drain, so the server has released the ref when this returns
        (or the deadline passed: then the stream is cancelled, which releases it too)."""
        with self._lock:
            self._closed = True
            self._requests.put(None)
            self._store._watchdog.touch(self._alarm)
            try:
                for _ in self._call:
                    pass  # containerd repeats its last response once
            except grpc.RpcError:
                pass  # an error ending the stream was raised by the exchange that caused it
            finally:
                self._end()

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

        checked: tuple[api.Store, api.InfoIterator, api.Writer, api.ReaderAt,
                       api.ReadyReader] = (s, s, w, r, r)
        del checked
