"""Positional reads of a committed blob through one open file descriptor."""

from __future__ import annotations

import os
from types import TracebackType

from .digest import Digest

__all__ = ["FileReaderAt"]


class FileReaderAt:
    """A reader of one file: a blob (containerd's ReaderAt), or an ingest's data
    (``digest`` None).

    ``size`` is captured at open. ``read_at(n, offset)`` returns at most ``n`` bytes
    (fewer only at the end; ``b""`` at or past the end). The caller closes it; it stays
    readable after the blob is deleted, until closed.
    """

    def __init__(self, fd: int, size: int, digest: Digest | None = None) -> None:
        self._fd = fd
        self.size = size
        self.digest = digest

    def fileno(self) -> int:
        return self._fd

    def read_at(self, n: int, offset: int) -> bytes:
        if offset < 0:
            raise ValueError("negative offset")
        return os.pread(self._fd, n, offset)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> FileReaderAt:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
