"""Handing memory freed after large Write streams back to the system (glibc malloc).

Each grpcio thread allocates from a malloc arena of its own, up to 8 per core. The
megabytes of a large message freed in one of them stay in the process: the arena is
fragmented, and glibc raises its mmap threshold after freeing a large mmapped block, so
later big buffers come from the heap and are never unmapped. Rounds of abandoned 15 MB
writes grew a server from 51 to over 600 MB RSS. ``limit_arenas`` caps the arenas (the
server calls it before its threads start) and a ``Trimmer`` calls ``malloc_trim`` once
enough bytes went through Write streams that ended. Elsewhere than glibc, both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from typing import Any

__all__ = ["Trimmer", "limit_arenas", "trim"]

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def limit_arenas(count: int = 2) -> bool:
    """Let at most ``count`` malloc arenas exist from now on; False if not glibc."""
    fn = getattr(_LIBC, "mallopt", None)
    return bool(fn is not None and fn(_M_ARENA_MAX, count) == 1)


def trim() -> bool:
    """Return free heap memory to the system (``malloc_trim(0)``); False if not glibc."""
    fn = getattr(_LIBC, "malloc_trim", None)
    if fn is None:
        return False
    fn(0)
    return True


class Trimmer:
    """Trims after streams that received at least ``threshold`` bytes end: ``delay``
    seconds after the last of them (streams ending together share one trim), at least
    every ``longest`` seconds while they keep ending, from a thread of its own."""

    def __init__(self, threshold: int = 1 << 20, delay: float = 0.5,
                 longest: float = 5.0) -> None:
        self.threshold = threshold
        self.delay = delay
        self.longest = longest
        self.trims = 0
        self._lock = threading.Lock()
        self._due = threading.Event()
        self._thread: threading.Thread | None = None

    def note(self, nbytes: int) -> None:
        """A stream that received ``nbytes`` has ended."""
        if nbytes < self.threshold:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="contentfs-trim",
                                                daemon=True)
                self._thread.start()
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            first = time.monotonic()
            while True:  # until no stream ended for `delay` seconds
                self._due.clear()
                time.sleep(self.delay)
                if not self._due.is_set() or time.monotonic() - first >= self.longest:
                    break
            t0 = time.perf_counter()
            if trim():
                self.trims += 1
                log.debug("malloc_trim: %.1f ms", (time.perf_counter() - t0) * 1e3)
