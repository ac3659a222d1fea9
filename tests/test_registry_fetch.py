"""``contentfs fetch`` and ``fetch-object`` against a real docker-registry (distribution
2.8) on 127.0.0.1, images built with umoci and pushed with skopeo; labels compared with
what a real containerd's ``ctr content fetch`` writes for the same images."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from store import LocalStore

from .fuse_util import MountFactory, mounter
from .grpc_util import Containerd, ctr
from .registry_util import (
    CountingProxy,
    Registry,
    build_image,
    build_index,
    read_blob,
    skopeo_copy,
)

mounter = mounter  # noqa: PLW0127 - the fixture, imported for this module
CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
BIG = 56 << 20  # the big layer: over 50 MiB of random bytes (gzip leaves it as big)
GC_ROOT = "containerd.io/gc.root"


def contentfs(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
              input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:  # noqa: A002
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTENTFS_")}
    full_env.update(env or {})
    return subprocess.run([CONTENTFS, *args], capture_output=True, timeout=timeout,
                          env=full_env, input=input, check=False)


class Images:
    """One registry holding test/multi:v1 (an index over linux/amd64 with a big layer and
    linux/arm64) and test/single:v1 (the amd64 manifest alone)."""

    def __init__(self, base: str) -> None:
        self.layout = os.path.join(base, "layout")
        self.amd = build_image(self.layout, "amd", [("/etc/small", 3000), ("/big", BIG),
                                                    ("/opt/tiny", 10)])
        self.arm = build_image(self.layout, "arm", [("/etc/arm", 5000)], arch="arm64")
        self.index = build_index(self.layout, "multi", {"linux/amd64": "amd",
                                                        "linux/arm64": "arm"})
        self.registry = Registry(os.path.join(base, "registry"))
        host = self.registry.host
        skopeo_copy(f"oci:{self.layout}:multi", f"docker://{host}/test/multi:v1")
        skopeo_copy(f"oci:{self.layout}:amd", f"docker://{host}/test/single:v1")
        amd_manifest = json.loads(read_blob(self.layout, self.amd))
        self.amd_layers = [layer["digest"] for layer in amd_manifest["layers"]]
        self.big = next(lay["digest"] for lay in amd_manifest["layers"] if lay["size"] > BIG)

    def ref(self, name: str) -> str:
        return f"{self.registry.host}/{name}"


def registry_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    """Fixture body: a registry of the test module's own with the test images pushed,
    stopped at its end (``images = pytest.fixture(scope="module")(registry_images)``)."""
    imgs = Images(str(tmp_path_factory.mktemp("registry")))
    try:
        yield imgs
    finally:
        imgs.registry.stop()


images = pytest.fixture(scope="module")(registry_images)


def labels_by_digest(root: str) -> dict[str, tuple[int, dict[str, str]]]:
    with LocalStore(root) as store:
        return {i.digest: (i.size, dict(i.labels)) for i in store.list()}


def ctr_labels(address: str, namespace: str) -> dict[str, tuple[int, dict[str, str]]]:
    """``ctr content ls`` parsed: digest -> (size, labels); ctr prints sizes rounded, so
    each size is that of ``ctr content get``."""
    out = ctr(address, "content", "ls", namespace=namespace)
    assert out.returncode == 0, out.stderr
    result: dict[str, tuple[int, dict[str, str]]] = {}
    for line in out.stdout.decode().splitlines()[1:]:
        fields = line.split("\t")
        digest, labels_text = fields[0], fields[-1].strip()
        labels: dict[str, str] = {}
        for pair in _split_labels(labels_text):
            k, _, v = pair.partition("=")
            labels[k] = v
        size = len(ctr(address, "content", "get", digest, namespace=namespace).stdout)
        result[digest] = (size, labels)
    return result


def _split_labels(text: str) -> list[str]:
    """ctr joins labels with ',' and a source label's value has ',' too: a new label
    starts where the next ``containerd.io/`` key does."""
    if text in ("", "-"):
        return []
    parts: list[str] = []
    for piece in text.split(","):
        if "=" in piece and piece.split("=", 1)[0].startswith("containerd.io/"):
            parts.append(piece)
        else:
            parts[-1] += "," + piece
    return parts


def without_root(labels: dict[str, tuple[int, dict[str, str]]]
                 ) -> dict[str, tuple[int, dict[str, str]]]:
    return {d: (s, {k: v for k, v in lab.items() if k != GC_ROOT})
            for d, (s, lab) in labels.items()}


def test_fetch_matches_ctr_content_fetch(images: Images, tmp_path: Any) -> None:
    root = str(tmp_path / "store")
    for name in ("test/multi:v1", "test/single:v1"):
        res = contentfs("--root", root, "fetch", "--plain-http", "--json", images.ref(name))
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["digest"] == (images.index if "multi" in name else images.amd)
    ours = labels_by_digest(root)
    # every blob of the layout is in the store, with its size
    for digest in (images.index, images.amd, images.arm, *images.amd_layers):
        assert digest in ours
        assert ours[digest][0] == len(read_blob(images.layout, digest))
    verify = contentfs("--root", root, "verify")
    assert verify.returncode == 0, verify.stdout
    # gc.root on the top objects only
    roots = {d for d, (_, lab) in ours.items() if GC_ROOT in lab}
    assert roots == {images.index, images.amd}

    ctrd = Containerd(str(tmp_path / "ctrd"))
    try:
        for name in ("test/multi:v1", "test/single:v1"):
            out = ctr(ctrd.address, "content", "fetch", "--plain-http", "--all-platforms",
                      images.ref(name), namespace="default", timeout=120)
            assert out.returncode == 0, out.stderr
        theirs = ctr_labels(ctrd.address, "default")
    finally:
        ctrd.stop()
    assert without_root(ours) == theirs


def test_fetch_one_platform_matches_ctr(images: Images, tmp_path: Any) -> None:
    root = str(tmp_path / "store")
    res = contentfs("--root", root, "fetch", "--plain-http", "--platform", "linux/arm64",
                    images.ref("test/multi:v1"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().strip() == images.index
    assert res.stderr == b""  # no progress display when stderr is not a terminal
    ours = labels_by_digest(root)
    assert images.amd not in ours and images.big not in ours and images.arm in ours
    ctrd = Containerd(str(tmp_path / "ctrd"))
    try:
        out = ctr(ctrd.address, "content", "fetch", "--plain-http", "--platform",
                  "linux/arm64", images.ref("test/multi:v1"), namespace="default")
        assert out.returncode == 0, out.stderr
        theirs = ctr_labels(ctrd.address, "default")
    finally:
        ctrd.stop()
    assert without_root(ours) == theirs


def test_fetch_again_downloads_nothing(images: Images, tmp_path: Any) -> None:
    root = str(tmp_path / "store")
    first = contentfs("--root", root, "fetch", "--plain-http", images.ref("test/single:v1"))
    assert first.returncode == 0, first.stderr
    again = contentfs("--root", root, "fetch", "--plain-http", "--json",
                      images.ref("test/multi:v1"))
    assert again.returncode == 0, again.stderr
    blobs = {b["digest"]: b for b in json.loads(again.stdout)["blobs"]}
    for layer in images.amd_layers:
        assert blobs[layer]["status"] == "exists" and blobs[layer]["transferred"] == 0
    # the second repository joined the source label, as ctr writes it
    labels = labels_by_digest(root)[images.big][1]
    assert labels["containerd.io/distribution.source.127.0.0.1"] == "test/multi,test/single"


def test_fetch_object(images: Images) -> None:
    top = contentfs("fetch-object", "--plain-http", images.ref("test/multi:v1"))
    assert top.returncode == 0, top.stderr
    assert top.stdout == read_blob(images.layout, images.index)
    layer = images.amd_layers[0]
    blob = contentfs("fetch-object", "--plain-http", images.ref("test/multi:v1"), layer)
    assert blob.returncode == 0, blob.stderr
    assert blob.stdout == read_blob(images.layout, layer)
    man = contentfs("fetch-object", "--plain-http", images.ref("test/multi:v1"), images.arm)
    assert man.returncode == 0, man.stderr
    assert man.stdout == read_blob(images.layout, images.arm)
    missing = contentfs("fetch-object", "--plain-http", images.ref("test/multi:v1"),
                        "sha256:" + "0" * 64)
    assert missing.returncode == 4, missing.stderr


def _active(root: str) -> dict[str, int]:
    if not os.path.isdir(root):
        return {}
    res = contentfs("--root", root, "active", "--json")
    assert res.returncode == 0, res.stderr
    return {s["ref"]: s["offset"] for s in json.loads(res.stdout)}


def _wait_for_offset(root: str, ref: str, least: int, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        offset = _active(root).get(ref, 0)
        if offset >= least:
            return offset
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    pytest.fail(f"ingest {ref} never reached {least} bytes")


def test_sigkill_mid_fetch_resumes_with_range(images: Images, tmp_path: Any) -> None:
    proxy = CountingProxy(images.registry.host, rate=16 << 20)
    root = str(tmp_path / "store")
    ref = f"{proxy.host}/test/single:v1"
    key = f"layer-{images.big}"
    try:
        proc = subprocess.Popen([CONTENTFS, "--root", root, "fetch", "--plain-http", ref],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _wait_for_offset(root, key, 8 << 20, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        held = _active(root)[key]
        assert 0 < held < BIG
        proxy.rate = None
        res = contentfs("--root", root, "fetch", "--plain-http", "--json", ref)
        assert res.returncode == 0, res.stderr
        gets = proxy.blob_requests(images.big)
        size = len(read_blob(images.layout, images.big))
        # the second run asked for the rest only, and got exactly that
        assert gets[-1]["range"] == f"bytes={held}-"
        assert gets[-1]["status"] == 206
        assert gets[-1]["sent"] == size - held
        summary = {b["digest"]: b for b in json.loads(res.stdout)["blobs"]}
        assert summary[images.big]["status"] == "resumed"
        assert summary[images.big]["transferred"] == size - held
    finally:
        proxy.stop()
    assert key not in _active(root)
    assert contentfs("--root", root, "verify", images.big).returncode == 0


def test_registry_stopped_mid_fetch_is_unavailable_and_resumable(
        tmp_path: Any, images: Images) -> None:
    # a registry of its own (it is stopped), holding a copy of the single image
    reg = Registry(str(tmp_path / "reg"))
    try:
        skopeo_copy(f"oci:{images.layout}:amd", f"docker://{reg.host}/test/single:v1")
        proxy = CountingProxy(reg.host, rate=16 << 20)
        root = str(tmp_path / "store")
        key = f"layer-{images.big}"
        try:
            proc = subprocess.Popen(
                [CONTENTFS, "--root", root, "fetch", "--plain-http",
                 f"{proxy.host}/test/single:v1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                _wait_for_offset(root, key, 4 << 20, proc)
                reg.stop()
                _, err = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 7, err
            assert b"unavailable" in err and proxy.host.encode() in err, err
            held = _active(root).get(key, 0)
            assert held > 0  # the ingest is kept, to resume
            reg.start()
            proxy.rate = None
            res = contentfs("--root", root, "fetch", "--plain-http", "--json",
                            f"{proxy.host}/test/single:v1")
            assert res.returncode == 0, res.stderr
            assert proxy.blob_requests(images.big)[-1]["range"] == f"bytes={held}-"
        finally:
            proxy.stop()
    finally:
        reg.stop()


def test_corrupt_registry_blob_is_dataloss(tmp_path: Any, images: Images) -> None:
    reg = Registry(str(tmp_path / "reg"))
    try:
        skopeo_copy(f"oci:{images.layout}:amd", f"docker://{reg.host}/test/single:v1")
        victim = images.amd_layers[0]
        with open(reg.blob_path(victim), "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        root = str(tmp_path / "store")
        res = contentfs("--root", root, "fetch", "--plain-http",
                        f"{reg.host}/test/single:v1")
        assert res.returncode == 8, res.stderr
        assert victim.encode() in res.stderr and b"nothing committed" in res.stderr
        stored = labels_by_digest(root)
        assert victim not in stored
        assert images.amd not in stored  # the image's manifest is not committed either
        assert f"layer-{victim}" not in _active(root)  # bad bytes are not kept to resume
    finally:
        reg.stop()


def test_unreachable_registry_is_unavailable(tmp_path: Any) -> None:
    # a port bound here but not listening refuses connections, and no other test can
    # start a server on it meanwhile
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        res = contentfs("--root", str(tmp_path / "s"), "fetch", "--plain-http",
                        f"127.0.0.1:{port}/nothing/here:v1", timeout=60)
    assert res.returncode == 7, res.stderr
    assert b"cannot connect" in res.stderr


def test_unknown_tag_is_not_found(images: Images, tmp_path: Any) -> None:
    res = contentfs("--root", str(tmp_path / "s"), "fetch", "--plain-http",
                    images.ref("test/multi:nope"))
    assert res.returncode == 4, res.stderr
    assert images.registry.host.encode() in res.stderr


def test_basic_auth_with_user_and_docker_config(images: Images, tmp_path: Any) -> None:
    reg = Registry(str(tmp_path / "reg"), users={"alice": "s3cret"})
    try:
        skopeo_copy(f"oci:{images.layout}:arm", f"docker://{reg.host}/priv/img:v1",
                    "--dest-creds", "alice:s3cret")
        ref = f"{reg.host}/priv/img:v1"
        home = tmp_path / "home"
        home.mkdir()
        env = {"HOME": str(home)}
        anon = contentfs("--root", str(tmp_path / "a"), "fetch", "--plain-http", ref, env=env)
        assert anon.returncode == 6, anon.stderr
        assert b"unauthorized" in anon.stderr and reg.host.encode() in anon.stderr
        wrong = contentfs("--root", str(tmp_path / "a"), "fetch", "--plain-http",
                          "--user", "alice:nope", ref, env=env)
        assert wrong.returncode == 6, wrong.stderr
        ok = contentfs("--root", str(tmp_path / "b"), "fetch", "--plain-http",
                       "--user", "alice:s3cret", ref, env=env)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.decode().strip() == images.arm
        prompted = contentfs("fetch-object", "--plain-http", "--user", "alice", ref,
                             env=env, input=b"s3cret\n")
        assert prompted.returncode == 0, prompted.stderr
        (home / ".docker").mkdir()
        auth = base64.b64encode(b"alice:s3cret").decode()
        (home / ".docker" / "config.json").write_text(
            json.dumps({"auths": {reg.host: {"auth": auth}}}))
        cfg = contentfs("--root", str(tmp_path / "c"), "fetch", "--plain-http", ref, env=env)
        assert cfg.returncode == 0, cfg.stderr
        assert set(labels_by_digest(str(tmp_path / "c"))) == \
            set(labels_by_digest(str(tmp_path / "b")))
    finally:
        reg.stop()


def test_tls_is_verified_by_default(images: Images, tmp_path: Any) -> None:
    """Without --plain-http the client speaks TLS to the plain-HTTP registry and fails:
    Unavailable, never a silent fallback to HTTP."""
    res = contentfs("--root", str(tmp_path / "s"), "fetch", images.ref("test/single:v1"),
                    timeout=60)
    assert res.returncode == 7, res.stderr


def test_tls_registry(images: Images, tmp_path: Any) -> None:
    """A registry with a self-signed certificate: refused by default (the certificate is
    verified), fetched with --skip-verify, and with the CA trusted through SSL_CERT_FILE."""
    reg = Registry(str(tmp_path / "tls"), tls=True)
    try:
        skopeo_copy(f"oci:{images.layout}:arm", f"docker://{reg.host}/tls/img:v1")
        ref = f"{reg.host}/tls/img:v1"
        refused = contentfs("--root", str(tmp_path / "a"), "fetch", ref)
        assert refused.returncode == 7, refused.stderr
        assert b"certificate" in refused.stderr.lower(), refused.stderr
        skipped = contentfs("--root", str(tmp_path / "b"), "fetch", "--skip-verify", ref)
        assert skipped.returncode == 0, skipped.stderr
        assert skipped.stdout.decode().strip() == images.arm
        trusted = contentfs("--root", str(tmp_path / "c"), "fetch", ref,
                            env={"SSL_CERT_FILE": reg.cert})
        assert trusted.returncode == 0, trusted.stderr
    finally:
        reg.stop()


def test_fetch_into_containerd_through_its_content_api(images: Images, tmp_path: Any) -> None:
    """``--address`` and ``-n``: contentfs fetches into a live containerd (its Content
    API); what containerd then holds in that namespace is what ``ctr content fetch``
    puts in another one, labels included, plus gc.root on the top object."""
    ctrd = Containerd(str(tmp_path / "ctrd"))
    try:
        res = contentfs("--address", ctrd.address, "-n", "ours", "fetch", "--plain-http",
                        images.ref("test/multi:v1"))
        assert res.returncode == 0, res.stderr
        out = ctr(ctrd.address, "content", "fetch", "--plain-http", "--all-platforms",
                  images.ref("test/multi:v1"), namespace="theirs", timeout=120)
        assert out.returncode == 0, out.stderr
        ours = ctr_labels(ctrd.address, "ours")
        theirs = ctr_labels(ctrd.address, "theirs")
    finally:
        ctrd.stop()
    assert GC_ROOT in ours[images.index][1]
    assert without_root(ours) == theirs


def test_fetch_memory_is_bounded(images: Images, tmp_path: Any) -> None:
    """A layer is streamed into its ingest, never held whole: fetching the image with the
    56 MiB layer peaks far below the layer's size over the interpreter's own."""
    wrapper = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]);"
               " _, status, usage = os.wait4(p.pid, 0);"
               " print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))")
    base = subprocess.run([sys.executable, "-c", wrapper, CONTENTFS, "--version"],
                          capture_output=True, text=True, check=True).stdout.split()
    out = subprocess.run([sys.executable, "-c", wrapper, CONTENTFS, "--root",
                          str(tmp_path / "s"), "fetch", "--plain-http",
                          images.ref("test/single:v1")],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == images.amd and out[2] == "0", out  # the digest, then peak and exit
    peak_mib, idle_mib = int(out[1]) / 1024, int(base[-2]) / 1024
    assert peak_mib - idle_mib < 40, (peak_mib, idle_mib)  # the layer is 56 MiB


def test_fetch_fills_an_oci_layout_read_through_a_mount(images: Images, tmp_path: Any,
                                                         mounter: MountFactory) -> None:
    """A store that is an OCI layout (its index.json naming the images, no blobs yet):
    fetch brings the blobs, and skopeo reads the images through the mount."""
    import shutil

    root = str(tmp_path / "layout")
    os.makedirs(root)
    for name in ("oci-layout", "index.json"):
        shutil.copy(os.path.join(images.layout, name), root)
    res = contentfs("--root", root, "fetch", "--plain-http", images.ref("test/multi:v1"))
    assert res.returncode == 0, res.stderr
    m = mounter(root=root)
    from .registry_util import SKOPEO, run

    amd = json.loads(run(SKOPEO, "inspect", f"oci:{m.path}:amd").stdout)
    assert amd["Digest"] == images.amd and amd["Layers"] == images.amd_layers
    out = str(tmp_path / "copy")
    skopeo_copy(f"oci:{m.path}:multi", f"oci:{out}:multi")
    assert read_blob(out, images.big) == read_blob(images.layout, images.big)


def test_fetch_into_namespaces(images: Images, tmp_path: Any) -> None:
    """-n: what is fetched belongs to that namespace; a second namespace fetching the
    same image gets its own records and labels without the bytes being downloaded again
    (the store keeps bytes once)."""
    proxy = CountingProxy(images.registry.host)
    root = str(tmp_path / "store")
    ref = f"{proxy.host}/test/single:v1"
    try:
        first = contentfs("--root", root, "-n", "team-a", "fetch", "--plain-http", ref)
        assert first.returncode == 0, first.stderr
        sent_first = sum(r["sent"] for r in proxy.blob_requests(images.big))
        second = contentfs("--root", root, "fetch", "-n", "team-b", "--plain-http", "--json",
                           ref)
        assert second.returncode == 0, second.stderr
    finally:
        proxy.stop()
    assert sent_first > BIG
    assert sum(r["sent"] for r in proxy.blob_requests(images.big)) == sent_first
    assert json.loads(second.stdout)["transferred"] < 1 << 20

    def listing(ns: str) -> dict[str, dict[str, str]]:
        out = contentfs("--root", root, "-n", ns, "ls", "--json")
        assert out.returncode == 0, out.stderr
        return {b["digest"]: b["labels"] for b in json.loads(out.stdout)}

    a, b = listing("team-a"), listing("team-b")
    assert set(a) == set(b) and images.amd in a and images.big in a
    assert a[images.big] == b[images.big] == {
        "containerd.io/distribution.source.127.0.0.1": "test/single"}
    assert GC_ROOT in b[images.amd]
    assert images.big not in listing("default")


def test_progress_on_a_terminal(images: Images, tmp_path: Any) -> None:
    """On a terminal, ctr's display: a line per object with its status and bar, then
    elapsed time, total and rate; stdout (a pipe) still carries only the digest."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([CONTENTFS, "--root", str(tmp_path / "s"), "fetch",
                                 "--plain-http", images.ref("test/single:v1")],
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert out.decode().strip() == images.amd
    screen = b"".join(chunks).decode(errors="replace")
    assert f"layer-{images.big}:" in screen and f"manifest-{images.amd}:" in screen
    assert "|" + "+" * 40 + "|" in screen and "done" in screen
    assert "elapsed:" in screen and "total:" in screen and "/s)" in screen


@pytest.mark.parametrize("body", [
    b"{not json",
    b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",'
    b' "config": {"digest": "sha256:nothex", "size": 1}, "layers": []}',
    b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",'
    b' "config": {"digest": "sha256:' + b"a" * 64 + b'", "size": 1}, "layers": "no"}',
])
def test_unparseable_manifest_is_invalid_argument(images: Images, tmp_path: Any,
                                                  body: bytes) -> None:
    proxy = CountingProxy(images.registry.host)
    proxy.manifest_body = body
    root = str(tmp_path / "s")
    try:
        res = contentfs("--root", root, "fetch", "--plain-http",
                        f"{proxy.host}/test/single:v1")
    finally:
        proxy.stop()
    assert res.returncode == 3, res.stderr
    assert b"manifest" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not os.path.isdir(root) or labels_by_digest(root) == {}


def test_gc_keeps_what_was_fetched(images: Images, tmp_path: Any) -> None:
    """gc.root on the top object and the gc.ref.content labels keep the whole image
    (one platform of an index too); without the root, gc takes all of it."""
    root = str(tmp_path / "s")
    res = contentfs("--root", root, "fetch", "--plain-http", "--platform", "linux/arm64",
                    images.ref("test/multi:v1"))
    assert res.returncode == 0, res.stderr
    before = set(labels_by_digest(root))
    kept = contentfs("--root", root, "gc")
    assert kept.returncode == 0, kept.stderr
    assert set(labels_by_digest(root)) == before
    unroot = contentfs("--root", root, "label", images.index, f"{GC_ROOT}=")
    assert unroot.returncode == 0, unroot.stderr
    gone = contentfs("--root", root, "gc")
    assert gone.returncode == 0, gone.stderr
    assert labels_by_digest(root) == {}


def test_gc_during_a_fetch_takes_nothing_of_it(images: Images, tmp_path: Any) -> None:
    """A gc while a fetch runs (the small blobs committed, the big layer still coming,
    the manifest with its gc.root and gc.ref labels not yet there) takes nothing: the
    fetch holds what it writes by a lease of its own (ctr's way), deleted at the end.
    Before: gc took the config and the small layers and the fetch still succeeded."""
    proxy = CountingProxy(images.registry.host, rate=16 << 20)
    root = str(tmp_path / "store")
    ref = f"{proxy.host}/test/single:v1"
    small = [d for d in images.amd_layers if d != images.big]
    try:
        proc = subprocess.Popen([CONTENTFS, "--root", root, "fetch", "--plain-http", ref],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _wait_for_offset(root, f"layer-{images.big}", 8 << 20, proc)
            assert set(small) <= set(labels_by_digest(root))  # committed, not yet rooted
            during = contentfs("--root", root, "gc")
            assert during.returncode == 0, during.stderr
            assert during.stdout == b"", during.stdout  # nothing removed
            leases = contentfs("--root", root, "lease", "ls", "-q")
            assert len(leases.stdout.split()) == 1, leases
        finally:
            proxy.rate = None
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        proxy.stop()
    assert set(images.amd_layers) | {images.amd} <= set(labels_by_digest(root))
    assert contentfs("--root", root, "lease", "ls", "-q").stdout == b""  # the lease went
    assert contentfs("--root", root, "gc").stdout == b""  # and the image is rooted
