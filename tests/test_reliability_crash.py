"""Crash at any moment, store and CLI writers: SIGKILL a writer at chosen points and at
random moments, then check that committed blobs are intact, nothing partial sits under
``blobs/``, the ingest holds a true prefix, the lock is free and the ingest resumes."""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

from store import AlreadyExists, LocalStore, Unavailable

from .rel_util import (
    COMMIT_STAGES,
    CONTENTFS,
    assert_clean_error,
    check_blobs,
    check_ingests,
    kill9,
    payload,
    run_cli,
    sha256,
    start_driver,
    wait_for,
    wait_paused,
)

SIZE = 8 * (1 << 20) + 123
#: commit stages a kill leaves the ingest intact at (later ones leave the blob committed)
_KEEPS_INGEST = ("commit-start", "before-rename", "before-db")
MiB = 1 << 20


def _baseline(root: str) -> dict[str, bytes]:
    """Commit a few blobs that every crash must leave intact."""
    blobs: dict[str, bytes] = {}
    with LocalStore(root) as s:
        for i, n in enumerate((0, 1, 3 * MiB + 1)):
            data = payload(1000 + i, n)
            w = s.writer(f"base-{i}")
            w.write(data)
            blobs[w.commit(n, sha256(data), labels={"base": str(i)})] = data
    return blobs


def _check_after_crash(root: str, base: dict[str, bytes], ref: str, data: bytes) -> int:
    """Invariants after a kill; returns the offset the ingest of ``ref`` resumes at
    (-1 if the blob got committed and the ingest is gone)."""
    blobs = check_blobs(root)
    for dgst, want in base.items():
        assert blobs[dgst] == want
    with LocalStore(root) as s:
        for dgst in base:
            assert s.info(dgst).labels == {"base": str(list(base).index(dgst))}
    offsets = check_ingests(root, {ref: data})
    if sha256(data) in blobs:
        assert ref not in offsets
        return -1
    return offsets.get(ref, 0)


def _resume_and_commit(root: str, ref: str, data: bytes, offset: int) -> None:
    """A new writer takes the lock at once, resumes at ``offset`` and commits."""
    with LocalStore(root) as s:
        w = s.writer(ref, total=len(data))
        assert w.offset == max(offset, 0)
        w.write(data[w.offset :])
        try:
            assert w.commit(len(data), sha256(data)) == sha256(data)
            assert offset != -1, "committed twice"
        except AlreadyExists:
            assert offset == -1
            # the labels of the killed commit were recorded with the blob
            assert s.info(sha256(data)).labels == {"crash": "test"}
        assert s.list_statuses() == []
    assert check_blobs(root)[sha256(data)] == data


WRITER_PAUSES = [
    "open",
    "offset:1",
    f"offset:{MiB - 1}",
    f"offset:{MiB}",
    f"offset:{5 * MiB + 7}",
    f"offset:{SIZE - 1}",
    f"offset:{SIZE}",
    "closed",
    *COMMIT_STAGES,
]


@pytest.mark.parametrize("pause", WRITER_PAUSES)
def test_store_writer_killed(store_root: str, tmp_path: str, pause: str) -> None:
    base = _baseline(store_root)
    ref, seed = "layer-under-test", 7
    data = payload(seed, SIZE)
    pause_file = os.path.join(tmp_path, "paused")
    proc = start_driver(["writer", store_root, ref, str(seed), str(SIZE), pause], pause_file)
    try:
        wait_paused(proc, pause_file, pause)
        if pause != "closed":
            with LocalStore(store_root) as s, pytest.raises(Unavailable):
                s.writer(ref)
    finally:
        kill9(proc)
    offset = _check_after_crash(store_root, base, ref, data)
    if pause == "open":
        assert offset == 0
    elif pause.startswith("offset:"):
        assert offset == int(pause.split(":")[1])
    elif pause == "closed" or pause in _KEEPS_INGEST:
        assert offset == SIZE
    else:
        assert offset == -1
    _resume_and_commit(store_root, ref, data, offset)


@pytest.mark.parametrize("stop_at", [0, 1, 65536, 3 * MiB + 5])
def test_cli_ingest_killed_mid_stream(store_root: str, tmp_path: str, stop_at: int) -> None:
    base = _baseline(store_root)
    ref = f"cli-{stop_at}"
    data = payload(stop_at, 4 * MiB + 11)
    src = os.path.join(tmp_path, "input")
    with open(src, "wb") as f:
        f.write(data)
    data_path = LocalStore(store_root).ingest_data_path(ref)
    proc = subprocess.Popen(
        [CONTENTFS, "--root", store_root, "ingest", ref],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(data[:stop_at])
        proc.stdin.flush()

        def written() -> bool:
            try:
                return os.path.getsize(data_path) == stop_at
            except FileNotFoundError:
                return False

        wait_for(written, proc, what=f"{stop_at} bytes ingested")
        # the live CLI writer holds the ref: a second CLI is refused at once
        assert_clean_error(run_cli(store_root, "ingest", ref, src), 7)
    finally:
        kill9(proc)
    offset = _check_after_crash(store_root, base, ref, data)
    assert offset == stop_at
    done = run_cli(store_root, "ingest", ref, src)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == sha256(data)
    assert check_blobs(store_root)[sha256(data)] == data
    assert check_ingests(store_root, {}) == {}


@pytest.mark.parametrize("stage", COMMIT_STAGES)
def test_cli_ingest_killed_in_commit(store_root: str, tmp_path: str, stage: str) -> None:
    base = _baseline(store_root)
    ref = "cli-commit"
    data = payload(99, 2 * MiB + 3)
    src = os.path.join(tmp_path, "input")
    with open(src, "wb") as f:
        f.write(data)
    pause_file = os.path.join(tmp_path, "paused")
    proc = start_driver(
        ["cli", stage, "--root", store_root, "ingest", ref, src, "--label", "k=v"], pause_file
    )
    try:
        wait_paused(proc, pause_file, stage)
    finally:
        kill9(proc)
    offset = _check_after_crash(store_root, base, ref, data)
    assert offset == (len(data) if stage in _KEEPS_INGEST else -1)
    done = run_cli(store_root, "ingest", ref, src, "--label", "k=v")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == sha256(data)
    assert check_blobs(store_root)[sha256(data)] == data
    assert check_ingests(store_root, {}) == {}
    with LocalStore(store_root) as s:
        assert s.info(sha256(data)).labels == {"k": "v"}


def test_random_kills_then_resume(store_root: str, tmp_path: str, soak: bool) -> None:
    """Kill CLI and store writers at random moments; each kill leaves a true prefix that
    never shrinks, and the last run commits the right digest."""
    base = _baseline(store_root)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ref = "random-kills"
    data = payload(seed, 48 * MiB + 5)
    src = os.path.join(tmp_path, "input")
    with open(src, "wb") as f:
        f.write(data)
    last = 0
    for i in range(40 if soak else 6):
        if i % 2:
            cmd = [CONTENTFS, "--root", store_root, "ingest", ref, src]
        else:
            from .rel_util import DRIVER, PYTHON

            cmd = [PYTHON, DRIVER, "writer", store_root, ref, str(seed), str(len(data)), "none"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # kill once the ingest has grown past a random point (or at once, or as the
        # last bytes land, i.e. around commit)
        target = rng.choice([0, len(data), rng.randrange(len(data))])
        data_path = LocalStore(store_root).ingest_data_path(ref)
        while proc.poll() is None:
            try:
                if os.path.getsize(data_path) >= target > 0:
                    break
            except FileNotFoundError:
                pass
            if target == 0 and rng.random() < 0.2:
                break
            time.sleep(0.002)
        kill9(proc)
        assert proc.returncode in (0, -9), (seed, proc.returncode, proc.stderr)
        offset = _check_after_crash(store_root, base, ref, data)
        if offset == -1:
            break
        assert offset >= last, f"seed {seed}: ingest shrank from {last} to {offset}"
        last = offset
    done = run_cli(store_root, "ingest", ref, src)
    assert done.returncode == 0, (seed, done.stderr)
    assert done.stdout.decode().strip() == sha256(data)
    check_blobs(store_root)
    assert check_ingests(store_root, {}) == {}
