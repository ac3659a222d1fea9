"""A fast lane for Content.Read: served on grpc's core server from one thread, with no
thread pool hop.

``ctr content get`` issues one Read RPC per 32 KiB, so the per-call cost decides its
speed. grpcio's sync server spends most of it in Python around each call (a pool hop,
a condition wait per received and per sent message, a separate batch for the status):
about 330 µs of server CPU per 32 KiB Read on the test machine, against about
150 µs here, where each call is two batches on a completion queue of our own: receive
the request, then initial metadata + message + status (+ receive-close) in one batch.
A Read larger than one chunk streams: each chunk waits for the previous send to
complete, and only the last one travels with the status. The lane keeps the last
:data:`OPEN_BLOBS` blobs it read open (ctr reads one blob in thousands of calls); each
call checks by ``lstat`` that the path still names the same file, else it forgets it and
answers through the service's full path (NotFound for a deleted blob).

This uses grpcio's Cython layer (``grpc._cython.cygrpc``), which is not public API.
:func:`attach` checks that the pieces are there and returns None otherwise; the server
then keeps serving Read through its generic handler (same behaviour, slower). The
registered method takes precedence over the generic handler in grpc's core, so only one
of the two ever sees a Read call.

Behaviour matches the generic handler: status codes and messages come from the same
:class:`~store.grpc.service.ContentService.read` and :func:`~store.grpc.errors.to_grpc`;
a request that does not parse gets INTERNAL, a call without a request message gets
UNIMPLEMENTED, as grpcio's server does. A call the client cancels ends at its next send.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from store.api import BlobFiles, FileReader, ReaderAt
from store.digest import parse_digest
from store.errors import StoreError
from store.metadata import MetadataDB

from .errors import GrpcError, to_grpc
from .pb import content_pb2 as pb
from .service import NAMESPACE_KEY, READ_CHUNK, check_namespace
from .wire import encode_read_response

if TYPE_CHECKING:
    from .service import ContentService

__all__ = ["ReadLane", "attach"]

log = logging.getLogger(__name__)

READ_METHOD = "/containerd.services.content.v1.Content/Read"
#: How often the lane's thread looks up from an idle queue (to notice a dropped server).
POLL_SECONDS = 1.0
#: What the lane expects from grpc internals (checked by :func:`attach`).
_CYGRPC_NAMES = (
    "CompletionQueue", "CompletionType", "StatusCode", "ReceiveMessageOperation",
    "SendInitialMetadataOperation", "SendMessageOperation",
    "SendStatusFromServerOperation", "ReceiveCloseOnServerOperation",
)

#: What a read turns into a status; anything else is a bug (UNKNOWN, logged).
_EXPECTED = (StoreError, GrpcError, OSError)

#: Open blobs kept by the lane (ctr reads one blob in many calls).
OPEN_BLOBS = 32
#: Namespaces already found valid (a set that stops growing at this size).
KNOWN_NAMESPACES = 256


class _Open:
    """A blob the lane keeps open, with what identifies its file."""

    __slots__ = ("reader", "fd", "path", "dev", "ino", "size", "seen_in")

    def __init__(self, reader: ReaderAt, fd: int, path: str, st: os.stat_result) -> None:
        #: namespace (None: the raw view) -> the metadata's change stamp when the blob
        #: was last found visible there
        self.seen_in: dict[str | None, object] = {}
        self.reader = reader
        self.fd = fd
        self.path = path
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.size = st.st_size


class _Call:
    """One Read call in flight: its core call, metadata, and once started, its chunks."""

    __slots__ = ("call", "metadata", "chunks", "pending", "replied")

    def __init__(self, call: Any, metadata: Any) -> None:
        self.call = call
        self.metadata = metadata
        self.chunks: Iterator[bytes] | None = None
        self.pending: bytes | None = None  # the next chunk, read ahead to spot the last
        self.replied = False  # initial metadata sent

    def close(self) -> None:
        chunks, self.chunks = self.chunks, None
        if chunks is not None:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a generator: runs its finally (closes the blob)


class ReadLane:
    """Content.Read on ``cy_server`` (a started grpc core server) from one thread.

    Create with :func:`attach` before the server starts; call :meth:`start` after it
    has. The thread ends once the server shuts down and its last call is done.
    """

    def __init__(
        self, cy_server: Any, cygrpc: Any, service: ContentService, *, debug: bool
    ) -> None:
        self._server = cy_server
        self._cy = cygrpc
        self._service = service
        self._read = service.read
        self._open: dict[str, _Open] = {}
        meta = getattr(service.store, "meta", None)
        self._stamp: Callable[[], object] | None = (
            meta.change_stamp if isinstance(meta, MetadataDB) else None)
        self._namespaces: set[str | None] = set()
        self._debug = debug
        self._cq = cygrpc.CompletionQueue()
        cy_server.register_completion_queue(self._cq)
        cy_server.register_method(READ_METHOD)
        self._new = object()  # tag of the pending request for a new call
        self._active: set[_Call] = set()
        self._thread = threading.Thread(target=self._run, name="contentfs-read", daemon=True)
        self._ok = cygrpc.StatusCode.ok

    def start(self) -> None:
        """Begin serving; the server must be started."""
        self._server.request_registered_call(self._cq, self._cq, READ_METHOD, self._new)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The lane's thread is running (started, and the server not yet stopped)."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        cy = self._cy
        timeout_type = cy.CompletionType.queue_timeout
        shutdown_type = cy.CompletionType.queue_shutdown
        serving = True
        while serving or self._active:
            event = self._cq.poll(time.time() + POLL_SECONDS)
            kind = event.completion_type
            if kind == timeout_type:
                continue
            if kind == shutdown_type:
                break
            tag = event.tag
            if tag is self._new:
                if not event.success:  # the server is shutting down
                    serving = False
                    continue
                try:
                    self._server.request_registered_call(
                        self._cq, self._cq, READ_METHOD, self._new
                    )
                except Exception:  # shutting down under us: serve what we have
                    log.debug("read lane: no more calls", exc_info=True)
                    serving = False
                self._accept(event)
                continue
            step, state = tag
            try:
                step(state, event)
            except Exception:  # a bug: never let it stop the lane
                log.exception("read lane: call failed")
                self._finish(state, grpc.StatusCode.UNKNOWN, "internal error in the read lane")
        for blob in self._open.values():
            blob.reader.close()
        self._open.clear()
        log.debug("read lane: stopped")

    def _accept(self, event: Any) -> None:
        if self._debug:
            log.debug("call %s", READ_METHOD)
        state = _Call(event.call, event.invocation_metadata)
        self._active.add(state)
        state.call.start_server_batch(
            (self._cy.ReceiveMessageOperation(0),), (self._on_request, state)
        )

    def _on_request(self, state: _Call, event: Any) -> None:
        raw = event.batch_operations[0].message() if event.success else None
        if raw is None:
            if not event.success:
                self._drop(state)
                return
            self._finish(
                state, grpc.StatusCode.UNIMPLEMENTED,
                f'"{READ_METHOD}" requires exactly one request message.',
            )
            return
        try:
            request = pb.ReadContentRequest.FromString(raw)
        except DecodeError:  # as grpcio's server reports it
            self._finish(state, grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            return
        data = self._quick(request, state.metadata)
        if data is not None:
            cy = self._cy
            state.replied = True
            state.call.start_server_batch(
                (
                    cy.SendInitialMetadataOperation(None, 0),
                    cy.SendMessageOperation(data, 0),
                    cy.SendStatusFromServerOperation(None, self._ok, b"", 0),
                    cy.ReceiveCloseOnServerOperation(0),
                ),
                (self._on_done, state),
            )
            return
        try:
            state.chunks = iter(self._read(request, state.metadata))
            state.pending = next(state.chunks, None)
        except Exception as exc:  # noqa: BLE001  # a handler's bug becomes UNKNOWN, as in grpcio
            self._fail(state, exc)
            return
        self._send_next(state)

    def _quick(self, req: pb.ReadContentRequest, metadata: Any) -> bytes | None:
        """The one message answering a Read of one chunk or less of a blob that is valid
        and open already (or opens now); None for everything else, which the service's
        read then answers in full (errors included)."""
        blob = self._open.get(req.digest)
        if blob is None:
            blob = self._admit(req.digest, metadata)
            if blob is None:
                return None
        else:
            try:
                st = os.lstat(blob.path)
            except OSError:
                st = None
            if st is None or (st.st_dev, st.st_ino, st.st_size) != (
                blob.dev, blob.ino, blob.size
            ):  # deleted or replaced: forget it, the full path says what happened
                del self._open[req.digest]
                blob.reader.close()
                return None
            self._open[req.digest] = self._open.pop(req.digest)  # most recently used last
        ns: str | None = None  # no header: the raw view (ContentService.view)
        for key, value in metadata:
            if key == NAMESPACE_KEY:
                ns = value
                break
        if ns not in self._namespaces:
            try:
                check_namespace(metadata)
            except GrpcError:
                return None
            if len(self._namespaces) < KNOWN_NAMESPACES:
                self._namespaces.add(ns)
        # a namespace sees its own records only (the file being there says nothing
        # about a namespace): looked up once, then trusted while no metadata row
        # changed anywhere (ctr reads a blob in thousands of calls; the lookup through
        # the namespace's view cost more than the rest of the call)
        stamp = self._stamp() if self._stamp is not None else None
        if stamp is None or blob.seen_in.get(ns) != stamp:
            try:
                self._service.view(metadata).info(req.digest)
            except (StoreError, GrpcError, OSError):
                return None
            if stamp is not None:
                if len(blob.seen_in) >= KNOWN_NAMESPACES:
                    blob.seen_in.clear()
                blob.seen_in[ns] = stamp
        offset = req.offset if req.offset > 0 else 0
        size = blob.size
        end = size if req.size <= 0 or offset + req.size > size else offset + req.size
        n = end - offset
        if n <= 0 or n > READ_CHUNK:
            return None
        data = os.pread(blob.fd, n, offset)
        if len(data) != n:
            return None
        return encode_read_response(0, data)

    def _admit(self, digest: str, metadata: Any) -> _Open | None:
        """Open a committed blob to keep; None if it is not one (the full path reports).
        Opened through the call's view, so a namespace's visibility and recorded size
        count (later calls recheck the visibility for their own namespace)."""
        try:
            dgst = parse_digest(digest)
            store = self._service.store
            if not isinstance(store, BlobFiles):
                return None
            reader = self._service.view(metadata).reader_at(dgst)
        except (StoreError, GrpcError, OSError):
            return None
        if not isinstance(reader, FileReader):
            reader.close()
            return None
        path = store.blob_path(dgst)
        fd = reader.fileno()
        try:
            st = os.fstat(fd)
            lst = os.lstat(path)
        except OSError:
            reader.close()
            return None
        if (lst.st_dev, lst.st_ino) != (st.st_dev, st.st_ino):
            reader.close()
            return None
        blob = _Open(reader, fd, path, st)
        if len(self._open) >= OPEN_BLOBS:
            oldest = next(iter(self._open))
            self._open.pop(oldest).reader.close()
        self._open[digest] = blob
        return blob

    def _on_sent(self, state: _Call, event: Any) -> None:
        if not event.success:  # cancelled by the client or by shutdown
            self._drop(state)
            return
        self._send_next(state)

    def _send_next(self, state: _Call) -> None:
        """Send the pending chunk: with the status when it is the last one."""
        cy = self._cy
        data = state.pending
        if data is None:  # nothing (more) to send
            self._finish(state, grpc.StatusCode.OK, "")
            return
        assert state.chunks is not None
        try:
            state.pending = next(state.chunks, None)
        except Exception as exc:  # noqa: BLE001  # see _on_request
            # send what we have, then the error (as the generic handler does)
            state.pending = None
            state.call.start_server_batch(
                self._head(state) + (cy.SendMessageOperation(data, 0),),
                (self._then_fail, (state, exc)),
            )
            return
        if state.pending is None:
            self._finish(state, grpc.StatusCode.OK, "", data)
            return
        state.call.start_server_batch(
            self._head(state) + (cy.SendMessageOperation(data, 0),), (self._on_sent, state)
        )

    def _then_fail(self, pair: tuple[_Call, BaseException], event: Any) -> None:
        state, exc = pair
        if not event.success:
            self._drop(state)
            return
        self._fail(state, exc)

    def _head(self, state: _Call) -> tuple[Any, ...]:
        """Initial metadata, on the first batch that sends anything."""
        if state.replied:
            return ()
        state.replied = True
        return (self._cy.SendInitialMetadataOperation(None, 0),)

    def _fail(self, state: _Call, exc: BaseException) -> None:
        code, message = to_grpc(exc)
        if not isinstance(exc, _EXPECTED):
            # a bug: reported as grpcio reports an exception from a streaming handler
            log.error("read failed", exc_info=exc)
            message = f"Exception iterating responses: {exc}"
        if len(message) > 1024:
            message = message[:1000] + "... (truncated)"
        if code == grpc.StatusCode.UNKNOWN:
            log.warning("call failed: %s", message)
        else:
            log.debug("-> %s: %s", code.name, message)
        self._finish(state, code, message)

    def _finish(
        self, state: _Call, code: grpc.StatusCode, message: str, data: bytes | None = None
    ) -> None:
        """The last batch: (initial metadata), (a message), the status, receive-close."""
        cy = self._cy
        state.close()
        ops: tuple[Any, ...] = self._head(state)
        if data is not None:
            ops += (cy.SendMessageOperation(data, 0),)
        status = cy.StatusCode(code.value[0])
        ops += (
            cy.SendStatusFromServerOperation(None, status, message.encode("utf-8"), 0),
            cy.ReceiveCloseOnServerOperation(0),
        )
        state.call.start_server_batch(ops, (self._on_done, state))

    def _on_done(self, state: _Call, event: Any) -> None:
        self._drop(state)

    def _drop(self, state: _Call) -> None:
        state.close()
        self._active.discard(state)
        state.call = None


def attach(
    server: grpc.Server, service: ContentService, *, debug: bool = False
) -> ReadLane | None:
    """Register a Read lane on ``server`` (built, not yet started); None when this grpcio
    does not have the internals it needs (the generic handler then serves Read)."""
    try:
        from grpc._cython import cygrpc
    except ImportError:
        return None
    state = getattr(server, "_state", None)
    cy_server = getattr(state, "server", None)
    if cy_server is None or not all(hasattr(cygrpc, n) for n in _CYGRPC_NAMES):
        return None
    for name in ("register_method", "request_registered_call", "register_completion_queue"):
        if not hasattr(cy_server, name):
            return None
    return ReadLane(cy_server, cygrpc, service, debug=debug)
