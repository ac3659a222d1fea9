"""Lock waits (DESIGN §1): a writer for a held ref waits up to about a second for the
holder to let go, as containerd 1.6's local store does; ``wait=0`` fails at once. A client
that closes a writer and reopens the ref at once (containerd's Go client, over gRPC without
waiting for the stream's end) always gets it."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest

from store import LocalStore, Unavailable, digest_of
from store.grpc.pb import content_pb2 as pb

from .grpc_util import SERVICE, InProcessServer, inproc_server

server = pytest.fixture(inproc_server)

ROUNDS = 1000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wait_zero_fails_at_once_and_default_waits_for_a_release(store: LocalStore) -> None:
    held = store.writer("r")
    held.write(b"abc")
    with pytest.raises(Unavailable, match=r"^ref r locked for "):
        store.writer("r", wait=0)  # a hang here would fail by pytest-timeout
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(store.writer("r", wait=60)))
    waiter.start()
    held.close()
    waiter.join(120)
    assert not waiter.is_alive()
    w = got[0]
    assert not isinstance(w, BaseException)
    assert getattr(w, "offset") == 3  # noqa: B009 - resumed where the holder stopped
    getattr(w, "close")()  # noqa: B009


def test_wait_ends_with_unavailable(store: LocalStore) -> None:
    held = store.writer("r")
    try:
        with pytest.raises(Unavailable, match=r"^ref r locked for \d+\.\ds \(since "):
            store.writer("r", wait=0.2)
    finally:
        held.close()


def test_waits_for_a_holder_in_another_process(store: LocalStore) -> None:
    script = (
        "import sys, time\nfrom store import LocalStore\n"
        "w = LocalStore(sys.argv[1]).writer('x')\nw.write(b'12345')\n"
        "print('held', flush=True)\ntime.sleep(0.3)\nw.close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, store.root], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(Unavailable):
            store.writer("x", wait=0)
        with store.writer("x", wait=60) as w:  # sees the release by its next try
            assert w.offset == 5
    finally:
        assert proc.wait(60) == 0
        assert proc.stdout is not None
        proc.stdout.close()


def test_close_then_reopen_from_two_threads_never_unavailable(store: LocalStore) -> None:
    """Two threads take turns on one ref, ROUNDS opens in all, each closing and at once
    reopening: every open gets the writer (the default wait covers the other's hold)."""
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            for _ in range(ROUNDS // 2):
                w = store.writer("busy")
                w.write(b"x")
                w.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.status("busy").offset == ROUNDS


class _Stream:
    """One raw Write stream, driven as containerd's Go proxy writer drives it: each
    message waits for its response; Close half-closes without waiting for the end."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._queue: queue.Queue[pb.WriteContentRequest | None] = queue.Queue()
        method = channel.stream_stream(
            SERVICE + "Write",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.WriteContentResponse.FromString,
        )
        self.call = method(self._requests(), timeout=60)

    def _requests(self) -> Iterator[pb.WriteContentRequest]:
        while (req := self._queue.get()) is not None:
            yield req

    def send(self, req: pb.WriteContentRequest) -> pb.WriteContentResponse:
        self._queue.put(req)
        resp: pb.WriteContentResponse = next(self.call)
        return resp

    def half_close(self) -> None:
        self._queue.put(None)


def test_grpc_close_then_reopen_never_unavailable(server: InProcessServer) -> None:
    """ROUNDS Write streams on one ref, each opened the moment the previous one was
    half-closed (or cancelled, every third round) without waiting for its end: no open
    is refused, and every byte written lands exactly once."""
    channel = grpc.insecure_channel(f"unix:{server.socket}")
    streams = []
    try:
        for i in range(ROUNDS):
            s = _Stream(channel)
            streams.append(s)
            try:
                st = s.send(pb.WriteContentRequest(action=pb.STAT, ref="proxy-ref"))
                assert st.offset == i
                w = s.send(pb.WriteContentRequest(action=pb.WRITE, offset=i, data=b"y"))
                assert w.offset == i + 1
            except grpc.RpcError as exc:
                pytest.fail(f"round {i}: {exc.code()}: {exc.details()}")
            if i % 3 == 2:
                s.call.cancel()
            else:
                s.half_close()
            if len(streams) > 8:
                streams.pop(0).call.cancel()  # long done: let go of its resources
    finally:
        for s in streams:
            s.half_close()
            s.call.cancel()
        channel.close()
    st = server.store.status("proxy-ref")
    assert st.offset == ROUNDS
    with server.store.writer("proxy-ref") as w:
        assert w.digest() == digest_of(b"y" * ROUNDS)
