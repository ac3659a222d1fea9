"""Push changes made by other processes into the mount's caches and the kernel's.

Blob entries and misses are cached for an hour (view timeouts), blob attributes and
listings by the mount (:class:`fusefs.blobcache.BlobCache`). The store's change feed
(:class:`store.api.ChangeFeed`; for a local root, inotify on ``blobs/<alg>/`` and the
metadata database) tells when a blob appears or disappears, whoever did it (the CLI, a
gRPC server, containerd): its cached attributes and listing are dropped and its name
invalidated, so the next lookup sees the truth. When labels changed somewhere, blobs
whose UpdatedAt moved get their cached attributes dropped and the kernel's invalidated,
so ctime moves; blobs the kernel holds that this view no longer shows (a record
deleted in this namespace while another keeps the file) are dropped and invalidated.
Ingest entries have short timeouts and need no watch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from store import StoreError
from store.api import ChangeFeed, ChangeKind

from . import view
from .blobcache import BlobCache

__all__ = ["watch_store"]

log = logging.getLogger("fusefs")
T = TypeVar("T")

#: Looking for relabelled blobs scans the metadata: at most this often (seconds).
DB_CHECK_INTERVAL = 0.2
_CHECK_DUTY = 10  # ... and at least this many times the CPU the last look took


async def watch_store(feed: ChangeFeed, blobs: BlobCache) -> None:
    """Run until cancelled, feeding the store's changes to ``blobs`` and the kernel."""
    try:
        changes = feed.open_changes()
    except (OSError, AttributeError) as exc:
        log.warning("change feed unavailable (%s): changes by other processes show up"
                    " only after cache timeouts", exc)
        return
    labels_dirty = False  # labels changed somewhere: look for relabelled blobs
    last_check = -math.inf
    interval = DB_CHECK_INTERVAL
    try:
        while True:
            wait = (last_check + interval - trio.current_time() if labels_dirty
                    else math.inf)
            with trio.move_on_after(max(0.0, wait)):
                await trio.lowlevel.wait_readable(changes.fileno())
                try:
                    got = changes.read()
                except OSError as exc:
                    log.warning("change feed failed (%s): watch stopped; other processes'"
                                " changes show up after cache timeouts", exc)
                    return
                for change in got:
                    if change.kind is ChangeKind.BLOBS and change.digest is not None:
                        _blob_changed(blobs, change.digest)
                    elif change.kind is ChangeKind.LABELS:
                        labels_dirty = True
                    elif change.kind is ChangeKind.OVERFLOW:  # (LABELS comes with it)
                        log.warning("change feed overflow: looking at every blob again")
                        for alg_ino, name in blobs.overflowed():
                            pyfuse3.invalidate_entry_async(alg_ino, name,
                                                           ignore_enoent=True)
            if labels_dirty and trio.current_time() >= last_check + interval:
                labels_dirty = False
                last_check = trio.current_time()
                # a big store (or many held blobs) makes each check costly: keep the
                # watch to a tenth of a core however often the database changes. Its
                # CPU, not its wall time: on a busy machine the wait for a thread
                # would otherwise space the checks seconds apart for a tiny store
                interval = max(DB_CHECK_INTERVAL, _CHECK_DUTY * await _relabelled(blobs))
    finally:
        changes.close()


def _blob_changed(blobs: BlobCache, digest: str) -> None:
    """Blob ``digest`` came or went: drop what the mount and the kernel hold of it."""
    alg, hexpart = digest.partition(":")[::2]
    alg_ino = blobs.nodes.alg_ino(alg)
    if alg_ino is None:
        return
    blobs.drop_listing(alg)
    blobs.drop(view.hex_ino(hexpart))
    blobs.misses.discard((alg_ino, hexpart.encode()))
    pyfuse3.invalidate_entry_async(alg_ino, hexpart.encode(), ignore_enoent=True)


def _on_thread_timed(fn: Callable[..., T], *args: Any) -> Callable[[], tuple[T, float]]:
    """``fn(*args)`` as a thread body that also returns the CPU seconds it took."""
    def body() -> tuple[T, float]:
        started = time.thread_time()
        result = fn(*args)
        return result, time.thread_time() - started
    return body


async def _relabelled(blobs: BlobCache) -> float:
    """Push label changes (ctime) made by any process into the kernel's attribute cache.
    Returns the CPU seconds the look took (its database and file checks)."""
    try:
        rows, cpu = await trio.to_thread.run_sync(_on_thread_timed(blobs.updated_rows))
        started = time.thread_time()
        held = blobs.relabelled(rows)
        held_blobs = blobs.held_blobs()
        cpu += time.thread_time() - started
        # a record deleted in this namespace while another keeps the file changes no
        # file (no event on blobs/): drop what the kernel holds that is no longer shown
        gone, used = await trio.to_thread.run_sync(_on_thread_timed(blobs.invisible,
                                                                    held_blobs))
        cpu += used
    except (StoreError, OSError) as exc:  # e.g. a locked database: try at the next change
        log.warning("looking for relabelled blobs: %s", exc)
        return 0.0
    for digest in gone:
        _blob_changed(blobs, digest)

    # a record that appeared in this namespace for a file that was already there (a
    # shared commit, a claim elsewhere) changes no file: drop the kernel's cached miss
    for digest, _created, _updated in rows:
        alg, hexpart = digest.partition(":")[::2]
        alg_ino = blobs.nodes.alg_ino(alg)
        if alg_ino is not None and blobs.cached(view.hex_ino(hexpart)) is None:
            blobs.drop_listing(alg)
            pyfuse3.invalidate_entry_async(alg_ino, hexpart.encode(), ignore_enoent=True)

    def invalidate() -> None:
        for i in held:
            try:
                pyfuse3.invalidate_inode(i, attr_only=True)
            except OSError as exc:  # ENOENT: the kernel no longer holds it
                log.debug("invalidating inode %d: %s", i, exc)

    if held:
        await trio.to_thread.run_sync(invalidate)
    return cpu
