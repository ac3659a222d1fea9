"""contentfs benchmark: every figure of issue 5, each paired with its baseline.

Each figure runs its two commands alternately (A B A B ...) in the same process tree and
on the same data; values are medians over the runs and the ratio is the median of the
per-pair ratios, so a noisy machine moves both sides together. Throughput figures report
MB/s (10^6 bytes/s) and ``ours / baseline``; metadata figures report seconds and
``ours / baseline`` time (lower is better); memory reports peak RSS in MB.

The harness starts everything it measures (a FUSE mount of a temporary root,
``contentfs serve``, a containerd daemon with its own root, state and socket) and stops
all of it on exit, failure or Ctrl-C. Run it through ``scripts/bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from store.text import human_size

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MiB = 1 << 20
NS = "default"  # namespace of every ctr call: the one a mount and the CLI use by default


class BenchError(Exception):
    """A figure could not be measured (a command failed or a check did not hold)."""


# --------------------------------------------------------------------------------------
# figures


@dataclasses.dataclass(frozen=True)
class Figure:
    """One row of the table. ``kind`` is ``rate`` (MB/s, higher is better, ratio =
    ours/baseline), ``time`` (seconds, ratio = ours/baseline, lower is better) or
    ``memory`` (peak MB; the target applies to ``ours``, the ratio is informative)."""

    name: str
    title: str
    ours: str
    baseline: str
    kind: str
    op: str  # comparison of ratio (or of ours, for memory) with target: >=, >, <=, <
    target: float
    note: str = ""


FIGURES: tuple[Figure, ...] = (
    Figure("read_first", "first read, big blob", "cat via mount, mount cache dropped",
           "cat of the backing file, page cache warm", "rate", ">=", 0.3),
    Figure("read_warm", "warm re-read", "cat via mount, second read",
           "cat of the backing file, page cache warm", "rate", ">=", 0.7),
    Figure("ingest_mount", "ingest big blob via mount", "cp into ingest/ + setfattr commit",
           "Python hashlib.sha256 over the same bytes", "rate", ">=", 0.6),
    Figure("small_writes", "small writes into ingest", "dd bs=16k into ingest/",
           "dd bs=1M into ingest/", "rate", ">=", 0.6),
    Figure("ls_first", "first ls -l after mount", "ls -l via a fresh mount",
           "ls -l of the backing dir", "time", "<=", 3.0),
    Figure("ls_many", "ls -l of many blobs", "ls -l via mount", "ls -l of the backing dir",
           "time", "<=", 1.5),
    Figure("find_many", "find -newer of many blobs", "find -newer via mount",
           "find -newer in the backing dir", "time", "<=", 1.5),
    Figure("stat_hit", "stat of existing blobs, 2nd pass", "os.stat via mount",
           "os.stat in the backing dir", "time", "<=", 2.0),
    Figure("stat_miss", "stat of missing blobs, 2nd pass", "os.stat via mount",
           "os.stat in the backing dir", "time", "<=", 2.0),
    Figure("ctr_get", "ctr content get, big blob", "ctr against contentfs serve",
           "ctr against containerd", "rate", ">=", 1.3),
    Figure("ctr_ingest", "ctr content ingest, big blob", "ctr against contentfs serve",
           "ctr against containerd", "rate", ">=", 1.5),
    Figure("cli_ingest", "CLI ingest, big blob", "contentfs ingest",
           "ctr content ingest on containerd", "rate", ">", 1.0),
    Figure("cli_get", "CLI get, big blob", "contentfs get", "ctr content get on containerd",
           "rate", ">", 1.0),
    Figure("read_remote", "first read via a mount over containerd",
           "cat of a 256 MiB blob via `contentfs mount --address` (cache dropped)",
           "ctr content get of it from the same containerd", "rate", ">=", 2.0),
    Figure("cli_verify", "CLI verify, blobs of 1-64 MiB", "contentfs verify",
           "sha256sum of the blob files", "rate", ">=", 2.0),
    Figure("fetch_registry", "fetch an image from a registry", "contentfs fetch",
           "ctr content fetch into containerd", "rate", ">=", 1.0),
    Figure("fetch_registry_skopeo", "fetch an image from a registry", "contentfs fetch",
           "skopeo copy docker:// oci:", "rate", ">=", 1.0),
    Figure("rss_mount", "mount daemon peak RSS", "contentfs mount (VmHWM)",
           "containerd (VmHWM)", "memory", "<", 150.0),
    Figure("rss_serve", "serve daemon peak RSS", "contentfs serve (VmHWM)",
           "containerd (VmHWM)", "memory", "<", 150.0),
    Figure("serve_rss_abandoned", "serve RSS after abandoned large writes",
           "contentfs serve RSS after rounds of abandoned 15 MB writes (max)",
           "the same server's RSS before them", "memory", "<", 100.0,
           "within 50 MB of the ~46 MB start (issue 15); growth in extra"),
    Figure("gc_many", "gc over many blobs, all reachable",
           "contentfs gc peak RSS: --blobs blobs, a tenth gc.root, the rest by gc.ref.content",
           "contentfs gc peak RSS over an empty store", "memory", "<", 150.0,
           "time, writers held off and blob count in extra (issue 12)"),
    Figure("pull_proxy", "ctr images pull, one big layer",
           "containerd over contentfs serve (content proxy plugin)",
           "containerd with its own content store", "rate", ">=", 0.8),
)
BY_NAME = {f.name: f for f in FIGURES}
REGISTRY_FIGS = frozenset({"fetch_registry", "fetch_registry_skopeo"})
PULL_FIGS = frozenset({"pull_proxy"})  # makes its own data and daemons


@dataclasses.dataclass
class Result:
    figure: Figure
    ours: list[float] = dataclasses.field(default_factory=list)
    baseline: list[float] = dataclasses.field(default_factory=list)
    ratio: float | None = None
    error: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def finish(self) -> None:
        f = self.figure
        if not self.ours or not self.baseline:
            return
        if f.kind == "memory":
            self.ratio = max(self.ours) / max(self.baseline)
            return
        pairs = list(zip(self.ours, self.baseline, strict=False))
        self.ratio = statistics.median(a / b for a, b in pairs if b > 0)

    def value(self, side: list[float]) -> float | None:
        if not side:
            return None
        return max(side) if self.figure.kind == "memory" else statistics.median(side)

    def met(self) -> bool | None:
        f = self.figure
        x = self.value(self.ours) if f.kind == "memory" else self.ratio
        if x is None:
            return None
        return {">=": x >= f.target, ">": x > f.target, "<=": x <= f.target,
                "<": x < f.target}[f.op]

    def to_json(self) -> dict[str, Any]:
        f = self.figure
        unit = {"rate": "MB/s", "time": "s", "memory": "MB"}[f.kind]
        return {
            "name": f.name, "title": f.title, "ours_what": f.ours, "baseline_what": f.baseline,
            "unit": unit, "ours": self.value(self.ours), "baseline": self.value(self.baseline),
            "ratio": self.ratio, "target": f.target, "op": f.op, "met": self.met(),
            "note": f.note, "runs": {"ours": self.ours, "baseline": self.baseline},
            "error": self.error, **({"extra": self.extra} if self.extra else {}),
        }


# --------------------------------------------------------------------------------------
# processes


def run(
    argv: Sequence[str], *, stdin: IO[bytes] | None = None, stdout: Any = subprocess.DEVNULL,
    env: dict[str, str] | None = None, check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; BenchError with its stderr when it fails (and ``check``)."""
    p = subprocess.run(list(argv), stdin=stdin if stdin is not None else subprocess.DEVNULL,
                       stdout=stdout, stderr=subprocess.PIPE, env=env)
    if check and p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"{' '.join(argv[:4])}: exit {p.returncode}: {' | '.join(err[-3:])}")
    return p


def timed(argv: Sequence[str], *, stdin_path: str | None = None,
          env: dict[str, str] | None = None) -> float:
    """Wall time of one command (stdout to /dev/null, stdin from a file if given)."""
    with contextlib.ExitStack() as stack:
        stdin = stack.enter_context(open(stdin_path, "rb")) if stdin_path else None
        t0 = time.perf_counter()
        run(argv, stdin=stdin, env=env)
        return time.perf_counter() - t0


def read_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field (VmHWM, VmRSS) of /proc/PID/status."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"process {pid}: no {field} in /proc/{pid}/status")


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
SPAWNED: list[Daemon] = []  # every daemon started, in order; main() stops what is left


def stop_spawned() -> None:
    for d in reversed(SPAWNED):
        d.stop()


class Daemon:
    """A background process in its own session (so the whole group can be stopped)."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.peak_mb = 0.0
        self.stopped = False
        # A signal must not land between the fork and our record of the child: block
        # them until the daemon is in SPAWNED, which main() stops in any case.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
            SPAWNED.append(self)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} exited {self.proc.returncode}: {self.log_tail()}")

    def peak_rss_mb(self) -> float:
        """Peak RSS over the daemon's life (phase resets included)."""
        self.peak_mb = max(self.peak_mb, read_status_kb(self.pid, "VmHWM") / 1024)
        return self.peak_mb

    def phase_peak_mb(self) -> float:
        """Peak RSS since the previous call: VmHWM, then reset it (clear_refs 5)."""
        peak = read_status_kb(self.pid, "VmHWM") / 1024
        self.peak_mb = max(self.peak_mb, peak)
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as fh:
            fh.write("5")
        return peak

    def rss_mb(self) -> float:
        return read_status_kb(self.pid, "VmRSS") / 1024

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it does not exit in time."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.pid, signal.SIGKILL)
                    self.proc.wait(5)
            # children the daemon left in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        finally:
            self._log.close()


def wait_until(what: str, cond: Callable[[], bool], daemon: Daemon | None,
               timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if daemon is not None:
            daemon.check_alive()
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f}s"
                             + (f": {daemon.log_tail()}" if daemon else ""))
        time.sleep(0.05)


def is_mounted(path: Path) -> bool:
    target = os.fsencode(str(path))
    with open("/proc/self/mounts", "rb") as fh:
        return any(line.split()[1] == target for line in fh)


def unmount_under(path: Path) -> None:
    """Lazily unmount whatever is still mounted below ``path`` (last-resort cleanup)."""
    prefix = os.fsencode(str(path)) + b"/"
    with open("/proc/self/mounts", "rb") as fh:
        targets = [ln.split()[1] for ln in fh if ln.split()[1].startswith(prefix)]
    for t in targets:
        run(["fusermount3", "-u", "-z", os.fsdecode(t)], check=False)


class Mount:
    """``contentfs mount -f ROOT MNT`` as our own child, so its PID (and RSS) is known."""

    def __init__(self, root: Path, mnt: Path, logdir: Path) -> None:
        self.root, self.mnt = root, mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.daemon = Daemon("contentfs mount", [str(BIN / "contentfs"), "mount", "-f",
                                                 str(root), str(mnt)],
                             logdir / "mount.log")
        try:
            wait_until("mount", lambda: is_mounted(mnt) and (mnt / "blobs").exists(),
                       self.daemon)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            if is_mounted(self.mnt):
                run([str(BIN / "contentfs"), "umount", str(self.mnt)], check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.daemon.proc.wait(15)
        finally:
            self.daemon.stop()
            if is_mounted(self.mnt):
                run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)


class RemoteMount(Mount):
    """``contentfs mount -f --address SOCK -o namespace=NS MNT``: a mount over containerd."""

    def __init__(self, sock: Path, mnt: Path, logdir: Path) -> None:
        self.root, self.mnt = sock, mnt
        mnt.mkdir(parents=True, exist_ok=True)
        self.daemon = Daemon("contentfs mount --address",
                             [str(BIN / "contentfs"), "mount", "-f", "--address",
                              f"unix://{sock}", "-o", f"namespace={NS}", str(mnt)],
                             logdir / "mount-remote.log")
        try:
            wait_until("remote mount", lambda: is_mounted(mnt) and (mnt / "blobs").exists(),
                       self.daemon)
        except BaseException:
            self.stop()
            raise


class Serve:
    """``contentfs serve`` on a unix socket; ready when it prints its "serving" line."""

    def __init__(self, root: Path, sock: Path, logdir: Path, name: str = "serve") -> None:
        self.sock = sock
        log = logdir / f"{name}.log"
        self.daemon = Daemon("contentfs serve", [str(BIN / "contentfs"), "serve", "--root",
                                                 str(root), "--address", f"unix://{sock}"], log)
        try:
            wait_until("contentfs serve", lambda: b"serving" in log.read_bytes()
                       and sock.exists(), self.daemon)
        except BaseException:
            self.daemon.stop()
            raise

    def stop(self) -> None:
        self.daemon.stop()


class Containerd:
    """Debian's containerd on its own root, state and socket; no CRI, no GC by mutation
    count (so blobs ingested without a lease survive the benchmark)."""

    DISABLED = ("io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
                "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing")

    def __init__(self, base: Path, sock: Path, content_proxy: Path | None = None) -> None:
        """``content_proxy``: the socket of a Content server that replaces containerd's
        built-in content store (``[proxy_plugins]``, as for the pull_proxy figure)."""
        exe = shutil.which("containerd")
        if exe is None:
            raise BenchError("containerd not found (apt-get install containerd)")
        base.mkdir(parents=True, exist_ok=True)
        self.sock = sock
        self.daemon_root = base / "root"
        disabled = list(self.DISABLED)
        if content_proxy:
            disabled.append("io.containerd.content.v1.content")
        config = base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{base / "root"}"\n'
            f'state = "{base / "state"}"\n'
            f"disabled_plugins = {json.dumps(disabled)}\n"
            f'[grpc]\n  address = "{self.sock}"\n'
            f'[ttrpc]\n  address = "{self.sock}.ttrpc"\n'
            '[debug]\n  level = "warn"\n'
            '[plugins."io.containerd.gc.v1.scheduler"]\n  mutation_threshold = 0\n'
            + (f'[proxy_plugins.contentfs]\n  type = "content"\n  address = "{content_proxy}"\n'
               if content_proxy else "")
        )
        self.daemon = Daemon("containerd", [exe, "--config", str(config)], base / "log")
        try:
            wait_until("containerd", lambda: self.sock.exists() and run(
                ctr(self.sock, "version"), check=False).returncode == 0, self.daemon)
        except BaseException:
            self.daemon.stop()
            raise

    def stop(self) -> None:
        self.daemon.stop()


def ctr(sock: Path, *args: str) -> list[str]:
    return ["ctr", "-a", str(sock), "-n", NS, *args]


# --------------------------------------------------------------------------------------
# data


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``64k`` or a byte count (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if mult != 1 else t
    try:
        n = int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a size (e.g. 1G, 256M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: size must be positive")
    return n


def make_random_file(path: Path, size: int, seed: int) -> str:
    """Write ``size`` incompressible bytes; return their sha256 hex. Every 1 MiB chunk is
    one random 4 MiB pool at a seed-chosen offset, with the chunk number stamped in front,
    so chunks differ (no store here deduplicates or compresses, so this is enough)."""
    rng = random.Random(seed)
    pool = rng.randbytes(4 * MiB)
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for i in range((size + MiB - 1) // MiB):
            start = rng.randrange(3 * MiB)
            chunk = (b"%016x" % i + pool[start : start + MiB - 16])[: size - i * MiB]
            h.update(chunk)
            fh.write(chunk)
    return h.hexdigest()


def warm(path: Path) -> None:
    """Read a file once so it sits in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(MiB)
        while fh.readinto(buf):
            pass


def drop_cache(path: Path) -> None:
    """Drop one file's pages from the page cache (works for a file on the mount: the
    kernel keeps FUSE file data in the same page cache, keyed by the FUSE inode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> float | None:
    """Fraction of a file's pages resident in the page cache (``fincore``), or None."""
    if shutil.which("fincore") is None:
        return None
    p = run(["fincore", "-b", "-n", "-o", "RES,SIZE", str(path)], stdout=subprocess.PIPE,
            check=False)
    try:
        res, size = (int(x) for x in p.stdout.split()[:2])
    except ValueError:
        return None
    return res / size if size else 1.0


def make_small_blobs(blob_dir: Path, n: int) -> list[str]:
    """``n`` tiny blobs written straight into the backing dir, named by their sha256;
    returned in creation order (so their mtimes increase along the list). About 20 s
    per million on ext4."""
    blob_dir.mkdir(parents=True, exist_ok=True)
    names = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    dfd = os.open(blob_dir, os.O_RDONLY | os.O_DIRECTORY)
    sha256, open_, write, close = hashlib.sha256, os.open, os.write, os.close
    try:
        for i in range(n):
            data = b"contentfs bench blob %d\n" % i
            hexd = sha256(data).hexdigest()
            fd = open_(hexd, flags, 0o444, dir_fd=dfd)
            try:
                write(fd, data)
            finally:
                close(fd)
            names.append(hexd)
    finally:
        os.close(dfd)
    return names


def small_blob_size(i: int) -> int:
    return len(b"contentfs bench blob %d\n" % i)


def record_blobs(root: Path, rows: Sequence[tuple[str, int]], label: bool = True) -> None:
    """Give each blob ``(hex, size)`` its metadata row (and one label), as a commit
    through contentfs would (so listings pay for the database as they do on a real
    store), in order (so CreatedAt increases along ``rows`` as the files' mtimes do).
    One transaction for all of them: a million rows take seconds, not an hour of
    per-commit transactions."""
    import sqlite3

    from store import LocalStore

    LocalStore(str(root)).close()  # creates the database and its tables
    from store.layout import Layout

    conn = sqlite3.connect(Layout(str(root)).db)
    try:
        base = time.time_ns()
        with conn:
            conn.executemany(
                "INSERT OR REPLACE INTO blobs(ns, digest, size, created_ns, updated_ns)"
                " VALUES ('default', ?, ?, ?, ?)",
                ((f"sha256:{h}", size, base + i, base + i) for i, (h, size) in enumerate(rows)))
            if label:
                conn.executemany(
                    "INSERT OR REPLACE INTO labels(ns, digest, key, value)"
                    " VALUES ('default', ?, ?, ?)",
                    ((f"sha256:{h}", "containerd.io/distribution.source.bench", "library/bench")
                     for h, _ in rows))
    finally:
        conn.close()


def make_verify_blobs(root: Path, total: int, seed: int) -> list[tuple[str, int]]:
    """Blobs of 1 to 64 MiB (at most total/4, at least 1 MiB) adding up to ``total``
    bytes, written into the store with their rows; returns (hex, size) of each."""
    rng = random.Random(seed)
    blob_dir = root / "blobs" / "sha256"
    largest = max(1, min(64, total // MiB // 4))
    out: list[tuple[str, int]] = []
    left, i = total, 0
    while left > 0:
        size = min(left, rng.randint(1, largest) * MiB)
        tmp = root / f"verify-{i}.tmp"
        hexd = make_random_file(tmp, size, seed * 1000 + i)
        os.replace(tmp, blob_dir / hexd)
        out.append((hexd, size))
        left -= size
        i += 1
    record_blobs(root, out, label=False)
    return out


def commit_file(root: Path, path: Path, hexd: str) -> None:
    """Store a file as a blob the way contentfs does (writer, commit): a committed blob,
    with its metadata row, not a foreign file the mount would verify on first read."""
    from store import LocalStore

    store = LocalStore(str(root))
    try:
        w = store.writer(f"bench-prepare-{hexd[:12]}", total=path.stat().st_size)
        with open(path, "rb") as fh:
            while chunk := fh.read(8 * MiB):
                w.write(chunk)
        w.commit(expected=f"sha256:{hexd}")
    finally:
        store.close()


def hashlib_seconds(path: Path) -> float:
    """Python's hashlib.sha256 over a (page-cached) file in 1 MiB chunks."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    h.hexdigest()
    return time.perf_counter() - t0


def stat_pass_seconds(paths: Sequence[str]) -> float:
    """One pass of os.stat over ``paths`` (missing ones are fine)."""
    st = os.stat
    t0 = time.perf_counter()
    for p in paths:
        try:
            st(p)
        except FileNotFoundError:
            pass
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# the benchmark


@dataclasses.dataclass
class Params:
    size: int
    small_size: int
    blobs: int
    stats: int
    runs: int
    slow_runs: int
    only: frozenset[str]
    tmpdir: str
    keep: bool
    json_path: Path
    quick: bool
    compare: Path | None = None
    plot: bool = False
    show: bool = False
    layer_size: int = 512 * MiB
    pull_layer_size: int = 256 * MiB


class Bench:
    """Prepares the data, starts what the selected figures need, runs them."""

    def __init__(self, p: Params, stack: contextlib.ExitStack) -> None:
        self.p = p
        self.stack = stack
        self.results: dict[str, Result] = {}
        self.env = {**os.environ, "LC_ALL": "C"}
        self.work = Path(tempfile.mkdtemp(prefix="contentfs-bench-", dir=p.tmpdir))
        if not p.keep:
            stack.callback(shutil.rmtree, self.work, True)
        stack.callback(unmount_under, self.work)  # never rmtree through a live mount
        self.root = self.work / "root"
        self.mnt = self.work / "mnt"
        self.logs = self.work / "logs"
        self.logs.mkdir()
        # unix socket paths are limited to ~104 bytes: keep them in a short directory
        self.socks = Path(tempfile.mkdtemp(prefix="cfsb-", dir="/tmp"))
        stack.callback(shutil.rmtree, self.socks, True)
        self.root.mkdir()
        self.mount: Mount | None = None
        self.serve: Serve | None = None
        self.containerd: Containerd | None = None
        self.rss: dict[str, dict[str, float]] = {}
        self.start_errors: dict[str, str] = {}
        self.load_before = os.getloadavg()  # the machine's load as the run starts
        self.prepared = False
        self.verify_blobs: list[tuple[str, int]] = []  # (hex, size), for cli_verify

    # setup ------------------------------------------------------------------------------

    def wanted(self, *names: str) -> bool:
        return any(n in self.p.only for n in names)

    def prepare(self) -> None:
        p = self.p
        self.prepared = not p.only <= REGISTRY_FIGS | PULL_FIGS
        if not self.prepared:  # the registry figures make their own data
            return
        say(f"preparing data in {self.work}: 2 x {human_size(p.size)}, {p.blobs} small blobs")
        self.big = self.work / "big.bin"
        self.big_hex = make_random_file(self.big, p.size, 1)
        self.src = self.work / "ingest.bin"
        self.src_hex = make_random_file(self.src, p.size, 2)
        blob_dir = self.root / "blobs" / "sha256"
        t0 = time.monotonic()
        self.names = make_small_blobs(blob_dir, p.blobs)
        record_blobs(self.root, [(h, small_blob_size(i)) for i, h in enumerate(self.names)])
        say(f"  {p.blobs} small blobs with their rows in {time.monotonic() - t0:.1f} s")
        self.big_blob = blob_dir / self.big_hex
        commit_file(self.root, self.big, self.big_hex)
        if self.wanted("cli_verify"):
            self.verify_blobs = make_verify_blobs(self.root, p.size, 3)
        for f in (self.big, self.src, self.big_blob):
            warm(f)

    def start_mount(self) -> Mount:
        if self.mount is None:
            say("starting contentfs mount")
            self.mount = Mount(self.root, self.mnt, self.logs)
            self.stack.callback(self.mount.stop)
            self.rss["mount"] = {"start": self.mount.daemon.rss_mb()}
        return self.mount

    def start_serve(self) -> Serve:
        if self.serve is None:
            say("starting contentfs serve")
            self.serve = Serve(self.root, self.socks / "cfs.sock", self.logs)
            self.stack.callback(self.serve.stop)
            self.rss["serve"] = {"start": self.serve.daemon.rss_mb()}
        return self.serve

    def start_containerd(self) -> Containerd:
        if self.containerd is None:
            say("starting containerd")
            c = Containerd(self.work / "containerd", self.socks / "c.sock")
            self.containerd = c
            self.stack.callback(c.stop)
            if self.prepared:
                with open(self.big, "rb") as fh:
                    run(ctr(c.sock, "content", "ingest", "bench-big"), stdin=fh)
                run(ctr(c.sock, "content", "label", f"sha256:{self.big_hex}",
                        "containerd.io/gc.root=bench"))
            self.rss["containerd"] = {"start": c.daemon.rss_mb()}
        return self.containerd

    # figures ------------------------------------------------------------------------------

    def figure(self, name: str) -> Figure:
        """The figure with this run's target: at a million blobs the mount may use 300 MB
        (issue 14), at the default 100,000 it stays under 150 MB."""
        f = BY_NAME[name]
        if name == "rss_mount" and self.p.blobs > 200_000:
            f = dataclasses.replace(f, target=300.0)
        return f

    def measure(self, name: str, fn: Callable[[Result], None]) -> None:
        if name not in self.p.only:
            return
        res = Result(self.figure(name))
        self.results[name] = res
        say(f"  {name}: {res.figure.title}")
        daemons = {"mount": self.mount, "serve": self.serve, "containerd": self.containerd}
        for d in daemons.values():
            if d is not None and d.daemon.alive():
                d.daemon.phase_peak_mb()
        t0 = time.monotonic()
        try:
            fn(res)
        except BenchError as exc:
            res.error = str(exc)
            say(f"  {name}: FAILED: {exc}")
        res.finish()
        res.extra["seconds"] = round(time.monotonic() - t0, 1)
        # which phase drives each daemon's memory: peak during this figure, RSS after it
        for key, d in daemons.items():
            if d is not None and d.daemon.alive():
                self.rss.setdefault(key, {})[f"{name} peak"] = round(d.daemon.phase_peak_mb(), 1)
                self.rss[key][f"{name} after"] = round(d.daemon.rss_mb(), 1)

    def pairs(self, res: Result, runs: int, ours: Callable[[], float],
              base: Callable[[], float], to_value: Callable[[float], float]) -> None:
        """Alternate ours/baseline ``runs`` times; store to_value(seconds) of each."""
        for _ in range(runs):
            res.ours.append(to_value(ours()))
            res.baseline.append(to_value(base()))

    def rate(self, nbytes: int) -> Callable[[float], float]:
        return lambda seconds: nbytes / seconds / 1e6

    def run_all(self) -> None:
        p = self.p
        fuse_figs = ("read_first", "read_warm", "ingest_mount", "small_writes", "ls_first",
                     "ls_many", "find_many", "stat_hit", "stat_miss", "rss_mount")
        grpc_figs = ("ctr_get", "ctr_ingest", "rss_serve")
        cd_figs = ("ctr_get", "ctr_ingest", "cli_ingest", "cli_get", "read_remote", "rss_mount",
                   "rss_serve")
        if self.wanted(*cd_figs):
            self.guard("containerd", self.start_containerd)
        if self.wanted(*fuse_figs):
            self.guard("mount", self.start_mount)
        if self.mount is not None:
            # first: it remounts, and the later figures then see one mount's whole life
            self.measure("ls_first", self.fig_ls_first)
        if self.mount is not None:
            self.measure("read_first", self.fig_read_first)
            self.measure("read_warm", self.fig_read_warm)
            self.measure("ls_many", self.fig_ls_many)
            self.measure("find_many", self.fig_find_many)
            self.measure("stat_hit", lambda r: self.fig_stat(r, self.names))
            self.measure("stat_miss", lambda r: self.fig_stat(r, None))
            self.measure("ingest_mount", self.fig_ingest_mount)
            self.measure("small_writes", self.fig_small_writes)
            self.measure("rss_mount", lambda r: self.fig_rss(r, self.mount))
        if self.wanted(*grpc_figs):
            self.guard("serve", self.start_serve)
        if self.serve is not None and self.containerd is not None:
            self.measure("ctr_get", self.fig_ctr_get)
            self.measure("ctr_ingest", self.fig_ctr_ingest)
        if self.containerd is not None:
            self.measure("cli_ingest", self.fig_cli_ingest)
            self.measure("cli_get", self.fig_cli_get)
            self.measure("read_remote", self.fig_read_remote)
        self.measure("cli_verify", self.fig_cli_verify)
        if self.serve is not None:
            self.measure("rss_serve", lambda r: self.fig_rss(r, self.serve))
        self.measure("serve_rss_abandoned", self.fig_serve_rss_abandoned)
        self.measure("gc_many", self.fig_gc_many)
        if self.wanted("fetch_registry", "fetch_registry_skopeo"):
            self.run_registry_figures()
        if self.wanted("pull_proxy"):
            self.run_pull_proxy()
        for name in p.only:
            if name not in self.results:
                res = Result(self.figure(name), error=self.start_errors.get(name, "not run"))
                self.results[name] = res

    def guard(self, what: str, start: Callable[[], object]) -> None:
        try:
            start()
        except BenchError as exc:
            say(f"  cannot start {what}: {exc}")
            deps = {"mount": ("read_first", "read_warm", "ingest_mount", "small_writes",
                              "ls_first", "ls_many", "find_many", "stat_hit", "stat_miss",
                              "rss_mount"),
                    "serve": ("ctr_get", "ctr_ingest", "rss_serve"),
                    "containerd": ("ctr_get", "ctr_ingest", "cli_ingest", "cli_get",
                                   "read_remote")}
            for name in deps[what]:
                self.start_errors.setdefault(name, f"{what} did not start: {exc}")

    # FUSE -----------------------------------------------------------------------------

    @property
    def mnt_blob(self) -> Path:
        return self.mnt / "blobs" / "sha256" / self.big_hex

    def cat(self, path: Path) -> Callable[[], float]:
        return lambda: timed(["cat", str(path)], env=self.env)

    def fig_read_first(self, res: Result) -> None:
        # one untimed check: the mount returns the right bytes
        h = hashlib.sha256()
        with open(self.mnt_blob, "rb", buffering=0) as fh:
            buf = bytearray(MiB)
            view = memoryview(buf)
            while n := fh.readinto(buf):
                h.update(view[:n])
        if h.hexdigest() != self.big_hex:
            raise BenchError(f"{self.mnt_blob}: read back sha256:{h.hexdigest()}")
        cat_mnt = self.cat(self.mnt_blob)
        fractions = []

        def first() -> float:
            drop_cache(self.mnt_blob)
            frac = cached_fraction(self.mnt_blob)
            if frac is not None:
                fractions.append(frac)
            return cat_mnt()

        self.pairs(res, self.p.runs, first, self.cat(self.big_blob), self.rate(self.p.size))
        if fractions:
            res.extra["cached_before_first_read"] = max(fractions)
            if max(fractions) > 0.01:
                raise BenchError(f"mount cache not dropped ({max(fractions):.0%} resident)")

    def fig_read_warm(self, res: Result) -> None:
        cat_mnt = self.cat(self.mnt_blob)
        cat_mnt()  # make sure the mount's cache holds it
        frac = cached_fraction(self.mnt_blob)
        if frac is not None:
            res.extra["cached_before_reread"] = frac
        self.pairs(res, self.p.runs, cat_mnt, self.cat(self.big_blob), self.rate(self.p.size))

    def fig_ingest_mount(self, res: Result) -> None:
        ref = self.mnt / "ingest" / "bench-cp"
        blob = self.mnt / "blobs" / "sha256" / self.src_hex

        def ours() -> float:
            t0 = time.perf_counter()
            run(["cp", str(self.src), str(ref)])
            run(["setfattr", "-n", "user.contentfs.commit", "-v", f"sha256:{self.src_hex}",
                 str(ref)])
            t = time.perf_counter() - t0
            if not blob.exists() or blob.stat().st_size != self.p.size:
                raise BenchError(f"{blob}: missing or wrong size after commit")
            run(["rm", "-f", str(blob)])
            return t

        self.pairs(res, self.p.runs, ours, lambda: hashlib_seconds(self.src),
                   self.rate(self.p.size))

    def fig_small_writes(self, res: Result) -> None:
        size = self.p.small_size
        ref = self.mnt / "ingest" / "bench-dd"

        def dd(bs: int) -> Callable[[], float]:
            def go() -> float:
                t = timed(["dd", f"if={self.src}", f"of={ref}", f"bs={bs}",
                           f"count={size // bs}", "status=none"])
                got = ref.stat().st_size
                run(["rm", "-f", str(ref)])
                if got != size // bs * bs:
                    raise BenchError(f"dd bs={bs}: ingest holds {got} bytes")
                return t
            return go

        res.extra["bytes"] = size
        self.pairs(res, self.p.runs, dd(16 << 10), dd(MiB), self.rate(size // MiB * MiB))

    def restart_mount(self) -> Mount:
        """Unmount and mount again: the daemon's caches and the kernel's are empty."""
        assert self.mount is not None
        old = self.mount
        old.stop()
        peak = old.daemon.peak_mb
        self.mount = None
        m = self.start_mount()
        m.daemon.peak_mb = max(m.daemon.peak_mb, peak)
        return m

    def fig_ls_first(self, res: Result) -> None:
        d_root = self.root / "blobs" / "sha256"
        res.extra["entries"] = self.p.blobs + 1 + len(self.verify_blobs)

        def first() -> float:
            if res.ours:  # the mount started by run_all has not listed anything yet
                self.restart_mount()
            return timed(["ls", "-l", str(self.mnt / "blobs" / "sha256")], env=self.env)

        self.pairs(res, self.p.runs, first, lambda: timed(["ls", "-l", str(d_root)],
                                                           env=self.env), float)

    def fig_ls_many(self, res: Result) -> None:
        d_mnt, d_root = self.mnt / "blobs" / "sha256", self.root / "blobs" / "sha256"
        res.extra["entries"] = self.p.blobs + 1 + len(self.verify_blobs)
        self.pairs(res, self.p.runs, lambda: timed(["ls", "-l", str(d_mnt)], env=self.env),
                   lambda: timed(["ls", "-l", str(d_root)], env=self.env), float)

    def fig_find_many(self, res: Result) -> None:
        d_mnt, d_root = self.mnt / "blobs" / "sha256", self.root / "blobs" / "sha256"
        mid = self.names[len(self.names) // 2]

        def find(d: Path) -> Callable[[], float]:
            return lambda: timed(["find", str(d), "-newer", str(d / mid)], env=self.env)

        self.pairs(res, self.p.runs, find(d_mnt), find(d_root), float)

    def fig_stat(self, res: Result, names: list[str] | None) -> None:
        n = self.p.stats
        if names is None:
            rng = random.Random(3)
            picked = [f"{rng.getrandbits(256):064x}" for _ in range(n)]
        else:
            picked = (names * (n // max(1, len(names)) + 1))[:n]
        d_mnt, d_root = self.mnt / "blobs" / "sha256", self.root / "blobs" / "sha256"
        on_mnt = [str(d_mnt / h) for h in picked]
        on_root = [str(d_root / h) for h in picked]

        def second_pass(paths: list[str]) -> Callable[[], float]:
            def go() -> float:
                stat_pass_seconds(paths)
                return stat_pass_seconds(paths)
            return go

        res.extra["stats"] = n
        self.pairs(res, self.p.runs, second_pass(on_mnt), second_pass(on_root), float)

    def fig_rss(self, res: Result, which: Mount | Serve | None) -> None:
        if which is None or self.containerd is None:
            raise BenchError("daemon or containerd not running")
        key = "mount" if isinstance(which, Mount) else "serve"
        if isinstance(which, Serve):
            # the serve daemon's share of "listing many blobs": ctr content ls over gRPC
            t0 = time.perf_counter()
            out = run(ctr(which.sock, "content", "ls", "-q"), stdout=subprocess.PIPE).stdout
            res.extra["ctr_ls_seconds"] = round(time.perf_counter() - t0, 3)
            if len(out.split()) < self.p.blobs:
                raise BenchError(f"ctr content ls via serve: {len(out.split())} blobs listed")
        self.rss.setdefault(key, {})["end"] = which.daemon.rss_mb()
        res.ours.append(which.daemon.peak_rss_mb())
        res.baseline.append(self.containerd.daemon.peak_rss_mb())
        res.extra["rss_mb"] = self.rss.get(key, {})

    def fig_serve_rss_abandoned(self, res: Result) -> None:
        """Rounds of Write streams that each send one 15 MB chunk and leave without a
        commit, against a server of its own: its RSS once they left, vs before."""
        import threading

        import grpc

        from store.grpc.pb import content_pb2 as pb

        writers, rounds = (8, 1) if self.p.quick else (64, 4)
        root = self.work / "abandoned-root"
        root.mkdir()
        logs = self.logs / "abandoned"
        logs.mkdir()
        srv = Serve(root, self.socks / "abandoned.sock", logs)
        chunk = os.urandom(15 * MiB)

        def one(rnd: int, i: int) -> None:
            ch = grpc.insecure_channel(f"unix:{srv.sock}", options=[
                ("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 32 * MiB)])
            call = ch.stream_stream("/containerd.services.content.v1.Content/Write",
                                    request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=pb.WriteContentResponse.FromString)
            req = pb.WriteContentRequest(action=pb.WRITE, ref=f"abandoned-{rnd}-{i}", data=chunk)
            with contextlib.suppress(grpc.RpcError):
                for _ in call(iter([req]), metadata=(("containerd-namespace", NS),), timeout=120):
                    pass
            ch.close()

        try:
            before = srv.daemon.rss_mb()
            after = []
            for rnd in range(rounds):
                threads = [threading.Thread(target=one, args=(rnd, i)) for i in range(writers)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                srv.daemon.check_alive()
                # the clients have left; the server trims shortly after
                settle = time.monotonic() + 5
                while srv.daemon.rss_mb() > before + 50 and time.monotonic() < settle:
                    time.sleep(0.1)
                after.append(round(srv.daemon.rss_mb(), 1))
            res.ours.append(max(after))
            res.baseline.append(before)
            res.extra.update({"writers": writers, "rounds": rounds, "rss_after_rounds": after,
                              "growth_mb": round(max(after) - before, 1)})
        finally:
            srv.stop()

    def fig_gc_many(self, res: Result) -> None:
        """``contentfs gc`` over ``--blobs`` blobs that are all reachable (see
        ``gc_many``), against gc over an empty store: peak RSS of each gc process."""
        empty = gc_many(0, str(self.work), keep=False)
        full = gc_many(self.p.blobs, str(self.work), keep=False)
        res.ours.append(full["peak_rss_mb"])
        res.baseline.append(empty["peak_rss_mb"])
        res.extra.update({k: full[k] for k in ("blobs", "roots", "gc_seconds", "held_seconds",
                                               "remarked")})

    # gRPC and CLI -----------------------------------------------------------------------

    def ctr_get(self, sock: Path) -> Callable[[], float]:
        return lambda: timed(ctr(sock, "content", "get", f"sha256:{self.big_hex}"))

    def ctr_ingest(self, sock: Path) -> Callable[[], float]:
        def go() -> float:
            t = timed(ctr(sock, "content", "ingest", "bench-ctr"), stdin_path=str(self.src))
            p = run(ctr(sock, "content", "rm", f"sha256:{self.src_hex}"), stdout=subprocess.PIPE)
            if self.src_hex not in p.stdout.decode():
                raise BenchError(f"ctr ingest via {sock.name}: sha256:{self.src_hex} not stored")
            return t
        return go

    def fig_ctr_get(self, res: Result) -> None:
        assert self.serve is not None and self.containerd is not None
        self.pairs(res, self.p.slow_runs, self.ctr_get(self.serve.sock),
                   self.ctr_get(self.containerd.sock), self.rate(self.p.size))

    def fig_ctr_ingest(self, res: Result) -> None:
        assert self.serve is not None and self.containerd is not None
        self.pairs(res, self.p.slow_runs, self.ctr_ingest(self.serve.sock),
                   self.ctr_ingest(self.containerd.sock), self.rate(self.p.size))

    def contentfs(self, *args: str) -> list[str]:
        return [str(BIN / "contentfs"), "--root", str(self.root), *args]

    def fig_cli_ingest(self, res: Result) -> None:
        assert self.containerd is not None

        def ours() -> float:
            t = timed(self.contentfs("ingest", "bench-cli"), stdin_path=str(self.src))
            run(self.contentfs("rm", f"sha256:{self.src_hex}"))
            return t

        self.pairs(res, self.p.slow_runs, ours, self.ctr_ingest(self.containerd.sock),
                   self.rate(self.p.size))

    def fig_cli_get(self, res: Result) -> None:
        assert self.containerd is not None
        self.pairs(res, self.p.slow_runs,
                   lambda: timed(self.contentfs("get", f"sha256:{self.big_hex}")),
                   self.ctr_get(self.containerd.sock), self.rate(self.p.size))

    def fig_read_remote(self, res: Result) -> None:
        """A mount over containerd reads in large Read calls, ahead of ``cat``; ``ctr``
        asks 32 KiB per call. The mount's page cache is dropped before each of its runs."""
        assert self.containerd is not None
        size = min(self.p.size, 256 * MiB)
        src = self.work / "remote.bin"
        hexd = make_random_file(src, size, 3)
        sock = self.containerd.sock
        with open(src, "rb") as fh:
            run(ctr(sock, "content", "ingest", "bench-remote"), stdin=fh)
        run(ctr(sock, "content", "label", f"sha256:{hexd}", "containerd.io/gc.root=bench"))
        src.unlink()
        say("  starting contentfs mount --address (containerd)")
        mount = RemoteMount(sock, self.work / "mnt-remote", self.logs)
        try:
            blob = mount.mnt / "blobs" / "sha256" / hexd
            h = hashlib.sha256()
            with open(blob, "rb", buffering=0) as fh:
                buf = bytearray(MiB)
                view = memoryview(buf)
                while n := fh.readinto(buf):
                    h.update(view[:n])
            if h.hexdigest() != hexd:
                raise BenchError(f"{blob}: read back sha256:{h.hexdigest()}")
            cat_mnt = self.cat(blob)

            def first() -> float:
                drop_cache(blob)
                return cat_mnt()

            res.extra["size"] = size
            self.pairs(res, self.p.slow_runs, first,
                       lambda: timed(ctr(sock, "content", "get", f"sha256:{hexd}")),
                       self.rate(size))
        finally:
            mount.stop()


    def fig_cli_verify(self, res: Result) -> None:
        blob_dir = self.root / "blobs" / "sha256"
        digests = [f"sha256:{h}" for h, _ in self.verify_blobs]
        paths = [str(blob_dir / h) for h, _ in self.verify_blobs]
        total = sum(size for _, size in self.verify_blobs)
        for path in paths:
            warm(Path(path))
        res.extra["blobs"] = len(paths)
        res.extra["cpus"] = os.cpu_count()

        def ours() -> float:
            t0 = time.perf_counter()
            out = run(self.contentfs("verify", *digests), stdout=subprocess.PIPE).stdout
            t = time.perf_counter() - t0
            if out.decode().count(": OK\n") != len(digests):
                raise BenchError(f"contentfs verify: {out.decode()[-300:]}")
            return t

        self.pairs(res, self.p.runs, ours, lambda: timed(["sha256sum", *paths]),
                   self.rate(total))
    # registries ---------------------------------------------------------------------------

    def run_pull_proxy(self) -> None:
        _pull_proxy(self)

    def run_registry_figures(self) -> None:
        """``contentfs fetch`` of a one-layer image (``--layer-size``) from a local
        docker-registry, alternated with ``ctr content fetch`` into containerd and with
        ``skopeo copy docker:// oci:``; each run starts with none of the image's content
        where it writes (a fresh root / OCI directory; containerd's copy deleted and
        garbage-collected, checked on disk)."""
        try:
            reg = Registry(self.work / "registry", self.logs)
            self.stack.callback(reg.stop)
            ref = reg.push_image(self.work / "image", self.p.layer_size)
        except BenchError as exc:
            for name in ("fetch_registry", "fetch_registry_skopeo"):
                self.start_errors[name] = f"registry: {exc}"
            say(f"  cannot start the registry: {exc}")
            return
        rate = self.rate(self.p.layer_size)
        runs = self.p.slow_runs

        def ours() -> float:
            root = self.work / "fetch-root"
            shutil.rmtree(root, ignore_errors=True)
            t = timed([str(BIN / "contentfs"), "--root", str(root), "fetch", "--plain-http",
                       ref.name])
            if not (root / "blobs" / "sha256" / ref.layer_hex).is_file():
                raise BenchError("contentfs fetch: the layer is not in the store")
            shutil.rmtree(root, ignore_errors=True)
            return t

        def skopeo() -> float:
            out = self.work / "skopeo-oci"
            shutil.rmtree(out, ignore_errors=True)
            t = timed(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                       f"docker://{ref.name}", f"oci:{out}:v1"])
            if not (out / "blobs" / "sha256" / ref.layer_hex).is_file():
                raise BenchError("skopeo copy: the layer is not in the layout")
            shutil.rmtree(out, ignore_errors=True)
            return t

        if "fetch_registry" in self.p.only:
            if self.containerd is None:
                self.guard("containerd", self.start_containerd)
            c = self.containerd
            if c is not None:
                blob = c.daemon_root / "io.containerd.content.v1.content" / "blobs" / \
                    "sha256" / ref.layer_hex

                def ctr_fetch() -> float:
                    t = timed(ctr(c.sock, "content", "fetch", "--plain-http", ref.name))
                    if not blob.is_file():
                        raise BenchError("ctr content fetch: the layer is not in containerd")
                    run(ctr(c.sock, "images", "rm", ref.name), check=False)
                    run(ctr(c.sock, "content", "rm", *ref.digests))
                    run(ctr(c.sock, "content", "prune", "references"))  # a synchronous GC
                    wait_until("containerd GC of the fetched layer", lambda: not blob.exists(),
                               c.daemon, timeout=30)
                    return t

                self.measure("fetch_registry",
                             lambda r: self.pairs(r, runs, ours, ctr_fetch, rate))
        self.measure("fetch_registry_skopeo",
                     lambda r: self.pairs(r, runs, ours, skopeo, rate))


# pull through a content proxy ----------------------------------------------------------


def _pull_proxy(bench: Bench) -> None:
    """The pull_proxy figure: ``ctr images pull --plain-http`` (fetch and unpack) of a
    one-layer image (``--pull-layer-size``) from a local docker-registry, by a containerd
    whose content store is ``contentfs serve`` (proxy plugin), alternated with the same
    pull by a containerd with its own store; both started for this figure alone, with
    the same configuration otherwise. Every run starts with none of the image there:
    after each pull ``ctr images rm --sync`` has containerd's GC delete it (through
    contentfs for ours), checked on disk."""
    p = bench.p
    base = bench.work / "pull"
    socks = bench.socks
    logs = bench.logs / "pull"
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:  # everything of this figure stops after it
        try:
            reg = Registry(base / "registry", logs)
            stack.callback(reg.stop)
            ref = reg.push_image(base / "image", p.pull_layer_size)
            root = base / "cfs-root"
            serve = Serve(root, socks / "pull-cfs.sock", logs, name="pull-serve")
            stack.callback(serve.stop)
            ours_cd = Containerd(base / "cd-proxy", socks / "pp.sock",
                                 content_proxy=socks / "pull-cfs.sock")
            stack.callback(ours_cd.stop)
            plain_cd = Containerd(base / "cd-plain", socks / "pl.sock")
            stack.callback(plain_cd.stop)
        except BenchError as exc:
            bench.start_errors["pull_proxy"] = f"pull_proxy setup: {exc}"
            say(f"  cannot set up pull_proxy: {exc}")
            return
        ours_blob = root / "blobs" / "sha256" / ref.layer_hex
        plain_blob = (plain_cd.daemon_root / "io.containerd.content.v1.content" / "blobs"
                      / "sha256" / ref.layer_hex)

        def pull(c: Containerd, blob: Path) -> Callable[[], float]:
            def once() -> float:
                t = timed(ctr(c.sock, "images", "pull", "--plain-http", ref.name))
                if not blob.is_file():
                    raise BenchError(f"ctr images pull: the layer is not at {blob}")
                run(ctr(c.sock, "images", "rm", "--sync", ref.name))
                wait_until("containerd GC of the pulled layer", lambda: not blob.exists(),
                           c.daemon, timeout=60)
                return t
            return once

        bench.measure("pull_proxy", lambda r: bench.pairs(
            r, p.slow_runs, pull(ours_cd, ours_blob), pull(plain_cd, plain_blob),
            bench.rate(p.pull_layer_size)))


@dataclasses.dataclass
class Image:
    name: str  # HOST:PORT/REPO:TAG
    layer_hex: str
    digests: list[str]  # every blob of the image


class Registry:
    """Debian's docker-registry (distribution) on 127.0.0.1, filesystem storage."""

    def __init__(self, base: Path, logdir: Path) -> None:
        exe = shutil.which("docker-registry")
        if exe is None:
            raise BenchError("docker-registry not found (apt-get install docker-registry)")
        base.mkdir(parents=True, exist_ok=True)
        import socket

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        config = base / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.daemon = Daemon("docker-registry", [exe, "serve", str(config)],
                             logdir / "registry.log")
        import urllib.request

        def up() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2).close()
                return True
            except OSError:
                return False

        try:
            wait_until("docker-registry", up, self.daemon)
        except BaseException:
            self.daemon.stop()
            raise

    def push_image(self, layout: Path, layer_size: int) -> Image:
        """An OCI image with one layer: a tar of ``layer_size`` random bytes, written as a
        layout and pushed with skopeo (which gzips it on the way)."""
        import tarfile

        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        data = layout / "payload"
        make_random_file(data, layer_size, 7)
        tar_path = layout / "layer.tar"
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(data, arcname="payload")
        data.unlink()
        h = hashlib.sha256()
        with open(tar_path, "rb") as fh:
            while chunk := fh.read(MiB):
                h.update(chunk)
        layer_hex = h.hexdigest()
        tar_size = tar_path.stat().st_size
        tar_path.rename(blobs / layer_hex)

        def put(doc: dict[str, Any]) -> tuple[str, int]:
            raw = json.dumps(doc).encode()
            hexd = hashlib.sha256(raw).hexdigest()
            (blobs / hexd).write_bytes(raw)
            return hexd, len(raw)

        cfg_hex, cfg_size = put({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": [f"sha256:{layer_hex}"]}, "config": {}})
        man_hex, man_size = put({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": f"sha256:{cfg_hex}", "size": cfg_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": f"sha256:{layer_hex}", "size": tar_size}]})
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": f"sha256:{man_hex}", "size": man_size,
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
        name = f"127.0.0.1:{self.port}/bench/img:v1"
        run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false",
             f"oci:{layout}:v1", f"docker://{name}"])
        shutil.rmtree(layout, ignore_errors=True)
        # skopeo compresses the layer on its way to a registry: read what it stored
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v2/bench/img/manifests/v1",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        stored = json.loads(raw)
        layer = stored["layers"][0]["digest"]
        return Image(name, layer.split(":", 1)[1],
                     [f"sha256:{hashlib.sha256(raw).hexdigest()}", stored["config"]["digest"],
                      layer])

    def stop(self) -> None:
        self.daemon.stop()


# --------------------------------------------------------------------------------------
# output


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def fmt(x: float | None, kind: str) -> str:
    if x is None:
        return "-"
    if kind == "time":
        return f"{x:.3f} s"
    if kind == "memory":
        return f"{x:.0f} MB"
    return f"{x:.0f} MB/s"


def table(figures: Sequence[dict[str, Any]]) -> str:
    """The result table of a run's figures (``Result.to_json`` dicts)."""
    rows = [("figure", "ours", "baseline", "ratio", "target", "met?")]
    for f in figures:
        kind = {"MB/s": "rate", "s": "time", "MB": "memory"}.get(f["unit"], "rate")
        target = f"{f['op']} {f['target']:g}" + (" MB" if kind == "memory" else "")
        if kind == "memory":
            target = f"ours {target}"
        rows.append((
            f["name"], fmt(f.get("ours"), kind), fmt(f.get("baseline"), kind),
            ratio_text(f.get("ratio")),
            target + (f" ({f['note']})" if f.get("note") else ""),
            "ERROR" if f.get("error") else {True: "yes", False: "no", None: "-"}[f.get("met")],
        ))
    return render(rows)


HIGHER_IS_BETTER = {"MB/s": True, "s": False, "MB": False}
NOTABLE = 10.0  # percent: a change beyond this is marked better/worse


def change(new: float | None, old: float | None) -> float | None:
    """Change from ``old`` to ``new`` in percent, or None when either is missing."""
    if new is None or old is None or old == 0:
        return None
    return (new / old - 1) * 100


def compare_table(doc: dict[str, Any], old: dict[str, Any]) -> str:
    """Each figure of ``doc`` beside the same figure of an earlier run ``old``: our value
    and the ratio, then and now, with their change in percent; a change beyond NOTABLE
    percent in the ratio is marked ``better`` or ``worse`` (by the figure's direction)."""
    before = {f["name"]: f for f in old.get("figures", [])}
    rows = [("figure", "ours then", "ours now", "change", "ratio then", "ratio now", "change",
             "")]
    for f in doc.get("figures", []):
        o = before.get(f["name"], {})
        kind = {"MB/s": "rate", "s": "time", "MB": "memory"}.get(f["unit"], "rate")
        d_ours = change(f.get("ours"), o.get("ours"))
        d_ratio = change(f.get("ratio"), o.get("ratio"))
        verdict = ""
        if f["name"] not in before:
            verdict = "new"
        elif d_ratio is not None and abs(d_ratio) > NOTABLE:
            # the ratio of every kind reads like its value: rate ratios up is better,
            # time and memory ratios down is better
            good = (d_ratio > 0) == HIGHER_IS_BETTER.get(f["unit"], True)
            verdict = "better" if good else "WORSE"
        rows.append((
            f["name"], fmt(o.get("ours"), kind), fmt(f.get("ours"), kind), pct(d_ours),
            ratio_text(o.get("ratio")), ratio_text(f.get("ratio")), pct(d_ratio), verdict,
        ))
    gone = [n for n in before if n not in {f["name"] for f in doc.get("figures", [])}]
    return render(rows) + (f"\nnot in this run: {', '.join(gone)}" if gone else "")


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0f}%"


def ratio_text(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path, old: dict[str, Any] | None = None) -> None:
    """A PNG of ``doc``: one panel per figure with ours beside its baseline (and our
    value of ``old``, when given), titled with the ratio and the target, green when met.
    Needs matplotlib (the ``bench`` extra); BenchError with what to install if missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError(
            f"--plot needs matplotlib: {BIN / 'pip'} install 'matplotlib>=3.6' "
            f"(or: pip install -e '{REPO}[bench]')") from None
    figs = [f for f in doc.get("figures", []) if f.get("ours") is not None]
    if not figs:
        raise BenchError("nothing to plot: no figure has a value")
    before = {f["name"]: f for f in (old or {}).get("figures", [])}
    cols = 4
    rows = (len(figs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.4, rows * 2.7), squeeze=False)
    for ax, f in zip(axes.flat, figs, strict=False):
        labels, values, colors = ["baseline", "ours"], [f["baseline"] or 0, f["ours"]], \
            ["#9e9e9e", "#2e7d32" if f.get("met") else "#c62828"]
        prev = before.get(f["name"], {}).get("ours")
        if prev is not None:
            labels.insert(1, "ours before")
            values.insert(1, prev)
            colors.insert(1, "#90caf9")
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
        ratio = "-" if f.get("ratio") is None else f"{f['ratio']:.2f}"
        ax.set_title(f"{f['name']}: {ratio} (target {f['op']} {f['target']:g})", fontsize=9)
        ax.set_ylabel(f["unit"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(figs):]:
        ax.axis("off")
    m = doc.get("machine", {})
    fig.suptitle(f"contentfs bench {doc.get('date', '')}: {m.get('cpus', '?')} CPUs, "
                 f"{doc.get('fs_type', '?')}, {doc.get('params', {}).get('blobs', '?')} blobs"
                 " (green: target met; time and memory: lower is better)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> dict[str, Any]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except OSError:
            return ""
        return out.strip().splitlines()[0] if out.strip() else ""

    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "containerd": first_line(["containerd", "-v"]),
            "fuse": first_line(["fusermount3", "-V"])}


def fs_type(path: str) -> str:
    """The file system type of ``path`` (ext4, tmpfs, ...)."""
    p = run(["findmnt", "-n", "-o", "FSTYPE", "--target", path], stdout=subprocess.PIPE,
            check=False)
    return (p.stdout.decode().split() or ["unknown"])[0]


def parse_args(argv: Sequence[str]) -> Params:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure contentfs against its baselines (issue 5). Prints a table and "
                    "writes JSON.")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, 1 run: a smoke test of the harness (CI)")
    ap.add_argument("--size", type=parse_size, help="big blob size (default 1G; quick 32M)")
    ap.add_argument("--small-size", type=parse_size,
                    help="bytes written by the small-writes figure (default 256M; quick 8M)")
    ap.add_argument("--blobs", type=int, help="number of small blobs (default 100000)")
    ap.add_argument("--stats", type=int, help="stat calls per pass (default 10000)")
    ap.add_argument("--runs", type=int, help="pairs per figure (default 5; quick 1)")
    ap.add_argument("--slow-runs", type=int,
                    help="pairs for the figures against containerd (default 3; quick 1)")
    ap.add_argument("--only", help="comma-separated figure names (default: all): "
                    + ", ".join(BY_NAME))
    ap.add_argument("--json", dest="json_path", type=Path,
                    help="JSON output (default bench-results/bench-<date>.json)")
    ap.add_argument("--tmpdir", default=os.environ.get("TMPDIR", "/tmp"),
                    help="where the temporary store, data and daemons live (default $TMPDIR "
                         "or /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--compare", type=Path, metavar="OLD.json",
                    help="also print each figure beside the same figure of an earlier run, "
                         "with the change in percent")
    ap.add_argument("--plot", action="store_true",
                    help="write a PNG chart (ours vs baseline per figure) beside the JSON; "
                         "needs matplotlib (pip install -e '.[bench]')")
    ap.add_argument("--show", type=Path, metavar="RUN.json",
                    help="measure nothing: print (and --compare, --plot) a saved run")
    ap.add_argument("--layer-size", type=parse_size,
                    help="the registry image's layer (default 512M; quick 16M)")
    ap.add_argument("--pull-layer-size", type=parse_size,
                    help="the layer of the image pulled by pull_proxy (default 256M; "
                         "quick 16M)")
    a = ap.parse_args(argv)
    for path in (a.compare, a.show):
        if path is not None and not path.is_file():
            ap.error(f"{path}: no such file")
    q = a.quick
    only = frozenset(BY_NAME) if not a.only else frozenset(a.only.split(","))
    unknown = only - set(BY_NAME)
    if unknown:
        ap.error(f"unknown figure(s): {', '.join(sorted(unknown))}")
    size = a.size or (32 * MiB if q else 1 << 30)
    small = a.small_size or (8 * MiB if q else 256 * MiB)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return Params(
        size=size,
        small_size=max(MiB, min(small, size) // MiB * MiB),
        blobs=max(2, a.blobs if a.blobs is not None else (2000 if q else 100_000)),
        stats=a.stats or (1000 if q else 10_000),
        runs=a.runs or (1 if q else 5),
        slow_runs=a.slow_runs or a.runs or (1 if q else 3),
        only=only,
        tmpdir=a.tmpdir,
        keep=a.keep,
        json_path=a.show or a.json_path or REPO / "bench-results" / f"bench-{stamp}.json",
        quick=q,
        compare=a.compare,
        plot=a.plot,
        show=a.show is not None,
        layer_size=a.layer_size or (16 * MiB if q else 512 * MiB),
        pull_layer_size=a.pull_layer_size or (16 * MiB if q else 256 * MiB),
    )


# --------------------------------------------------------------------------------------
# gc_many: the gc_many figure, and on its own with --gc-many [N]


#: ``python -c`` body: run argv[2:], write its peak RSS in kB (ru_maxrss) to argv[1].
_PEAK_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:], check=False).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def gc_many(blobs: int, tmpdir: str, keep: bool) -> dict[str, Any]:
    """``contentfs gc`` over ``blobs`` blobs in namespace ``default``: a tenth are roots
    (``containerd.io/gc.root``), each with nine children reached through
    ``containerd.io/gc.ref.content.*`` labels, so everything is marked and nothing goes.
    Returns its wall time (``gc_seconds``; the figure's own ``seconds`` is the whole
    figure, store building included), peak RSS of the gc process (its own rusage) and
    how long writers were held off (the marking transaction), from ``contentfs gc --json``."""
    import sqlite3

    from store import LocalStore

    work = Path(tempfile.mkdtemp(prefix="contentfs-gc-", dir=tmpdir))
    try:
        root = work / "root"
        blob_dir = root / "blobs" / "sha256"
        blob_dir.mkdir(parents=True)
        say(f"gc_many: writing {blobs} blobs in {root}")
        names = make_small_blobs(blob_dir, blobs) if blobs else []
        LocalStore(str(root)).close()  # the schema
        db = sqlite3.connect(str(root / ".contentfs" / "meta.db"))
        now = time.time_ns()
        roots = max(1, blobs // 10) if blobs else 0
        with db:
            db.executemany(
                "INSERT INTO blobs(ns, digest, size, created_ns, updated_ns)"
                " VALUES ('default', ?, ?, ?, ?)",
                [(f"sha256:{h}", (blob_dir / h).stat().st_size, now, now) for h in names])
            rows = []
            for i in range(roots):
                parent = f"sha256:{names[i]}"
                rows.append((parent, "containerd.io/gc.root", "bench"))
                for j in range(i + roots, blobs, roots)[:9]:
                    rows.append((parent, f"containerd.io/gc.ref.content.l.{j}",
                                 f"sha256:{names[j]}"))
            db.executemany("INSERT INTO labels(ns, digest, key, value)"
                           " VALUES ('default', ?, ?, ?)", rows)
        db.close()
        say(f"gc_many: contentfs gc over {blobs} blobs ({roots} roots)")
        started = time.monotonic()
        # through a small launcher: a child's ru_maxrss counts what it inherited at fork,
        # so gc forked from this (big) process would report this process's RSS
        peak_file = work / "gc.peak"
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_LAUNCHER, str(peak_file),
             str(BIN / "contentfs"), "--root", str(root), "gc", "--json"],
            capture_output=True, check=False)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise BenchError(f"contentfs gc failed: {proc.stderr.decode()[-2000:]}")
        out = proc.stdout
        peak_mb = int(peak_file.read_text()) / 1024  # kB on Linux
        report = json.loads(out)
        left = len(os.listdir(blob_dir))
        if report["removed"] or left != blobs:
            raise BenchError(f"gc removed {len(report['removed'])} rooted blobs")
        return {"blobs": blobs, "roots": roots, "gc_seconds": round(seconds, 3),
                "held_seconds": report["held_seconds"],
                "remarked": report.get("remarked"),
                "peak_rss_mb": round(peak_mb, 1)}
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt so cleanup runs."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    # a shell starts background jobs with SIGINT ignored, and Python then keeps ignoring
    # it: Ctrl-C (or kill -INT) must stop the run wherever it was started
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: not a bench result ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("figures"), list):
        raise BenchError(f"{path}: not a bench result (no figures)")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--gc-many":
        # gc_many [N]: self-contained, no baseline; target: peak RSS < 150 MB
        n = int(args[1]) if len(args) > 1 else 100_000
        res = gc_many(n, os.environ.get("TMPDIR", "/tmp"), keep=False)
        res["met"] = res["peak_rss_mb"] < 150.0
        print(json.dumps(res, indent=2))
        return 0 if res["met"] else 1
    p = parse_args(args)
    try:
        old = load(p.compare) if p.compare is not None else None
        doc = load(p.json_path) if p.show else measure_all(p)
        if p.show:
            print(table(doc["figures"]))
        if old is not None:
            print(f"\ncompared with {p.compare} ({old.get('date', '?')}):")
            print(compare_table(doc, old))
        if p.plot:
            png = p.json_path.with_suffix(".png")
            plot(doc, png, old)
            print(f"chart: {png}")
    except BenchError as exc:
        say(str(exc))
        return 2
    errors = [f for f in doc["figures"] if f.get("error")]
    for f in errors:
        print(f"error: {f['name']}: {f['error']}", file=sys.stderr)
    return 1 if errors else 0


def measure_all(p: Params) -> dict[str, Any]:
    """Run the selected figures, write the JSON, print the table; return the JSON doc."""
    started = time.monotonic()
    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        bench = Bench(p, stack)
        # runs after the stack's own cleanups (mounts unmounted first), before its rmtree
        stack.callback(stop_spawned)
        try:
            bench.prepare()
            bench.run_all()
        finally:
            say("stopping daemons")
    results = [bench.results[f.name] for f in FIGURES if f.name in bench.results]
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "params": {"size": p.size, "small_size": p.small_size, "blobs": p.blobs,
                   "stats": p.stats, "runs": p.runs, "slow_runs": p.slow_runs,
                   "quick": p.quick, "tmpdir": p.tmpdir},
        "machine": machine(),
        "load_before": bench.load_before,
        "seconds": round(time.monotonic() - started, 1),
        "fs_type": fs_type(p.tmpdir),
        "rss_mb": bench.rss,
        "figures": [r.to_json() for r in results],
    }
    p.json_path.parent.mkdir(parents=True, exist_ok=True)
    p.json_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"contentfs bench: big blob {human_size(p.size)}, {p.blobs} small blobs, "
          f"{p.runs} runs ({p.slow_runs} against containerd), store on {doc['fs_type']} "
          f"({p.tmpdir}), {doc['seconds']} s")
    print(table(doc["figures"]))
    print(f"JSON: {p.json_path}")
    return doc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted; everything it started is stopped")
        sys.exit(130)
