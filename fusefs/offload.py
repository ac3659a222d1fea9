"""Where a store call runs: inline on the trio thread for a store of files on this
machine (stat and SQLite are fast; a thread hop costs more than the call), in a worker
thread for any other (a remote store's call waits on the network, up to its deadline,
and must never hold up the event loop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["call"]

T = TypeVar("T")


async def call(inline: bool, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``: inline when ``inline``, else in a worker thread."""
    if inline:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)
