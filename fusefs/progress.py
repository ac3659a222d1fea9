"""A one-line progress display for long CLI work (ingest, get, verify; DESIGN §3).

Shown on standard error only when it is a terminal, so pipes, files and scripts never
see it: a bar with a percentage when the amount of work is known, else the bytes so far.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import IO

from store.text import human_size as _size

__all__ = ["Progress"]

_INTERVAL = 0.1  # seconds between redraws
_WIDEST = "  100%  1023.9 MiB of 1023.9 MiB  1023.9 MiB/s"


class Progress:
    """``label`` and how far the work is, redrawn in place at most 10 times a second.

    ``advance(n)`` after each step; ``clear()`` before writing other lines to the same
    terminal (they then appear above the bar); ``close()`` (or the ``with`` block's end)
    draws the final state and ends the line. Does nothing when ``stream`` (standard
    error) is not a terminal.
    """

    def __init__(self, label: str, total: int | None, done: int = 0,
                 stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.shown = self.stream.isatty()
        except (AttributeError, ValueError):
            self.shown = False
        self.label = label
        self.total = total
        self.done = done
        self._start = time.monotonic()
        self._start_done = done
        self._drawn = 0.0
        self._visible = False

    def __enter__(self) -> Progress:
        self._draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def clear(self) -> None:
        """Erase the line, so the caller can print; the next ``advance`` redraws it."""
        if self._visible:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._visible = False

    def close(self) -> None:
        if self.shown:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False

    def _draw(self, *, force: bool = False) -> None:
        if not self.shown:
            return
        now = time.monotonic()
        if not force and now - self._drawn < _INTERVAL:
            return
        self._drawn = now
        elapsed = now - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0.5 else 0.0
        speed = f"  {_size(rate)}/s" if rate else ""
        width = shutil.get_terminal_size((80, 24)).columns
        if self.total:
            frac = min(1.0, self.done / self.total)
            text = f"  {frac * 100:3.0f}%  {_size(self.done)} of {_size(self.total)}{speed}"
            # one bar width throughout: room is kept for the longest figures
            room = width - len(self.label) - len(_WIDEST) - 3
            if room >= 10:
                bar_width = min(40, room)
                filled = int(frac * bar_width)
                text = f" [{'#' * filled}{'-' * (bar_width - filled)}]{text}"
        else:
            text = f"  {_size(self.done)}{speed}"
        self.stream.write(f"\r{self.label}{text}"[: width + 1] + "\x1b[K")
        self.stream.flush()
        self._visible = True
