"""Garbage collection (DESIGN §6, reference §5.6): containerd's mark and sweep, run
only when asked.

Roots, per namespace: blobs labelled ``containerd.io/gc.root``; blobs and ingests in a
live lease (one whose ``containerd.io/gc.expire`` is not past); ingests updated in the
last 24 hours (containerd's ``expireat``); the expected digests of live ingests. Edges:
``containerd.io/gc.ref.content.<anything>`` labels name blobs of the same namespace.
Blob files no namespace has a record of (unclaimed) are never collected, nor are blobs
the raw store has a record of.

One run:

1. finish what an earlier, killed run left in the journal (``gc_doomed``);
2. mark on a read snapshot (a connection of its own: nobody waits), then, in one SQLite
   write transaction (writers wait only for this step; its length is
   ``GcResult.held_s``): if nothing was committed since the snapshot, delete the
   records of unmarked blobs and expired leases and journal the digests whose last
   record went; else mark again first, under the lock (``GcResult.remarked``);
3. for each journalled digest, under that digest's commit lock (so never while a commit,
   a shared writer or a delete works on it): unlink the file unless a record or a live
   ingest claimed it meanwhile, then drop it from the journal;
4. abort expired ingests that no writer holds.

A SIGKILL anywhere leaves either the journal (step 3 is idempotent: the next run
finishes it) or nothing done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from typing import Protocol

from .digest import Digest, parse_digest
from .errors import InvalidArgument, Unavailable
from .fsutil import ensure_dir
from .layout import Layout
from .locks import hold_lock, try_lock
from .metadata import RAW, MetadataDB
from .types import GcResult, Status, parse_time

__all__ = [
    "EXPIRE_LABEL",
    "INGEST_EXPIRY_NS",
    "REF_PREFIX",
    "ROOT_LABEL",
    "GcResult",
    "GcStore",
    "collect",
    "lease_expired",
]

log = logging.getLogger(__name__)

ROOT_LABEL = "containerd.io/gc.root"
EXPIRE_LABEL = "containerd.io/gc.expire"
REF_PREFIX = "containerd.io/gc.ref.content."
#: An ingest not in a lease stays a root this long after its last write (containerd's
#: ``expireat``, reset each time its writer is opened).
INGEST_EXPIRY_NS = 24 * 3600 * 10**9


class GcStore(Protocol):
    """What gc needs of a store: its layout, its metadata and its ingests."""

    layout: Layout
    meta: MetadataDB

    def backend_statuses(self) -> Iterator[Status]: ...

    def backend_status(self, bref: str) -> Status | None: ...


def lease_expired(labels: dict[str, str], now_ns: int) -> bool:
    """A lease whose ``containerd.io/gc.expire`` (RFC 3339) is past; an unparsable value
    never expires it (as containerd)."""
    text = labels.get(EXPIRE_LABEL)
    if not text:
        return False
    try:
        return 0 < parse_time(text) < now_ns
    except ValueError:
        return False


def _split_bref(bref: str) -> tuple[str, str]:
    """(namespace, ref) of a backend ref; refs without a namespace are ``default``'s."""
    ns, sep, ref = bref.rpartition("\0")
    return (ns, ref) if sep else ("default", bref)


@dataclasses.dataclass
class _Plan:
    """What one mark decided: records to delete, expired leases, files to journal."""

    gone: list[tuple[str, str]]  # (namespace, digest) records
    leases: list[tuple[str, str]]  # expired (namespace, id)
    doomed: list[str]  # digests whose last record goes: unlink unless claimed again
    dead_ingests: list[tuple[str, int]]  # (backend ref, updated ns)


def collect(store: GcStore, *, dry_run: bool = False, now_ns: int | None = None) -> GcResult:
    """One garbage collection over the whole root (every namespace); see the module
    docstring. ``dry_run`` changes nothing and reports what would go.

    The mark runs on a snapshot, on a connection of its own, without holding anyone
    off; then, under the write lock, if the database has not changed since the snapshot
    only the (few) deletions run; else the mark runs again under the lock, so it sees
    every commit and label that raced with it."""
    now = time.time_ns() if now_ns is None else now_ns
    meta = store.meta
    result = GcResult()
    if not dry_run:
        _unlink(store, meta.doomed(), result)
    # ingests are files: read them before taking the database
    ingests = [(st.ref, st) for st in store.backend_statuses()]
    with meta.snapshot() as (snap, unchanged):
        plan = _plan(snap, ingests, now)
        with meta.exclusive() as c:
            t0 = time.monotonic()
            if not unchanged():
                plan = _plan(c, ingests, now)
                result.remarked = True
            result.records = len(plan.gone)
            result.leases = plan.leases
            if not dry_run:
                _apply(c, plan)
            result.held_s = time.monotonic() - t0
    if dry_run:
        for dgst in plan.doomed:
            size = _size(store, dgst)
            if size is not None:
                result.removed.append((dgst, size))
        result.ingests = [_split_bref(b) for b, _ in plan.dead_ingests]
        return result
    _unlink(store, plan.doomed, result)
    _abort_ingests(store, plan.dead_ingests, now, result)
    return result


def _plan(
    c: sqlite3.Connection, ingests: list[tuple[str, Status]], now: int
) -> _Plan:
    """Mark (roots, then ``gc.ref.content`` edges, per namespace) and decide."""
    expectations: dict[str, str] = dict(c.execute(
        "SELECT ref, expected FROM ingests WHERE expected IS NOT NULL"))
    expired: list[tuple[str, str]] = []
    live_leases: set[tuple[str, str]] = set()
    for ns, lease, labels_json in c.execute("SELECT ns, id, labels FROM leases"):
        if lease_expired(json.loads(labels_json), now):
            expired.append((ns, lease))
        else:
            live_leases.add((ns, lease))
    roots: dict[str, set[str]] = {}
    leased_ingests: set[tuple[str, str]] = set()
    for ns, lease, rtype, rid in c.execute("SELECT ns, lease, type, id FROM lease_resources"):
        if (ns, lease) not in live_leases:
            continue
        if rtype == "content":
            roots.setdefault(ns, set()).add(rid)
        elif rtype == "ingests":
            leased_ingests.add((ns, rid))
    protected: set[str] = set()  # files kept whatever records say
    dead: list[tuple[str, int]] = []
    for bref, st in ingests:
        ns, ref = _split_bref(bref)
        updated = int(st.updated_at.timestamp() * 1e9)
        if (ns, ref) in leased_ingests or updated + INGEST_EXPIRY_NS > now:
            exp = expectations.get(bref)
            if exp:
                protected.add(exp)
                roots.setdefault(ns, set()).add(exp)
        else:
            dead.append((bref, updated))
    seen = {b for b, _ in ingests}
    for bref, exp in expectations.items():  # shared writers: a record, no bytes yet
        if bref not in seen:
            ns, _ = _split_bref(bref)
            protected.add(exp)
            roots.setdefault(ns, set()).add(exp)
    for ns, dgst in c.execute(
        "SELECT ns, digest FROM labels WHERE key = ? AND ns != ''", (ROOT_LABEL,)
    ):
        roots.setdefault(ns, set()).add(dgst)
    edges: dict[str, dict[str, list[str]]] = {}
    for ns, dgst, target in c.execute(
        "SELECT ns, digest, value FROM labels WHERE key >= ? AND key < ? AND ns != ''",
        (REF_PREFIX, REF_PREFIX[:-1] + chr(ord(REF_PREFIX[-1]) + 1)),
    ):
        edges.setdefault(ns, {}).setdefault(dgst, []).append(target)
    marked = {ns: _mark(seeds, edges.get(ns, {})) for ns, seeds in roots.items()}
    edges.clear()
    gone: list[tuple[str, str]] = []
    for ns, dgst in c.execute("SELECT ns, digest FROM blobs WHERE ns != ''"):
        if dgst not in marked.get(ns, ()):
            gone.append((ns, dgst))
    marked.clear()
    candidates = sorted({d for _, d in gone} - protected)
    gone_set = set(gone)
    # records this run keeps (other namespaces, the raw store) still hold the file
    still = {d for ns, d in _remaining(c, candidates) if (ns, d) not in gone_set}
    return _Plan(gone, expired, [d for d in candidates if d not in still], dead)


def _apply(c: sqlite3.Connection, plan: _Plan) -> None:
    """Delete the plan's records and leases and journal its files, in the caller's
    transaction."""
    c.executemany("DELETE FROM blobs WHERE ns = ? AND digest = ?", plan.gone)
    c.executemany("DELETE FROM labels WHERE ns = ? AND digest = ?", plan.gone)
    c.executemany("DELETE FROM lease_resources WHERE ns = ? AND type = 'content' AND id = ?",
                  plan.gone)
    for ns, lease in plan.leases:
        c.execute("DELETE FROM leases WHERE ns = ? AND id = ?", (ns, lease))
        c.execute("DELETE FROM lease_resources WHERE ns = ? AND lease = ?", (ns, lease))
    c.executemany("INSERT OR IGNORE INTO gc_doomed(digest) VALUES (?)",
                  [(d,) for d in plan.doomed])


def _remaining(c: sqlite3.Connection, digests: list[str]) -> Iterable[tuple[str, str]]:
    for i in range(0, len(digests), 500):
        chunk = digests[i : i + 500]
        marks = ",".join("?" * len(chunk))
        yield from c.execute(f"SELECT ns, digest FROM blobs WHERE digest IN ({marks})", chunk)


def _mark(seeds: set[str], edges: dict[str, list[str]]) -> set[str]:
    marked = set(seeds)
    todo = list(seeds)
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target not in marked:
                marked.add(target)
                todo.append(target)
    return marked


def _size(store: GcStore, dgst: str) -> int | None:
    try:
        st = os.lstat(store.layout.blob_path(parse_digest(dgst)))
    except (OSError, InvalidArgument):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _unlink(store: GcStore, doomed: list[str], result: GcResult) -> None:
    """Step 3: unlink journalled files nothing claims any more; idempotent."""
    meta = store.meta
    ensure_dir(store.layout.private, 0o700)
    ensure_dir(store.layout.locks, 0o700)
    for dgst in doomed:
        try:
            digest: Digest = parse_digest(dgst)
            path = store.layout.blob_path(digest)
            lock = store.layout.commit_lock_path(digest)
        except InvalidArgument:
            meta.undoom(dgst)
            continue
        with hold_lock(lock):
            claimed = bool(meta.holders(dgst)) or meta.ingest_expects(dgst)
            if not claimed:
                size = _size(store, dgst)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    size = None
                if size is not None:
                    result.removed.append((dgst, size))
            meta.undoom(dgst)


def _abort_ingests(
    store: GcStore, dead: list[tuple[str, int]], now: int, result: GcResult
) -> None:
    """Step 4: remove expired ingests, unless a writer holds one or it was written to
    since it was judged."""
    layout = store.layout
    for bref, _updated in dead:
        try:
            lock = try_lock(layout.lock_path(bref), bref)
        except Unavailable:
            continue
        try:
            st = store.backend_status(bref)
            if st is None:
                continue
            if int(st.updated_at.timestamp() * 1e9) + INGEST_EXPIRY_NS > now:
                continue
            shutil.rmtree(layout.ingest_dir(bref), ignore_errors=True)
            store.meta.delete_ingest(bref)
            ns, ref = _split_bref(bref)
            if ns != RAW:
                store.meta.drop_lease_ingest(ns, ref)
            result.ingests.append((ns, ref))
        finally:
            lock.release()
