"""A measurement probe, not part of contentfs: Content.Read (and Info) of one store over
a hand-written HTTP/2 (h2c) server without grpcio, to measure what a Read path that
skips grpcio costs per call (README, Performance, ``ctr_get``).

Usage (needs ``pip install hpack`` in the venv; not a dependency of contentfs)::

    .venv/bin/python scripts/h2read_probe.py ROOT /tmp/probe.sock &
    ctr -a /tmp/probe.sock content get sha256:... > /dev/null

One thread, one blocking connection at a time. It answers only what ``ctr content get``
asks: Info (the size) and Reads of one chunk of a committed blob, through the Read
lane's own per-call checks (``ReadLane._quick``: lstat of the blob, the namespace's
visibility through the metadata's change stamp); anything else ends the connection.
``PROBE_CHECKS=0`` skips the checks (a bare ``pread``). Per call it reads the request's
frames in one ``recv`` and answers HEADERS + DATA + trailers (and any PING ack) in one
``sendall``, where grpcio's core hands each call between its event-engine threads and
the lane's.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from typing import Any

from grpc._cython import cygrpc
from hpack import Decoder

from store.grpc.fastread import ReadLane
from store.grpc.pb import content_pb2 as pb
from store.grpc.service import ContentService
from store.grpc.wire import encode_read_response
from store.local import LocalStore

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
# HPACK, never indexed: ":status: 200" (static entry 8), "content-type: application/grpc"
# (static name 31), then the trailers "grpc-status: 0" (a literal name)
RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"
TRAILERS = b"\x00\x0bgrpc-status\x010"


class _NoServer:
    """Stands in for grpc's core server: the lane is used for its checks only."""

    def register_completion_queue(self, cq: Any) -> None:
        pass

    def register_method(self, method: str) -> None:
        pass


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, kind, flags, stream) + payload


def serve(conn: socket.socket, lane: ReadLane, root: str, checks: bool) -> None:
    buf = bytearray()

    def need(n: int) -> None:
        while len(buf) < n:
            data = conn.recv(262144)
            if not data:
                raise EOFError
            buf.extend(data)

    need(len(PREFACE))
    del buf[: len(PREFACE)]
    # a 16 MiB stream window and a 1 GiB connection window for what the client sends
    conn.sendall(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 24))
                 + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))
    decoder = Decoder()
    send_window, max_frame = 65535, 16384
    streams: dict[int, tuple[bytes, bytearray, tuple[tuple[str, str], ...]]] = {}
    out: list[bytes] = []
    fds: dict[str, int] = {}
    while True:
        if len(buf) < 9 and out:  # about to block: flush acks first
            conn.sendall(b"".join(out))
            out.clear()
        need(9)
        n = (buf[0] << 16) | (buf[1] << 8) | buf[2]
        kind, flags = buf[3], buf[4]
        sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        need(9 + n)
        payload = bytes(buf[9 : 9 + n])
        del buf[: 9 + n]
        if kind == SETTINGS and not flags & ACK:
            for i in range(0, len(payload), 6):
                key, value = struct.unpack(">HI", payload[i : i + 6])
                if key == 5:
                    max_frame = value
            out.append(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            out.append(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE and sid == 0:
            send_window += int.from_bytes(payload, "big")
        elif kind == HEADERS:
            block = payload
            if flags & PADDED:
                block = block[1 : len(block) - block[0]]
            if flags & PRIORITY:
                block = block[5:]
            if not flags & END_HEADERS:
                raise SystemExit("probe: CONTINUATION frames are not handled")
            headers = decoder.decode(block, raw=True)
            path = dict(headers).get(b":path", b"")
            metadata = tuple((k.decode(), v.decode()) for k, v in headers
                             if not k.startswith(b":"))
            streams[sid] = (path, bytearray(), metadata)
        elif kind == DATA:
            path, body, metadata = streams[sid]
            body += payload
            if not flags & END_STREAM:
                continue
            del streams[sid]
            if path.endswith(b"/Read"):
                read = pb.ReadContentRequest.FromString(bytes(body[5:]))
                if checks:
                    msg = lane._quick(read, metadata)
                    if msg is None:
                        raise SystemExit(f"probe: not a quick read: {read}")
                else:
                    fd = fds.get(read.digest)
                    if fd is None:
                        fd = os.open(os.path.join(root, "blobs", "sha256", read.digest[7:]),
                                     os.O_RDONLY)
                        fds[read.digest] = fd
                    msg = encode_read_response(0, os.pread(fd, read.size, read.offset))
            elif path.endswith(b"/Info"):
                info = pb.InfoRequest.FromString(bytes(body[5:]))
                size = os.stat(os.path.join(root, "blobs", "sha256", info.digest[7:])).st_size
                msg = pb.InfoResponse(
                    info=pb.Info(digest=info.digest, size=size)).SerializeToString()
            else:
                raise SystemExit(f"probe: {path.decode()} is not served")
            message = b"\0" + struct.pack(">I", len(msg)) + msg
            if len(message) > send_window:
                raise SystemExit("probe: the client's connection window is exhausted")
            send_window -= len(message)
            out.append(frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS))
            for i in range(0, len(message), max_frame):
                out.append(frame(DATA, 0, sid, message[i : i + max_frame]))
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, TRAILERS))
            conn.sendall(b"".join(out))
            out.clear()
        elif kind == GOAWAY:
            return


def main() -> None:
    root, path = sys.argv[1], sys.argv[2]
    checks = os.environ.get("PROBE_CHECKS", "1") == "1"
    lane = ReadLane(_NoServer(), cygrpc, ContentService(LocalStore(root)), debug=False)
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen(8)
    print(f"probe: serving {root} on {path}", file=sys.stderr, flush=True)
    while True:
        conn, _ = sock.accept()
        try:
            serve(conn, lane, root, checks)
        except (EOFError, ConnectionError):
            pass
        finally:
            conn.close()


if __name__ == "__main__":
    main()
