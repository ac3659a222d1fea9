"""The FUSE handlers called in-process, without mounting (as s3ql's t3_fs_api does): a
ContentOps over a store in a temporary directory, its handlers called with pyfuse3's
types under trio. Most of the view's logic is checked here, fast and without
/dev/fuse; the real-mount tests (tests/test_fuse_*.py) stay for what only the kernel
shows (caching, the order of its requests, tools).

Every case runs over a local root and over a RemoteStore (a gRPC server in this
process): the same view over the store interface with and without the capabilities of
a store of files here. Where they differ on purpose, the case says so.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pyfuse3
import pytest
import trio

from fusefs import view
from fusefs.ops import ContentOps
from store import LocalStore
from store.api import Store
from store.grpc.client import RemoteStore
from tests.grpc_util import InProcessServer

ROOT, BLOBS, INGEST = 1, 2, 3
CTX: Any = None  # the handlers never look at the request context
TOKEN: Any = object()  # readdir's token goes only to pyfuse3.readdir_reply (replaced here)


@dataclasses.dataclass
class Fields:
    """pyfuse3.SetattrFields, duck-typed (its attributes are read-only)."""

    update_size: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_atime: bool = False
    update_mtime: bool = False


@pytest.fixture(params=["local", "remote"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    local = LocalStore(root)
    if request.param == "local":
        yield local
        local.close()
        return
    srv = InProcessServer(local, os.path.join(tmp_path, "s.sock")).start()
    remote = RemoteStore(srv.address)
    try:
        yield remote
    finally:
        remote.close()
        srv.stop()
        local.close()


def run(store: Store, fn: Callable[[ContentOps], Awaitable[None]], **kw: Any) -> None:
    """Run ``fn`` with a view of ``store`` on a trio loop, closing what it left open."""
    ops = ContentOps(store, **kw)

    async def main() -> None:
        try:
            await fn(ops)
        finally:
            ops.close_all()

    trio.run(main)


def is_local(store: Store) -> bool:
    return isinstance(store, LocalStore)


async def fails(code: int, call: Awaitable[object]) -> None:
    with pytest.raises(pyfuse3.FUSEError) as err:
        await call
    assert err.value.errno == code, (err.value.errno, code)


async def put(ops: ContentOps, name: bytes, data: bytes, *, close: bool = True) -> int:
    """cp into ingest/NAME: create, write, release. The file handle, if kept open."""
    fi, _ = await ops.create(INGEST, name, 0o644, os.O_WRONLY | os.O_CREAT, CTX)
    assert await ops.write(fi.fh, 0, data) == len(data)
    await ops.flush(fi.fh)
    if close:
        await ops.release(fi.fh)
    return int(fi.fh)


async def commit(ops: ContentOps, name: bytes, data: bytes) -> str:
    """cp + mv: the blob's hex digest."""
    await put(ops, name, data)
    hexd = hashlib.sha256(data).hexdigest()
    alg = ops.nodes.alg_ino("sha256")
    assert alg is not None
    await ops.rename(INGEST, name, alg, hexd.encode(), 0, CTX)
    return hexd


async def read_all(ops: ContentOps, ino: int) -> bytes:
    fi = await ops.open(ino, os.O_RDONLY, CTX)
    try:
        out = b""
        while chunk := await ops.read(fi.fh, len(out), 1 << 16):
            out += chunk
        return out
    finally:
        await ops.release(fi.fh)


def alg_ino(ops: ContentOps) -> int:
    ino = ops.nodes.alg_ino("sha256")
    assert ino is not None
    return ino


def test_copy_in_commit_by_rename_read_and_delete(store: Store) -> None:
    data = os.urandom(300_000)

    async def case(ops: ContentOps) -> None:
        hexd = await commit(ops, b"layer", data)
        await fails(errno.ENOENT, ops.lookup(INGEST, b"layer", CTX))  # gone from ingest/
        entry = await ops.lookup(alg_ino(ops), hexd.encode(), CTX)
        assert entry.st_size == len(data) and entry.st_mode & 0o777 == 0o444
        assert (await ops.getattr(entry.st_ino, CTX)).st_size == len(data)
        assert await read_all(ops, entry.st_ino) == data
        await fails(errno.EPERM, ops.open(entry.st_ino, os.O_WRONLY, CTX))
        await ops.unlink(alg_ino(ops), hexd.encode(), CTX)
        assert (await ops.lookup(alg_ino(ops), hexd.encode(), CTX)).st_ino == 0  # a miss
        await fails(errno.ENOENT, ops.unlink(alg_ino(ops), hexd.encode(), CTX))

    run(store, case)
    with pytest.raises(LookupError):
        store.info(f"sha256:{hashlib.sha256(data).hexdigest()}")


def test_commit_with_the_wrong_name_keeps_the_ingest(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        await put(ops, b"r", b"abc")
        await fails(errno.EBADMSG, ops.rename(INGEST, b"r", alg_ino(ops), b"0" * 64, 0, CTX))
        entry = await ops.lookup(INGEST, b"r", CTX)
        assert entry.st_size == 3
        err = await ops.getxattr(entry.st_ino, b"user.contentfs.error", CTX)
        assert b"unexpected commit digest" in err
        await fails(errno.EPERM, ops.rename(INGEST, b"r", alg_ino(ops), b"nothex", 0, CTX))

    run(store, case)


def test_labels_set_on_an_ingest_reach_the_blob(store: Store) -> None:
    data = b"labelled"
    hexd = hashlib.sha256(data).hexdigest()

    async def case(ops: ContentOps) -> None:
        await put(ops, b"r", data)
        ino = (await ops.lookup(INGEST, b"r", CTX)).st_ino
        await ops.setxattr(ino, b"user.containerd.io/gc.ref.content.0", b"sha256:x", CTX)
        await ops.setxattr(ino, b"user.contentfs.expected", f"sha256:{hexd}".encode(), CTX)
        assert await ops.listxattr(ino, CTX) == [b"user.containerd.io/gc.ref.content.0"]
        await ops.setxattr(ino, b"user.contentfs.commit", b"", CTX)
        blob = await ops.lookup(alg_ino(ops), hexd.encode(), CTX)
        assert await ops.getxattr(blob.st_ino, b"user.containerd.io/gc.ref.content.0",
                                  CTX) == b"sha256:x"
        assert await ops.getxattr(blob.st_ino, b"user.contentfs.size", CTX) == b"8"
        await ops.removexattr(blob.st_ino, b"user.containerd.io/gc.ref.content.0", CTX)
        assert await ops.listxattr(blob.st_ino, CTX) == []
        await fails(pyfuse3.ENOATTR, ops.getxattr(blob.st_ino, b"user.nothing", CTX))
        await fails(errno.ENOTSUP, ops.getxattr(blob.st_ino, b"security.selinux", CTX))
        await fails(errno.E2BIG, ops.setxattr(blob.st_ino, b"user.big", b"v" * 5000, CTX))
        await fails(errno.EPERM, ops.setxattr(blob.st_ino, b"user.contentfs.size", b"1",
                                              CTX))

    run(store, case)
    assert store.info(f"sha256:{hexd}").labels == {}


def test_ingests_are_append_only(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        fh = await put(ops, b"r", b"0123456789", close=False)
        await fails(errno.ESPIPE, ops.write(fh, 4, b"x"))
        assert await ops.write(fh, 12, b"ab") == 2  # past the end: zero-filled
        ino = (await ops.lookup(INGEST, b"r", CTX)).st_ino
        assert (await ops.getattr(ino, CTX)).st_size == 14
        await fails(errno.EINVAL, ops.setattr(ino, _size(5), Fields(update_size=True), fh,
                                              CTX))
        await ops.setattr(ino, _size(16), Fields(update_size=True), fh, CTX)  # zero-extend
        assert (await ops.getattr(ino, CTX)).st_size == 16
        assert await ops.getxattr(ino, b"user.contentfs.digest", CTX) == (
            b"sha256:" + hashlib.sha256(b"0123456789\0\0ab\0\0").hexdigest().encode())
        await ops.setattr(ino, _size(0), Fields(update_size=True), fh, CTX)  # restart
        assert await ops.getxattr(ino, b"user.contentfs.offset", CTX) == b"0"
        await ops.release(fh)

    run(store, case)


def _size(n: int) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_size = n
    return attr


def test_one_writer_per_ingest(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        fh = await put(ops, b"r", b"x", close=False)
        ino = (await ops.lookup(INGEST, b"r", CTX)).st_ino
        await fails(errno.EBUSY, ops.open(ino, os.O_WRONLY | os.O_APPEND, CTX))
        await ops.release(fh)
        fi = await ops.open(ino, os.O_WRONLY | os.O_APPEND, CTX)  # free again
        await ops.write(fi.fh, 0, b"y")
        await ops.release(fi.fh)
        assert await ops.getxattr(ino, b"user.contentfs.offset", CTX) == b"2"
        await fails(errno.EEXIST, ops.create(INGEST, b"r", 0o644,
                                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, CTX))

    run(store, case)


def test_abort_by_unlink(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        await put(ops, b"gone", b"partial")
        await ops.unlink(INGEST, b"gone", CTX)
        await fails(errno.ENOENT, ops.lookup(INGEST, b"gone", CTX))
        await fails(errno.ENOENT, ops.unlink(INGEST, b"gone", CTX))

    run(store, case)
    assert store.list_statuses() == []


def test_the_tree_is_fixed(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        await fails(errno.ENOENT, ops.lookup(ROOT, b"nothing", CTX))
        assert (await ops.lookup(alg_ino(ops), b"not-a-digest", CTX)).st_ino == 0
        await fails(errno.EPERM, ops.mkdir(INGEST, b"d", 0o755, CTX))
        await fails(errno.EPERM, ops.create(BLOBS, b"f", 0o644, os.O_WRONLY, CTX))
        await fails(errno.EINVAL, ops.create(INGEST, b"bad%name", 0o644, os.O_WRONLY, CTX))
        await fails(errno.ENAMETOOLONG, ops.create(INGEST, b"n" * 256, 0o644, os.O_WRONLY,
                                                   CTX))
        root = await ops.getattr(ROOT, CTX)
        assert root.st_mode & 0o777 == 0o555

    run(store, case)


def test_read_only_view_refuses_changes(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        await fails(errno.EROFS, ops.create(INGEST, b"r", 0o644, os.O_WRONLY, CTX))

    run(store, case, readonly=True)


def test_readdir_lists_blobs_and_ingests(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[bytes, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, _next: int) -> bool:
        sent.append((name, attr.st_size))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def listdir(ops: ContentOps, ino: int) -> list[tuple[bytes, int]]:
        sent.clear()
        fh = await ops.opendir(ino, CTX)
        await ops.readdir(fh, 0, TOKEN)
        await ops.releasedir(fh)
        return sorted(sent)

    async def case(ops: ContentOps) -> None:
        a = await commit(ops, b"a", b"aa")
        b = await commit(ops, b"b", b"bbb")
        await put(ops, b"open%2Fref", b"x")
        assert await listdir(ops, alg_ino(ops)) == sorted([(a.encode(), 2), (b.encode(), 3)])
        assert await listdir(ops, INGEST) == [(b"open%2Fref", 1)]
        assert [n for n, _ in await listdir(ops, ROOT)] == [b"blobs", b"ingest"]

    run(store, case)


def test_listings_across_changes_keep_lookup_counts(store: Store,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs listed (readdirplus) are held by the kernel until forget, across a commit
    and a delete and a listing opened before them read after a newer one: getattr
    answers for each held blob, ENOENT once deleted, and each is known until the
    kernel forgets every reference it was given."""
    sent: list[tuple[bytes, int, int]] = []

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, _next: int) -> bool:
        sent.append((name, attr.st_ino, attr.st_size))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)

    async def listed(fh: int) -> set[str]:
        sent.clear()
        await ops_of[0].readdir(fh, 0, TOKEN)
        for _, ino, _ in sent:
            given[ino] = given.get(ino, 0) + 1
        return {n.decode() for n, _, _ in sent}

    ops_of: list[ContentOps] = []
    given: dict[int, int] = {}  # references the kernel got, by inode

    async def case(ops: ContentOps) -> None:
        ops_of.append(ops)
        alg = alg_ino(ops)
        blobs = {await commit(ops, b"c%d" % i, b"x" * i): i for i in range(1, 6)}
        first = await ops.opendir(alg, CTX)
        assert await listed(first) == set(blobs)
        assert all(size == blobs[n.decode()] for n, _, size in sent)
        old = await ops.opendir(alg, CTX)
        newest = await commit(ops, b"n", b"new blob")
        gone = min(blobs)
        await ops.unlink(alg, gone.encode(), CTX)
        fh = await ops.opendir(alg, CTX)  # a new listing: the table of the directory
        assert await listed(fh) == set(blobs) - {gone} | {newest}
        await fails(errno.ENOENT, ops.getattr(view.hex_ino(gone), CTX))
        # (a listing opened before the changes; a remote store's listing is the
        # snapshot of one walk: it may still show the deleted blob)
        assert set(blobs) - {gone} <= await listed(old) <= set(blobs)
        assert await listed(fh) == set(blobs) - {gone} | {newest}
        for hexd in set(blobs) - {gone} | {newest}:
            ino = view.hex_ino(hexd)
            assert (await ops.getattr(ino, CTX)).st_ino == ino
        for handle in (first, old, fh):
            await ops.releasedir(handle)
        for ino, n in given.items():
            await ops.forget([(ino, n - 1)])
            assert ino in ops.nodes
            await ops.forget([(ino, 1)])
            assert ino not in ops.nodes and ops.nodes.get(ino) is None

    run(store, case)


def test_what_a_store_without_files_cannot_do(store: Store) -> None:
    """An ingest is read back, and renamed within ingest/, only where the store can
    (a local root); over containerd's API the view says so with an errno."""
    async def case(ops: ContentOps) -> None:
        await put(ops, b"r", b"data")
        ino = (await ops.lookup(INGEST, b"r", CTX)).st_ino
        if is_local(store):
            assert await read_all(ops, ino) == b"data"
            await ops.rename(INGEST, b"r", INGEST, b"s", 0, CTX)
            assert (await ops.lookup(INGEST, b"s", CTX)).st_size == 4
        else:
            await fails(errno.EACCES, ops.open(ino, os.O_RDONLY, CTX))
            await fails(errno.EPERM, ops.rename(INGEST, b"r", INGEST, b"s", 0, CTX))

    run(store, case)


def test_committing_content_that_exists_is_success(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        hexd = await commit(ops, b"first", b"same bytes")
        await put(ops, b"second", b"same bytes")
        await ops.rename(INGEST, b"second", alg_ino(ops), hexd.encode(), 0, CTX)
        await fails(errno.ENOENT, ops.lookup(INGEST, b"second", CTX))
        await put(ops, b"third", b"same bytes")
        await fails(errno.EEXIST, ops.rename(INGEST, b"third", alg_ino(ops), hexd.encode(),
                                             pyfuse3.RENAME_NOREPLACE, CTX))

    run(store, case)


def test_ingest_status_as_xattrs(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        fh = await put(ops, b"r", b"12345", close=False)
        ino = (await ops.lookup(INGEST, b"r", CTX)).st_ino
        await ops.setxattr(ino, b"user.contentfs.total", b"9", CTX)
        assert await ops.getxattr(ino, b"user.contentfs.offset", CTX) == b"5"
        assert await ops.getxattr(ino, b"user.contentfs.total", CTX) == b"9"
        await fails(errno.EINVAL, ops.setxattr(ino, b"user.contentfs.total", b"x", CTX))
        await ops.removexattr(ino, b"user.contentfs.total", CTX)
        assert await ops.getxattr(ino, b"user.contentfs.total", CTX) == b"0"
        want = b"sha256:" + hashlib.sha256(b"other").hexdigest().encode()
        await ops.setxattr(ino, b"user.contentfs.expected", want, CTX)
        assert await ops.getxattr(ino, b"user.contentfs.expected", CTX) == want
        await ops.release(fh)
        await fails(errno.EBADMSG, ops.setxattr(ino, b"user.contentfs.commit", b"", CTX))
        await ops.removexattr(ino, b"user.contentfs.expected", CTX)
        assert await ops.getxattr(ino, b"user.contentfs.expected", CTX) == b""
        await ops.setxattr(ino, b"user.contentfs.commit", b"", CTX)  # now it commits
        hexd = hashlib.sha256(b"12345").hexdigest().encode()
        assert (await ops.lookup(alg_ino(ops), hexd, CTX)).st_size == 5

    run(store, case)


def test_open_with_trunc_restarts_and_chmod_is_kept(store: Store) -> None:
    async def case(ops: ContentOps) -> None:
        await put(ops, b"r", b"old bytes")
        ino = (await ops.lookup(INGEST, b"r", CTX)).st_ino
        fi = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)
        await ops.write(fi.fh, 0, b"new")
        await ops.release(fi.fh)
        assert (await ops.getattr(ino, CTX)).st_size == 3
        mode = pyfuse3.EntryAttributes()
        mode.st_mode = 0o600
        entry = await ops.setattr(ino, mode, Fields(update_mode=True), None, CTX)
        assert entry.st_mode & 0o777 == 0o600
        other = pyfuse3.EntryAttributes()
        other.st_uid = os.getuid() + 1
        await fails(errno.EPERM, ops.setattr(ino, other, Fields(update_uid=True), None, CTX))
        blobs = await ops.getattr(BLOBS, CTX)
        await fails(errno.EPERM, ops.setattr(BLOBS, mode, Fields(update_mode=True), None,
                                             CTX))
        assert blobs.st_mode & 0o777 == 0o555

    run(store, case)


def test_a_blob_removed_while_open_keeps_answering(store: Store) -> None:
    data = b"still readable"

    async def case(ops: ContentOps) -> None:
        hexd = await commit(ops, b"r", data)
        ino = (await ops.lookup(alg_ino(ops), hexd.encode(), CTX)).st_ino
        fi = await ops.open(ino, os.O_RDONLY, CTX)
        await ops.unlink(alg_ino(ops), hexd.encode(), CTX)
        attr = await ops.getattr(ino, CTX)
        assert attr.st_nlink == 0 and attr.st_size == len(data)
        if is_local(store):  # a local file stays readable (a remote blob is gone)
            assert await ops.read(fi.fh, 0, 100) == data
        await ops.release(fi.fh)
        await fails(errno.ENOENT, ops.getattr(ino, CTX))

    run(store, case)


def test_a_store_that_is_gone_is_an_errno_never_a_crash(tmp_path: Any) -> None:
    """Handlers over a remote store whose server stopped answer with an errno (EIO):
    a StoreError escaping a handler would end the mount."""
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    local = LocalStore(root)
    srv = InProcessServer(local, os.path.join(tmp_path, "s.sock")).start()
    remote = RemoteStore(srv.address)

    async def case(ops: ContentOps) -> None:
        hexd = await commit(ops, b"r", b"x")
        await put(ops, b"open", b"y")
        srv.stop()
        ops.blobs.attrs.clear()
        codes = set()
        for call in (ops.lookup(alg_ino(ops), b"f" * 64, CTX),
                     ops.lookup(INGEST, b"open", CTX),
                     ops.unlink(alg_ino(ops), hexd.encode(), CTX),
                     ops.create(INGEST, b"new", 0o644, os.O_WRONLY | os.O_EXCL, CTX),
                     ops.opendir(INGEST, CTX)):
            with pytest.raises(pyfuse3.FUSEError) as err:
                await call
            codes.add(err.value.errno)
        assert codes <= {errno.EIO, errno.EBUSY}, codes

    try:
        run(remote, case)
    finally:
        remote.close()
        srv.stop()  # (again: a no-op once stopped)
        local.close()
