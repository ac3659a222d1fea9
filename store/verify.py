"""Verifying many blobs at once, on several threads, results in the order asked."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from .errors import StoreError
from .types import Info

__all__ = ["Verifier", "verify_many"]


class Verifier(Protocol):
    """What can rehash one blob (LocalStore, RemoteStore)."""

    def verify(self, digest: str, progress: Callable[[int], object] | None = None) -> Info:
        ...


def verify_many(
    store: Verifier, digests: Iterable[str], *, workers: int | None = None,
    progress: Callable[[str, int], object] | None = None,
) -> Iterator[tuple[str, Info | StoreError]]:
    """``store.verify`` each digest on ``workers`` threads (default: one per CPU; hashlib
    and file reads release Python's lock, so they run on several cores); yield
    ``(digest, Info or the StoreError)`` in the order of ``digests``. At most a few
    blobs per worker are in flight, so a million digests cost no more memory than a
    hundred. ``progress(digest, n)`` is called from the worker threads (it must be
    thread-safe) after each chunk of a blob is hashed. Other exceptions propagate."""
    n = workers or os.cpu_count() or 1

    def one(d: str) -> Info | StoreError:
        try:
            return store.verify(d, None if progress is None else functools.partial(progress, d))
        except StoreError as exc:
            return exc

    if n <= 1:
        for d in digests:
            yield d, one(d)
        return
    with concurrent.futures.ThreadPoolExecutor(n, "contentfs-verify") as pool:
        window: collections.deque[tuple[str, concurrent.futures.Future[Info | StoreError]]]
        window = collections.deque()
        try:
            for d in digests:
                window.append((d, pool.submit(one, d)))
                if len(window) >= 4 * n:
                    d0, f0 = window.popleft()
                    yield d0, f0.result()
            while window:
                d0, f0 = window.popleft()
                yield d0, f0.result()
        finally:
            for _, f in window:
                f.cancel()
