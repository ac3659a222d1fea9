"""containerd's local layout: pure path arithmetic, no I/O.

    ROOT/blobs/<alg>/<hex>                 committed blobs
    ROOT/ingest/<sha256(ref)>/data|ref|startedat|updatedat|total
    ROOT/.contentfs/meta.db                labels and times (SQLite, WAL)
    ROOT/.contentfs/locks/<sha256(ref)>    cross-process ref locks
"""

from __future__ import annotations

import hashlib
import os

from .digest import Digest, split_digest

__all__ = ["Layout"]


class Layout:
    """Paths under one store root."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.blobs = os.path.join(self.root, "blobs")
        self.ingest = os.path.join(self.root, "ingest")
        self.private = os.path.join(self.root, ".contentfs")
        self.db = os.path.join(self.private, "meta.db")
        self.locks = os.path.join(self.private, "locks")

    def blob_dir(self, algorithm: str) -> str:
        return os.path.join(self.blobs, algorithm)

    def blob_path(self, digest: Digest) -> str:
        alg, hexpart = split_digest(digest)
        return os.path.join(self.blobs, alg, hexpart)

    @staticmethod
    def ref_key(ref: str) -> str:
        """The ingest directory name for ``ref``: hex SHA-256 of its UTF-8 bytes."""
        return hashlib.sha256(ref.encode("utf-8", "surrogateescape")).hexdigest()

    def ingest_dir(self, ref: str) -> str:
        return os.path.join(self.ingest, self.ref_key(ref))

    def lock_path(self, ref: str) -> str:
        return os.path.join(self.locks, self.ref_key(ref))

    def commit_lock_path(self, digest: Digest) -> str:
        """The lock that serialises the commits, deletes and gc unlinks of one digest,
        in any thread or process (NUL cannot occur in a ref)."""
        return self.lock_path(f"\0commit {digest}")
