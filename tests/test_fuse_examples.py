"""The shell scripts in scripts/examples/, run against a real mount."""

from __future__ import annotations

import os

from tests import fuse_util
from tests.fuse_util import Mount, run, sha256

mounter = fuse_util.mounter
mnt = fuse_util.mnt

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "examples")


def _script(name: str) -> str:
    return os.path.join(EXAMPLES, name)


def test_import_label_and_list(mnt: Mount, tmp_path: os.PathLike[str]) -> None:
    src = os.path.join(os.fspath(tmp_path), "50% off.txt")
    with open(src, "wb") as f:
        f.write(b"example\n")
    out = run(_script("import-file"), mnt.path, src, "team=infra", "tier=gold").stdout
    example = "sha256:" + sha256(b"example\n")
    other_digest = "sha256:" + sha256(b"other\n")
    assert out.decode().strip() == example
    assert os.listdir(os.path.join(mnt.path, "ingest")) == []
    # importing the same bytes again is success
    assert run(_script("import-file"), mnt.path, src).stdout == out
    other = os.path.join(os.fspath(tmp_path), "other")
    with open(other, "wb") as f:
        f.write(b"other\n")
    run(_script("import-file"), mnt.path, other, "team=web")
    listed = run(_script("blobs-with-label"), mnt.path, "team").stdout.decode().split()
    assert sorted(listed) == sorted([example, other_digest])
    assert run(_script("blobs-with-label"), mnt.path, "team", "web").stdout.decode().split() \
        == [other_digest]


def test_clean_stale_ingests(mnt: Mount) -> None:
    for name in ("old", "new"):
        with open(mnt.ingest(name), "wb") as f:
            f.write(name.encode())
    os.utime(mnt.ingest("old"), (1_000_000_000, 1_000_000_000))
    dry = run(_script("clean-stale-ingests"), mnt.path, "2", "--dry-run").stdout
    assert dry == b"would abort old\n"
    assert run(_script("clean-stale-ingests"), mnt.path, "2").stdout == b"aborted old\n"
    assert os.listdir(os.path.join(mnt.path, "ingest")) == ["new"]


def test_oci_manifests(mounter: fuse_util.MountFactory, tmp_path: os.PathLike[str]) -> None:
    layout = os.path.join(os.fspath(tmp_path), "layout")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:v1")
    m = mounter(root=layout)
    out = run(_script("oci-manifests"), m.path).stdout.decode()
    assert "== index.json" in out
    assert '"schemaVersion":2' in out.replace(" ", "")
    assert "application/vnd.oci.image.config.v1+json" in out  # the manifest itself


def test_oci_manifests_on_a_plain_store(mnt: Mount) -> None:
    """A store that is not an OCI layout: one line saying so, not cat's error after a
    header (and ``--help`` is usage, not a path)."""
    p = run(_script("oci-manifests"), mnt.path, check=False)
    assert (p.returncode, p.stdout) == (1, b"")
    assert p.stderr.decode().strip().endswith(
        f"{mnt.path} has no index.json: not a mount of an OCI image layout")
    p = run(_script("oci-manifests"), "--help", check=False)
    assert p.returncode == 0 and p.stdout.decode().startswith("usage: ")
