"""Fetch an image (or one object) from a registry into a store, as ``ctr content fetch``.

The graph (index -> manifests -> config and layers) is read first, manifests into
memory (they are small and digest-checked); then the blobs are downloaded in parallel,
each streamed into the ingest containerd would use (``layer-<digest>``...) in 1 MiB
chunks, resuming an interrupted ingest with an HTTP Range request from its offset, and
committed with the expected digest and size (a mismatch aborts that ingest: DataLoss,
nothing committed). Blobs already in the store are not downloaded. Manifests are
committed last, children before parents, so a top object in the store means a complete
image; it gets ``containerd.io/gc.root``.

Labels are those ``ctr content fetch`` writes (checked against containerd 1.6.20):
``containerd.io/distribution.source.<hostname>=<repo>[,<repo>...]`` on every object and
``containerd.io/gc.ref.content.{m.N,config,l.N}`` on indexes and manifests.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import httpx

from ..api import Store, Writer
from ..digest import Digest, digest_of, split_digest
from ..errors import AlreadyExists, DataLoss, FailedPrecondition, NotFound
from .client import MANIFEST_ACCEPT, RegistryClient
from .images import (
    GC_ROOT,
    Descriptor,
    child_labels,
    children,
    is_index,
    is_manifest,
    media_type_of,
    parse_platform,
    platform_matches,
    ref_key,
    source_label,
)
from .reference import Reference
from .transfer import (
    BlobResult,
    Cancelled,
    NoProgress,
    Progress,
    Transfer,
    TransferResult,
    merge_labels,
    open_writer,
    rfc3339_now,
    run_parallel,
)

__all__ = ["FetchResult", "fetch_image", "fetch_object", "resolve"]

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FetchResult(TransferResult):
    """A fetch's result (see TransferResult)."""


def _check_bytes(data: bytes, desc: Descriptor, where: str) -> None:
    alg, _ = split_digest(desc.digest)
    actual = digest_of(data, alg)
    if actual != desc.digest or len(data) != desc.size:
        raise DataLoss(f"{where}: got {len(data)} bytes with digest {actual}, expected"
                       f" {desc.size} bytes with {desc.digest}; nothing committed")


class _WriteBehind:
    """Writes (and so hashes) pieces on a second thread while the next ones arrive: the
    socket read, the write and the digest release the GIL, so they overlap. At most
    ``depth`` pieces wait (bounded memory). ``close`` waits until every piece queued is
    written and raises the first write error (e.g. ENOSPC), if any."""

    def __init__(self, writer: Writer, depth: int = 4) -> None:
        self._writer = writer
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self.queued = writer.offset
        self._thread = threading.Thread(target=self._run, name="contentfs-write",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write(piece)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = exc

    def put(self, piece: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(piece)
        self.queued += len(piece)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _pieces(resp: httpx.Response) -> Iterator[bytes]:
    """The body in pieces of about CHUNK bytes. The raw stream (what the socket gives,
    joined) unless the server applied a Content-Encoding: httpx's own re-chunking of
    ``iter_bytes(n)`` costs about four times the network read (measured: 256 MiB in
    2.2 s against 0.5 s)."""
    if resp.headers.get("Content-Encoding", "identity") != "identity":
        yield from resp.iter_bytes(CHUNK)
        return
    held: list[bytes] = []
    size = 0
    for piece in resp.iter_raw():
        held.append(piece)
        size += len(piece)
        if size >= CHUNK:
            yield b"".join(held)
            held.clear()
            size = 0
    if held:
        yield b"".join(held)


def resolve(client: RegistryClient, ref: Reference) -> tuple[Descriptor, bytes]:
    """GET the manifest or index ``ref`` names: its descriptor and bytes (checked against
    the reference's digest, else the registry's Docker-Content-Digest)."""
    what = f"manifest {ref}"
    data, headers = client.get_bytes(f"{ref.repository}/manifests/{ref.object}", what,
                                     accept=MANIFEST_ACCEPT)
    media_type = media_type_of(data, what, headers.get("Content-Type", ""))
    if ref.digest:
        desc = Descriptor(media_type, ref.digest, len(data))
    else:
        desc = Descriptor(media_type, digest_of(data), len(data))
        claimed = headers.get("Docker-Content-Digest")
        if claimed and claimed.startswith("sha256:") and claimed != desc.digest:
            raise DataLoss(f"{what}: registry {client.host} says {claimed}, the bytes are"
                           f" {desc.digest}; nothing committed")
    _check_bytes(data, desc, what)
    return desc, data


@dataclasses.dataclass
class _Node:
    desc: Descriptor
    data: bytes
    labels: dict[str, str]


class _Fetch(Transfer):
    def __init__(self, store: Store, client: RegistryClient, ref: Reference,
                 progress: Progress) -> None:
        super().__init__(store, client, ref, progress)
        self.source_key, _ = source_label(ref.hostname, ref.repository, None)

    def source(self) -> dict[str, str]:
        return {self.source_key: self.ref.repository}

    def manifest_bytes(self, desc: Descriptor) -> bytes:
        """A child manifest's bytes: from the store when it has them, else the registry."""
        try:
            with self.store.reader_at(desc.digest) as reader:
                if reader.size == desc.size:
                    data = reader.read_at(desc.size, 0)
                    _check_bytes(data, desc, f"manifest {desc.digest} in the store")
                    return data
        except NotFound:
            pass
        what = f"manifest {self.ref.name}@{desc.digest}"
        data, _ = self.client.get_bytes(f"{self.ref.repository}/manifests/{desc.digest}", what,
                                        accept=MANIFEST_ACCEPT)
        _check_bytes(data, desc, what)
        return data

    def walk(self, top: Descriptor, top_data: bytes,
             platforms: Sequence[tuple[str, str, str | None]]) -> tuple[list[_Node],
                                                                        list[Descriptor]]:
        """Manifests in commit order (children first) and the other blobs, deduplicated."""
        nodes: list[_Node] = []
        blobs: dict[str, Descriptor] = {}
        seen: set[str] = set()

        def visit(desc: Descriptor, data: bytes, depth: int) -> None:
            if depth > 8:
                raise FailedPrecondition(f"manifest {desc.digest}: indexes nested too deep")
            seen.add(desc.digest)
            where = f"{ref_key(desc)} of {self.ref}"
            kids = children(data, desc.media_type, where)
            labels = {**self.source(), **child_labels(kids)}
            for kid in kids:
                if is_index(kid.media_type) or is_manifest(kid.media_type):
                    if kid.digest in seen or not platform_matches(kid, platforms):
                        continue
                    self.progress.update(ref_key(kid), "resolving", 0, kid.size)
                    kid_data = self.manifest_bytes(kid)
                    self.progress.update(ref_key(kid), "waiting", 0, kid.size)
                    visit(kid, kid_data, depth + 1)
                else:
                    blobs.setdefault(kid.digest, kid)
            nodes.append(_Node(desc, data, labels))

        visit(top, top_data, 0)
        return nodes, list(blobs.values())

    # blobs ----------------------------------------------------------------------------

    def blob(self, desc: Descriptor, stop: threading.Event) -> BlobResult:
        key = ref_key(desc)
        what = f"blob {self.ref.name}@{desc.digest}"
        labels = self.source()
        try:
            writer = open_writer(self.store, key, total=desc.size, expected=desc.digest,
                                 stop=stop)
        except AlreadyExists:
            merge_labels(self.store, desc.digest, labels)
            self.progress.update(key, "exists", desc.size, desc.size)
            return BlobResult(desc.digest, desc.size, desc.media_type, "exists")
        transferred = 0
        try:
            if writer.offset > desc.size:
                writer.truncate(0)
            resumed = writer.offset > 0
            failures = 0
            while writer.offset < desc.size:
                if stop.is_set():
                    raise Cancelled(key)
                self.progress.update(key, "downloading", writer.offset, desc.size)
                try:
                    transferred += self._download(desc, writer, what, stop)
                except httpx.TransportError as exc:  # mid-body: resume from the offset
                    failures += 1
                    if failures > self.client.retries:
                        raise self.client.unavailable(what, str(exc) or type(exc).__name__
                                                       ) from None
                    log.info("%s: %s at %d bytes; resuming", what, exc, writer.offset)
                    time.sleep(0.25 * 2 ** (failures - 1))
            self.progress.update(key, "committing", writer.offset, desc.size)
            try:
                writer.commit(desc.size, desc.digest, labels=labels)
            except AlreadyExists:
                merge_labels(self.store, desc.digest, labels)
            except FailedPrecondition as exc:
                self._drop(key)
                raise DataLoss(f"{what}: the bytes from the registry do not match the"
                               f" descriptor ({exc.message}); nothing committed") from None
        finally:
            if not writer.closed:
                writer.close()
        self.progress.update(key, "done", desc.size, desc.size)
        status = "resumed" if resumed else "downloaded"
        return BlobResult(desc.digest, desc.size, desc.media_type, status, transferred)

    def _drop(self, key: str) -> None:
        try:
            self.store.abort(key)
        except NotFound:
            pass

    def _download(self, desc: Descriptor, writer: Writer, what: str,
                  stop: threading.Event) -> int:
        offset = writer.offset
        headers = {"Range": f"bytes={offset}-"} if offset else None
        got = 0
        with self.client.open("GET", f"{self.ref.repository}/blobs/{desc.digest}", what,
                              headers=headers) as resp:
            if offset and resp.status_code == 206:
                m = _RANGE.match(resp.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != offset:
                    writer.truncate(0)  # not the range asked for: start over
                    return 0
            elif offset:
                writer.truncate(0)  # the registry ignored the range: take it all
            behind = _WriteBehind(writer)
            try:
                for chunk in _pieces(resp):
                    if behind.queued + len(chunk) > desc.size:
                        behind.close()
                        writer.close()
                        self._drop(ref_key(desc))
                        raise DataLoss(f"{what}: the registry sent more than the {desc.size}"
                                       " bytes of its descriptor; nothing committed")
                    behind.put(chunk)
                    got += len(chunk)
                    self.progress.update(ref_key(desc), "downloading", writer.offset,
                                         desc.size)
                    if stop.is_set():
                        raise Cancelled(ref_key(desc))
            finally:
                behind.close()  # what arrived is in the ingest, even when the body broke
        if writer.offset < desc.size:
            raise httpx.ReadError(f"body ended at {writer.offset} of {desc.size} bytes")
        return got

    # manifests ------------------------------------------------------------------------

    def commit_manifest(self, node: _Node, gc_root: bool) -> BlobResult:
        desc = node.desc
        key = ref_key(desc)
        labels = dict(node.labels)
        if gc_root:
            labels[GC_ROOT] = rfc3339_now()
        try:
            writer = open_writer(self.store, key, total=desc.size, expected=desc.digest)
        except AlreadyExists:
            merge_labels(self.store, desc.digest, labels)
            self.progress.update(key, "exists", desc.size, desc.size)
            return BlobResult(desc.digest, desc.size, desc.media_type, "exists")
        try:
            if writer.offset:
                writer.truncate(0)
            writer.write(node.data)
            try:
                writer.commit(desc.size, desc.digest, labels=labels)
            except AlreadyExists:
                merge_labels(self.store, desc.digest, labels)
        finally:
            if not writer.closed:
                writer.close()
        self.progress.update(key, "done", desc.size, desc.size)
        return BlobResult(desc.digest, desc.size, desc.media_type, "downloaded", desc.size)


def fetch_image(
    store: Store,
    client: RegistryClient,
    ref: Reference,
    *,
    platforms: Sequence[str] = (),
    concurrency: int = 3,
    progress: Progress | None = None,
    gc_root: bool = True,
) -> FetchResult:
    """Fetch ``ref`` and everything it references (the manifests of ``platforms`` only,
    as ``os/arch[/variant]``, when given) into ``store``. See the module docstring."""
    started = time.monotonic()
    prog = progress or NoProgress()
    wanted = [parse_platform(p) for p in platforms]
    job = _Fetch(store, client, ref, prog)
    prog.update(str(ref), "resolving")
    top, data = resolve(client, ref)
    prog.update(str(ref), "resolved")
    nodes, blobs = job.walk(top, data, wanted)
    for desc in blobs:
        prog.update(ref_key(desc), "waiting", 0, desc.size)
    results = run_parallel([functools.partial(job.blob, d) for d in blobs], concurrency)
    for node in nodes:
        results.append(job.commit_manifest(node, gc_root and node is nodes[-1]))
    return FetchResult(str(ref), top.digest, top.media_type, top.size, results,
                       time.monotonic() - started)


def fetch_object(client: RegistryClient, ref: Reference, obj: str | None, out: BinaryIO
                 ) -> Descriptor:
    """Write one object to ``out`` (a binary file), as ``ctr content fetch-object``:
    the manifest or index ``ref`` resolves to, or the blob or manifest ``obj`` (a digest)
    of its repository. Streams; the digest is checked at the end (DataLoss if the bytes
    did not match, after they were written)."""
    sink = out
    if obj is None:
        desc, data = resolve(client, ref)
        sink.write(data)
        return desc
    target = ref.with_object(obj)
    dgst = target.digest
    assert dgst is not None
    alg, hexpart = split_digest(dgst)
    what = f"object {ref.name}@{dgst}"
    hasher = hashlib.new(alg)
    size = 0
    path = f"{ref.repository}/blobs/{dgst}"
    if not client.exists(path, what):
        data, headers = client.get_bytes(f"{ref.repository}/manifests/{dgst}", what,
                                         accept=MANIFEST_ACCEPT)
        desc = Descriptor(media_type_of(data, what, headers.get("Content-Type", "")), dgst,
                          len(data))
        _check_bytes(data, desc, what)
        sink.write(data)
        return desc
    with client.open("GET", path, what) as resp:
        media_type = resp.headers.get("Content-Type", "application/octet-stream")
        try:
            for chunk in _pieces(resp):
                hasher.update(chunk)
                size += len(chunk)
                sink.write(chunk)
        except httpx.TransportError as exc:
            raise client.unavailable(what, str(exc) or type(exc).__name__) from None
    if hasher.hexdigest() != hexpart:
        raise DataLoss(f"{what}: the bytes have digest {alg}:{hasher.hexdigest()}")
    return Descriptor(media_type, Digest(dgst), size)
