"""Extended attributes: labels as ``user.<key>``, status as ``user.contentfs.<field>``.

A blob's labels are its store labels; an ingest's are the labels recorded for its
commit. ``user.contentfs.*`` names are reserved: readable by name (digest, size, times,
offset, total, expected, error), never listed; on an ingest, ``commit``, ``expected``
and ``total`` can be set; other reserved writes are accepted and ignored, so copies of
ingests round-trip. A label over 4096 bytes (key plus value) is E2BIG.
"""

from __future__ import annotations

import errno
import logging

from store import Info, NotFound
from store.api import Store
from store.labels import MAX_LABEL_SIZE, label_size
from store.types import format_time, to_ns

from . import offload
from .blobcache import BlobCache
from .errors import fuse_errors, refuse
from .ingests import Ingests
from .kernel import invalidate_inode
from .view import Kind, Node

__all__ = ["RESERVED", "Xattrs"]

log = logging.getLogger("fusefs")

RESERVED = "contentfs."


class Xattrs:
    """Reading and changing the extended attributes of blobs and ingests."""

    def __init__(self, store: Store, blobs: BlobCache, ingests: Ingests) -> None:
        self.store = store
        self.blobs = blobs
        self.ingests = ingests
        self.inline = blobs.inline  # store calls on the trio thread (see offload)

    async def _info(self, digest: str) -> Info:
        return await offload.call(self.inline, self.store.info, digest)

    async def get(self, node: Node, key: str) -> str | None:
        """The value of ``user.<key>``; None if it has none."""
        if key.startswith(RESERVED):
            return await self._reserved(node, key[len(RESERVED):])
        return (await self.labels(node)).get(key)

    async def labels(self, node: Node) -> dict[str, str]:
        """The labels of a blob or an ingest (none for anything else)."""
        with fuse_errors(f"labels of {node.key}"):
            if node.kind is Kind.BLOB:
                return dict((await self._info(node.key)).labels)
            if node.kind is Kind.INGEST:
                if not await self.ingests.exists(node.key):
                    raise NotFound(f"ingest {node.key}")
                return self.ingests.hints(node.key)[1]
        return {}

    async def _reserved(self, node: Node, field: str) -> str | None:
        """``user.contentfs.<field>``: status readable by name, never listed."""
        with fuse_errors(f"status of {node.key}"):
            if node.kind is Kind.BLOB:
                info = await self._info(node.key)
                return {
                    "digest": info.digest,
                    "size": str(info.size),
                    "createdat": format_time(to_ns(info.created_at)),
                    "updatedat": format_time(to_ns(info.updated_at)),
                }.get(field)
            if node.kind is not Kind.INGEST:
                return None
            ref = node.key
            if field == "error":
                return self.ingests.errors.get(ref)
            if field == "digest":
                return await self.ingests.digest(ref)
            st = await self.ingests.status(ref)
            return {
                "offset": str(st.offset),
                "total": str(st.total),
                "expected": st.expected or "",
                "startedat": format_time(to_ns(st.started_at)),
                "updatedat": format_time(to_ns(st.updated_at)),
            }.get(field)

    async def set(self, node: Node, key: str, value: str) -> None:
        """Set ``user.<key>`` on a blob or an ingest (the caller checked the kind)."""
        if key.startswith(RESERVED):
            await self.set_reserved(node, key[len(RESERVED):], value)
            return
        check_label_size(key, value)
        await self.change_label(node, key, value)

    async def change_label(self, node: Node, key: str, value: str) -> None:
        """Set label ``key`` (an empty value removes it) on a blob or an ingest."""
        with fuse_errors(f"label {key} of {node.key}"):
            if node.kind is Kind.BLOB:
                info = await self._info(node.key)
                change = Info(info.digest, info.size, info.created_at, info.updated_at,
                              {key: value})
                await offload.call(self.inline, self.store.update, change, f"labels.{key}")
                self.blobs.drop(node.ino)
                # ctime (UpdatedAt) changed: drop the kernel's cached attributes
                invalidate_inode(node.ino, node.key)
                return
            ref = node.key
            if not await self.ingests.exists(ref):
                raise NotFound(f"ingest {ref}")
            labels = self.ingests.hints(ref)[1]
            if value:
                labels[key] = value
            else:
                labels.pop(key, None)
            await self.ingests.set_hints(ref, labels=labels)

    async def set_reserved(self, node: Node, field: str, value: str) -> None:
        """``user.contentfs.<field>`` on an ingest (``node`` is not a blob)."""
        ref = node.key
        with fuse_errors(f"set contentfs.{field} on ingest {ref}"):
            if field == "commit":
                await self.ingests.commit_by_xattr(ref, value.strip() or None)
            elif field == "expected":
                if value.strip():
                    await self.ingests.set_hints(ref, expected=value.strip())
                else:
                    await self.ingests.set_hints(ref, clear_expected=True)
            elif field == "total":
                try:
                    total = int(value.strip() or "0")
                except ValueError:
                    raise refuse(errno.EINVAL, f"ingest {ref}: total {value!r} is not a"
                                 " number") from None
                self.ingests.set_total(ref, total)
            # other reserved names are informational: writes are accepted and ignored, so
            # copies of ingests round-trip

    async def remove_reserved(self, node: Node, field: str) -> None:
        """Removing ``user.contentfs.<field>`` from an ingest: ``expected`` and
        ``total`` are cleared; other names are accepted and ignored."""
        if field == "expected":
            with fuse_errors(f"clear expected of ingest {node.key}"):
                await self.ingests.set_hints(node.key, clear_expected=True)
        elif field == "total":
            await self.set_reserved(node, "total", "0")


def check_label_size(key: str, value: str) -> None:
    """E2BIG for a label over containerd's limit (key plus value, UTF-8 bytes)."""
    size = label_size(key, value)
    if size > MAX_LABEL_SIZE:
        raise refuse(errno.E2BIG, f"label {key[:64]}: key and value are {size} bytes,"
                     f" more than {MAX_LABEL_SIZE}")

