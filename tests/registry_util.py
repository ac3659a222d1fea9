"""Registry helpers for tests and the bench: a local OCI registry (Debian's
``docker-registry``, on 127.0.0.1 with filesystem storage in a directory of the caller),
images built with ``umoci`` and pushed with ``skopeo``, and what a pull of them fetches.

Usage::

    with Registry(tmp_path / "registry") as reg:
        image = build_image(tmp_path / "oci", [{"a.txt": b"hello"}, random_layer(3 << 20)])
        ref = push_image(image, reg, "test/app:v1")   # '127.0.0.1:PORT/test/app:v1'
        blobs = reg.blobs_of("test/app", "v1")        # manifest, config, layers

containerd on top: ``Containerd(base)`` (its own store) or ``Containerd(base,
content_proxy=SOCKET)`` (a Content server such as ``contentfs serve`` as its store) and
``ctr(address, "images", "pull", "--plain-http", ref)``, re-exported from grpc_util.

Every process a helper starts is stopped by the helper's ``stop()`` / context exit.
Missing tools are a clear ``pytest.fail`` (Debian packages docker-registry, umoci, skopeo).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from types import TracebackType

import pytest

from .grpc_util import Containerd, ServeProcess, ctr

__all__ = [
    "Blob", "Containerd", "OciImage", "Registry", "ServeProcess", "build_image", "ctr",
    "free_port", "push_image", "random_layer", "require_tool",
]

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
UMOCI = shutil.which("umoci") or "/usr/bin/umoci"
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def require_tool(path: str, package: str) -> None:
    """Fail (never skip) when a tool is missing."""
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} not found: install the Debian package {package}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Blob:
    """One object of an image as a registry serves it."""

    digest: str
    size: int
    media_type: str


class Registry:
    """``docker-registry serve`` on 127.0.0.1:PORT, storage under ``base/storage``,
    deletes enabled, no auth. Ready (``GET /v2/`` answers 200) when the constructor
    returns. ``host`` is ``127.0.0.1:PORT`` (plain HTTP: pull with ``--plain-http``)."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        require_tool(REGISTRY, "docker-registry")
        self.base = os.fspath(base)
        os.makedirs(os.path.join(self.base, "storage"), exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = os.path.join(self.base, "config.yml")
        with open(config, "w") as f:
            f.write(
                "version: 0.1\n"
                "log:\n  level: warn\n"
                "storage:\n"
                f"  filesystem:\n    rootdirectory: {self.base}/storage\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.host}\n"
            )
        self.log_path = os.path.join(self.base, "registry.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [REGISTRY, "serve", config], stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                pytest.fail(f"docker-registry exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"docker-registry did not answer on {self.host}: {self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-3000:]

    def get(self, path: str, accept: Sequence[str] = MANIFEST_TYPES) -> tuple[bytes, str]:
        """GET ``/v2/<path>``: the body and its Content-Type."""
        req = urllib.request.Request(
            f"http://{self.host}/v2/{path}", headers={"Accept": ", ".join(accept)}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read(), r.headers.get("Content-Type", "")

    def blobs_of(self, repo: str, tag: str) -> list[Blob]:
        """Every object a pull of ``repo:tag`` fetches: the manifest (or index and each
        manifest), each config and each layer, as the registry serves them."""
        out: list[Blob] = []

        def walk(reference: str) -> None:
            body, media_type = self.get(f"{repo}/manifests/{reference}")
            out.append(Blob(_digest(body), len(body), media_type))
            doc = json.loads(body)
            for m in doc.get("manifests", []):
                walk(m["digest"])
            if "config" in doc:
                c = doc["config"]
                out.append(Blob(c["digest"], c["size"], c["mediaType"]))
            for layer in doc.get("layers", []):
                out.append(Blob(layer["digest"], layer["size"], layer["mediaType"]))

        walk(tag)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def random_layer(size: int, name: str = "random.bin", seed: int = 0) -> dict[str, bytes]:
    """A layer of one file of ``size`` incompressible bytes (the same for the same seed)."""
    return {name: random.Random(seed).randbytes(size)}


@dataclasses.dataclass(frozen=True)
class OciImage:
    """An OCI image layout made by :func:`build_image`: ``layout`` dir and ``tag``."""

    layout: str
    tag: str

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def build_image(
    layout: str | os.PathLike[str],
    layers: Sequence[Mapping[str, bytes]],
    tag: str = "latest",
) -> OciImage:
    """An OCI image layout at ``layout`` (created) with one layer per mapping of file
    name -> content (each file goes to ``/<name>`` in the image), built by umoci."""
    require_tool(UMOCI, "umoci")
    layout = os.fspath(layout)
    _run([UMOCI, "init", "--layout", layout])
    _run([UMOCI, "new", "--image", f"{layout}:{tag}"])
    with tempfile.TemporaryDirectory(prefix="umoci-layer-") as tmp:
        for i, files in enumerate(layers):
            src = os.path.join(tmp, f"layer{i}")
            os.mkdir(src)
            for name, data in files.items():
                path = os.path.join(src, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            _run([UMOCI, "insert", "--image", f"{layout}:{tag}", src, f"/layer{i}"])
    _run([UMOCI, "config", "--image", f"{layout}:{tag}", "--config.cmd", "/bin/true"])
    return OciImage(layout, tag)


def push_image(image: OciImage, registry: Registry, name: str) -> str:
    """Push ``image`` to ``registry`` as ``name`` (``repo:tag``) with skopeo, unchanged
    (no conversion: the registry serves the layout's manifest and blobs byte for byte).
    Returns the pull reference ``127.0.0.1:PORT/repo:tag``."""
    require_tool(SKOPEO, "skopeo")
    _run([
        SKOPEO, "copy", "--quiet", "--insecure-policy", "--dest-tls-verify=false",
        image.ref, f"docker://{registry.host}/{name}",
    ])
    return f"{registry.host}/{name}"


def _run(cmd: Sequence[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, timeout=600, check=False)
    if p.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}"
        )
