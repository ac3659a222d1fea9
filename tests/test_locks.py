"""Ref locks across processes: a second writer anywhere gets Unavailable (at once with
``wait=0``; the default wait is tested in test_lock_wait.py), a closed or killed holder
lets the next writer in, and it resumes where the holder stopped.

"At once" is checked without timing: the holder waits for our command, so if taking the
lock blocked, the test would hang (and pytest-timeout would fail it)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from store import AlreadyExists, LocalStore, LocalWriter, NotFound, Unavailable, digest_of

HOLDER = r"""
import sys
from store import LocalStore
store = LocalStore(sys.argv[1])
w = store.writer(sys.argv[2], total=int(sys.argv[3]))
w.write(b"x" * int(sys.argv[4]))
print("held", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "close":
        w.close()
    elif cmd == "commit":
        print(w.commit(), flush=True)
    print("done", flush=True)
"""

LOCKED = re.compile(
    r"^ref (.+) locked for \d+\.\ds \(since \d{4}-\d\d-\d\dT[0-9:.]+Z\): unavailable$"
)


class Holder:
    """A child process holding the writer for ``ref`` with ``n`` bytes written."""

    def __init__(self, root: str, ref: str, n: int, total: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, root, ref, str(total), str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "held\n", f"holder failed to start (exit {self.proc.poll()}): {line!r}"

    def send(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if cmd == "commit":
            assert self.proc.stdout.readline() == "done\n"
            return out.strip()
        assert out == "done\n", out
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                f.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for h in started:
        h.stop()


def test_second_process_is_refused_at_once(store: LocalStore, holders: list[Holder]) -> None:
    h = Holder(store.root, "shared-ref", 100, total=300)
    holders.append(h)
    with pytest.raises(Unavailable) as info:
        store.writer("shared-ref", wait=0)
    m = LOCKED.match(str(info.value))
    assert m is not None and m.group(1) == "shared-ref", str(info.value)
    with pytest.raises(Unavailable):
        store.rename_ingest("shared-ref", "other")
    with pytest.raises(Unavailable):
        store.rename_ingest("x", "shared-ref")
    # another store instance and another process are refused too
    with LocalStore(store.root) as other:
        with pytest.raises(Unavailable):
            other.writer("shared-ref", wait=0)
    proc = subprocess.run(
        [sys.executable, "-m", "fusefs.cli", "--root", store.root, "ingest", "shared-ref"],
        input=b"abc", capture_output=True, timeout=120,
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.decode().startswith("contentfs: ref shared-ref locked for ")
    # the status is visible while held, and other refs are free
    st = store.status("shared-ref")
    assert (st.offset, st.total) == (100, 300)
    w = store.writer("free-ref")
    w.close()

    h.send("close")
    w = store.writer("shared-ref")
    assert w.offset == 100
    assert w.digest() == digest_of(b"x" * 100)
    assert w.status().total == 300
    w.write(b"y" * 200)
    assert w.commit() == digest_of(b"x" * 100 + b"y" * 200)


def test_killed_holder_releases_the_lock(store: LocalStore, holders: list[Holder]) -> None:
    h = Holder(store.root, "r", 4096)
    holders.append(h)
    with pytest.raises(Unavailable):
        store.writer("r", wait=0)
    h.proc.send_signal(signal.SIGKILL)
    assert h.proc.wait(30) == -signal.SIGKILL
    w = store.writer("r")
    assert w.offset == 4096
    assert w.digest() == digest_of(b"x" * 4096)
    w.close()


def test_commit_in_another_process_frees_and_removes(store: LocalStore,
                                                     holders: list[Holder]) -> None:
    h = Holder(store.root, "r", 10)
    holders.append(h)
    assert h.send("commit") == digest_of(b"x" * 10)
    with pytest.raises(NotFound):
        store.status("r")
    assert store.info(digest_of(b"x" * 10)).size == 10
    w = store.writer("r")
    assert w.offset == 0
    w.close()


def test_many_processes_race_for_one_ref(store: LocalStore) -> None:
    """Of several processes opening one ref at the same moment, exactly one wins."""
    script = (
        "import sys\nfrom store import LocalStore, Unavailable\n"
        "s = LocalStore(sys.argv[1])\n"
        "sys.stdin.readline()\n"
        "try:\n    w = s.writer('race', wait=0)\n"
        "except Unavailable:\n    print('busy', flush=True)\n"
        "else:\n    print('won', flush=True)\n    sys.stdin.readline()\n    w.close()\n"
    )
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", script, store.root], cwd=cwd,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    try:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(p.stdout.readline().strip())
        assert sorted(results) == ["busy"] * 5 + ["won"], results
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(60)
            assert p.stdout is not None
            p.stdout.close()
    w = store.writer("race")  # the winner closed: free again
    w.close()


def test_threads_race_for_one_ref(store: LocalStore) -> None:
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    writers = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            w = store.writer("t", wait=0)
        except Unavailable:
            with lock:
                outcomes.append("busy")
            return
        with lock:
            outcomes.append("won")
            writers.append(w)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy"] * 7 + ["won"]
    writers[0].close()


def test_lock_files_do_not_pile_up(store: LocalStore) -> None:
    locks = os.path.join(store.root, ".contentfs", "locks")
    for i in range(20):
        w = store.writer(f"r{i}")
        w.write(str(i).encode())
        if i % 2:
            w.close()
        else:
            w.commit()
    assert os.listdir(locks) == []
    assert len(store.list_statuses()) == 10


def test_racing_commits_of_the_same_bytes(store_root: str) -> None:
    """Of two commits of the same content at the same moment (two store instances, as two
    processes sharing a root), exactly one succeeds; the other gets AlreadyExists and does
    not overwrite the winner's labels."""
    s1, s2 = LocalStore(store_root), LocalStore(store_root)
    try:
        for i in range(60):
            data = os.urandom(64)
            writers = []
            for s, name in ((s1, "one"), (s2, "two")):
                w = s.writer(f"{name}-{i}")
                w.write(data)
                writers.append((w, name))
            barrier = threading.Barrier(2)
            won: list[str] = []

            def commit(w: LocalWriter, name: str, barrier: threading.Barrier,
                       won: list[str]) -> None:
                barrier.wait()
                try:
                    w.commit(labels={"who": name})
                except AlreadyExists:
                    return
                won.append(name)

            threads = [threading.Thread(target=commit, args=(*wn, barrier, won))
                       for wn in writers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(won) == 1, (i, won)
            assert dict(s1.info(digest_of(data)).labels) == {"who": won[0]}
        assert s1.list_statuses() == []
    finally:
        s1.close()
        s2.close()


def test_racing_commits_across_processes(store: LocalStore) -> None:
    script = (
        "import sys\nfrom store import LocalStore, AlreadyExists\n"
        "s = LocalStore(sys.argv[1])\n"
        "w = s.writer('p-' + sys.argv[2])\n"
        "w.write(b'identical bytes')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "try:\n    w.commit(labels={'who': sys.argv[2]})\n"
        "except AlreadyExists:\n    print('exists', flush=True)\n"
        "else:\n    print('won', flush=True)\n"
    )
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", script, store.root, str(n)], cwd=cwd,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for n in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(60)
            if p.stdout is not None:
                p.stdout.close()
    assert sorted(results) == ["exists"] * 3 + ["won"], results
    winner = str(results.index("won"))
    assert dict(store.info(digest_of(b"identical bytes")).labels) == {"who": winner}
    assert store.list_statuses() == []
    assert os.listdir(os.path.join(store.root, ".contentfs", "locks")) == []
