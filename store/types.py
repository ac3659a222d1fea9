"""Value types: Info (a committed blob) and Status (an active ingest), as in containerd."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Mapping

from .digest import Digest

__all__ = [
    "EPOCH", "GcResult", "Info", "Lease", "Status", "format_time", "from_ns", "parse_time",
    "to_ns",
]

UTC = dt.UTC
#: Go's zero time, 0001-01-01T00:00:00Z: what containerd writes for "unset".
EPOCH = dt.datetime(1, 1, 1, tzinfo=UTC)
_UNIX = dt.datetime(1970, 1, 1, tzinfo=UTC)


@dataclasses.dataclass(frozen=True)
class Info:
    """A committed blob: digest, size, times and labels."""

    digest: Digest
    size: int
    created_at: dt.datetime
    updated_at: dt.datetime
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Lease:
    """A lease (containerd's ``leases.Lease``): holds blobs and ingests against gc."""

    id: str
    created_at: dt.datetime
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GcResult:
    """What one garbage collection removed (or, dry, would remove)."""

    removed: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # digest, bytes
    ingests: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # ns, ref
    leases: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # ns, id
    records: int = 0  # namespace records of blobs deleted
    held_s: float = 0.0  # how long writers were held off (the write transaction)
    remarked: bool = False  # the database changed during the mark: marked again, locked

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.removed)


@dataclasses.dataclass(frozen=True)
class Status:
    """An active ingest. ``offset`` is the number of bytes written so far."""

    ref: str
    offset: int
    total: int
    expected: Digest | None
    started_at: dt.datetime
    updated_at: dt.datetime


def from_ns(ns: int) -> dt.datetime:
    """A UTC datetime from nanoseconds since the epoch (microsecond precision)."""
    return _UNIX + dt.timedelta(microseconds=ns // 1000) if ns else EPOCH


def to_ns(when: dt.datetime) -> int:
    if when <= EPOCH:
        return 0
    delta = when - _UNIX
    return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def format_time(ns: int) -> str:
    """Go's RFC 3339 with nanoseconds, trailing zeros dropped, in UTC (``Z``)."""
    if ns <= 0:
        return "0001-01-01T00:00:00Z"
    secs, frac = divmod(ns, 10**9)
    base = dt.datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        base += "." + f"{frac:09d}".rstrip("0")
    return base + "Z"


_TIME_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:\d\d)$"
)


def parse_time(text: str) -> int:
    """Parse an RFC 3339 time as Go writes it; return nanoseconds since the epoch (0 = zero).

    Raises ValueError on anything else.
    """
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"time {text!r}: not RFC 3339")
    year, mon, day, hh, mm, ss, frac, zone = m.groups()
    if zone in ("Z", "z"):
        tz = UTC
    else:
        sign = 1 if zone[0] == "+" else -1
        tz = dt.timezone(sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    when = dt.datetime(int(year), int(mon), int(day), int(hh), int(mm), int(ss), tzinfo=tz)
    if when.astimezone(UTC) <= EPOCH:
        return 0
    delta = when - _UNIX
    nanos = int((frac or "0").ljust(9, "0"))
    return (delta.days * 86400 + delta.seconds) * 10**9 + nanos
