"""Helpers for the gRPC tests: servers (in-process, ``contentfs serve``, a real containerd
daemon), ``ctr`` and a raw Content client that reports codes instead of raising."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest

from store import LocalStore
from store.grpc.pb import content_pb2 as pb
from store.grpc.server import build_server

CTR = shutil.which("ctr") or "/usr/bin/ctr"
CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
SERVICE = "/containerd.services.content.v1.Content/"
NS = (("containerd-namespace", "default"),)


def require(path: str, what: str) -> None:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{what} not found at {path}: install it (Debian package containerd)")


@dataclasses.dataclass
class InProcessServer:
    """A server thread over ``store`` on a unix socket (cheap: for API-level tests)."""

    store: LocalStore
    socket: str
    server: Any = None

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> InProcessServer:
        self.server, self._pool = build_server(self.store)
        self.server.add_insecure_port(f"unix:{self.socket}")
        self.server.start()
        return self

    def stop(self) -> None:
        # bounded: grpc once left an RPC unfinished after a raw request it could not
        # decode (test_refs_utf8, 1 in ~4 loaded runs) and stop() waited forever
        if not self.server.stop(0).wait(timeout=60):
            self._pool.shutdown(wait=False)
            pytest.fail("the in-process gRPC server did not stop within 60 s of stop(0)")
        self._pool.shutdown(wait=True)


def inproc_server(tmp_path: Any) -> Iterator[InProcessServer]:
    """Fixture body (``name = pytest.fixture(inproc_server)`` in a test module)."""
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    store = LocalStore(root)
    srv = InProcessServer(store, os.path.join(tmp_path, "s.sock")).start()
    try:
        yield srv
    finally:
        srv.stop()
        store.close()


class ServeProcess:
    """``contentfs serve --root ROOT --address unix://SOCKET`` as a child process."""

    def __init__(self, root: str, socket: str, *extra: str) -> None:
        self.root = root
        self.socket = socket
        self.proc = subprocess.Popen(
            [CONTENTFS, "serve", "--root", root, "--address", f"unix://{socket}", *extra],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 60
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            self.proc.wait()
        if self.proc.poll() is not None or not self.lines or "serving" not in self.lines[-1]:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"contentfs serve did not start: {''.join(self.lines)}")
        self._rest: list[str] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._rest.append(line)

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server, wait for it, return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(timeout=10)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines + self._rest)


def serve_process(tmp_path: Any) -> Iterator[ServeProcess]:
    """Fixture body: ``contentfs serve`` on a fresh root, which must stop cleanly (exit 0)
    at the end (``serve = pytest.fixture(serve_process)`` in a test module)."""
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    srv = ServeProcess(root, os.path.join(tmp_path, "s.sock"))
    try:
        yield srv
    finally:
        rc = srv.stop()
    assert rc == 0, srv.stderr


def ctr(
    address: str,
    *args: str,
    input: bytes | None = None,  # noqa: A002 - subprocess's name
    env: dict[str, str] | None = None,
    timeout: float = 60,
    namespace: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``ctr -a SOCKET [-n NS] ARGS`` and return the finished process."""
    require(CTR, "ctr")
    sock = address[len("unix://") :] if address.startswith("unix://") else address
    cmd = [CTR, "-a", sock]
    if namespace is not None:
        cmd += ["-n", namespace]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    full_env.update(env or {})
    return subprocess.run(
        [*cmd, *args], input=input, capture_output=True, timeout=timeout, env=full_env,
        check=False,
    )


class Containerd:
    """A real containerd daemon on its own root, state and socket under ``base``.

    With ``content_proxy`` (a unix socket path) its built-in content store is disabled
    and the Content server there is its store (``[proxy_plugins.contentfs]``, reference
    §14). The log is ``base/containerd.log``.
    """

    def __init__(self, base: str, content_proxy: str | None = None) -> None:
        require(CONTAINERD, "containerd")
        os.makedirs(base, exist_ok=True)
        self.base = base
        self.socket = os.path.join(base, "containerd.sock")
        config = os.path.join(base, "config.toml")
        disabled = ['"io.containerd.grpc.v1.cri"']
        if content_proxy:
            disabled.insert(0, '"io.containerd.content.v1.content"')
        with open(config, "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{base}/root"\n'
                f'state = "{base}/state"\n'
                f"disabled_plugins = [{', '.join(disabled)}]\n"
                "[grpc]\n"
                f'  address = "{self.socket}"\n'
                "[ttrpc]\n"
                f'  address = "{self.socket}.ttrpc"\n'
            )
            if content_proxy:
                f.write(
                    "[proxy_plugins.contentfs]\n"
                    '  type = "content"\n'
                    f'  address = "{content_proxy}"\n'
                )
        self.log = open(os.path.join(base, "containerd.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [CONTAINERD, "--config", config], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"containerd exited with {self.proc.returncode}: {self._log()}")
            if os.path.exists(self.socket):
                ch = grpc.insecure_channel(f"unix:{self.socket}")
                try:
                    grpc.channel_ready_future(ch).result(timeout=5)
                    break
                except grpc.FutureTimeoutError:
                    pass
                finally:
                    ch.close()
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"containerd did not start: {self._log()}")
            time.sleep(0.1)

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def _log(self) -> str:
        return self.full_log()[-3000:]

    def full_log(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def containerd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """Fixture body: a containerd of the test module's own, stopped at its end
    (``containerd = pytest.fixture(scope="module")(containerd_daemon)`` in a test module)."""
    daemon = Containerd(str(tmp_path_factory.mktemp("containerd")))
    try:
        yield daemon
    finally:
        daemon.stop()


@dataclasses.dataclass
class Reply:
    """The outcome of one raw call: the code, its details and the responses received."""

    code: grpc.StatusCode
    details: str
    responses: list[Any]


class RawContent:
    """Raw Content calls with explicit metadata; errors are returned, not raised."""

    def __init__(self, address: str) -> None:
        sock = address[len("unix://") :]
        self.channel = grpc.insecure_channel(f"unix:{sock}")

    def close(self) -> None:
        self.channel.close()

    def _method(self, name: str, kind: str, resp_type: Any) -> Any:
        factory = getattr(self.channel, kind)
        return factory(
            SERVICE + name,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_type.FromString,
        )

    def unary(
        self, name: str, req: Any, resp_type: Any, md: Sequence[tuple[str, str]] = NS
    ) -> Reply:
        try:
            resp = self._method(name, "unary_unary", resp_type)(req, metadata=md, timeout=30)
        except grpc.RpcError as exc:
            return Reply(exc.code(), exc.details() or "", [])
        return Reply(grpc.StatusCode.OK, "", [resp])

    def stream(
        self, name: str, req: Any, resp_type: Any, md: Sequence[tuple[str, str]] = NS
    ) -> Reply:
        out: list[Any] = []
        try:
            for resp in self._method(name, "unary_stream", resp_type)(req, metadata=md, timeout=30):
                out.append(resp)
        except grpc.RpcError as exc:
            return Reply(exc.code(), exc.details() or "", out)
        return Reply(grpc.StatusCode.OK, "", out)

    def write(self, reqs: Sequence[Any], md: Sequence[tuple[str, str]] = NS) -> Reply:
        """Send all ``reqs`` on one Write stream, half-close, drain all responses."""
        out: list[Any] = []
        call = self._method("Write", "stream_stream", pb.WriteContentResponse)
        try:
            for resp in call(iter(reqs), metadata=md, timeout=30):
                out.append(resp)
        except grpc.RpcError as exc:
            return Reply(exc.code(), exc.details() or "", out)
        return Reply(grpc.StatusCode.OK, "", out)
