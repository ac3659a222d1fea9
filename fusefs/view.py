"""The filesystem view as a pure, synchronous model: inodes, names, attributes.

No pyfuse3 and no trio here (``ops`` adapts this to FUSE). The tree (README, "The
filesystem")::

    /                      ROOT_INO
      blobs/               BLOBS_INO
        sha256/ ...        one ALG directory per supported algorithm
          <hex>            BLOB: inode derived from the digest, stable across mounts
      ingest/              INGEST_INO
        <name>             INGEST: percent-encoded ref, inode numbered per mount
      oci-layout           only when the root is an OCI image layout
      index.json

Inode numbers: fixed ones are small; blob inodes have the top bits ``01`` and come
from the digest (so ``st_ino`` survives remounts); ingest inodes have the top bits
``10`` and a per-mount counter (a committed ingest's inode becomes a blob node, so an
ingest's number is never reused for another ref).
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import enum
import hashlib
import os
import stat
from typing import Any

from store import ALGORITHMS, Info
from store.digest import is_hex_name

__all__ = [
    "BLKSIZE",
    "Attr",
    "BlobListing",
    "BlobRows",
    "Kind",
    "Node",
    "NodeTable",
    "decode_name",
    "encode_ref",
    "index_inos",
    "is_blob_name",
]

ROOT_INO = 1
BLOBS_INO = 2
INGEST_INO = 3
OCI_LAYOUT_INO = 4
INDEX_JSON_INO = 5
_ALG_BASE = 16
LAYOUT_FILES = {"oci-layout": OCI_LAYOUT_INO, "index.json": INDEX_JSON_INO}

BLKSIZE = 1 << 20
#: Blobs never change: let the kernel keep their entries and attributes for long.
#: Deletions by other processes are pushed to the kernel by the root watcher.
BLOB_TIMEOUT = 3600.0
#: Ingests change under writes and from other processes.
INGEST_TIMEOUT = 1.0
#: Misses in blobs/<alg>/ are invalidated on commit, and by the root watcher when another
#: process adds a blob: cache them as long as blob entries.
NEGATIVE_TIMEOUT = BLOB_TIMEOUT
DIR_TIMEOUT = 3600.0
LAYOUT_TIMEOUT = 1.0

_BLOB_TAG = 1 << 62
_INGEST_TAG = 2 << 62
_LOW_62 = (1 << 62) - 1


class Kind(enum.Enum):
    ROOT = "root"
    BLOBS = "blobs"
    ALG = "alg"
    INGEST_DIR = "ingest-dir"
    LAYOUT_FILE = "layout-file"
    BLOB = "blob"
    INGEST = "ingest"


DIR_KINDS = frozenset({Kind.ROOT, Kind.BLOBS, Kind.ALG, Kind.INGEST_DIR})


@dataclasses.dataclass(slots=True)
class Node:
    """One inode the kernel knows. ``key``: the algorithm (ALG), digest (BLOB), ref
    (INGEST) or file name (LAYOUT_FILE). ``lookups`` counts the kernel's references."""

    ino: int
    kind: Kind
    key: str = ""
    lookups: int = 0

    @property
    def is_dir(self) -> bool:
        return self.kind in DIR_KINDS


@dataclasses.dataclass
class Attr:
    """What ``stat`` shows for a node, plus how long the kernel may cache it."""

    ino: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    blocks: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    timeout: float = INGEST_TIMEOUT


def encode_ref(ref: str) -> str:
    """The file name of an ingest: ``%`` and ``/`` percent-encoded, nothing else."""
    return ref.replace("%", "%25").replace("/", "%2F")


def decode_name(name: str) -> str | None:
    """The ref named by ``name``, or None if ``name`` is not in canonical form (a ``%``
    not followed by ``25`` or ``2F``), so that each ingest has exactly one name."""
    if "/" in name or not name:
        return None
    ref = name.replace("%2F", "/").replace("%25", "%")
    return ref if encode_ref(ref) == name else None


def is_blob_name(algorithm: str, name: str) -> bool:
    """True if ``name`` is a well-formed hex digest for ``algorithm``."""
    return is_hex_name(algorithm, name)


def blob_ino(digest: str) -> int:
    """Stable inode number of a blob: 62 bits of its digest, tagged."""
    hexpart = digest.partition(":")[2]
    return _BLOB_TAG | (int(hexpart[:16], 16) & _LOW_62)


def hex_ino(hexname: str) -> int:
    """``blob_ino`` of a digest given by its hex part (any algorithm)."""
    return _BLOB_TAG | (int(hexname[:16], 16) & _LOW_62)


def dir_key(name: str) -> int:
    """A readdir cursor for ``name``: 60 bits of a hash, positive, never 0."""
    return (int(hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:15], 16)
            | 1)


def hex_key(hexname: str) -> int:
    """A readdir cursor for a blob name that sorts like the name (60 bits of it)."""
    return int(hexname[:15], 16) + 1


@dataclasses.dataclass(frozen=True, slots=True)
class BlobListing:
    """The blob names of one ``blobs/<alg>/``, sorted, shared by every open of it until
    the directory changes: ``names`` is their concatenation (each ``width`` bytes),
    ``inos`` their inodes. About 100 bytes per blob."""

    stamp: object  # the store's blob_names_stamp when the names were read (None: walked)
    width: int
    names: bytes
    inos: array.array[int]
    keys: array.array[int]  # readdir cursors (``view.hex_key``: ascending like the names)
    infos: dict[int, Info] | None = None  # by inode, when the listing came from a walk
    # rows by inode: an open-addressing table of ``row + 1`` (0: empty) at ``ino % len``
    # onwards, twice as long as the listing (8 B per blob), built by ``index_inos``
    index: array.array[int] = dataclasses.field(default_factory=lambda: array.array("I"))

    def __len__(self) -> int:
        return len(self.inos)

    def row_of(self, ino: int) -> int:
        """The row of inode ``ino``, or -1."""
        index, inos = self.index, self.inos
        size = len(index)
        if not size:
            return -1
        s = ino % size
        while r := index[s]:
            if inos[r - 1] == ino:
                return r - 1
            s = s + 1 if s + 1 < size else 0
        return -1

    def name(self, j: int) -> bytes:
        return self.names[j * self.width:(j + 1) * self.width]


def index_inos(inos: array.array[int]) -> array.array[int]:
    """The ``BlobListing.index`` of ``inos`` (about 1 s per million, in a worker)."""
    size = 2 * len(inos) + 1
    index = array.array("I", bytes(4 * size))
    for r, ino in enumerate(inos, 1):
        s = ino % size
        while index[s]:
            s = s + 1 if s + 1 < size else 0
        index[s] = r
    return index


class BlobRows:
    """The blobs of one listing of ``blobs/<alg>/`` as a compact table, one row per name
    (in the listing's order): the kernel's lookup count of the blob and its attributes
    once read (``have``). About 50 bytes a row beside the listing's 80: no object per
    blob, so a million blobs the kernel holds cost ~130 MB, not ~700.

    Rows are found by inode (:meth:`find`, four bisections of the listing's cursors).
    When ``blobs/<alg>/`` is listed afresh, the new table takes over the rows of the old
    one whose names it still has (:meth:`adopt`)."""

    __slots__ = ("alg", "blocks", "created", "gid", "have", "listing", "lookups", "nreplies",
                 "replies", "size", "uid", "updated")

    def __init__(self, alg: str, listing: BlobListing) -> None:
        n = len(listing)
        self.alg = alg
        self.listing = listing
        self.lookups = array.array("I", bytes(4 * n))  # the kernel's references
        self.have = bytearray(n)  # 1: the attributes below are the blob's; 2: and sent
        self.size = array.array("q", bytes(8 * n))
        self.blocks = array.array("q", bytes(8 * n))
        self.created = array.array("q", bytes(8 * n))
        self.updated = array.array("q", bytes(8 * n))  # ctime: max(updated, created)
        self.uid = array.array("I", bytes(4 * n))
        self.gid = array.array("I", bytes(4 * n))
        # replies built from rows, kept for the first REPLIES_KEPT rows sent twice
        # (readdirplus is ~40% cheaper from a kept reply; ~300 B each)
        self.replies: list[Any] = [None] * n
        self.nreplies = 0

    def __len__(self) -> int:
        return len(self.have)

    def find(self, ino: int) -> int:
        """The row of blob inode ``ino``, or -1: through the listing's index if it has
        one, else bisections (the inode keeps 62 of the first 64 bits of the digest and
        the cursor its first 60 bits: try the four top bits)."""
        if self.listing.index:
            return self.listing.row_of(ino)
        keys, inos = self.listing.keys, self.listing.inos
        n = len(keys)
        low = ino & _LOW_62
        for top in (0, 1, 2, 3):
            key = (((top << 62) | low) >> 4) + 1
            i = bisect.bisect_left(keys, key)
            while i < n and keys[i] == key:
                if inos[i] == ino:
                    return i
                i += 1
        return -1

    def digest(self, row: int) -> str:
        return f"{self.alg}:{self.listing.name(row).decode()}"

    def put(self, row: int, attr: Attr) -> None:
        """Keep blob attributes ``attr`` in row ``row``."""
        self.size[row] = attr.size
        self.blocks[row] = attr.blocks
        self.created[row] = attr.mtime_ns
        self.updated[row] = attr.ctime_ns
        self.uid[row] = attr.uid
        self.gid[row] = attr.gid
        self.have[row] = 1
        self.unreply(row)

    def unset(self, row: int) -> None:
        """Forget the attributes of row ``row``."""
        self.have[row] = 0
        self.unreply(row)

    def unreply(self, row: int) -> None:
        if self.replies[row] is not None:
            self.replies[row] = None
            self.nreplies -= 1

    def attr(self, row: int, ino: int, timeout: float) -> Attr:
        """The attributes kept in row ``row`` (``have``)."""
        return Attr(ino, stat.S_IFREG | 0o444, size=self.size[row], uid=self.uid[row],
                    gid=self.gid[row], blocks=self.blocks[row], atime_ns=self.created[row],
                    mtime_ns=self.created[row], ctime_ns=self.updated[row], timeout=timeout)

    def forget_attrs(self) -> None:
        self.have = bytearray(len(self.have))
        self.replies = [None] * len(self.have)
        self.nreplies = 0

    def adopt(self, old: BlobRows) -> list[tuple[int, str, int]]:
        """Take over the lookup counts and attributes of ``old`` (an earlier listing of
        the same directory) for the names both have. Returns ``(ino, digest, lookups)``
        of old rows the kernel holds whose names this listing lacks (deleted blobs).
        Python work is per run of equal names, not per name."""
        w = self.listing.width
        a, b = old.listing.names, self.listing.names
        na, nb = len(old), len(self)
        gone: list[tuple[int, str, int]] = []
        i = j = 0
        cols = ("lookups", "have", "size", "blocks", "created", "updated", "uid", "gid",
                "replies")
        while i < na and j < nb:
            k = _common_run(a, i, b, j, w, min(na - i, nb - j))
            if k:
                for col in cols:
                    getattr(self, col)[j:j + k] = getattr(old, col)[i:i + k]
                i += k
                j += k
                continue
            if a[i * w:(i + 1) * w] < b[j * w:(j + 1) * w]:  # gone from the directory
                if old.lookups[i]:
                    gone.append((old.listing.inos[i], old.digest(i), old.lookups[i]))
                i += 1
            else:  # new in the directory
                j += 1
        gone.extend((old.listing.inos[r], old.digest(r), old.lookups[r])
                    for r in range(i, na) if old.lookups[r])
        self.nreplies = nb - self.replies.count(None)
        return gone


def _common_run(a: bytes, i: int, b: bytes, j: int, w: int, most: int) -> int:
    """How many names (``w`` bytes each) are equal from name ``i`` of ``a`` and ``j`` of
    ``b`` on, at most ``most``: doubling, then bisection of slice compares."""
    def same(k: int) -> bool:
        return a[i * w:(i + k) * w] == b[j * w:(j + k) * w]

    if most <= 0 or not same(1):
        return 0
    lo, hi = 1, 2  # same(lo); find the first k with not same(k)
    while hi <= most and same(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, most + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if same(mid):
            lo = mid
        else:
            hi = mid
    return lo


class NodeTable:
    """The inodes the kernel currently holds, with their lookup counts.

    Fixed inodes are always present; blob and ingest nodes are added on lookup (and
    readdirplus) and dropped when the kernel forgets them. A blob in the current
    listing of its directory is counted in that listing's :class:`BlobRows` (``rows``)
    instead of by a :class:`Node`: :meth:`get` makes a Node for it on demand. A blob
    counted by a Node stays counted there until the kernel forgets it.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, Node] = {}
        self._ingest_by_ref: dict[str, int] = {}
        self._next_ingest = 1
        #: the compact table of each blobs/<alg>/ (its latest listing), by algorithm
        self.rows: dict[str, BlobRows] = {}
        for ino, kind, key in (
            (ROOT_INO, Kind.ROOT, ""),
            (BLOBS_INO, Kind.BLOBS, ""),
            (INGEST_INO, Kind.INGEST_DIR, ""),
            (OCI_LAYOUT_INO, Kind.LAYOUT_FILE, "oci-layout"),
            (INDEX_JSON_INO, Kind.LAYOUT_FILE, "index.json"),
        ):
            self._nodes[ino] = Node(ino, kind, key)
        for i, alg in enumerate(sorted(ALGORITHMS)):
            self._nodes[_ALG_BASE + i] = Node(_ALG_BASE + i, Kind.ALG, alg)

    @property
    def table(self) -> dict[int, Node]:
        """The nodes by inode, for hot loops: read only (blobs counted in ``rows`` are
        not in it)."""
        return self._nodes

    def _row(self, ino: int) -> tuple[BlobRows, int] | None:
        if ino >> 62 != 1:
            return None
        for rows in self.rows.values():
            r = rows.find(ino)
            if r >= 0:
                return rows, r
        return None

    def get(self, ino: int) -> Node | None:
        node = self._nodes.get(ino)
        if node is None and (found := self._row(ino)) is not None:
            rows, r = found
            if rows.lookups[r]:
                return Node(ino, Kind.BLOB, rows.digest(r), rows.lookups[r])
        return node

    def alg_ino(self, algorithm: str) -> int | None:
        for i, alg in enumerate(sorted(ALGORITHMS)):
            if alg == algorithm:
                return _ALG_BASE + i
        return None

    def algorithms(self) -> list[tuple[str, int]]:
        return [(alg, _ALG_BASE + i) for i, alg in enumerate(sorted(ALGORITHMS))]

    def blob(self, digest: str) -> Node:
        """The node for a blob (created if the kernel does not hold one yet)."""
        ino = blob_ino(digest)
        node = self._nodes.get(ino)
        if node is not None and node.kind is Kind.BLOB:
            return node
        rows = self.rows.get(digest.partition(":")[0])
        r = rows.find(ino) if rows is not None else -1
        if rows is not None and r >= 0 and rows.digest(r) == digest:
            return Node(ino, Kind.BLOB, digest, rows.lookups[r])  # counted in its row
        node = Node(ino, Kind.BLOB, digest)
        self._nodes[ino] = node
        return node

    def install(self, rows: BlobRows) -> None:
        """``rows`` is now the table of its directory: it takes over the counts of the
        one before; a blob held by the kernel but no longer listed gets a Node."""
        old = self.rows.get(rows.alg)
        if old is rows:
            return
        if old is not None:
            for ino, digest, n in rows.adopt(old):
                node = self._nodes.get(ino)
                if node is None:
                    self._nodes[ino] = Node(ino, Kind.BLOB, digest, n)
                else:
                    node.lookups += n
        self.rows[rows.alg] = rows

    def ingest(self, ref: str) -> Node:
        """The node for an ingest ref (a fresh number unless the kernel holds one)."""
        ino = self._ingest_by_ref.get(ref)
        if ino is not None and ino in self._nodes:
            return self._nodes[ino]
        ino = _INGEST_TAG | self._next_ingest
        self._next_ingest += 1
        node = Node(ino, Kind.INGEST, ref)
        self._nodes[ino] = node
        self._ingest_by_ref[ref] = ino
        return node

    def ingest_ino(self, ref: str) -> int | None:
        return self._ingest_by_ref.get(ref)

    def rename_ingest(self, old: str, new: str) -> None:
        """Ingest ``old`` is now called ``new``; a node that held ``new`` is orphaned."""
        ino = self._ingest_by_ref.pop(old, None)
        self._ingest_by_ref.pop(new, None)
        if ino is not None and ino in self._nodes:
            self._nodes[ino].key = new
            self._ingest_by_ref[new] = ino

    def committed(self, ref: str, digest: str) -> None:
        """Ingest ``ref`` became blob ``digest``: its node (if any) now shows the blob."""
        ino = self._ingest_by_ref.pop(ref, None)
        if ino is not None and ino in self._nodes:
            node = self._nodes[ino]
            node.kind = Kind.BLOB
            node.key = digest

    def gone(self, ref: str) -> None:
        """Ingest ``ref`` no longer exists: the next create gets a new inode number."""
        self._ingest_by_ref.pop(ref, None)

    def remember(self, node: Node) -> None:
        """The kernel took one more reference to ``node`` (lookup, create, readdirplus)."""
        node.lookups += 1
        held = self._nodes.get(node.ino)
        if held is not None:
            if held is not node:  # a row's copy, and a relisting moved its count to a
                held.lookups += 1  # Node meanwhile (a lookup awaiting a remote store)
            return
        if node.kind is Kind.BLOB and (found := self._row(node.ino)) is not None:
            rows, r = found
            if rows.digest(r) == node.key:
                rows.lookups[r] += 1
                return
        self._nodes[node.ino] = node

    def drop_unused(self, node: Node) -> None:
        """Drop a node created for a reply the kernel did not take."""
        if node.lookups <= 0 and node.kind in (Kind.BLOB, Kind.INGEST):
            self.forget(node.ino, 0)

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None:
            if (found := self._row(ino)) is not None:
                rows, r = found
                rows.lookups[r] -= min(n, rows.lookups[r])
            return
        if node.kind not in (Kind.BLOB, Kind.INGEST):
            return
        node.lookups -= n
        if node.lookups <= 0:
            del self._nodes[ino]
            if node.kind is Kind.INGEST and self._ingest_by_ref.get(node.key) == ino:
                del self._ingest_by_ref[node.key]

    def __contains__(self, ino: int) -> bool:
        return ino in self._nodes or self.get(ino) is not None


def dir_attr(ino: int, st: os.stat_result, *, writable: bool, nlink: int = 2) -> Attr:
    mode = stat.S_IFDIR | (0o755 if writable else 0o555)
    return Attr(ino, mode, size=4096, nlink=nlink, uid=st.st_uid, gid=st.st_gid,
                atime_ns=st.st_mtime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                timeout=DIR_TIMEOUT)


def blob_attr(ino: int, st: os.stat_result, created_ns: int, updated_ns: int) -> Attr:
    """A blob: read-only, mtime = CreatedAt, ctime = UpdatedAt, blocks of the backing file."""
    return Attr(ino, stat.S_IFREG | 0o444, size=st.st_size, uid=st.st_uid, gid=st.st_gid,
                blocks=st.st_blocks, atime_ns=created_ns, mtime_ns=created_ns,
                ctime_ns=max(updated_ns, created_ns), timeout=BLOB_TIMEOUT)


def ingest_attr(ino: int, st: os.stat_result, size: int, mode: int | None) -> Attr:
    """An ingest: its data file's times and blocks; ``size`` is the bytes written so far."""
    perm = mode if mode is not None else 0o644
    return Attr(ino, stat.S_IFREG | (perm & 0o7777), size=size, uid=st.st_uid,
                gid=st.st_gid, blocks=st.st_blocks, atime_ns=st.st_atime_ns,
                mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, timeout=INGEST_TIMEOUT)


def layout_attr(ino: int, st: os.stat_result) -> Attr:
    return Attr(ino, stat.S_IFREG | 0o444, size=st.st_size, uid=st.st_uid, gid=st.st_gid,
                blocks=st.st_blocks, atime_ns=st.st_mtime_ns, mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns, timeout=LAYOUT_TIMEOUT)


def info_attr(ino: int, size: int, created_ns: int, updated_ns: int, uid: int, gid: int,
              timeout: float) -> Attr:
    """A blob of a store that is not files here: from its Info, owned by the mount."""
    return Attr(ino, stat.S_IFREG | 0o444, size=size, uid=uid, gid=gid,
                blocks=(size + 511) // 512, atime_ns=created_ns, mtime_ns=created_ns,
                ctime_ns=max(updated_ns, created_ns), timeout=timeout)


def status_attr(ino: int, size: int, started_ns: int, updated_ns: int, uid: int, gid: int,
                mode: int | None) -> Attr:
    """An ingest of a store that is not files here: from its Status, owned by the mount."""
    perm = mode if mode is not None else 0o644
    return Attr(ino, stat.S_IFREG | (perm & 0o7777), size=size, uid=uid, gid=gid,
                blocks=(size + 511) // 512, atime_ns=updated_ns, mtime_ns=updated_ns,
                ctime_ns=max(updated_ns, started_ns), timeout=INGEST_TIMEOUT)


def synthetic_dir_attr(ino: int, when_ns: int, uid: int, gid: int, *, writable: bool,
                       nlink: int = 2) -> Attr:
    """A directory of a mount with no root directory here (a remote store)."""
    mode = stat.S_IFDIR | (0o755 if writable else 0o555)
    return Attr(ino, mode, size=4096, nlink=nlink, uid=uid, gid=gid, atime_ns=when_ns,
                mtime_ns=when_ns, ctime_ns=when_ns, timeout=DIR_TIMEOUT)
