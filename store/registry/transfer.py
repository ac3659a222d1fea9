"""What fetch and push share: progress reporting, per-blob results, label merging,
opening a writer that another fetch may hold for a while, and the parallel runner."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from ..api import Store, Writer
from ..errors import Unavailable
from ..types import Info
from .client import RegistryClient
from .images import GC_ROOT, SOURCE_PREFIX
from .reference import Reference

__all__ = [
    "BlobResult",
    "Cancelled",
    "Progress",
    "Transfer",
    "TransferResult",
    "merge_labels",
    "open_writer",
    "run_parallel",
]

T = TypeVar("T")


class Progress(Protocol):
    """Receives the state of each transfer, from any thread. ``key`` is the ingest ref
    (``layer-sha256:...``) or the reference; ``status`` one of ctr's words: resolving,
    resolved, waiting, downloading, uploading, committing, done, exists."""

    def update(self, key: str, status: str, offset: int = 0, total: int = 0) -> None: ...


class NoProgress:
    def update(self, key: str, status: str, offset: int = 0, total: int = 0) -> None:
        pass


class Cancelled(Exception):
    """A transfer stopped because another one failed or the user interrupted."""


@dataclasses.dataclass
class BlobResult:
    """One blob of a transfer: ``status`` is ``downloaded``, ``resumed`` (part was
    already in an ingest), ``exists`` (nothing transferred), ``uploaded`` or
    ``skipped`` (the registry had it); ``transferred`` counts the bytes moved."""

    digest: str
    size: int
    media_type: str
    status: str
    transferred: int = 0

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TransferResult:
    """A whole fetch or push: the top object (``digest``, ``media_type``, ``size``) and
    each blob's result; ``elapsed`` in seconds."""

    reference: str
    digest: str
    media_type: str
    size: int
    blobs: list[BlobResult]
    elapsed: float = 0.0

    @property
    def transferred(self) -> int:
        return sum(b.transferred for b in self.blobs)

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
            "transferred": self.transferred,
            "elapsed": round(self.elapsed, 3),
            "blobs": [b.to_json() for b in self.blobs],
        }


class Transfer:
    """What one fetch or push works with: the store, the registry client, the reference
    and where progress goes."""

    def __init__(self, store: Store, client: RegistryClient, ref: Reference,
                 progress: Progress) -> None:
        self.store = store
        self.client = client
        self.ref = ref
        self.progress = progress


def rfc3339_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wanted_labels(existing: Mapping[str, str], add: Mapping[str, str]) -> dict[str, str]:
    """The labels of ``add`` that change ``existing``: distribution sources merge into the
    comma-separated set already there; a gc.root already set is kept."""
    out: dict[str, str] = {}
    for key, value in add.items():
        old = existing.get(key)
        if key.startswith(SOURCE_PREFIX) and old:
            repos = set(old.split(",")) | set(value.split(","))
            repos.discard("")
            value = ",".join(sorted(repos))
        elif key == GC_ROOT and old:
            continue
        if old != value:
            out[key] = value
    return out


def merge_labels(store: Store, digest: str, add: Mapping[str, str]) -> Info:
    """Add ``add`` to a committed blob's labels (see :func:`wanted_labels`)."""
    info = store.info(digest)
    changes = wanted_labels(info.labels, add)
    if not changes:
        return info
    return store.update(Info(info.digest, info.size, info.created_at, info.updated_at, changes),
                        *(f"labels.{k}" for k in changes))


def open_writer(store: Store, ref: str, *, total: int, expected: str,
                wait: float = 120.0, stop: threading.Event | None = None) -> Writer:
    """``store.writer`` that waits (backoff up to 1 s) while another process holds the
    ref, e.g. a second fetch of the same layer, up to ``wait`` seconds; then Unavailable.
    AlreadyExists passes through."""
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        try:
            return store.writer(ref, total=total, expected=expected)
        except Unavailable:
            if time.monotonic() > deadline:
                raise
        if stop is not None and stop.wait(delay):
            raise Cancelled(ref)
        elif stop is None:
            time.sleep(delay)
        delay = min(delay * 2, 1.0)


def run_parallel(jobs: Iterable[Callable[[threading.Event], T]], concurrency: int) -> list[T]:
    """Run ``jobs`` on ``concurrency`` threads; each gets a stop event to check between
    chunks. The first failure sets it, the others stop (their ingests kept), and that
    failure is raised once all have ended; so is a KeyboardInterrupt of the caller."""
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency),
                                                 thread_name_prefix="contentfs-transfer")
    futures = [pool.submit(job, stop) for job in jobs]
    try:
        first_error: BaseException | None = None
        for fut in concurrent.futures.as_completed(futures):
            exc = fut.exception()
            if exc is not None and not isinstance(exc, Cancelled):
                stop.set()
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return [f.result() for f in futures]
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
