"""Load: 32 parallel readers of the same and of different blobs, 8 parallel ingests and a
label writer for a bounded time, through one mount and then through ``contentfs serve``.
Every read matches its digest, every ingest commits, no request hangs (every worker
returns), the daemon's memory stays bounded, and the daemon exits cleanly."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from store.grpc.client import RemoteStore
from tests.fuse_util import Mount, require_fuse
from tests.grpc_util import ServeProcess

from .rel_util import check_blobs, check_ingests, payload, sha256

MiB = 1 << 20
SIZES = [0, 1, 1000, 65537, MiB, 3 * MiB + 7, 8 * MiB, 4096]
#: growth of the daemon's resident memory over its idle size that counts as unbounded
RSS_BOUND = 256 * MiB


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Harness:
    """Runs the workers, records failures and counts, samples the daemon's memory."""

    def __init__(self, pid: int, duration: float) -> None:
        self.pid = pid
        self.deadline = time.monotonic() + duration
        self.errors: list[str] = []
        self.counts = {"reads": 0, "ingests": 0, "labels": 0}
        self.rss: list[int] = [rss(pid)]
        self._lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.errors

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def run(self, workers: list[Callable[[], None]]) -> None:
        def guard(fn: Callable[[], None]) -> Callable[[], None]:
            def body() -> None:
                try:
                    fn()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    with self._lock:
                        self.errors.append(f"{fn.__name__}: {exc!r}")
            return body

        threads = [threading.Thread(target=guard(w), daemon=True) for w in workers]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and time.monotonic() < self.deadline + 120:
            self.rss.append(rss(self.pid))
            time.sleep(0.25)
        hung = [t for t in threads if t.is_alive()]
        assert not hung, f"{len(hung)} workers hung (a request never returned)"
        assert not self.errors, self.errors[:5]


def _blobs(seed: int) -> dict[str, bytes]:
    out = {}
    for i in range(16):
        data = payload(seed + i, SIZES[i % len(SIZES)] + i)
        out[sha256(data)] = data
    return out


def _workload(h: Harness, blobs: dict[str, bytes], *,
              read: Callable[[str, random.Random], bytes],
              ingest: Callable[[str, bytes, random.Random], str],
              set_label: Callable[[str, str, str], None],
              get_label: Callable[[str, str], str | None],
              readers: int = 32, ingesters: int = 8) -> dict[str, bytes]:
    digests = sorted(blobs)
    committed: dict[str, bytes] = {}
    lock = threading.Lock()

    def reader(i: int) -> Callable[[], None]:
        def read_loop() -> None:
            rng = random.Random(i)
            while h.running():
                # half the readers share one blob; the others roam
                d = digests[0] if i % 2 else rng.choice(digests)
                got = read(d, rng)
                assert hashlib.sha256(got).hexdigest() == d.split(":")[1], f"bad read of {d}"
                h.count("reads")
        return read_loop

    def ingester(i: int) -> Callable[[], None]:
        def ingest_loop() -> None:
            rng = random.Random(1000 + i)
            n = 0
            while h.running():
                data = rng.randbytes(rng.choice([0, 10, 70_000, MiB + 3, 3 * MiB]))
                data += f"{i}-{n}".encode()  # unique: every ingest makes a new blob
                assert ingest(f"load-{i}-{n}", data, rng) == sha256(data)
                with lock:
                    committed[sha256(data)] = data
                h.count("ingests")
                n += 1
        return ingest_loop

    def labeller() -> None:
        rng = random.Random(7)
        n = 0
        while h.running():
            d = rng.choice(digests)
            set_label(d, "load", str(n))
            assert get_label(d, "load") == str(n)
            h.count("labels")
            n += 1

    h.run([reader(i) for i in range(readers)] + [ingester(i) for i in range(ingesters)]
          + [labeller])
    assert h.counts["reads"] > readers and h.counts["ingests"] >= ingesters, h.counts
    assert h.counts["labels"] > 0, h.counts
    growth = max(h.rss) - h.rss[0]
    print(f"load: {h.counts}, daemon rss {h.rss[0] // MiB} MiB idle, "
          f"peak {max(h.rss) // MiB} MiB, end {h.rss[-1] // MiB} MiB")
    assert growth < RSS_BOUND, f"daemon memory grew by {growth // MiB} MiB"
    return committed


# through the mount -----------------------------------------------------------------


@pytest.fixture
def mount(tmp_path: str) -> Iterator[Mount]:
    require_fuse()
    base = os.fspath(tmp_path)
    root, path = os.path.join(base, "root"), os.path.join(base, "mnt")
    os.makedirs(root)
    os.makedirs(path)
    m = Mount(root, path, (), os.path.join(base, "mount.log"))
    try:
        yield m.start()
        m.unmount()  # exits 0 with no error in its log
    finally:
        m.cleanup()


def test_load_through_mount(mount: Mount, soak: bool) -> None:
    m = mount
    blobs = _blobs(1)
    for i, (d, data) in enumerate(blobs.items()):
        with open(m.ingest(f"seed-{i}"), "wb") as f:
            f.write(data)
        os.setxattr(m.ingest(f"seed-{i}"), "user.contentfs.commit", d.encode())

    def read(d: str, rng: random.Random) -> bytes:
        with open(m.blob(d.split(":")[1]), "rb", buffering=0) as f:
            chunks = []
            while chunk := f.read(rng.choice([4096, 65536, MiB, 4 * MiB])):
                chunks.append(chunk)
        return b"".join(chunks)

    def ingest(ref: str, data: bytes, rng: random.Random) -> str:
        fd = os.open(m.ingest(ref), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[: rng.choice([16384, 131072, MiB])]) :]
        finally:
            os.close(fd)
        os.setxattr(m.ingest(ref), "user.contentfs.commit", sha256(data).encode())
        assert not os.path.exists(m.ingest(ref))
        return sha256(data)

    def set_label(d: str, key: str, value: str) -> None:
        os.setxattr(m.blob(d.split(":")[1]), f"user.{key}", value.encode())

    def get_label(d: str, key: str) -> str | None:
        return os.getxattr(m.blob(d.split(":")[1]), f"user.{key}").decode()

    assert m.proc is not None
    h = Harness(m.proc.pid, 120 if soak else 15)
    committed = _workload(h, blobs, read=read, ingest=ingest, set_label=set_label,
                          get_label=get_label)
    on_disk = check_blobs(m.root)
    assert all(on_disk[d] == b for d, b in {**blobs, **committed}.items())
    assert check_ingests(m.root, {}) == {}


# through the gRPC server -----------------------------------------------------------


@pytest.fixture
def served(tmp_path: str) -> Iterator[ServeProcess]:
    root = os.path.join(os.fspath(tmp_path), "root")
    os.mkdir(root)
    srv = ServeProcess(root, os.path.join(os.fspath(tmp_path), "s.sock"))
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.stderr


def test_load_through_grpc(served: ServeProcess, soak: bool) -> None:
    local = threading.local()

    def client() -> Any:
        if not hasattr(local, "store"):
            local.store = RemoteStore(served.address)
        return local.store

    blobs = _blobs(2)
    for i, (d, data) in enumerate(blobs.items()):
        w = client().writer(f"seed-{i}")
        w.write(data)
        assert w.commit(len(data), d) == d

    def read(d: str, rng: random.Random) -> bytes:
        with client().reader_at(d) as r:
            chunks, off = [], 0
            while chunk := r.read_at(rng.choice([4096, MiB, 4 * MiB]), off):
                chunks.append(chunk)
                off += len(chunk)
        return b"".join(chunks)

    def ingest(ref: str, data: bytes, rng: random.Random) -> str:
        w = client().writer(ref, total=len(data))
        view = memoryview(data)
        while view:
            n = rng.choice([16384, MiB])
            w.write(bytes(view[:n]))
            view = view[n:]
        return str(w.commit(len(data), sha256(data)))

    def set_label(d: str, key: str, value: str) -> None:
        info = client().info(d)
        client().update(type(info)(info.digest, info.size, info.created_at, info.updated_at,
                                   {key: value}), f"labels.{key}")

    def get_label(d: str, key: str) -> str | None:
        return client().info(d).labels.get(key)  # type: ignore[no-any-return]

    h = Harness(served.proc.pid, 60 if soak else 10)
    committed = _workload(h, blobs, read=read, ingest=ingest, set_label=set_label,
                          get_label=get_label)
    on_disk = check_blobs(served.root)
    assert all(on_disk[d] == b for d, b in {**blobs, **committed}.items())
    assert check_ingests(served.root, {}) == {}
