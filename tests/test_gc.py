"""Leases and garbage collection (DESIGN §6, reference §5.6, §8.8): roots, edges,
leases and their expiry, unclaimed blobs, concurrent writers, SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from store import AlreadyExists, Digest, LocalStore, NotFound, digest_of
from store.gc import EXPIRE_LABEL, INGEST_EXPIRY_NS, REF_PREFIX, ROOT_LABEL

from .test_cli import CONTENTFS, ok, run


def put(store: LocalStore, data: bytes, labels: dict[str, str] | None = None) -> Digest:
    w = store.writer(f"put-{digest_of(data)}-{random.random()}")
    w.write(data)
    try:
        return Digest(w.commit(len(data), None, labels=labels))
    except AlreadyExists:
        return digest_of(data)


def test_roots_edges_and_unclaimed(store: LocalStore) -> None:
    a = store.namespace("a")
    leaf = put(a, b"leaf")
    mid = put(a, b"mid", {REF_PREFIX + "anything.x": leaf})
    root = put(a, b"root", {ROOT_LABEL: "1", REF_PREFIX + "config": mid})
    junk = put(a, b"junk")
    cycle1 = put(a, b"c1")
    put(a, b"c2", {REF_PREFIX + "0": cycle1})
    a.update(a.info(cycle1).__class__(cycle1, 0, a.info(cycle1).created_at,
                                      a.info(cycle1).updated_at,
                                      {REF_PREFIX + "0": digest_of(b"c2")}), "labels")
    # an unclaimed file: never collected
    loose = digest_of(b"loose")
    path = store.layout.blob_path(loose)
    with open(path, "wb") as f:
        f.write(b"loose")
    dry = store.gc(dry_run=True)
    assert {d for d, _ in dry.removed} == {junk, cycle1, digest_of(b"c2")}
    assert os.path.exists(store.layout.blob_path(junk))
    result = store.gc()
    assert {d for d, _ in result.removed} == {junk, cycle1, digest_of(b"c2")}
    assert result.bytes_freed == 4 + 2 + 2
    assert {i.digest for i in a.list()} == {leaf, mid, root}
    assert os.path.exists(path)
    assert store.namespace("default").info(loose).labels == {}
    assert store.gc().removed == []


def test_same_blob_rooted_in_one_namespace_only(store: LocalStore) -> None:
    a, b = store.namespace("a"), store.namespace("b")
    d = put(a, b"both", {ROOT_LABEL: "x"})
    put(b, b"both")
    result = store.gc()
    assert result.removed == [] and result.records == 1  # b's record went, the file stays
    with pytest.raises(NotFound):
        b.info(d)
    assert a.info(d).labels == {ROOT_LABEL: "x"}


def test_leases_hold_blobs_and_ingests_until_deleted_or_expired(store: LocalStore) -> None:
    ns = store.namespace("n")
    lease = ns.create_lease("l1", {"k": "v"})
    assert lease.id == "l1"
    with pytest.raises(AlreadyExists):
        ns.create_lease("l1")
    held = ns.namespace("n", lease="l1")
    d = put(held, b"leased blob")
    w = held.writer("leased-ingest")
    w.write(b"part")
    w.close()
    assert ns.lease_resources("l1") == [("content", d), ("ingests", "leased-ingest")]
    old = time.time_ns() + 2 * INGEST_EXPIRY_NS  # long after: only the lease holds them
    from store.gc import collect

    assert collect(store, now_ns=old).removed == []
    assert ns.status("leased-ingest").offset == 4
    expired = ns.create_lease("soon", {EXPIRE_LABEL: "2000-01-01T00:00:00Z"})
    ns.add_lease_resource(expired.id, "content", d)
    assert [x.id for x in ns.leases()] == ["l1", "soon"]
    assert [x.id for x in ns.leases("labels.k==v")] == ["l1"]
    result = ns.delete_lease("l1", sync=True)
    assert result is not None
    assert (d, len(b"leased blob")) in result.removed  # the expired lease held nothing
    assert ("n", "soon") in result.leases
    assert ns.leases() == []
    with pytest.raises(NotFound):
        ns.delete_lease("l1")
    with pytest.raises(NotFound):
        held.writer("x")  # the lease is gone: containerd's "lease does not exist"


def test_unleased_ingest_expires_after_a_day(store: LocalStore) -> None:
    from store.gc import collect

    ns = store.namespace("n")
    with ns.writer("idle") as w:
        w.write(b"abc")
    assert collect(store).ingests == []
    result = collect(store, now_ns=time.time_ns() + INGEST_EXPIRY_NS + 10**9)
    assert result.ingests == [("n", "idle")]
    assert ns.list_statuses() == []


def test_cli_lease_and_gc(store_root: str) -> None:
    def cf(*args: str, stdin: bytes | None = None):  # noqa: ANN202
        return run("--root", store_root, *args, stdin=stdin)

    keep = ok(cf("ingest", "k", "--label", f"{ROOT_LABEL}=1", stdin=b"keep")).text.strip()
    drop = ok(cf("ingest", "d", stdin=b"drop")).text.strip()
    lid = ok(cf("-n", "x", "lease", "create", "--expire", "1h", "--label", "a=b")).text.strip()
    listed = ok(cf("lease", "ls", "-n", "x", "--json")).text
    assert lid in listed and EXPIRE_LABEL in listed
    r = cf("-n", "x", "lease", "create", "--id", lid)
    assert r.code == 5
    r = cf("lease", "create", "--expire", "soon")
    assert r.code == 3
    # a ~= regex that does not compile is exit 3, as for ls and active (it listed nothing
    # with a bare log line and exit 0)
    r = cf("-n", "x", "lease", "ls", "id~=[")
    assert (r.code, r.text) == (3, "") and "regex does not compile" in r.error_line()
    # gc is of every namespace: -n is refused rather than ignored (so is serve's)
    for cmd in ("gc", "serve"):
        r = cf("-n", "x", cmd)
        assert r.code == 2 and "every namespace" in r.err and "-n x does not apply" in r.err
    r = ok(cf("gc", "--dry-run"))
    assert r.text.split() == [drop, "4"]
    r = ok(cf("gc"))
    assert r.text.split() == [drop, "4"] and "freed 4 bytes" in r.err
    assert ok(cf("ls", "-q")).text.split() == [keep]
    ok(cf("-n", "x", "lease", "rm", "--sync", lid))
    assert cf("-n", "x", "lease", "rm", lid).code == 4


def test_gc_under_load_loses_no_rooted_blob(store_root: str) -> None:
    """8 writers commit and label (half of their blobs rooted, some rooted only after
    commit) while `contentfs gc` runs in a loop: every rooted blob is still there."""
    duration = 10.0
    store = LocalStore(store_root)
    stop = threading.Event()
    rooted: list[Digest] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        ns = store.namespace(f"w{n % 3}")
        i = 0
        try:
            while not stop.is_set():
                i += 1
                data = f"writer {n} blob {i} ".encode() * 50
                if i % 2:
                    d = put(ns, data, {ROOT_LABEL: "1"})
                elif i % 4 == 0:
                    d = put(ns, data)
                    try:  # claimed after commit: may already be collected, that is fine
                        info = ns.info(d)
                        ns.update(type(info)(d, 0, info.created_at, info.updated_at,
                                             {ROOT_LABEL: "late"}), f"labels.{ROOT_LABEL}")
                    except NotFound:
                        continue
                else:
                    put(ns, data)  # unrooted: gc may take it
                    continue
                with lock:
                    rooted.append(d)
                    rooted_ns[d] = ns.ns or ""
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    rooted_ns: dict[str, str] = {}
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    runs = 0
    held: list[tuple[float, bool]] = []  # writers held off per run, remarked under the lock
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:
            p = subprocess.run([CONTENTFS, "--root", store_root, "gc", "--json"],
                               capture_output=True, timeout=120)
            assert p.returncode == 0, p.stderr
            report = json.loads(p.stdout)
            held.append((report["held_seconds"], report["remarked"]))
            runs += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert runs >= 2 and len(rooted) > 50
    print(f"gc under load: {runs} runs, {len(rooted)} rooted commits, writers held off"
          f" max {max(h for h, _ in held) * 1000:.1f} ms, median"
          f" {sorted(h for h, _ in held)[len(held) // 2] * 1000:.1f} ms,"
          f" {sum(r for _, r in held)} runs marked again under the lock")
    for d in rooted:
        assert store.namespace(rooted_ns[d]).info(d).labels.get(ROOT_LABEL), d
        with store.namespace(rooted_ns[d]).reader_at(d) as r:
            assert digest_of(r.read_at(r.size, 0)) == d
    store.close()


def test_sigkill_during_gc_then_gc_again(store_root: str) -> None:
    store = LocalStore(store_root)
    ns = store.namespace("k")
    keep = [put(ns, f"keep {i}".encode(), {ROOT_LABEL: "1"}) for i in range(50)]
    rng = random.Random(12)
    for round_ in range(12):
        for i in range(150):
            put(ns, f"junk {round_} {i}".encode())
        p = subprocess.Popen([CONTENTFS, "--root", store_root, "gc"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.8))
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = subprocess.run([CONTENTFS, "--root", store_root, "gc"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(i.digest for i in ns.list()) == sorted(keep)
    blobs = os.listdir(os.path.join(store_root, "blobs", "sha256"))
    assert sorted(f"sha256:{b}" for b in blobs) == sorted(keep)
    assert store.meta.doomed() == []
    assert store.namespace("default").list() == []
    store.close()
