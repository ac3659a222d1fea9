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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .errors import DataLoss, InvalidArgument, Unavailable
from .fsutil import ensure_dir
from .text import is_text

__all__ = ["RAW", "BlobRow", "IngestRow", "LeaseRow", "MetadataDB", "NsMetadata"]

log = logging.getLogger(__name__)

BlobRow = tuple[int, int, int, dict[str, str]]  # size, created_ns, updated_ns, labels
IngestRow = tuple[str | None, dict[str, str]]  # expected digest, labels
LeaseRow = tuple[str, int, dict[str, str]]  # id, created_ns, labels

#: The namespace key of the raw store (no namespace): its records claim nothing.
RAW = ""
#: Schema version in ``PRAGMA user_version``: 0 = before namespaces, 1 = namespaces.
SCHEMA_VERSION = 1


def create_tables(conn: sqlite3.Connection) -> None:
    """The whole schema. Times are integer nanoseconds since the Unix epoch, UTC.

    ``ns`` is a containerd namespace, or '' for the raw store's own records (what a
    request without a namespace sees; they do not claim a blob for any namespace).
    """
    conn.executescript(
        """
        CREATE TABLE IF NOT EXISTS blobs (
            ns         TEXT NOT NULL,       -- namespace ('' = raw store)
            digest     TEXT NOT NULL,       -- 'sha256:<hex>'
            size       INTEGER NOT NULL,    -- bytes, as committed
            created_ns INTEGER NOT NULL,    -- commit time (CreatedAt)
            updated_ns INTEGER NOT NULL,    -- last label change (UpdatedAt)
            PRIMARY KEY (ns, digest)
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS blobs_by_digest ON blobs(digest);
        CREATE TABLE IF NOT EXISTS labels (
            ns     TEXT NOT NULL,
            digest TEXT NOT NULL,           -- blob the label belongs to
            key    TEXT NOT NULL,
            value  TEXT NOT NULL,           -- never empty: empty means removed
            PRIMARY KEY (ns, digest, key)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS ingests (
            ref      TEXT PRIMARY KEY,      -- the backend ref (namespace-qualified)
            expected TEXT,                  -- digest hint for commit, or NULL
            labels   TEXT NOT NULL          -- JSON object: labels to give the blob at commit
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS leases (
            ns         TEXT NOT NULL,
            id         TEXT NOT NULL,
            created_ns INTEGER NOT NULL,
            labels     TEXT NOT NULL,       -- JSON object
            PRIMARY KEY (ns, id)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS lease_resources (
            ns    TEXT NOT NULL,
            lease TEXT NOT NULL,
            type  TEXT NOT NULL,            -- 'content' (a digest) or 'ingests' (a ref)
            id    TEXT NOT NULL,
            PRIMARY KEY (ns, lease, type, id)
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS lease_resources_by_id ON lease_resources(ns, type, id);
        CREATE TABLE IF NOT EXISTS gc_doomed (
            digest TEXT PRIMARY KEY         -- blob files gc unlinks unless claimed again
        ) WITHOUT ROWID;
        """
    )


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a database to SCHEMA_VERSION in place, in one transaction (several processes
    may open the store at once: the first migrates, the others find it done).

    Version 0 (before namespaces) had ``blobs(digest, ...)`` and ``labels(digest, key,
    value)``: every row becomes namespace ``default``'s, so no label is lost.
    """
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    level = conn.isolation_level
    conn.isolation_level = None
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = "blobs" in {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if old and "ns" not in _columns(conn, "blobs"):
                log.info("metadata database: moving labels into namespace 'default'")
                conn.execute("ALTER TABLE blobs RENAME TO blobs_v0")
                conn.execute("ALTER TABLE labels RENAME TO labels_v0")
                conn.execute("DROP INDEX IF EXISTS blobs_by_digest")
            for stmt in _split_script(conn):
                conn.execute(stmt)
            if old and "blobs_v0" in {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}:
                conn.execute(
                    "INSERT OR IGNORE INTO blobs(ns, digest, size, created_ns, updated_ns)"
                    " SELECT 'default', digest, size, created_ns, updated_ns FROM blobs_v0")
                conn.execute(
                    "INSERT OR IGNORE INTO labels(ns, digest, key, value)"
                    " SELECT 'default', digest, key, value FROM labels_v0")
                conn.execute("DROP TABLE blobs_v0")
                conn.execute("DROP TABLE labels_v0")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.isolation_level = level


def _split_script(conn: sqlite3.Connection) -> list[str]:
    """create_tables as single statements (executescript would commit our transaction)."""
    mem = sqlite3.connect(":memory:")
    create_tables(mem)
    out = [sql for (sql,) in mem.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid")]
    mem.close()
    return [s.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ", 1)
             .replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1) for s in out]


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
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as exc:  # e.g. locked exclusively by another
                conn.close()
                raise _db_error(self.path, exc) from None
            if version < SCHEMA_VERSION:
                # an older store that cannot be migrated in place: migrate a copy in memory
                mem = sqlite3.connect(":memory:", check_same_thread=False)
                conn.backup(mem)
                conn.close()
                migrate(mem)
                return mem
            return conn
        ensure_dir(os.path.dirname(self.path), 0o700)
        for attempt in (1, 2):
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                migrate(conn)
                # touch every table's pages, so corruption is found (and the database
                # rebuilt) here rather than in the middle of a later request
                for table in ("blobs", "labels", "ingests", "leases", "lease_resources"):
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

    def change_stamp(self) -> tuple[object, int, int]:
        """Equal stamps mean no row changed in between: not through this handle
        (its connection's total_changes), not through any other connection or process
        (SQLite's data_version), and the file was not replaced (reopened). Cheap: for
        callers that cache what they read."""
        with self._tx() as c:
            (version,) = c.execute("PRAGMA data_version").fetchone()
            return self._ident, int(version), c.total_changes

    # blobs ---------------------------------------------------------------------------

    def get_blob(self, ns: str, digest: str) -> BlobRow | None:
        with self._tx() as c:
            row = c.execute(
                "SELECT size, created_ns, updated_ns FROM blobs WHERE ns = ? AND digest = ?",
                (ns, digest),
            ).fetchone()
            if row is None:
                return None
            labels = dict(c.execute(
                "SELECT key, value FROM labels WHERE ns = ? AND digest = ?", (ns, digest)))
        return row[0], row[1], row[2], labels

    def committed_size(self, digest: str) -> int | None:
        """The size recorded for ``digest`` at commit, in any namespace (the same in all:
        it is the content's), or None if no namespace has a row."""
        with self._tx() as c:
            row = c.execute("SELECT size FROM blobs WHERE digest = ? LIMIT 1",
                            (digest,)).fetchone()
        return None if row is None else int(row[0])

    def get_blob_times(self, ns: str, digests: list[str]) -> dict[str, tuple[int, int, int]]:
        """(size, created_ns, updated_ns) of those ``digests`` that have a row; no labels.
        For listings: one query per batch instead of one per blob."""
        with self._tx() as c:
            return {
                d: (size, cr, up)
                for d, size, cr, up in _select_in(
                    c, "SELECT digest, size, created_ns, updated_ns FROM blobs", digests,
                    "ns = ?", (ns,),
                )
            }

    def get_blob_times_between(self, ns: str, first: str,
                               last: str) -> list[tuple[str, int, int, int]]:
        """(digest, size, created_ns, updated_ns) of the rows with ``first <= digest <=
        last``, in digest order: one range scan of the primary key, for a run of a sorted
        listing (cheaper than ``digest IN`` of each)."""
        with self._tx() as c:
            return c.execute(
                "SELECT digest, size, created_ns, updated_ns FROM blobs"
                " WHERE ns = ? AND digest BETWEEN ? AND ? ORDER BY digest",
                (ns, first, last)).fetchall()

    def blobs_updated_since(self, ns: str, since: int) -> list[tuple[str, int, int]]:
        """(digest, created_ns, updated_ns) of blobs whose UpdatedAt is after ``since``: what
        changed since then (a mount looks for labels set by other processes)."""
        with self._tx() as c:
            return list(c.execute(
                "SELECT digest, created_ns, updated_ns FROM blobs"
                " WHERE ns = ? AND updated_ns > ?", (ns, since)))

    def get_blobs(self, ns: str, digests: list[str]) -> dict[str, BlobRow]:
        """Rows, with labels, of those ``digests`` that have one: a batch of a listing,
        so walking many blobs never holds every row at once."""
        with self._tx() as c:
            out: dict[str, BlobRow] = {
                d: (size, cr, up, {})
                for d, size, cr, up in _select_in(
                    c, "SELECT digest, size, created_ns, updated_ns FROM blobs", digests,
                    "ns = ?", (ns,),
                )
            }
            for d, k, v in _select_in(
                c, "SELECT digest, key, value FROM labels", digests, "ns = ?", (ns,)
            ):
                if d in out:
                    out[d][3][k] = v
        return out

    def claimed(self, digests: list[str]) -> set[str]:
        """Those ``digests`` held by some namespace, or about to be unlinked by gc (the
        others are unclaimed: they show in namespace ``default``)."""
        with self._tx() as c:
            out = {d for (d,) in _select_in(
                c, "SELECT DISTINCT digest FROM blobs", digests, "ns != ''", ())}
            out.update(d for (d,) in _select_in(c, "SELECT digest FROM gc_doomed", digests))
        return out

    def holders(self, digest: str) -> list[str]:
        """Namespaces (and '' for the raw store) with a record of ``digest``."""
        with self._tx() as c:
            return [ns for (ns,) in c.execute(
                "SELECT ns FROM blobs WHERE digest = ?", (digest,))]

    def put_blob(
        self, ns: str, digest: str, size: int, now_ns: int, labels: Mapping[str, str],
        *, lease: str | None = None, ingest_ref: str | None = None,
    ) -> None:
        """Record a fresh commit: times = now, labels replace any stale ones. With a
        ``lease``, the blob joins it (and ``ingest_ref`` leaves it), in the same
        transaction."""
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO blobs(ns, digest, size, created_ns, updated_ns)"
                " VALUES (?, ?, ?, ?, ?)",
                (ns, digest, size, now_ns, now_ns),
            )
            c.execute("DELETE FROM labels WHERE ns = ? AND digest = ?", (ns, digest))
            c.executemany(
                "INSERT INTO labels(ns, digest, key, value) VALUES (?, ?, ?, ?)",
                [(ns, digest, k, v) for k, v in labels.items() if v],
            )
            c.execute("DELETE FROM gc_doomed WHERE digest = ?", (digest,))
            if lease is not None:
                _lease_move(c, ns, lease, ingest_ref, digest)

    def update_labels(
        self,
        ns: str,
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
                "INSERT INTO blobs(ns, digest, size, created_ns, updated_ns)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(ns, digest) DO UPDATE SET updated_ns = excluded.updated_ns",
                (ns, digest, size, created_ns, now_ns),
            )
            c.execute("DELETE FROM gc_doomed WHERE digest = ?", (digest,))
            if replace is not None:
                c.execute("DELETE FROM labels WHERE ns = ? AND digest = ?", (ns, digest))
                c.executemany(
                    "INSERT INTO labels(ns, digest, key, value) VALUES (?, ?, ?, ?)",
                    [(ns, digest, k, v) for k, v in replace.items() if v],
                )
            for k, v in changes.items():
                if v:
                    c.execute(
                        "INSERT OR REPLACE INTO labels(ns, digest, key, value)"
                        " VALUES (?, ?, ?, ?)",
                        (ns, digest, k, v),
                    )
                else:
                    c.execute("DELETE FROM labels WHERE ns = ? AND digest = ? AND key = ?",
                              (ns, digest, k))
            row = c.execute(
                "SELECT size, created_ns, updated_ns FROM blobs WHERE ns = ? AND digest = ?",
                (ns, digest),
            ).fetchone()
            labels = dict(c.execute(
                "SELECT key, value FROM labels WHERE ns = ? AND digest = ?", (ns, digest)))
        return row[0], row[1], row[2], labels

    def delete_blob(self, ns: str, digest: str, *, lease: str | None = None) -> list[str]:
        """Remove ``ns``'s record (and from ``lease``); return who still holds the blob."""
        with self._tx() as c:
            c.execute("DELETE FROM blobs WHERE ns = ? AND digest = ?", (ns, digest))
            c.execute("DELETE FROM labels WHERE ns = ? AND digest = ?", (ns, digest))
            if lease is not None:
                c.execute(
                    "DELETE FROM lease_resources WHERE ns = ? AND lease = ? AND type = 'content'"
                    " AND id = ?", (ns, lease, digest))
            return [n for (n,) in c.execute("SELECT ns FROM blobs WHERE digest = ?", (digest,))]

    def digests_of(self, ns: str) -> set[str]:
        """Every digest ``ns`` has a record of."""
        with self._tx() as c:
            return {d for (d,) in c.execute("SELECT digest FROM blobs WHERE ns = ?", (ns,))}

    def hidden_from(self, ns: str) -> set[str]:
        """Digests some other namespace holds and ``ns`` does not (for ``default``: the
        claimed files it does not see), and those gc is about to unlink."""
        with self._tx() as c:
            return {d for (d,) in c.execute(
                "SELECT DISTINCT digest FROM blobs WHERE ns NOT IN ('', ?)"
                " EXCEPT SELECT digest FROM blobs WHERE ns = ?"
                " UNION SELECT digest FROM gc_doomed", (ns, ns))}

    def namespaces(self) -> set[str]:
        """Namespaces with a blob record or a lease."""
        with self._tx() as c:
            out = {n for (n,) in c.execute("SELECT DISTINCT ns FROM blobs")}
            out.update(n for (n,) in c.execute("SELECT DISTINCT ns FROM leases"))
        out.discard(RAW)
        return out

    # ingests -------------------------------------------------------------------------
    # A ref that is not valid UTF-8 (a legacy ingest made by hand) cannot be stored in
    # SQLite's TEXT: it has no row, and LocalStore refuses to record hints for it.

    def get_ingest(self, ref: str) -> IngestRow:
        if not is_text(ref):
            return None, {}
        with self._tx() as c:
            row = c.execute("SELECT expected, labels FROM ingests WHERE ref = ?", (ref,)).fetchone()
        if row is None:
            return None, {}
        return row[0], json.loads(row[1])

    def ingest_expects(self, digest: str) -> bool:
        """True if some ingest records ``digest`` as its expected digest."""
        with self._tx() as c:
            return c.execute("SELECT 1 FROM ingests WHERE expected = ? LIMIT 1",
                             (digest,)).fetchone() is not None

    def put_ingest(self, ref: str, expected: str | None, labels: Mapping[str, str]) -> None:
        if not is_text(ref):
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
        if not is_text(ref):
            return
        with self._tx() as c:
            c.execute("DELETE FROM ingests WHERE ref = ?", (ref,))

    def rename_ingest(self, old: str, new: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM ingests WHERE ref = ?", (new,))
            if is_text(old):
                c.execute("UPDATE ingests SET ref = ? WHERE ref = ?", (new, old))


    # leases --------------------------------------------------------------------------

    def create_lease(self, ns: str, lease: str, now_ns: int, labels: Mapping[str, str]) -> bool:
        """False if ``ns`` already has a lease ``lease``."""
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO leases(ns, id, created_ns, labels) VALUES (?, ?, ?, ?)",
                (ns, lease, now_ns, json.dumps(dict(labels), sort_keys=True)))
            return cur.rowcount == 1

    def get_lease(self, ns: str, lease: str) -> LeaseRow | None:
        with self._tx() as c:
            row = c.execute("SELECT id, created_ns, labels FROM leases WHERE ns = ? AND id = ?",
                            (ns, lease)).fetchone()
        return None if row is None else (row[0], row[1], json.loads(row[2]))

    def list_leases(self, ns: str) -> list[LeaseRow]:
        with self._tx() as c:
            rows = c.execute(
                "SELECT id, created_ns, labels FROM leases WHERE ns = ? ORDER BY id", (ns,)
            ).fetchall()
        return [(i, cr, json.loads(lb)) for i, cr, lb in rows]

    def delete_lease(self, ns: str, lease: str) -> bool:
        """False if there was no such lease."""
        with self._tx() as c:
            cur = c.execute("DELETE FROM leases WHERE ns = ? AND id = ?", (ns, lease))
            c.execute("DELETE FROM lease_resources WHERE ns = ? AND lease = ?", (ns, lease))
            return cur.rowcount == 1

    def lease_resources(self, ns: str, lease: str) -> list[tuple[str, str]]:
        """(type, id) of a lease's resources."""
        with self._tx() as c:
            return list(c.execute(
                "SELECT type, id FROM lease_resources WHERE ns = ? AND lease = ?"
                " ORDER BY type, id", (ns, lease)))

    def add_lease_resource(self, ns: str, lease: str, rtype: str, rid: str) -> bool:
        """False if the lease does not exist."""
        with self._tx() as c:
            if c.execute("SELECT 1 FROM leases WHERE ns = ? AND id = ?",
                         (ns, lease)).fetchone() is None:
                return False
            c.execute("INSERT OR IGNORE INTO lease_resources(ns, lease, type, id)"
                      " VALUES (?, ?, ?, ?)", (ns, lease, rtype, rid))
            return True

    def delete_lease_resource(self, ns: str, lease: str, rtype: str, rid: str) -> bool:
        """False if the lease does not exist."""
        with self._tx() as c:
            if c.execute("SELECT 1 FROM leases WHERE ns = ? AND id = ?",
                         (ns, lease)).fetchone() is None:
                return False
            c.execute("DELETE FROM lease_resources WHERE ns = ? AND lease = ? AND type = ?"
                      " AND id = ?", (ns, lease, rtype, rid))
            return True

    def move_lease_ingest(self, ns: str, old: str, new: str) -> None:
        """An ingest renamed in ``ns``: its lease entries follow it (a legacy ref that is
        not text has none)."""
        if not is_text(old):
            return
        with self._tx() as c:
            c.execute("UPDATE OR REPLACE lease_resources SET id = ?"
                      " WHERE ns = ? AND type = 'ingests' AND id = ?", (new, ns, old))

    def drop_lease_ingest(self, ns: str, ref: str) -> None:
        if not is_text(ref):
            return
        with self._tx() as c:
            c.execute("DELETE FROM lease_resources WHERE ns = ? AND type = 'ingests'"
                      " AND id = ?", (ns, ref))

    # garbage collection --------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken at once (BEGIN IMMEDIATE): other writers wait until
        it ends. For gc's mark and sweep of records."""
        with self._lock:
            conn = self._current()
            level = conn.isolation_level
            conn.isolation_level = None
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as exc:
                raise _db_error(self.path, exc) from None
            finally:
                conn.isolation_level = level

    @contextmanager
    def snapshot(self) -> Iterator[tuple[sqlite3.Connection, Callable[[], bool]]]:
        """A read snapshot on a connection of its own (nobody waits for it), and a check
        that tells, later (e.g. under ``exclusive``), whether anyone has committed a
        change to the database since the snapshot began."""
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10,
                               isolation_level=None)
        try:
            conn.execute("BEGIN")
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            conn.execute("SELECT count(*) FROM blobs").fetchone()  # the snapshot starts here

            def unchanged() -> bool:
                if conn.in_transaction:  # end the snapshot: data_version is read outside
                    conn.execute("COMMIT")
                return bool(conn.execute("PRAGMA data_version").fetchone()[0] == version)

            try:
                yield conn, unchanged
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise _db_error(self.path, exc) from None
        finally:
            conn.close()

    def doomed(self) -> list[str]:
        with self._tx() as c:
            return [d for (d,) in c.execute("SELECT digest FROM gc_doomed ORDER BY digest")]

    def undoom(self, digest: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM gc_doomed WHERE digest = ?", (digest,))


def _lease_move(
    c: sqlite3.Connection, ns: str, lease: str, ingest_ref: str | None, digest: str
) -> None:
    if ingest_ref is not None and is_text(ingest_ref):
        c.execute("DELETE FROM lease_resources WHERE ns = ? AND lease = ? AND type = 'ingests'"
                  " AND id = ?", (ns, lease, ingest_ref))
    if c.execute("SELECT 1 FROM leases WHERE ns = ? AND id = ?", (ns, lease)).fetchone():
        c.execute("INSERT OR IGNORE INTO lease_resources(ns, lease, type, id)"
                  " VALUES (?, ?, 'content', ?)", (ns, lease, digest))


class NsMetadata:
    """The metadata of one namespace (or of the raw store, ``ns`` = '')."""

    def __init__(self, db: MetadataDB, ns: str) -> None:
        self.meta = db
        self.ns = ns

    def get_blob(self, digest: str) -> BlobRow | None:
        return self.meta.get_blob(self.ns, digest)

    def get_blobs(self, digests: list[str]) -> dict[str, BlobRow]:
        return self.meta.get_blobs(self.ns, digests)

    def get_blob_times(self, digests: list[str]) -> dict[str, tuple[int, int, int]]:
        return self.meta.get_blob_times(self.ns, digests)

    def get_blob_times_between(self, first: str,
                               last: str) -> list[tuple[str, int, int, int]]:
        return self.meta.get_blob_times_between(self.ns, first, last)

    def blobs_updated_since(self, since: int) -> list[tuple[str, int, int]]:
        return self.meta.blobs_updated_since(self.ns, since)

    def put_blob(
        self, digest: str, size: int, now_ns: int, labels: Mapping[str, str]
    ) -> None:
        self.meta.put_blob(self.ns, digest, size, now_ns, labels)

    def update_labels(
        self, digest: str, size: int, created_ns: int, now_ns: int,
        replace: Mapping[str, str] | None, changes: Mapping[str, str],
    ) -> BlobRow:
        return self.meta.update_labels(
            self.ns, digest, size, created_ns, now_ns, replace, changes)

    def delete_blob(self, digest: str) -> list[str]:
        return self.meta.delete_blob(self.ns, digest)

    def get_ingest(self, ref: str) -> IngestRow:
        return self.meta.get_ingest(ref)

    def put_ingest(self, ref: str, expected: str | None, labels: Mapping[str, str]) -> None:
        self.meta.put_ingest(ref, expected, labels)

    def delete_ingest(self, ref: str) -> None:
        self.meta.delete_ingest(ref)

    def rename_ingest(self, old: str, new: str) -> None:
        self.meta.rename_ingest(old, new)

    def close(self) -> None:
        self.meta.close()


def _select_in(
    c: sqlite3.Connection, select: str, digests: list[str], extra: str = "",
    params: tuple[Any, ...] = (), batch: int = 500,
) -> Iterator[tuple[Any, ...]]:
    """Rows of ``select ... WHERE [extra AND] digest IN (...)`` over ``digests``, in
    batches that stay under SQLite's limit on bound parameters."""
    cond = f"{extra} AND " if extra else ""
    for i in range(0, len(digests), batch):
        chunk = digests[i : i + batch]
        marks = ",".join("?" * len(chunk))
        yield from c.execute(f"{select} WHERE {cond}digest IN ({marks})", (*params, *chunk))


