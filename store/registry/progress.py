"""A terminal progress display like ``ctr content fetch``'s: one line per object (its
ref, status, a bar and bytes), then elapsed time, total bytes and rate; redrawn in place
every 100 ms from its own thread. For terminals only: callers use none when piped."""

from __future__ import annotations

import threading
import time
from typing import TextIO

from ..text import human_size as _size

__all__ = ["TerminalProgress"]

_BAR = 40


class TerminalProgress:
    """Thread-safe :class:`~store.registry.transfer.Progress` drawing on ``out``."""

    def __init__(self, out: TextIO, interval: float = 0.1) -> None:
        self._out = out
        self._interval = interval
        self._lock = threading.Lock()
        self._rows: dict[str, tuple[str, int, int]] = {}
        self._base: dict[str, int] = {}  # offset at first sight: resumed bytes are no rate
        self._lines = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contentfs-progress",
                                        daemon=True)

    def __enter__(self) -> TerminalProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._draw()

    def update(self, key: str, status: str, offset: int = 0, total: int = 0) -> None:
        with self._lock:
            if status in ("downloading", "uploading"):
                self._base.setdefault(key, offset)  # bytes resumed from an ingest
            self._rows[key] = (status, offset, total)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            rows = list(self._rows.items())
            moved = sum(max(0, off - self._base[k]) for k, (st, off, _) in rows
                        if k in self._base and st != "exists")
        width = max((len(k) for k, _ in rows), default=10) + 1
        lines = []
        for key, (status, offset, total) in rows:
            if total:
                fill = min(_BAR, _BAR * offset // total) if status not in ("done", "exists") \
                    else _BAR
                bar = "|" + "+" * fill + "-" * (_BAR - fill) + "|"
                sizes = f" {_size(offset)}/{_size(total)}" if status == "downloading" or \
                    status == "uploading" else ""
            else:
                bar = "|" + ("+" * _BAR if status in ("resolved", "done") else "-" * _BAR) + "|"
                sizes = ""
            lines.append(f"{key + ':':<{width}} {status:<14} {bar}{sizes}")
        elapsed = time.monotonic() - self._started
        rate = moved / elapsed if elapsed > 0 else 0.0
        lines.append(f"elapsed: {elapsed:.1f} s{'':<{max(1, width - 6)}}total: {_size(moved)}"
                     f" ({_size(rate)}/s)")
        text = ""
        if self._lines:
            text += f"\x1b[{self._lines}F"  # back to the first line drawn last time
        text += "".join(f"{line}\x1b[K\n" for line in lines)
        self._lines = len(lines)
        self._out.write(text)
        self._out.flush()
