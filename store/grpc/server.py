"""``contentfs serve``: containerd's Content, Version and Introspection services on grpcio.

Addresses: ``unix:///PATH`` (or a bare absolute path), default a socket in the user's
runtime directory (``$XDG_RUNTIME_DIR/contentfs/contentfs.sock``, ``/run/contentfs/
contentfs.sock`` for root), created with mode 0600. The server refuses a path that is not
a socket, a socket owned by someone else, or one that a live server answers on; a stale
socket of ours is replaced. TCP only when asked: ``tcp://HOST:PORT`` (port 0 picks one).

Once listening it prints ``contentfs: serving ROOT on ADDRESS`` to stderr. SIGINT and
SIGTERM stop it: calls in flight get a short grace period, then open Write streams are
cancelled and their writers closed, so their ingests stay resumable.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2

from store.api import Store
from store.errors import StoreError
from store.local import LocalStore

from .errors import GrpcError, to_grpc
from .fastread import ReadLane, attach
from .leases import LEASES, LeasesService
from .memory import Trimmer, limit_arenas
from .pb import content_pb2 as pb
from .pb import introspection_pb2, version_pb2
from .pb import leases_pb2 as lpb
from .service import ContentService
from .wire import decode_write_request

__all__ = ["Address", "build_server", "default_address", "parse_address", "serve_main"]

log = logging.getLogger(__name__)

CONTENT = "containerd.services.content.v1.Content"
VERSION = "containerd.services.version.v1.Version"
INTROSPECTION = "containerd.services.introspection.v1.Introspection"
#: containerd's default message limit, both directions (reference §8.1).
MAX_MESSAGE = 16 << 20
GRACE_SECONDS = 2.0
#: Write streams open at once, over all connections: each holds a handler thread for its
#: whole life (grpcio's sync server), idle or not. One more is RESOURCE_EXHAUSTED.
WRITE_STREAMS = 256
#: Handler threads beyond those Write streams can hold: headroom that idle Write streams
#: never take, so short calls (Info, List, Status, Abort, Read...) are always answered.
SHORT_WORKERS = 32
WORKERS = WRITE_STREAMS + SHORT_WORKERS
#: Calls in flight or queued for a thread before grpcio answers RESOURCE_EXHAUSTED.
MAX_CALLS = 4 * WORKERS
#: HTTP/2 streams one connection may have open at once; more wait in that client.
STREAMS_PER_CONNECTION = 128
#: A Write stream that waits this long for its client's next message is cancelled: its
#: writer is closed and the ref lock freed; the ingest stays, resumable (0: never).
WRITE_IDLE_TIMEOUT = 60.0

Req = TypeVar("Req")


@dataclass(frozen=True)
class Address:
    """Where to listen: ``unix`` with a socket path, or ``tcp`` with ``host:port``."""

    scheme: str
    target: str

    def grpc_target(self) -> str:
        return f"unix:{self.target}" if self.scheme == "unix" else self.target

    def __str__(self) -> str:
        return f"unix://{self.target}" if self.scheme == "unix" else f"tcp://{self.target}"


def default_address() -> Address:
    """``$XDG_RUNTIME_DIR/contentfs/contentfs.sock``; for root without it,
    ``/run/contentfs/contentfs.sock``; else a per-user directory under /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        base = os.path.join(runtime, "contentfs")
    elif os.geteuid() == 0:
        base = "/run/contentfs"
    else:
        base = f"/tmp/contentfs-{os.geteuid()}"
    return Address("unix", os.path.join(base, "contentfs.sock"))


def parse_address(text: str | None) -> Address:
    """Parse ``unix:///PATH``, ``/PATH`` or ``tcp://HOST:PORT``; ValueError otherwise."""
    if not text:
        return default_address()
    if text.startswith("unix://"):
        path = text[len("unix://") :]
    elif text.startswith("/"):
        path = text
    elif text.startswith("tcp://"):
        hostport = text[len("tcp://") :]
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {text}: want tcp://HOST:PORT")
        return Address("tcp", hostport)
    else:
        raise ValueError(f"address {text}: want unix:///PATH or tcp://HOST:PORT")
    if not path.startswith("/"):
        raise ValueError(f"address {text}: the socket path must be absolute")
    return Address("unix", os.path.normpath(path))


def _prepare_socket_path(path: str, *, private_dir: bool = False) -> None:
    """Create the parent directory (0700 when we create it) and clear a stale socket of
    ours; ValueError for a path we must not take over. With ``private_dir`` (the default
    address, possibly under /tmp) the directory must also be ours and closed to others."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if private_dir:
        st_dir = os.lstat(parent)
        if not stat.S_ISDIR(st_dir.st_mode) or st_dir.st_uid != os.geteuid():
            raise ValueError(f"socket directory {parent}: not a directory owned by us")
        if st_dir.st_mode & 0o022:
            raise ValueError(f"socket directory {parent}: writable by others")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"socket {path}: exists and is not a socket")
    if st.st_uid != os.geteuid():
        raise ValueError(f"socket {path}: owned by uid {st.st_uid}, not by us")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ValueError(f"socket {path}: {exc.strerror}") from None
        os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ValueError(f"socket {path}: a server is already listening there")


# -- binding the service to grpcio ---------------------------------------------------


def _abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    code, message = to_grpc(exc)
    if len(message) > 1024:
        # the message travels percent-encoded in a trailer; clients drop trailers over
        # 16 KiB (RESOURCE_EXHAUSTED instead of our code), e.g. when it quotes a huge ref
        message = message[:1000] + "... (truncated)"
    if code == grpc.StatusCode.UNKNOWN:
        log.warning("call failed: %s", message)  # not a store error: say so without --debug
    else:
        log.debug("-> %s: %s", code.name, message)
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort always raises


#: What a handler turns into a status; anything else is a bug, which grpcio logs with its
#: traceback and reports as UNKNOWN.
_EXPECTED = (StoreError, GrpcError, OSError)


def _unary(
    fn: Callable[[Any, Any], Any], request_type: Any, response_serializer: Any
) -> grpc.RpcMethodHandler:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            result = fn(request, context.invocation_metadata())
        except _EXPECTED as exc:
            _abort(context, exc)
        return empty_pb2.Empty() if result is None else result

    return grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=request_type.FromString,
        response_serializer=response_serializer,
    )


def _server_stream(
    fn: Callable[[Any, Any], Iterator[Any]], request_type: Any, response_serializer: Any
) -> grpc.RpcMethodHandler:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(request, context.invocation_metadata())
        except _EXPECTED as exc:
            _abort(context, exc)

    return grpc.unary_stream_rpc_method_handler(
        handler,
        request_deserializer=request_type.FromString,
        response_serializer=response_serializer,
    )


class _WriteLimits:
    """Admission and idleness of Write streams: at most ``streams`` open at once, and a
    stream whose client sends nothing for ``idle`` seconds is cancelled (one reaper
    thread checks every stream waiting for its next message)."""

    def __init__(self, streams: int, idle: float) -> None:
        self.trimmer = Trimmer()
        self._slots = threading.BoundedSemaphore(streams)
        self.streams = streams
        self.idle = idle
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._ids = itertools.count()
        self._reaper: threading.Thread | None = None

    def admit(self) -> bool:
        return self._slots.acquire(blocking=False)

    def release(self) -> None:
        self._slots.release()

    def watch(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        """``requests``, timed: each wait for the next message counts as idle. The bytes
        received are noted for the trimmer when the stream ends."""
        received = 0
        key = next(self._ids)
        if self.idle > 0:
            self._start_reaper()
        try:
            while True:
                if self.idle > 0:
                    with self._lock:
                        self._waiting[key] = (time.monotonic(), context)
                try:
                    req = next(requests)
                except StopIteration:
                    return
                finally:
                    if self.idle > 0:
                        with self._lock:
                            self._waiting.pop(key, None)
                received += len(req.data)
                yield req
        finally:
            with self._lock:
                self._waiting.pop(key, None)
            if received:
                self.trimmer.note(received)

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is not None:
                return
            self._reaper = threading.Thread(target=self._reap, name="contentfs-idle-writes",
                                            daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        interval = min(1.0, self.idle / 4)
        while True:
            time.sleep(interval)
            now = time.monotonic()
            with self._lock:
                stale = [(k, ctx) for k, (since, ctx) in self._waiting.items()
                         if now - since >= self.idle]
                for k, _ in stale:
                    self._waiting.pop(k, None)
            for _, ctx in stale:
                log.warning("a Write stream sent nothing for %.0f s: cancelled (its ingest"
                            " stays, resumable)", self.idle)
                ctx.cancel()  # the call's end closes its writer (service.write on_end)


def _write_stream(
    fn: Callable[[Iterator[Any], Any, Callable[[Callable[[], None]], object]], Iterator[Any]],
    limits: _WriteLimits,
) -> grpc.RpcMethodHandler:
    """The Write handler: admitted within ``limits`` and cancelled when idle."""

    def handler(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        if not limits.admit():
            _abort(context, GrpcError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many Write streams open ({limits.streams}): retry later"))
        freed = threading.Lock()

        def free() -> None:  # once: at the call's end or this generator's, what comes first
            if freed.acquire(blocking=False):
                limits.release()

        if not context.add_callback(free):
            free()  # (already ended: the finally below finds it freed)
        try:
            yield from fn(limits.watch(_decoded(requests), context),
                          context.invocation_metadata(), context.add_callback)
        except _EXPECTED as exc:
            if not context.is_active():
                return  # cancelled by the client, by shutdown or as idle: nobody to tell
            _abort(context, exc)
        except grpc.RpcError:
            if context.is_active():
                raise
            return  # the request stream ended by cancellation (client, shutdown, idle)
        finally:
            free()

    return grpc.stream_stream_rpc_method_handler(
        handler,
        request_deserializer=_WriteDecoder.FromString,
        response_serializer=_serialize,
    )


class _Undecodable:
    """A Write request that did not decode (e.g. a ref that is not UTF-8)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _WriteDecoder:
    """Write requests are decoded by hand so that their data is never copied.

    Never raises: a request that does not decode becomes ``_Undecodable`` and the
    handler ends the call with INTERNAL. grpc's own answer to a failing deserializer
    on a stream (its abort from the receiving callback) left the call unfinished now
    and then (5 in 40 under load), and ``server.stop`` then waited for it forever.
    """

    @staticmethod
    def FromString(raw: bytes) -> Any:  # noqa: N802 - grpc's deserializer name
        try:
            return decode_write_request(raw)
        except ValueError as exc:  # WireError, UnicodeDecodeError
            return _Undecodable(str(exc))


def _decoded(requests: Iterator[Any]) -> Iterator[Any]:
    """The Write stream's requests; INTERNAL (containerd's "error unmarshalling
    request") at the first one that did not decode."""
    for req in requests:
        if isinstance(req, _Undecodable):
            raise GrpcError(grpc.StatusCode.INTERNAL,
                            f"error unmarshalling request: {req.reason}")
        yield req


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def content_handler(
    service: ContentService, limits: _WriteLimits | None = None
) -> grpc.GenericRpcHandler:
    """The Content service's method table."""
    s = _serialize
    if limits is None:
        limits = _WriteLimits(WRITE_STREAMS, WRITE_IDLE_TIMEOUT)
    return grpc.method_handlers_generic_handler(
        CONTENT,
        {
            "Info": _unary(service.info, pb.InfoRequest, s),
            "Update": _unary(service.update, pb.UpdateRequest, s),
            "List": _server_stream(service.list, pb.ListContentRequest, s),
            "Delete": _unary(service.delete, pb.DeleteContentRequest, s),
            "Read": _server_stream(service.read, pb.ReadContentRequest, None),
            "Status": _unary(service.status, pb.StatusRequest, s),
            "ListStatuses": _unary(service.list_statuses, pb.ListStatusesRequest, s),
            "Write": _write_stream(service.write, limits),
            "Abort": _unary(service.abort, pb.AbortRequest, s),
        },
    )


def leases_handler(service: LeasesService) -> grpc.GenericRpcHandler:
    """The Leases service's method table (reference §8.8)."""
    s = _serialize
    return grpc.method_handlers_generic_handler(
        LEASES,
        {
            "Create": _unary(service.create, lpb.CreateRequest, s),
            "Delete": _unary(service.delete, lpb.DeleteRequest, s),
            "List": _unary(service.list, lpb.ListRequest, s),
            "AddResource": _unary(service.add_resource, lpb.AddResourceRequest, s),
            "DeleteResource": _unary(service.delete_resource, lpb.DeleteResourceRequest, s),
            "ListResources": _unary(service.list_resources, lpb.ListResourcesRequest, s),
        },
    )


def _version(_req: Any, _md: Any) -> version_pb2.VersionResponse:
    from importlib import metadata

    try:
        version = metadata.version("contentfs")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return version_pb2.VersionResponse(version=f"contentfs {version}", revision="")


def other_handlers(server_uuid: str) -> list[grpc.GenericRpcHandler]:
    """Version (for ``ctr version``) and Introspection.Server (newer ctr asks it on every
    command, to print deprecations: we have none)."""

    def server_info(_req: Any, _md: Any) -> introspection_pb2.ServerResponse:
        return introspection_pb2.ServerResponse(uuid=server_uuid, pid=os.getpid())

    return [
        grpc.method_handlers_generic_handler(
            VERSION, {"Version": _unary(_version, empty_pb2.Empty, _serialize)}
        ),
        grpc.method_handlers_generic_handler(
            INTROSPECTION, {"Server": _unary(server_info, empty_pb2.Empty, _serialize)}
        ),
    ]


class _LogCalls(grpc.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        log.debug("call %s", handler_call_details.method)
        return continuation(handler_call_details)


class Server:
    """A grpcio server and its Read lane (:mod:`store.grpc.fastread`): ``start`` starts
    both; the lane ends by itself once the server has stopped."""

    def __init__(self, server: grpc.Server, lane: ReadLane | None) -> None:
        self.grpc = server
        self.lane = lane

    def add_insecure_port(self, address: str) -> int:
        port: int = self.grpc.add_insecure_port(address)
        return port

    def start(self) -> None:
        self.grpc.start()
        if self.lane is not None:
            self.lane.start()

    def stop(self, grace: float | None) -> threading.Event:
        """As grpc.Server.stop: returns an event set once the server has stopped."""
        done: threading.Event = self.grpc.stop(grace)
        return done


def build_server(
    store: Store,
    *,
    debug: bool = False,
    read_lane: bool = True,
    write_idle_timeout: float = WRITE_IDLE_TIMEOUT,
) -> tuple[Server, futures.ThreadPoolExecutor]:
    """A server with the three services, not yet bound or started, and its pool.

    With ``read_lane`` (and a grpcio that allows it), Content.Read is served by the
    lane of :mod:`store.grpc.fastread`; else by the generic handler, like every call.
    Idle Write streams never starve other calls: they are limited (WRITE_STREAMS, and
    STREAMS_PER_CONNECTION per connection), the pool keeps SHORT_WORKERS threads beyond
    them, and one idle for ``write_idle_timeout`` seconds is cancelled (0: never).
    """
    pool = futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="contentfs-grpc")
    service = ContentService(store)
    limits = _WriteLimits(WRITE_STREAMS, write_idle_timeout)
    server = grpc.server(
        pool,
        handlers=[content_handler(service, limits), leases_handler(LeasesService(store)),
                  *other_handlers(str(uuid.uuid4()))],
        interceptors=[_LogCalls()] if debug else None,
        maximum_concurrent_rpcs=MAX_CALLS,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
            ("grpc.so_reuseport", 0),
        ],
    )
    lane = attach(server, service, debug=debug) if read_lane else None
    return Server(server, lane), pool


def serve_main(
    store: LocalStore,
    address: str | None,
    *,
    debug: bool,
    write_idle_timeout: float = WRITE_IDLE_TIMEOUT,
) -> int:
    """Serve ``store`` until SIGINT/SIGTERM; return the exit status (0 after a clean stop,
    2 for an unusable address)."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="contentfs: %(levelname)s %(name)s: %(message)s",
    )
    try:
        addr = parse_address(address)
        if addr.scheme == "unix":
            _prepare_socket_path(addr.target, private_dir=not address)
    except (ValueError, OSError) as exc:
        print(f"contentfs: {exc}", file=sys.stderr)
        return 2
    limit_arenas(2)  # before the server's threads start (see .memory)
    server, pool = build_server(store, debug=debug, write_idle_timeout=write_idle_timeout)
    old_umask = os.umask(0o177) if addr.scheme == "unix" else None
    try:
        port = server.add_insecure_port(addr.grpc_target())
    except RuntimeError as exc:
        print(f"contentfs: address {addr}: cannot listen: {exc}", file=sys.stderr)
        return 2
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    if addr.scheme == "unix":
        os.chmod(addr.target, 0o600)
    else:
        host = addr.target.rpartition(":")[0]
        addr = Address("tcp", f"{host}:{port}")
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            print(f"contentfs: warning: {addr} is reachable from the network, "
                  "with no authentication", file=sys.stderr)

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"contentfs: serving {store.root} on {addr}", file=sys.stderr, flush=True)
        # Poll: the kernel may deliver the signal to one of grpc's threads, and then
        # nothing interrupts a long wait in this one (Python runs handlers here only).
        while not stop.wait(0.2):
            pass
        server.stop(GRACE_SECONDS).wait()
        if server.lane is not None:
            server.lane.join(GRACE_SECONDS)
        pool.shutdown(wait=True)  # cancelled Write streams close their writers
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if addr.scheme == "unix":
            try:
                os.unlink(addr.target)
            except FileNotFoundError:
                pass
    print("contentfs: stopped", file=sys.stderr, flush=True)
    return 0
