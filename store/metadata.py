"""Labels and times in SQLite (WAL) beside the blobs.

The database is an index, never the truth about which blobs exist: the files under
``blobs/`` are. A blob on disk without a row (a containerd directory, an OCI layout, a
crash between the commit rename and the row write) is listed with times from its file.
A missing database is created empty; a corrupt one is moved aside and recreated.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .errors import DataLoss, InvalidArgument, Unavailable
from .fsutil import ensure_dir

__all__ = ["BlobRow", "IngestRow", "MetadataDB"]

log = logging.getLogger(__name__)

BlobRow = tuple[int, int, int, dict[str, str]]  # size, created_ns, updated_ns, labels
IngestRow = tuple[str | None, dict[str, str]]  # expected digest, labels


def create_tables(conn: sqlite3.Connection) -> None:
    """The whole schema. Times are integer nanoseconds since the Unix epoch, UTC."""
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS blobs (
            digest     TEXT PRIMARY KEY,    -- 'sha256:<hex>'
            size       INTEGER NOT NULL,    -- bytes, as committed
            created_ns INTEGER NOT NULL,    -- commit time (CreatedAt)
            updated_ns INTEGER NOT NULL     -- last label change (UpdatedAt)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS labels (
            digest TEXT NOT NULL,           -- blob the label belongs to
            key    TEXT NOT NULL,
            value  TEXT NOT NULL,           -- never empty: empty means removed
            PRIMARY KEY (digest, key)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS ingests (
            ref      TEXT PRIMARY KEY,      -- the ingest's ref, as given by the client
            expected TEXT,                  -- digest hint for commit, or NULL
            labels   TEXT NOT NULL          -- JSON object: labels to give the blob at commit
        ) WITHOUT ROWID;
        """
    )


def _kind(exc: sqlite3.DatabaseError) -> str:
    """What a database error means: "busy" (a lock held elsewhere), "corrupt", "io" (the
    file cannot be written or read: read-only, immutable, failing disk) or "other"."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return "busy"
    if (name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
            or "malformed" in text or "not a database" in text or "corrupt" in text):
        return "corrupt"
    if name.startswith(("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        return "io"
    return "other"


def _db_error(path: str, exc: sqlite3.DatabaseError) -> Exception:
    """A locked (or full) database is Unavailable; a corrupt one is DataLoss; one that
    cannot be written or read (read-only or immutable file, failing disk) is an OSError
    (EROFS or EIO) with its own message: that is no busy lock, waiting will not help."""
    text = str(exc)
    kind = _kind(exc)
    if kind == "corrupt":
        return DataLoss(f"metadata database {path}: {text} (it is rebuilt at the next use)")
    if kind == "io":
        readonly = getattr(exc, "sqlite_errorname", "").startswith("SQLITE_READONLY")
        code = errno.EROFS if readonly else errno.EIO
        return OSError(code, f"metadata database cannot be written or read ({text}):"
                       " check the file and its directory (permissions, read-only mount,"
                       " immutable attribute: lsattr)", path)
    return Unavailable(f"metadata database {path}: {text}")


class MetadataDB:
    """A thread-safe handle on the metadata database (one connection behind a lock).

    The file at ``path`` is checked on every use (one ``stat``): when another process
    replaced, removed or moved it aside (a rebuild), the connection is reopened on the
    file now at the path, so nothing is written where no one reads. After a corruption
    error the next use reopens too (rebuilding the database).
    """

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self._readonly = readonly
        self._lock = threading.Lock()
        self._conn = self._open(readonly)
        self._ident = self._identity()
        self._broken = False

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _open(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            if not os.path.exists(self.path):
                conn = sqlite3.connect(":memory:", check_same_thread=False)
                create_tables(conn)
                return conn
            uri = f"file:{urllib.parse.quote(self.path)}?mode=ro"
            if os.statvfs(os.path.dirname(self.path)).f_flag & os.ST_RDONLY:
                # read-only media: nothing can change the file, and SQLite could not
                # create the WAL index (-shm) that a plain read-only open needs
                uri += "&immutable=1"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10)
            return conn
        ensure_dir(os.path.dirname(self.path), 0o700)
        for attempt in (1, 2):
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                with conn:
                    create_tables(conn)
                # touch every table's pages, so corruption is found (and the database
                # rebuilt) here rather than in the middle of a later request
                for table in ("blobs", "labels", "ingests"):
                    conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                return conn
            except sqlite3.DatabaseError as exc:
                conn.close()
                if _kind(exc) != "corrupt" or attempt == 2:
                    raise _db_error(self.path, exc) from None
                aside = f"{self.path}.corrupt-{time.time_ns()}"
                log.error("metadata database %s is unreadable (%s); moved to %s, recreating",
                          self.path, exc, aside)
                # the main file last: a process that sees it still in place never pairs
                # a new database with the old one's log
                for suffix in ("-wal", "-shm", ""):
                    if os.path.exists(self.path + suffix):
                        os.replace(self.path + suffix, aside + suffix)
        raise AssertionError("unreachable")

    def _current(self) -> sqlite3.Connection:
        """The connection, reopened first if the file at the path is no longer the one
        it holds (or it failed as corrupt). Called with the lock held."""
        ident = self._identity()
        if ident == self._ident and not self._broken:
            return self._conn
        if self._readonly and ident is None and self._ident is None:
            return self._conn  # still no database: the empty in-memory one stands
        log.warning("metadata database %s was %s: reopening", self.path,
                    "found corrupt" if self._broken else
                    "removed" if ident is None else "replaced by another file")
        old = self._conn
        self._conn = self._open(self._readonly)  # on failure: retried at the next use
        self._ident = self._identity()
        self._broken = False
        try:
            old.close()
        except sqlite3.Error as exc:  # e.g. a checkpoint into a file that is gone
            log.debug("closing the old metadata connection: %s", exc)
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                conn = self._current()
                with conn:
                    yield conn
            except sqlite3.DatabaseError as exc:
                err = _db_error(self.path, exc)
                if isinstance(err, DataLoss):
                    self._broken = True
                raise err from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # blobs ---------------------------------------------------------------------------

    def get_blob(self, digest: str) -> BlobRow | None:
        with self._tx() as c:
            row = c.execute(
                "SELECT size, created_ns, updated_ns FROM blobs WHERE digest = ?", (digest,)
            ).fetchone()
            if row is None:
                return None
            labels = dict(c.execute("SELECT key, value FROM labels WHERE digest = ?", (digest,)))
        return row[0], row[1], row[2], labels

    def get_blob_times(self, digests: list[str]) -> dict[str, tuple[int, int, int]]:
        """(size, created_ns, updated_ns) of those ``digests`` that have a row; no labels.
        For listings: one query per batch instead of one per blob."""
        with self._tx() as c:
            return {
                d: (size, cr, up)
                for d, size, cr, up in _select_in(
                    c, "SELECT digest, size, created_ns, updated_ns FROM blobs", digests
                )
            }

    def blobs_updated_since(self, ns: int) -> list[tuple[str, int, int]]:
        """(digest, created_ns, updated_ns) of blobs whose UpdatedAt is after ``ns``: what
        changed since then (a mount looks for labels set by other processes)."""
        with self._tx() as c:
            return list(c.execute(
                "SELECT digest, created_ns, updated_ns FROM blobs WHERE updated_ns > ?", (ns,)))

    def get_blobs(self, digests: list[str]) -> dict[str, BlobRow]:
        """Rows, with labels, of those ``digests`` that have one: a batch of a listing,
        so walking many blobs never holds every row at once."""
        with self._tx() as c:
            out: dict[str, BlobRow] = {
                d: (size, cr, up, {})
                for d, size, cr, up in _select_in(
                    c, "SELECT digest, size, created_ns, updated_ns FROM blobs", digests
                )
            }
            for d, k, v in _select_in(c, "SELECT digest, key, value FROM labels", digests):
                if d in out:
                    out[d][3][k] = v
        return out

    def put_blob(self, digest: str, size: int, now_ns: int, labels: Mapping[str, str]) -> None:
        """Record a fresh commit: times = now, labels replace any stale ones."""
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO blobs(digest, size, created_ns, updated_ns)"
                " VALUES (?, ?, ?, ?)",
                (digest, size, now_ns, now_ns),
            )
            c.execute("DELETE FROM labels WHERE digest = ?", (digest,))
            c.executemany(
                "INSERT INTO labels(digest, key, value) VALUES (?, ?, ?)",
                [(digest, k, v) for k, v in labels.items() if v],
            )

    def update_labels(
        self,
        digest: str,
        size: int,
        created_ns: int,
        now_ns: int,
        replace: Mapping[str, str] | None,
        changes: Mapping[str, str],
    ) -> BlobRow:
        """Replace all labels (``replace``) and/or apply ``changes`` (empty value removes).

        Creates the row when the blob had none. Returns the new row.
        """
        with self._tx() as c:
            c.execute(
                "INSERT INTO blobs(digest, size, created_ns, updated_ns) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(digest) DO UPDATE SET updated_ns = excluded.updated_ns",
                (digest, size, created_ns, now_ns),
            )
            if replace is not None:
                c.execute("DELETE FROM labels WHERE digest = ?", (digest,))
                c.executemany(
                    "INSERT INTO labels(digest, key, value) VALUES (?, ?, ?)",
                    [(digest, k, v) for k, v in replace.items() if v],
                )
            for k, v in changes.items():
                if v:
                    c.execute(
                        "INSERT OR REPLACE INTO labels(digest, key, value) VALUES (?, ?, ?)",
                        (digest, k, v),
                    )
                else:
                    c.execute("DELETE FROM labels WHERE digest = ? AND key = ?", (digest, k))
            row = c.execute(
                "SELECT size, created_ns, updated_ns FROM blobs WHERE digest = ?", (digest,)
            ).fetchone()
            labels = dict(c.execute("SELECT key, value FROM labels WHERE digest = ?", (digest,)))
        return row[0], row[1], row[2], labels

    def delete_blob(self, digest: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
            c.execute("DELETE FROM labels WHERE digest = ?", (digest,))

    # ingests -------------------------------------------------------------------------
    # A ref that is not valid UTF-8 (a legacy ingest made by hand) cannot be stored in
    # SQLite's TEXT: it has no row, and LocalStore refuses to record hints for it.

    def get_ingest(self, ref: str) -> IngestRow:
        if not _storable(ref):
            return None, {}
        with self._tx() as c:
            row = c.execute("SELECT expected, labels FROM ingests WHERE ref = ?", (ref,)).fetchone()
        if row is None:
            return None, {}
        return row[0], json.loads(row[1])

    def put_ingest(self, ref: str, expected: str | None, labels: Mapping[str, str]) -> None:
        if not _storable(ref):
            raise InvalidArgument(f"ref {ref.encode('utf-8', 'surrogateescape')!r}:"
                                  " not valid UTF-8")
        with self._tx() as c:
            if expected is None and not labels:
                c.execute("DELETE FROM ingests WHERE ref = ?", (ref,))
            else:
                c.execute(
                    "INSERT OR REPLACE INTO ingests(ref, expected, labels) VALUES (?, ?, ?)",
                    (ref, expected, json.dumps(dict(labels), sort_keys=True)),
                )

    def delete_ingest(self, ref: str) -> None:
        if not _storable(ref):
            return
        with self._tx() as c:
            c.execute("DELETE FROM ingests WHERE ref = ?", (ref,))

    def rename_ingest(self, old: str, new: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM ingests WHERE ref = ?", (new,))
            if _storable(old):
                c.execute("UPDATE ingests SET ref = ? WHERE ref = ?", (new, old))


def _storable(ref: str) -> bool:
    """True if ``ref`` is valid Unicode text (SQLite TEXT cannot hold lone surrogates)."""
    try:
        ref.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _select_in(
    c: sqlite3.Connection, select: str, digests: list[str], batch: int = 500
) -> Iterator[tuple[Any, ...]]:
    """Rows of ``select ... WHERE digest IN (...)`` over ``digests``, in batches that stay
    under SQLite's limit on bound parameters."""
    for i in range(0, len(digests), batch):
        chunk = digests[i : i + batch]
        marks = ",".join("?" * len(chunk))
        yield from c.execute(f"{select} WHERE digest IN ({marks})", chunk)
