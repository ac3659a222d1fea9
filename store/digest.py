"""Digests as go-digest validates them: ``<alg>:<lowercase hex>`` for sha256/384/512."""

from __future__ import annotations

import functools
import hashlib
import re
from typing import NewType

from .errors import InvalidArgument

__all__ = [
    "ALGORITHMS",
    "CANONICAL",
    "Digest",
    "digest_of",
    "hex_pattern",
    "is_hex_name",
    "new_hasher",
    "parse_digest",
    "split_digest",
]

Digest = NewType("Digest", str)

#: Available algorithms and the length of their hex encoding.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
CANONICAL = "sha256"
_HEX = frozenset("0123456789abcdef")


def parse_digest(value: str) -> Digest:
    """Return ``value`` as a Digest, or raise InvalidArgument saying what is wrong."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument("digest: invalid checksum digest format (empty)")
    alg, sep, hexpart = value.partition(":")
    if not sep or not alg or not hexpart:
        raise InvalidArgument(f"digest {value!r}: invalid checksum digest format")
    want = ALGORITHMS.get(alg)
    if want is None:
        raise InvalidArgument(f"digest {value!r}: unsupported digest algorithm")
    if len(hexpart) != want or not _HEX.issuperset(hexpart):
        raise InvalidArgument(
            f"digest {value!r}: invalid checksum digest length or encoding"
            f" (want {want} lowercase hex characters)"
        )
    return Digest(value)


def split_digest(digest: Digest) -> tuple[str, str]:
    alg, _, hexpart = digest.partition(":")
    return alg, hexpart


def new_hasher(algorithm: str = CANONICAL) -> hashlib._Hash:
    return hashlib.new(algorithm)


def digest_of(data: bytes, algorithm: str = CANONICAL) -> Digest:
    """The digest of ``data`` (a convenience for tests and small blobs)."""
    return Digest(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


@functools.cache
def hex_pattern(algorithm: str) -> re.Pattern[str]:
    """A pattern whose ``fullmatch`` accepts the hex part of an ``algorithm`` digest
    (matches nothing for an unknown algorithm): for filtering many names at once."""
    width = ALGORITHMS.get(algorithm)
    return re.compile(f"[0-9a-f]{{{width}}}" if width else "(?!)")


def is_hex_name(algorithm: str, name: str) -> bool:
    """True if ``name`` is a well-formed hex part of an ``algorithm`` digest."""
    return hex_pattern(algorithm).fullmatch(name) is not None
