"""A real containerd daemon (its own config, root and socket under a temporary directory)
writes a blob and leaves a partial ingest with ``ctr``; then its content directory opens as
a store: the blob listed and readable, the ingest listed and resumable."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from store import LocalStore, digest_of

CONFIG = """\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
                    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/c.sock.ttrpc"
[debug]
  address = "{d}/debug.sock"
[metrics]
  address = ""

[plugins."io.containerd.gc.v1.scheduler"]
  mutation_threshold = 1000000
  deletion_threshold = 0
  startup_delay = "10ms"
"""


class Containerd:
    def __init__(self, workdir: str) -> None:
        self.dir = workdir
        self.sock = os.path.join(workdir, "c.sock")
        self.content = os.path.join(workdir, "root", "io.containerd.content.v1.content")
        self.proc: subprocess.Popen[bytes] | None = None

    def ctr(self, *args: str, stdin: bytes | None = None) -> str:
        proc = subprocess.run(["ctr", "-a", self.sock, *args], input=stdin,
                              capture_output=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: {proc.stderr.decode()}\n{self.log()}")
        return proc.stdout.decode()

    def log(self) -> str:
        with open(os.path.join(self.dir, "containerd.log"), errors="replace") as f:
            return f.read()[-3000:]


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    binary = shutil.which("containerd")
    assert binary and shutil.which("ctr"), "needs containerd and ctr (apt-get install containerd)"
    workdir = tempfile.mkdtemp(prefix="ctd-")  # short: unix socket paths are limited
    d = Containerd(workdir)
    cfg = os.path.join(workdir, "config.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(d=workdir))
    log = open(os.path.join(workdir, "containerd.log"), "wb")  # noqa: SIM115
    d.proc = subprocess.Popen([binary, "--config", cfg], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        for _ in range(300):
            if d.proc.poll() is not None:
                raise AssertionError(f"containerd exited {d.proc.returncode}:\n{d.log()}")
            if os.path.exists(d.sock):
                with contextlib.suppress(AssertionError):
                    d.ctr("version")
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"containerd did not answer on {d.sock}:\n{d.log()}")
        time.sleep(0.3)  # let the one-shot startup GC pass before content is written
        yield d
    finally:
        d.proc.terminate()
        try:
            d.proc.wait(30)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()
        log.close()
        # the daemon may have left mounts of its own under the root
        subprocess.run(["umount", "-R", os.path.join(workdir, "state")], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def test_containerd_content_directory_opens_as_store(containerd: Containerd) -> None:
    blob = os.urandom(200_000)
    dgst = digest_of(blob)
    containerd.ctr("content", "ingest", "--expected-digest", dgst, "whole", stdin=blob)
    containerd.ctr("content", "label", dgst, "containerd.io/gc.root=test", "team=infra")
    assert dgst in containerd.ctr("content", "ls", "-q").split()

    # a partial ingest: ctr is killed halfway, leaving the ingest (and its lease) behind.
    # ctr 1.6 sends 1 MiB messages (it fills its buffer before writing), so send more.
    size = 3 << 20
    partial = os.urandom(size)
    sent = (1 << 20) + 12345
    backend_ref = "default/1/part"  # what containerd hands its local store (reference §1.1)
    ingest_dir = os.path.join(containerd.content, "ingest",
                              hashlib.sha256(backend_ref.encode()).hexdigest())
    data_file = os.path.join(ingest_dir, "data")
    ctr = subprocess.Popen(
        ["ctr", "-a", containerd.sock, "content", "ingest", "--expected-size", str(size), "part"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert ctr.stdin is not None
        ctr.stdin.write(partial[:sent])
        ctr.stdin.flush()
        for _ in range(600):
            if os.path.exists(data_file) and os.path.getsize(data_file) == 1 << 20:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the partial ingest never reached 1 MiB: {containerd.log()}")
    finally:
        ctr.kill()
        ctr.wait()
    assert "part" in containerd.ctr("content", "active")
    assert containerd.proc is not None
    containerd.proc.terminate()
    assert containerd.proc.wait(30) == 0, containerd.log()
    offset = 1 << 20

    assert os.path.isdir(ingest_dir), os.listdir(os.path.join(containerd.content, "ingest"))

    with LocalStore(containerd.content) as s:
        infos = s.list()
        assert [i.digest for i in infos] == [dgst]
        assert infos[0].size == len(blob)
        assert infos[0].labels == {}  # containerd keeps labels in its bolt database
        with s.reader_at(dgst) as r:
            assert r.read_at(len(blob) + 1, 0) == blob
        assert s.verify(dgst).size == len(blob)

        sts = s.list_statuses()
        assert [(st.ref, st.offset, st.total) for st in sts] == [(backend_ref, offset, size)]
        assert s.list_statuses("ref~=^default/1/part$") == sts
        w = s.writer(backend_ref, total=size)
        assert w.offset == offset
        assert w.digest() == digest_of(partial[:offset])
        assert w.status().started_at == sts[0].started_at
        w.write(partial[offset:])
        assert w.commit(size, digest_of(partial)) == digest_of(partial)
        assert sorted(i.digest for i in s.list()) == sorted([dgst, digest_of(partial)])
        assert s.list_statuses() == []
    # containerd's own files are untouched
    assert os.path.isdir(os.path.join(containerd.dir, "root", "io.containerd.metadata.v1.bolt"))
    assert os.stat(os.path.join(containerd.content, "blobs", "sha256",
                                dgst.split(":")[1])).st_mode & 0o222 == 0
