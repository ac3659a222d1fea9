"""Push a blob and everything it references from a store to a registry (``contentfs
push``, as ``ctr images push`` does for an image), or one object (``push-object``).

The graph is read from the store (an index's manifests, then each manifest's config and
layers); a child that is not in the store is NotFound (``--platform`` limits an index to
the manifests one has). Blobs go first, in parallel: each is skipped when the registry has
it (HEAD), mounted from another repository of the same registry when its distribution
source label names one, else uploaded in one streamed PUT (bounded memory, length and
digest checked by the registry). Manifests follow, children first, the top one under the
reference's tag (or its digest). Nothing in the store changes.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator, Sequence
from urllib.parse import quote

from ..api import Store
from ..errors import DataLoss, InvalidArgument, NotFound
from .client import MANIFEST_ACCEPT, RegistryClient
from .fetch import CHUNK
from .images import (
    SOURCE_PREFIX,
    Descriptor,
    children,
    is_index,
    is_manifest,
    media_type_of,
    parse_platform,
    platform_matches,
)
from .reference import Reference
from .transfer import (
    BlobResult,
    Cancelled,
    NoProgress,
    Progress,
    Transfer,
    TransferResult,
    run_parallel,
)

__all__ = ["PushResult", "push_image", "push_object"]

MAX_MANIFEST = 8 << 20


class PushResult(TransferResult):
    """A push's result (see TransferResult)."""


def _read_small(store: Store, digest: str) -> bytes | None:
    """A blob's bytes if it is small enough to be a manifest, else None."""
    with store.reader_at(digest) as reader:
        if reader.size > MAX_MANIFEST:
            return None
        return reader.read_at(reader.size, 0)


def _chunks(store: Store, digest: str, size: int, progress: Progress, key: str,
            stop: threading.Event | None) -> Iterator[bytes]:
    with store.reader_at(digest) as reader:
        if reader.size != size:
            raise DataLoss(f"content {digest}: {reader.size} bytes in the store, expected {size}")
        offset = 0
        while offset < size:
            if stop is not None and stop.is_set():
                raise Cancelled(key)
            chunk = reader.read_at(min(CHUNK, size - offset), offset)
            if not chunk:
                raise DataLoss(f"content {digest}: ends at {offset} of {size} bytes")
            offset += len(chunk)
            progress.update(key, "uploading", offset, size)
            yield chunk


class _Push(Transfer):
    def has_blob(self, digest: str) -> bool:
        return self.client.exists(f"{self.ref.repository}/blobs/{digest}",
                                  f"blob {self.ref.name}@{digest}")

    def upload(self, desc: Descriptor, stop: threading.Event | None = None) -> BlobResult:
        """One blob, unless the registry has it or can mount it."""
        key = f"blob-{desc.digest}"
        repo = self.ref.repository
        what = f"blob {self.ref.name}@{desc.digest}"
        if self.has_blob(desc.digest):
            self.progress.update(key, "exists", desc.size, desc.size)
            return BlobResult(desc.digest, desc.size, desc.media_type, "skipped")
        resp = None
        for source in self._mount_sources(desc.digest)[:1]:
            # the label has no port: the source may be another registry on this host,
            # which a 404 (or any refusal) says; then upload as usual
            try:
                resp = self.client.send("POST", f"{repo}/blobs/uploads/", f"mount of {what}",
                                        params={"mount": desc.digest, "from": source})
            except (NotFound, InvalidArgument):
                resp = None
            if resp is not None and resp.status_code == 201:  # mounted
                self.progress.update(key, "exists", desc.size, desc.size)
                return BlobResult(desc.digest, desc.size, desc.media_type, "mounted")
        if resp is None:
            resp = self.client.send("POST", f"{repo}/blobs/uploads/", f"upload of {what}")
        location = resp.headers.get("Location")
        if not location:
            raise InvalidArgument(f"registry {self.client.host}: upload of {what}: no Location")
        self.progress.update(key, "uploading", 0, desc.size)
        sep = "&" if "?" in location else "?"  # keep the registry's own query (_state)
        self.client.send(
            "PUT", f"{location}{sep}digest={quote(desc.digest)}", f"upload of {what}",
            content=_chunks(self.store, desc.digest, desc.size, self.progress, key, stop),
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(desc.size)},
        )
        self.progress.update(key, "done", desc.size, desc.size)
        return BlobResult(desc.digest, desc.size, desc.media_type, "uploaded", desc.size)

    def _mount_sources(self, digest: str) -> list[str]:
        """Repositories of this registry the store's labels say the blob came from."""
        try:
            labels = self.store.info(digest).labels
        except NotFound:
            return []
        value = labels.get(SOURCE_PREFIX + self.ref.hostname, "")
        return [r for r in value.split(",") if r and r != self.ref.repository]

    def put_manifest(self, desc: Descriptor, data: bytes, tag: str | None) -> BlobResult:
        key = f"manifest-{desc.digest}"
        where = tag or desc.digest
        what = f"manifest {self.ref.name}:{where}" if tag else f"manifest {self.ref.name}@{where}"
        if tag is None and self.client.exists(
                f"{self.ref.repository}/manifests/{desc.digest}", what,
                accept=MANIFEST_ACCEPT):
            self.progress.update(key, "exists", desc.size, desc.size)
            return BlobResult(desc.digest, desc.size, desc.media_type, "skipped")
        resp = self.client.send("PUT", f"{self.ref.repository}/manifests/{where}", what,
                                content=data, headers={"Content-Type": desc.media_type})
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != desc.digest:
            raise DataLoss(f"{what}: the registry stored {got}, expected {desc.digest}")
        self.progress.update(key, "done", desc.size, desc.size)
        return BlobResult(desc.digest, desc.size, desc.media_type, "uploaded", desc.size)


def _describe(store: Store, digest: str, media_type: str | None = None
              ) -> tuple[Descriptor, bytes | None]:
    info = store.info(digest)
    data = _read_small(store, digest)
    if data is not None and media_type is None:
        try:
            media_type = media_type_of(data, f"content {digest}")
        except InvalidArgument:
            media_type = None
    return Descriptor(media_type or "application/octet-stream", info.digest, info.size), data


def push_image(
    store: Store,
    client: RegistryClient,
    ref: Reference,
    digest: str,
    *,
    platforms: Sequence[str] = (),
    concurrency: int = 3,
    progress: Progress | None = None,
) -> PushResult:
    """Push ``digest`` and what it references to ``ref`` (see the module docstring)."""
    started = time.monotonic()
    prog = progress or NoProgress()
    wanted = [parse_platform(p) for p in platforms]
    job = _Push(store, client, ref, prog)
    top, top_data = _describe(store, digest)
    manifests: list[tuple[Descriptor, bytes]] = []
    blobs: dict[str, Descriptor] = {}
    seen: set[str] = set()

    def visit(desc: Descriptor, data: bytes, depth: int) -> None:
        if depth > 8:
            raise InvalidArgument(f"content {desc.digest}: indexes nested too deep")
        seen.add(desc.digest)
        for kid in children(data, desc.media_type, f"content {desc.digest}"):
            if is_index(kid.media_type) or is_manifest(kid.media_type):
                if kid.digest in seen or not platform_matches(kid, wanted):
                    continue
                try:
                    _, kid_data = _describe(store, kid.digest, kid.media_type)
                except NotFound:
                    raise NotFound(f"content {kid.digest} (a manifest {desc.digest} references;"
                                   " --platform pushes only some)") from None
                if kid_data is None:
                    raise InvalidArgument(f"content {kid.digest}: too large for a manifest")
                visit(kid, kid_data, depth + 1)
            else:
                try:
                    store.info(kid.digest)
                except NotFound:
                    raise NotFound(f"content {kid.digest} (referenced by {desc.digest})"
                                   ) from None
                blobs.setdefault(kid.digest, kid)
        manifests.append((desc, data))

    if top_data is not None and (is_index(top.media_type) or is_manifest(top.media_type)):
        visit(top, top_data, 0)
    else:
        blobs[top.digest] = top
    client.ping()  # the auth flow runs here, not on a streamed upload
    results = run_parallel([functools.partial(job.upload, d) for d in blobs.values()],
                           concurrency)
    if ref.digest and ref.digest != top.digest:
        raise InvalidArgument(f"reference {ref}: names {ref.digest}, not {top.digest}")
    for desc, data in manifests:
        tag = (ref.tag or "latest") if desc.digest == top.digest and not ref.digest else None
        results.append(job.put_manifest(desc, data, tag))
    return PushResult(str(ref), top.digest, top.media_type, top.size, results,
                      time.monotonic() - started)


def push_object(store: Store, client: RegistryClient, ref: Reference, digest: str,
                media_type: str) -> BlobResult:
    """Push one object as ``ctr content push-object``: a manifest or index media type is
    PUT as a manifest under the reference's tag (or its digest), anything else is
    uploaded as a blob of the repository."""
    job = _Push(store, client, ref, NoProgress())
    desc, data = _describe(store, digest, media_type)
    client.ping()
    if is_index(media_type) or is_manifest(media_type):
        if data is None:
            raise InvalidArgument(f"content {digest}: too large for a manifest")
        return job.put_manifest(desc, data, None if ref.digest else ref.tag)
    return job.upload(desc)
