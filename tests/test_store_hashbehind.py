"""The writer hashes large writes on a thread of its own (store/writer.py _HashBehind):
whatever mix of sizes and buffer kinds arrives, the digest is that of the bytes in
write order, buffers the caller reuses after ``write`` returns are hashed as they were,
and digest(), truncate(0), close-and-resume and commit see every byte written before."""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

from store import LocalStore, digest_of
from store import writer as writer_mod


def _chunks(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [1, 4096, 128 << 10, (128 << 10) - 1, 1 << 20, 3 << 20, 17, 2 << 20, 64 << 10]
    rng.shuffle(sizes)
    return [rng.randbytes(n) for n in sizes * 3]


def test_mixed_writes_hash_in_order(store: LocalStore) -> None:
    chunks = _chunks(1)
    want = hashlib.sha256()
    w = store.writer("mixed")
    reused = bytearray(4 << 20)
    for i, c in enumerate(chunks):
        kind = i % 3
        if kind == 0:
            w.write(c)  # bytes: may be hashed later
        elif kind == 1:
            w.write(memoryview(c)[:])  # a read-only view of bytes
        else:
            reused[: len(c)] = c
            w.write(memoryview(reused)[: len(c)])  # a buffer the caller reuses
            reused[: len(c)] = b"\xff" * len(c)  # ... at once
        want.update(c)
        if i == len(chunks) // 2:
            assert w.digest() == f"sha256:{want.hexdigest()}"
    assert w.commit() == f"sha256:{want.hexdigest()}"
    with store.reader_at(f"sha256:{want.hexdigest()}") as r:
        assert hashlib.sha256(os.pread(r.fileno(), 200 << 20, 0)).hexdigest() == \
            want.hexdigest()


def test_truncate_and_resume_after_queued_writes(store: LocalStore) -> None:
    big = random.Random(2).randbytes(8 << 20)
    w = store.writer("again")
    for i in range(0, len(big), 1 << 20):
        w.write(big[i : i + (1 << 20)])
    w.truncate(0)  # everything queued is dropped with the old state
    w.write(big[: 3 << 20])
    w.close()  # the resumable hash state is the one of those 3 MiB
    w = store.writer("again")
    assert w.offset == 3 << 20
    w.write(big[3 << 20 :])
    assert w.commit() == digest_of(big)


def test_writes_wait_when_the_hasher_lags(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow hashing thread bounds the bytes queued (HASH_AHEAD), and the digest is
    still right."""
    monkeypatch.setattr(writer_mod, "HASH_AHEAD", 2 << 20)
    gate = threading.Event()
    real = hashlib.sha256

    class Slow:
        def __init__(self) -> None:
            self._h = real()
            self.name = "sha256"

        def update(self, data: bytes) -> None:
            gate.wait(0.01)
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    data = random.Random(3).randbytes(16 << 20)
    w = store.writer("slow")
    w._hash._hasher = Slow()  # type: ignore[assignment]
    for i in range(0, len(data), 1 << 20):
        w.write(data[i : i + (1 << 20)])
        assert w._hash._pending <= 3 << 20
    assert w.digest() == digest_of(data)
    assert w.commit() == digest_of(data)
