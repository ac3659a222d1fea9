"""``contentfs push`` and ``push-object``: two stores as two machines sharing content
through real docker-registry instances, checked with skopeo too."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from .registry_util import SKOPEO, Registry, read_blob, run, skopeo_copy
from .test_registry_fetch import Images, contentfs, labels_by_digest, registry_images

SOURCE = "containerd.io/distribution.source.127.0.0.1"


images = pytest.fixture(scope="module")(registry_images)


@pytest.fixture
def second(tmp_path: Any) -> Iterator[Registry]:
    reg = Registry(str(tmp_path / "second"))
    try:
        yield reg
    finally:
        reg.stop()


def fetched(images: Images, root: str, *extra: str) -> None:
    res = contentfs("--root", root, "fetch", "--plain-http", *extra,
                    images.ref("test/multi:v1"))
    assert res.returncode == 0, res.stderr


def test_push_then_fetch_on_another_machine(images: Images, second: Registry,
                                            tmp_path: Any) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    fetched(images, a)
    target = f"{second.host}/new/repo:v2"
    pushed = contentfs("--root", a, "push", "--plain-http", "--json", target, images.index)
    assert pushed.returncode == 0, pushed.stderr
    summary = json.loads(pushed.stdout)
    assert summary["digest"] == images.index
    statuses = {blob["digest"]: blob["status"] for blob in summary["blobs"]}
    assert statuses[images.big] == "uploaded"
    assert set(statuses) == set(labels_by_digest(a))

    got = contentfs("--root", b, "fetch", "--plain-http", target)
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode().strip() == images.index
    mine, theirs = labels_by_digest(a), labels_by_digest(b)
    assert {d: s for d, (s, _) in mine.items()} == {d: s for d, (s, _) in theirs.items()}
    for digest, (_, labels) in mine.items():
        other = dict(theirs[digest][1])
        assert other.pop(SOURCE) == "new/repo"
        expected = {k: v for k, v in labels.items() if k != SOURCE}
        if "containerd.io/gc.root" in expected:
            assert "containerd.io/gc.root" in other
            expected.pop("containerd.io/gc.root")
            other.pop("containerd.io/gc.root")
        assert other == expected

    # a third party reads what was pushed
    out = str(tmp_path / "skopeo-layout")
    skopeo_copy(f"docker://{target}", f"oci:{out}:v2")
    for digest in labels_by_digest(a):
        assert read_blob(out, digest) == read_blob(images.layout, digest)
    inspect = run(SKOPEO, "inspect", "--tls-verify=false", "--raw", f"docker://{target}")
    assert json.loads(inspect.stdout)["manifests"][0]["digest"] == images.amd

    again = contentfs("--root", a, "push", "--plain-http", "--json", target, images.index)
    assert again.returncode == 0, again.stderr
    again_blobs = json.loads(again.stdout)["blobs"]
    assert all(b["status"] == "skipped" and b["transferred"] == 0
               for b in again_blobs if b["digest"] != images.index)


def test_push_within_a_registry_mounts_blobs(images: Images, tmp_path: Any) -> None:
    root = str(tmp_path / "a")
    fetched(images, root)
    res = contentfs("--root", root, "push", "--plain-http", "--json",
                    images.ref("copies/multi:v1"), images.index)
    assert res.returncode == 0, res.stderr
    blobs = {b["digest"]: b for b in json.loads(res.stdout)["blobs"]}
    assert blobs[images.big]["status"] == "mounted"
    assert blobs[images.big]["transferred"] == 0
    top = contentfs("fetch-object", "--plain-http", images.ref("copies/multi:v1"))
    assert top.stdout == read_blob(images.layout, images.index)


def test_push_of_a_partial_index(images: Images, second: Registry, tmp_path: Any) -> None:
    root = str(tmp_path / "a")
    fetched(images, root, "--platform", "linux/arm64")
    target = f"{second.host}/part/img:v1"
    missing = contentfs("--root", root, "push", "--plain-http", target, images.index)
    assert missing.returncode == 4, missing.stderr
    assert images.amd.encode() in missing.stderr
    # distribution 2.8 refuses an index whose manifests it lacks (ctr images push
    # --platform meets the same refusal): InvalidArgument, naming what it lacks
    partial = contentfs("--root", root, "push", "--plain-http", "--platform", "linux/arm64",
                        target, images.index)
    assert partial.returncode == 3, partial.stderr
    assert b"manifest_blob_unknown" in partial.stderr
    # the one platform's manifest alone is an image the registry takes
    ok = contentfs("--root", root, "push", "--plain-http", target, images.arm)
    assert ok.returncode == 0, ok.stderr
    back = contentfs("--root", str(tmp_path / "b"), "fetch", "--plain-http", target)
    assert back.returncode == 0, back.stderr
    assert back.stdout.decode().strip() == images.arm
    assert set(labels_by_digest(str(tmp_path / "b"))) == \
        set(labels_by_digest(root)) - {images.index}


def test_push_object_and_fetch_object(images: Images, second: Registry,
                                      tmp_path: Any) -> None:
    root = str(tmp_path / "a")
    fetched(images, root, "--platform", "linux/arm64")
    target = f"{second.host}/obj/img:t"
    arm = json.loads(read_blob(images.layout, images.arm))
    for desc in [arm["config"], *arm["layers"]]:
        res = contentfs("--root", root, "push-object", "--plain-http", target, desc["digest"],
                        desc["mediaType"])
        assert res.returncode == 0, res.stderr
        assert res.stdout.decode().strip() == desc["digest"]
        back = contentfs("fetch-object", "--plain-http", target, desc["digest"])
        assert back.stdout == read_blob(images.layout, desc["digest"])
    res = contentfs("--root", root, "push-object", "--plain-http", target, images.arm,
                    "application/vnd.oci.image.manifest.v1+json")
    assert res.returncode == 0, res.stderr
    top = contentfs("fetch-object", "--plain-http", target)
    assert top.returncode == 0, top.stderr
    assert top.stdout == read_blob(images.layout, images.arm)
    missing = contentfs("--root", root, "push-object", "--plain-http", target,
                        "sha256:" + "0" * 64, "application/octet-stream")
    assert missing.returncode == 4, missing.stderr


def test_push_with_basic_auth(images: Images, tmp_path: Any) -> None:
    reg = Registry(str(tmp_path / "auth"), users={"bob": "pw"})
    try:
        root = str(tmp_path / "a")
        fetched(images, root, "--platform", "linux/arm64")
        target = f"{reg.host}/bob/img:v1"
        env = {"HOME": str(tmp_path)}
        denied = contentfs("--root", root, "push", "--plain-http", target, images.arm,
                           env=env)
        assert denied.returncode == 6, denied.stderr
        assert reg.host.encode() in denied.stderr
        ok = contentfs("--root", root, "push", "--plain-http", "--user", "bob:pw", target,
                       images.arm, env=env)
        assert ok.returncode == 0, ok.stderr
        os.makedirs(tmp_path / "out")
        skopeo_copy(f"docker://{target}", f"oci:{tmp_path / 'out'}:v1", "--src-creds",
                    "bob:pw")
        assert read_blob(str(tmp_path / "out"), images.arm) == \
            read_blob(images.layout, images.arm)
    finally:
        reg.stop()


def test_token_auth_fetch_and_push(images: Images, second: Registry, tmp_path: Any) -> None:
    """The Bearer flow (realm, service, scope) of Docker Hub and most registries, with a
    token service in front of a real registry: pull scope to fetch, pull,push to push."""
    from .registry_util import CountingProxy

    gate = CountingProxy(second.host, bearer=("carol", "tok-pw"))
    try:
        root = str(tmp_path / "a")
        fetched(images, root, "--platform", "linux/arm64")
        target = f"{gate.host}/tok/img:v1"
        env = {"HOME": str(tmp_path)}
        anon = contentfs("--root", root, "push", "--plain-http", target, images.arm, env=env)
        assert anon.returncode == 6, anon.stderr
        assert gate.host.encode() in anon.stderr
        pushed = contentfs("--root", root, "push", "--plain-http", "-u", "carol:tok-pw",
                           target, images.arm, env=env)
        assert pushed.returncode == 0, pushed.stderr
        scopes = {s for r in gate.token_requests for s in r["query"].get("scope", [])}
        assert "repository:tok/img:pull,push" in scopes
        assert all(r["query"].get("service") == ["test-registry"] for r in gate.token_requests)
        back = contentfs("--root", str(tmp_path / "b"), "fetch", "--plain-http",
                         "-u", "carol:tok-pw", target, env=env)
        assert back.returncode == 0, back.stderr
        assert back.stdout.decode().strip() == images.arm
        # uploads went with the token (never a 401 on a streamed PUT)
        puts = [r for r in gate.requests if r["method"] == "PUT"]
        assert puts and all(r["status"] == 201 for r in puts)
    finally:
        gate.stop()


def test_blob_redirects_are_followed_without_credentials(images: Images, second: Registry,
                                                          tmp_path: Any) -> None:
    """Registries send blob GETs to storage elsewhere (307 to S3 and the like): followed,
    and the registry's token is not sent to the other origin."""
    from .registry_util import CountingProxy

    gate = CountingProxy(second.host, bearer=("dave", "pw"))
    gate.redirect = True
    try:
        root = str(tmp_path / "a")
        fetched(images, root, "--platform", "linux/arm64")
        target = f"{gate.host}/redir/img:v1"
        env = {"HOME": str(tmp_path)}
        pushed = contentfs("--root", root, "push", "--plain-http", "-u", "dave:pw", target,
                           images.arm, env=env)
        assert pushed.returncode == 0, pushed.stderr
        back = contentfs("--root", str(tmp_path / "b"), "fetch", "--plain-http", "-u",
                         "dave:pw", target, env=env)
        assert back.returncode == 0, back.stderr
        stored = [r for r in gate.requests if r.get("redirected")]
        assert stored and all(r["status"] == 200 for r in stored)
        assert all(r["authorization"] is None for r in stored)
    finally:
        gate.stop()


def test_registry_failing_with_5xx_is_unavailable(images: Images, second: Registry,
                                                  tmp_path: Any) -> None:
    """503 on every blob: retried (3 times), then exit 7 naming the registry."""
    from .registry_util import CountingProxy

    proxy = CountingProxy(second.host)
    try:
        root = str(tmp_path / "a")
        fetched(images, root, "--platform", "linux/arm64")
        target = f"{proxy.host}/flaky/img:v1"
        assert contentfs("--root", root, "push", "--plain-http", target,
                         images.arm).returncode == 0
        proxy.fail_status = 503
        res = contentfs("--root", str(tmp_path / "b"), "fetch", "--plain-http", target)
        assert res.returncode == 7, res.stderr
        assert b"HTTP 503" in res.stderr and proxy.host.encode() in res.stderr
        gets = [r for r in proxy.requests if r["method"] == "GET" and "/blobs/" in r["path"]]
        by_path: dict[str, int] = {}
        for r in gets:
            by_path[r["path"]] = by_path.get(r["path"], 0) + 1
        assert max(by_path.values()) == 4  # the first try and 3 retries
    finally:
        proxy.stop()
