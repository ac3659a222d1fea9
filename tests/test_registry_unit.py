"""store.registry's pure parts: references, children and labels, challenges, docker
config credentials."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from store import InvalidArgument
from store.registry import docker_config_credentials, parse_reference
from store.registry.auth import parse_challenge
from store.registry.images import (
    Descriptor,
    child_labels,
    children,
    media_type_of,
    platform_matches,
    ref_key,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


@pytest.mark.parametrize("text,host,repo,tag,digest", [
    ("busybox", "docker.io", "library/busybox", None, None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("user/app", "docker.io", "user/app", None, None),
    ("127.0.0.1:5000/a/b:v1", "127.0.0.1:5000", "a/b", "v1", None),
    ("localhost/x", "localhost", "x", None, None),
    (f"ghcr.io/o/r@{D1}", "ghcr.io", "o/r", None, D1),
    (f"ghcr.io/o/r:t@{D1}", "ghcr.io", "o/r", "t", D1),
])
def test_parse_reference(text: str, host: str, repo: str, tag: str | None,
                         digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repo, tag, digest)
    assert ref.object == (digest or tag or "latest")


def test_reference_hostname_drops_the_port() -> None:
    ref = parse_reference("127.0.0.1:5000/a:v1")
    assert ref.hostname == "127.0.0.1"
    assert parse_reference("busybox").api_host == "registry-1.docker.io"


@pytest.mark.parametrize("text", ["", "UPPER/case", "a/b:bad tag", "h.io/a@sha256:xyz",
                                  "h.io/", " busybox"])
def test_bad_references(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


def manifest(config: str, layers: list[str]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                   "size": 1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d,
                    "size": 2} for d in layers],
    }).encode()


def test_children_and_labels_of_a_manifest() -> None:
    data = manifest(D1, [D2, D3])
    mt = media_type_of(data, "m")
    kids = children(data, mt, "m")
    assert [k.digest for k in kids] == [D1, D2, D3]
    assert child_labels(kids) == {
        "containerd.io/gc.ref.content.config": D1,
        "containerd.io/gc.ref.content.l.0": D2,
        "containerd.io/gc.ref.content.l.1": D3,
    }
    assert ref_key(kids[0]) == f"config-{D1}" and ref_key(kids[1]) == f"layer-{D2}"


def test_index_children_and_platforms() -> None:
    data = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": D1, "size": 3,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": D2, "size": 3,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    ]}).encode()
    mt = media_type_of(data, "i")
    assert mt == "application/vnd.oci.image.index.v1+json"
    kids = children(data, mt, "i")
    assert child_labels(kids) == {"containerd.io/gc.ref.content.m.0": D1,
                                  "containerd.io/gc.ref.content.m.1": D2}
    arm = [("linux", "arm64", None)]
    assert [platform_matches(k, arm) for k in kids] == [False, True]
    assert platform_matches(kids[1], [("linux", "arm64", "v8")])
    assert not platform_matches(kids[1], [("linux", "arm64", "v7")])
    assert platform_matches(Descriptor("x", D3, 1), arm)  # no platform: always


@pytest.mark.parametrize("data", [
    b"not json", b"[1, 2]", b'{"mediaType": "application/vnd.oci.image.manifest.v1+json"}',
    b'{"schemaVersion": 2, "manifests": "nope"}',
    b'{"schemaVersion": 2, "manifests": [{"digest": "sha256:12", "size": 1}]}',
    b'{"schemaVersion": 2, "manifests": [{"digest": "' + D1.encode() + b'", "size": -1}]}',
])
def test_unparseable_manifests_are_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        children(data, media_type_of(data, "m", "application/vnd.oci.image.index.v1+json"),
                 "m")


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_docker_config_credentials(tmp_path: Any) -> None:
    path = tmp_path / "config.json"
    auth = base64.b64encode(b"bob:pa:ss").decode()
    path.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": auth},
        "reg.example:5000": {"username": "u", "password": "p"},
    }}))
    hub = docker_config_credentials("docker.io", str(path))
    assert hub is not None and (hub.username, hub.password) == ("bob", "pa:ss")
    other = docker_config_credentials("reg.example:5000", str(path))
    assert other is not None and (other.username, other.password) == ("u", "p")
    assert docker_config_credentials("nowhere.example", str(path)) is None
    assert docker_config_credentials("x", str(tmp_path / "missing.json")) is None
    path.write_text("{broken")
    with pytest.raises(InvalidArgument):
        docker_config_credentials("x", str(path))


def test_terminal_progress_draws_lines_like_ctr() -> None:
    import io

    from store.registry import TerminalProgress

    out = io.StringIO()
    with TerminalProgress(out, interval=0.01) as prog:
        prog.update("host/repo:v1", "resolved")
        prog.update(f"layer-{D1}", "downloading", 1 << 20, 4 << 20)  # resumed at 1 MiB
        prog.update(f"layer-{D1}", "downloading", 3 << 20, 4 << 20)
        prog.update(f"config-{D2}", "exists", 10, 10)
    last = out.getvalue().split("\x1b[")[-4:]  # the final frame's lines
    text = out.getvalue()
    assert f"layer-{D1}:" in text and "downloading" in text and "3.0 MiB/4.0 MiB" in text
    assert "exists" in text and "resolved" in text
    # the rate counts what was downloaded in this run only (2 MiB), not resumed bytes
    assert "total: 2.0 MiB" in "".join(last)
