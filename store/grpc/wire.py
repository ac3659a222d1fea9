"""Hand-coded protobuf framing for the two hot messages, to spare copies of bulk data.

``decode_write_request`` parses a WriteContentRequest and returns its ``data`` as a
memoryview into the received buffer (protobuf's parser would copy the bytes once into the
message and again on each access of ``.data``). ``encode_read_response`` builds a
ReadContentResponse with one copy of the data. Both follow the proto3 wire format exactly
(tests compare them with the generated code); everything else uses the generated code.
"""

from __future__ import annotations

import dataclasses

__all__ = ["WireError", "WriteRequest", "decode_write_request", "encode_read_response"]


class WireError(ValueError):
    """A malformed message."""


@dataclasses.dataclass(slots=True)
class WriteRequest:
    """containerd.services.content.v1.WriteContentRequest, decoded."""

    action: int = 0
    ref: str = ""
    total: int = 0
    expected: str = ""
    offset: int = 0
    data: memoryview = dataclasses.field(default_factory=lambda: memoryview(b""))
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint too long")


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each field; varints as ints, the rest as views."""
    out: list[tuple[int, int, int | memoryview]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wtype = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value: int | memoryview
        if wtype == 0:
            value, pos = _varint(buf, pos)
        elif wtype == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise WireError("truncated length-delimited field")
            value, pos = buf[pos : pos + size], pos + size
        elif wtype == 1 or wtype == 5:
            size = 8 if wtype == 1 else 4
            if pos + size > end:
                raise WireError("truncated fixed field")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise WireError(f"unsupported wire type {wtype}")
        out.append((number, wtype, value))
    return out


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise WireError("string field with a varint wire type")
    return str(value, "utf-8")


def decode_write_request(raw: bytes) -> WriteRequest:
    """Parse a WriteContentRequest; ``data`` is a view into ``raw`` (no copy).

    Raises WireError (a ValueError) for malformed input, as the generated parser would.
    """
    req = WriteRequest()
    for number, wtype, value in _fields(memoryview(raw)):
        if number == 1 and wtype == 0:
            assert isinstance(value, int)
            action = value & 0xFFFFFFFF  # an enum is an int32
            req.action = action - (1 << 32) if action >= 1 << 31 else action
        elif number == 2 and wtype == 2:
            req.ref = _text(value)
        elif number == 3 and wtype == 0:
            assert isinstance(value, int)
            req.total = _int64(value)
        elif number == 4 and wtype == 2:
            req.expected = _text(value)
        elif number == 5 and wtype == 0:
            assert isinstance(value, int)
            req.offset = _int64(value)
        elif number == 6 and wtype == 2:
            assert isinstance(value, memoryview)
            req.data = value  # the last occurrence wins, as in protobuf
        elif number == 7 and wtype == 2:
            assert isinstance(value, memoryview)
            key = val = ""
            for n, wt, v in _fields(value):
                if n == 1 and wt == 2:
                    key = _text(v)
                elif n == 2 and wt == 2:
                    val = _text(v)
            req.labels[key] = val
        elif number in (1, 2, 3, 4, 5, 6, 7):
            raise WireError(f"field {number} with wire type {wtype}")
        # unknown fields are skipped, as protobuf does
    return req


def _encode_varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_read_response(offset: int, data: bytes) -> bytes:
    """ReadContentResponse{offset, data} in protobuf wire format, built with one copy of
    ``data`` (field 1 varint, field 2 length-delimited; proto3 omits zero values)."""
    head = b"\x08" + _encode_varint(offset) if offset else b""
    if not data:
        return head
    return b"".join((head, b"\x12", _encode_varint(len(data)), data))
