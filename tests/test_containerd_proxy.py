"""contentfs as the content store of a real containerd 1.6 (its content proxy plugin,
reference §14), end to end: a local registry (docker-registry), an image built with umoci
and pushed with skopeo, ``contentfs serve``, and containerd with its built-in content
store disabled and ``[proxy_plugins.contentfs]`` pointing at the server. Every process is
started by the test and stopped after it.

``ctr images pull --plain-http`` fetches and unpacks (overlayfs snapshotter) through
contentfs; the bytes land under the contentfs root, bare (containerd keeps the labels in
its own database); ``ctr images rm --sync`` makes containerd's GC delete them through
contentfs. A ``contentfs serve`` killed mid-pull and restarted loses nothing: the pull
run again completes and ``blobs/`` never holds a half-written blob.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .fuse_util import MountFactory, mounter
from .grpc_util import CONTENTFS, Containerd, ServeProcess, ctr
from .registry_util import CountingProxy, Registry, build_image, skopeo_copy

mounter = mounter  # noqa: PLW0127 - the fixture, imported for this module

LAYERS = [("/etc/hello", 3000), ("/opt/data.bin", 4 << 20), ("/etc/small", 200)]
#: containerd log lines that are errors (logrus text format)
_ERROR_LINE = re.compile(r"level=(error|fatal|panic)")


@dataclass
class Stack:
    base: str
    registry: Registry
    root: str
    socket: str
    serve: ServeProcess
    containerd: Containerd
    errors_expected: bool = False

    def start_serve(self) -> ServeProcess:
        self.serve = ServeProcess(self.root, self.socket)
        return self.serve

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return ctr(self.containerd.address, *args, timeout=timeout)

    def blob_files(self) -> dict[str, bytes]:
        """digest -> content of every file under ``ROOT/blobs/sha256``."""
        d = os.path.join(self.root, "blobs", "sha256")
        out = {}
        for name in os.listdir(d) if os.path.isdir(d) else []:
            with open(os.path.join(d, name), "rb") as f:
                out["sha256:" + name] = f.read()
        return out


@pytest.fixture
def stack(tmp_path: os.PathLike[str]) -> Iterator[Stack]:
    """Registry, ``contentfs serve`` on a root it creates, containerd over it. At the end
    containerd's log must hold no error, unless the test expects some."""
    base = os.fspath(tmp_path)
    registry = Registry(os.path.join(base, "registry"))
    serve: ServeProcess | None = None
    containerd: Containerd | None = None
    s: Stack | None = None
    try:
        root = os.path.join(base, "cfs")
        sock = os.path.join(base, "cfs.sock")
        serve = ServeProcess(root, sock)  # makes the root (a command that writes)
        containerd = Containerd(os.path.join(base, "ctd"), content_proxy=sock)
        s = Stack(base, registry, root, sock, serve, containerd)
        yield s
        if not s.errors_expected:
            bad = [ln for ln in containerd.full_log().splitlines() if _ERROR_LINE.search(ln)]
            assert not bad, "containerd logged errors:\n" + "\n".join(bad[-20:])
    finally:
        if containerd is not None:
            containerd.stop()
        srv = s.serve if s is not None else serve
        if srv is not None:
            srv.stop()
        registry.stop()


def push(stack: Stack, name: str, layers: list[tuple[str, int]]) -> tuple[str, list[str]]:
    """Build an image with ``layers`` and push it as ``name``; return the pull reference
    and the digests a pull fetches (manifest, config, layers)."""
    layout = os.path.join(stack.base, "oci-" + name.replace("/", "-").replace(":", "-"))
    build_image(layout, "v1", layers)
    ref = f"{stack.registry.host}/{name}"
    skopeo_copy(f"oci:{layout}:v1", f"docker://{ref}")
    return ref, fetched(stack.registry.host, name)


def fetched(host: str, name: str) -> list[str]:
    repo, tag = name.rsplit(":", 1)
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    doc = json.loads(body)
    return ["sha256:" + hashlib.sha256(body).hexdigest(), doc["config"]["digest"],
            *(layer["digest"] for layer in doc["layers"])]


def check_blobs_intact(stack: Stack) -> dict[str, bytes]:
    """Every file under blobs/ is a whole blob: its bytes hash to its name."""
    files = stack.blob_files()
    for digest, data in files.items():
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, f"half-written {digest}"
    return files


def test_pull_lands_in_contentfs_and_rm_removes(stack: Stack, mounter: MountFactory) -> None:
    p = stack.ctr("plugins", "ls")
    assert re.search(r"io\.containerd\.content\.v1\s+contentfs\s+-\s+ok", p.stdout.decode()), \
        p.stdout.decode()
    ref, digests = push(stack, "test/app:v1", LAYERS)
    assert len(digests) == 2 + len(LAYERS)
    p = stack.ctr("images", "pull", "--plain-http", ref)
    assert p.returncode == 0, p.stderr.decode() + stack.containerd.full_log()[-3000:]

    # every object is a file under the contentfs root, bare (no labels kept there)...
    files = check_blobs_intact(stack)
    assert set(digests) <= set(files), (digests, list(files))
    ls = subprocess.run([CONTENTFS, "--root", stack.root, "ls", "--json"],
                        capture_output=True, check=True, timeout=60)
    assert {i["digest"]: i["labels"] for i in json.loads(ls.stdout)} == {
        d: {} for d in files}
    # ... and reads back right through a mount of that root
    m = mounter("ro", root=stack.root)
    out = subprocess.run(["sha256sum", *(m.blob(d[7:]) for d in digests)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert [line.split()[0] for line in out.splitlines()] == [d[7:] for d in digests]
    m.unmount()

    # containerd lists them with its labels (kept in its own database)
    p = stack.ctr("content", "ls")
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split()[-1] for line in p.stdout.decode().splitlines()[1:]}
    assert set(digests) <= set(rows)
    for d in digests:
        assert "containerd.io/distribution.source." in rows[d], rows[d]
    assert f"containerd.io/gc.ref.content.config={digests[1]}" in rows[digests[0]]
    p = stack.ctr("images", "ls", "-q")
    assert p.stdout.decode().split() == [ref]

    # removing the image makes containerd's GC delete the blobs through contentfs
    p = stack.ctr("images", "rm", "--sync", ref)
    assert p.returncode == 0, p.stderr
    assert set(stack.blob_files()) & set(digests) == set()
    assert stack.ctr("content", "ls", "-q").stdout.decode().split() == []


def test_serve_killed_mid_pull_then_restarted(stack: Stack) -> None:
    """SIGKILL ``contentfs serve`` while containerd writes a layer through it, restart it:
    the pull, run again as a user would (ctr gives up when its store goes away), completes;
    blobs/ holds only whole blobs at every step."""
    stack.errors_expected = True  # containerd logs the failed pull
    big = 24 << 20
    throttle = CountingProxy(stack.registry.host, rate=8 << 20)  # a pull of about 3 s
    try:
        name = "test/big:v1"
        _, digests = push(stack, name, [("/etc/a", 1000), ("/big.bin", big)])
        ref = f"{throttle.host}/{name}"
        pull = subprocess.Popen(
            [*_ctr_cmd(stack), "images", "pull", "--plain-http", ref],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            ingest = os.path.join(stack.root, "ingest")
            deadline = time.monotonic() + 120
            while _largest_ingest(ingest) < (2 << 20):  # well into the big layer
                assert pull.poll() is None, "the pull ended before it could be interrupted"
                assert time.monotonic() < deadline, "no ingest grew under contentfs"
                time.sleep(0.02)
            stack.serve.proc.send_signal(signal.SIGKILL)
            stack.serve.stop()
            _, err = pull.communicate(timeout=120)
        finally:
            if pull.poll() is None:
                pull.kill()
                pull.communicate()
        assert pull.returncode != 0, "the pull survived its store being killed?"
        assert digests[-1] not in check_blobs_intact(stack)
        partial = _largest_ingest(os.path.join(stack.root, "ingest"))
        assert 0 < partial < big + 1024  # the interrupted layer is an ingest, kept

        throttle.rate = None
        stack.start_serve()
        deadline = time.monotonic() + 120
        while True:  # containerd reconnects to the restarted server within ~3 s
            p = stack.ctr("images", "pull", "--plain-http", ref)
            if p.returncode == 0:
                break
            assert time.monotonic() < deadline, p.stderr.decode()
            time.sleep(1)
        files = check_blobs_intact(stack)
        assert set(digests) <= set(files)
        assert os.listdir(os.path.join(stack.root, "ingest")) == []
        p = stack.ctr("images", "rm", "--sync", ref)
        assert p.returncode == 0, p.stderr
        assert set(stack.blob_files()) & set(digests) == set()
    finally:
        throttle.stop()


def _ctr_cmd(stack: Stack) -> list[str]:
    from .grpc_util import CTR

    return [CTR, "-a", stack.containerd.socket]


def _largest_ingest(ingest_dir: str) -> int:
    best = 0
    try:
        names = os.listdir(ingest_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        try:
            best = max(best, os.stat(os.path.join(ingest_dir, name, "data")).st_size)
        except OSError:
            pass
    return best


def test_example_script(tmp_path: os.PathLike[str]) -> None:
    """scripts/examples/containerd-proxy pulls an image into a contentfs store under a
    containerd it starts, shows the blobs through a mount, and stops everything."""
    base = os.fspath(tmp_path)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "examples", "containerd-proxy")
    registry = Registry(os.path.join(base, "registry"))
    try:
        layout = os.path.join(base, "oci")
        build_image(layout, "v1", [("/etc/hello", 5000)])
        skopeo_copy(f"oci:{layout}:v1", f"docker://{registry.host}/ex/app:v1")
        digests = fetched(registry.host, "ex/app:v1")
        work = os.path.join(base, "work")
        env = {**os.environ, "CONTENTFS": CONTENTFS}
        p = subprocess.run([script, "-n", "-w", work, f"{registry.host}/ex/app:v1",
                            "--plain-http"], capture_output=True, text=True, env=env,
                           timeout=300, check=False)
    finally:
        registry.stop()
    assert p.returncode == 0, p.stdout + p.stderr
    for d in digests:
        assert d in p.stdout  # in ctr content ls
        assert d[7:] in p.stdout.split("--- ls -l", 1)[1]  # and in the mount
        assert os.path.isfile(os.path.join(work, "store", "blobs", "sha256", d[7:]))
    with open("/proc/mounts") as f:
        assert work not in f.read()
    assert subprocess.run(["pgrep", "-f", work], capture_output=True).returncode == 1
