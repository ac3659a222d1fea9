"""Test helpers for registries: a real Debian ``docker-registry`` (distribution 2.8) on
127.0.0.1 with filesystem storage in a temp dir (optionally htpasswd basic auth), images
built with umoci, multi-platform indexes crafted on top, and skopeo to push them.

Every registry a test starts is stopped by the fixture that started it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
UMOCI = shutil.which("umoci") or "/usr/bin/umoci"
HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"


def require(path: str, what: str) -> None:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{what} not found at {path} (scripts/setup installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """``docker-registry serve`` on 127.0.0.1:PORT, storage under ``base``/data.

    ``users`` turns on htpasswd basic auth with those user -> password pairs.
    """

    def __init__(self, base: str, *, users: dict[str, str] | None = None,
                 port: int | None = None, tls: bool = False) -> None:
        require(REGISTRY, "docker-registry")
        os.makedirs(base, exist_ok=True)
        self.base = base
        self.data = os.path.join(base, "data")
        self.port = port or free_port()
        self.users = users
        self.config = os.path.join(base, "config.yml")
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.data}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            "  addr: 127.0.0.1:{PORT}",
        ]
        self.tls = tls
        self.cert = os.path.join(base, "cert.pem")
        if tls:  # a self-signed certificate for 127.0.0.1
            key = os.path.join(base, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-keyout", key, "-out", self.cert, "-days", "2",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True)
            lines += ["  tls:", f"    certificate: {self.cert}", f"    key: {key}"]
        if users:
            require(HTPASSWD, "htpasswd (apache2-utils)")
            htfile = os.path.join(base, "htpasswd")
            with open(htfile, "w") as f:
                for user, password in users.items():
                    out = subprocess.run([HTPASSWD, "-Bbn", user, password], check=True,
                                         capture_output=True, text=True).stdout
                    f.write(out.strip() + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: contentfs-test",
                      f"    path: {htfile}"]
        self._lines = lines
        self.log_path = os.path.join(base, "registry.log")
        self.proc: subprocess.Popen[bytes] | None = None
        # a port picked here may be taken by another test (or xdist worker) before the
        # registry binds it: then pick another, a few times (a port given is kept)
        for attempt in range(5):
            self._write_config()
            if self._start(fail=port is not None or attempt == 4):
                break
            self.port = free_port()

    def _write_config(self) -> None:
        with open(self.config, "w") as f:
            f.write("\n".join(self._lines).replace("{PORT}", str(self.port)) + "\n")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (again) on the same port and storage; fail the test if it does not answer."""
        self._start(fail=True)

    def _start(self, fail: bool) -> bool:
        """Start and wait until it answers (True). False when it exited because its port
        is taken and not ``fail``; any other failure fails the test."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        start = log.tell()
        try:
            self.proc = subprocess.Popen([REGISTRY, "serve", self.config], stdout=log,
                                         stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                said = f.read()
            if self.proc.poll() is not None:
                if b"address already in use" in said and not fail:
                    self.proc = None
                    return False
                pytest.fail(f"docker-registry exited {self.proc.returncode}: {self.log()}")
            # it logs "listening on" once bound: until then an answer could come from
            # whoever else holds the port
            if b"listening on" in said:
                try:
                    if self.tls:
                        import ssl

                        ctx = ssl.create_default_context(cafile=self.cert)
                        urllib.request.urlopen(f"https://{self.host}/v2/", timeout=2,
                                               context=ctx).close()
                    else:
                        urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2).close()
                    return True
                except urllib.error.HTTPError:
                    return True  # 401 with auth: it answers
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"docker-registry did not start: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def blob_path(self, digest: str) -> str:
        """Where the registry keeps a blob's bytes on disk (distribution's layout)."""
        alg, hexpart = digest.split(":", 1)
        return os.path.join(self.data, "docker/registry/v2/blobs", alg, hexpart[:2], hexpart,
                            "data")

    def blob_gets(self, digest: str) -> list[tuple[int, int]]:
        """(status, bytes sent) of every access-log line for GET of this blob."""
        out = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                if "GET /v2/" not in line or f"/blobs/{digest} " not in line:
                    continue
                # combined log format: "GET ... HTTP/1.1" STATUS BYTES
                tail = line.split('HTTP/1.1" ', 1)
                if len(tail) != 2:
                    continue
                fields = tail[1].split()
                out.append((int(fields[0]), int(fields[1]) if fields[1].isdigit() else 0))
        return out


def registry_fixture(tmp_path: Any, **kwargs: Any) -> Iterator[Registry]:
    reg = Registry(os.path.join(tmp_path, f"registry-{free_port()}"), **kwargs)
    try:
        yield reg
    finally:
        reg.stop()


# images ------------------------------------------------------------------------------


def run(*cmd: str, timeout: float = 300, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def build_image(layout: str, tag: str, files: Sequence[tuple[str, int]], *,
                arch: str = "amd64", seed: int = 0) -> str:
    """Build an image with umoci in the OCI layout ``layout``: one layer per (path, size)
    of random bytes. Returns the manifest digest."""
    require(UMOCI, "umoci")
    if not os.path.exists(os.path.join(layout, "oci-layout")):
        run(UMOCI, "init", "--layout", layout)
    run(UMOCI, "new", "--image", f"{layout}:{tag}")
    work = layout + f".files-{tag}"
    os.makedirs(work, exist_ok=True)
    for i, (path, size) in enumerate(files):
        src = os.path.join(work, f"f{i}")
        with open(src, "wb") as f:
            f.write(os.urandom(size))
        run(UMOCI, "insert", "--image", f"{layout}:{tag}", src, path)
    run(UMOCI, "config", "--image", f"{layout}:{tag}", "--os", "linux",
        "--architecture", arch)
    shutil.rmtree(work)
    return manifest_of(layout, tag)["digest"]


def read_index(layout: str) -> dict[str, Any]:
    with open(os.path.join(layout, "index.json")) as f:
        return json.load(f)  # type: ignore[no-any-return]


def manifest_of(layout: str, tag: str) -> dict[str, Any]:
    for desc in read_index(layout)["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return desc  # type: ignore[no-any-return]
    raise KeyError(tag)


def read_blob(layout: str, digest: str) -> bytes:
    alg, hexpart = digest.split(":", 1)
    with open(os.path.join(layout, "blobs", alg, hexpart), "rb") as f:
        return f.read()


def add_blob(layout: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])
    with open(path, "wb") as f:
        f.write(data)
    return digest


def build_index(layout: str, tag: str, platforms: dict[str, str]) -> str:
    """Craft an OCI image index tagged ``tag`` over the manifests tagged by ``platforms``'
    values (``{"linux/amd64": "amd", ...}``). Returns the index digest."""
    manifests = []
    for platform, mtag in platforms.items():
        desc = dict(manifest_of(layout, mtag))
        desc.pop("annotations", None)
        os_, arch = platform.split("/", 1)
        desc["platform"] = {"architecture": arch, "os": os_}
        manifests.append(desc)
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": manifests}, indent=None).encode()
    digest = add_blob(layout, body)
    index = read_index(layout)
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
        "size": len(body), "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    return digest


def skopeo_copy(src: str, dst: str, *extra: str, timeout: float = 300) -> None:
    """``skopeo copy`` with TLS checks off for the local plain-HTTP registries."""
    require(SKOPEO, "skopeo")
    args = [SKOPEO, "--insecure-policy", "copy"]
    if src.startswith("docker://"):
        args.append("--src-tls-verify=false")
    if dst.startswith("docker://"):
        args.append("--dest-tls-verify=false")
    if "--all" not in extra and "--multi-arch" not in " ".join(extra):
        args.append("--all")
    run(*args, *extra, src, dst, timeout=timeout)


class CountingProxy:
    """A tiny HTTP reverse proxy in front of a registry (a thread per connection): it
    records each request's method, path, Range header and the body bytes it passed on,
    and can throttle bodies (``rate`` bytes per second) so a test can act mid-transfer."""

    def __init__(self, upstream: str, rate: float | None = None,
                 bearer: tuple[str, str] | None = None) -> None:
        import http.server
        import threading

        proxy = self
        self.upstream = upstream
        self.rate = rate
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        # token auth as Docker Hub does it: /v2/ answers 401 with a Bearer challenge; the
        # realm (/token here) gives a token for the scopes asked, to USER:PASSWORD
        self.bearer = bearer
        self.tokens: dict[str, set[str]] = {}
        self.token_requests: list[dict[str, Any]] = []
        self.fail_status = 0  # answer blob GETs with this status (a failing registry)
        self.redirect = False  # send blob GETs to "storage" on another origin (307)
        self.manifest_body: bytes | None = None  # answer every manifest GET with this

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _token(self) -> None:
                import base64
                import secrets
                import urllib.parse

                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    user = base64.b64decode(auth[6:]).decode()
                proxy.token_requests.append({"query": query, "user": user})
                assert proxy.bearer is not None
                if user != ":".join(proxy.bearer):
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                token = secrets.token_hex(8)
                proxy.tokens[token] = set(query.get("scope", []))
                body = json.dumps({"token": token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _challenge(self) -> bool:
                """True when the request may pass (a token with the scope it needs)."""
                if proxy.bearer is None:
                    return True
                parts = self.path.split("?", 1)[0].split("/")
                repo = "/".join(parts[2:-2]) if len(parts) > 4 else ""
                action = "pull" if self.command in ("GET", "HEAD") else "push"
                scope = f"repository:{repo}:{'pull' if action == 'pull' else 'pull,push'}"
                auth = self.headers.get("Authorization", "")
                token = auth[7:] if auth.startswith("Bearer ") else None
                granted = proxy.tokens.get(token or "", set())
                if any(g.startswith(f"repository:{repo}:") and action in g.split(":")[-1]
                       for g in granted) or (not repo and token in proxy.tokens):
                    return True
                realm = f"http://127.0.0.1:{proxy.port}/token"
                challenge = f'Bearer realm="{realm}",service="test-registry"'
                if repo:
                    challenge += f',scope="{scope}"'
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
                self.send_response(401)
                self.send_header("WWW-Authenticate", challenge)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return False

            def _forward(self) -> None:
                import http.client

                if proxy.bearer is not None and self.path.startswith("/token"):
                    self._token()
                    return
                redirected = self.path.startswith("/_storage/")
                if redirected:  # "blob storage": a presigned URL needs no registry auth
                    self.path = self.path[len("/_storage"):]
                elif not self._challenge():
                    return
                if proxy.manifest_body is not None and "/manifests/" in self.path:
                    body = proxy.manifest_body
                    self.send_response(200)
                    self.send_header("Content-Type",
                                     "application/vnd.oci.image.manifest.v1+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                is_blob_get = self.command == "GET" and "/blobs/sha256:" in self.path
                if is_blob_get and proxy.fail_status and not redirected:
                    with proxy._lock:
                        proxy.requests.append({"method": self.command, "path": self.path,
                                               "range": self.headers.get("Range"), "sent": 0,
                                               "status": proxy.fail_status})
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if is_blob_get and proxy.redirect and not redirected:
                    # elsewhere, as S3 would be: another origin (localhost, not 127.0.0.1)
                    self.send_response(307)
                    self.send_header("Location", f"http://localhost:{proxy.port}/_storage"
                                                 f"{self.path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                record = {"method": self.command, "path": self.path,
                          "range": self.headers.get("Range"), "sent": 0, "status": 0,
                          "redirected": redirected,
                          "authorization": self.headers.get("Authorization")}
                with proxy._lock:
                    proxy.requests.append(record)
                try:
                    conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                except OSError:
                    self.close_connection = True
                    return  # the client sees the connection close
                record["status"] = resp.status
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                chunked = resp.getheader("Content-Length") is None and self.command != "HEAD"
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if self.command == "HEAD":
                    conn.close()
                    return
                started = time.monotonic()
                expected = resp.getheader("Content-Length")
                try:
                    while True:
                        try:
                            chunk = resp.read1(64 << 10)
                        except Exception:  # noqa: BLE001 - upstream died mid-body
                            chunk = b""
                        if not chunk:
                            if expected is not None and record["sent"] < int(expected):
                                # cut short upstream: cut the client off too, as a
                                # registry that stops does
                                self.close_connection = True
                                self.connection.shutdown(socket.SHUT_RDWR)
                                return
                            break
                        if chunked:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        else:
                            self.wfile.write(chunk)
                        record["sent"] += len(chunk)
                        if proxy.rate:
                            ahead = record["sent"] / proxy.rate - (time.monotonic() - started)
                            if ahead > 0:
                                time.sleep(ahead)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_requests(self, digest: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests
                    if r["method"] == "GET" and r["path"].endswith(f"/blobs/{digest}")]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
