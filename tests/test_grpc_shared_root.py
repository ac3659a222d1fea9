"""One root served over gRPC, used by the CLI and mounted, all at once: blobs, labels and
ref locks are shared (the store's cross-process flock and SQLite)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from fusefs.exits import EXIT_CODES
from store import Unavailable, digest_of
from store.grpc.client import RemoteStore
from tests.fuse_util import Mount, require_fuse
from tests.grpc_util import CONTENTFS, ServeProcess, ctr


def cli(root: str, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CONTENTFS, *args, "--root", root], input=data, capture_output=True, timeout=120,
        check=False,
    )


def test_server_cli_and_mount_share_one_root(tmp_path: Any) -> None:
    require_fuse()
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    srv = ServeProcess(root, os.path.join(tmp_path, "s.sock"))
    mnt = os.path.join(tmp_path, "mnt")
    os.mkdir(mnt)
    mount = Mount(root, mnt, (), os.path.join(tmp_path, "mnt.log"))
    remote = RemoteStore(srv.address)
    try:
        mount.start()
        # CLI -> gRPC and mount
        from_cli = b"ingested by the cli\n"
        p = cli(root, "ingest", "cli-ref", "-", "--label", "by=cli", data=from_cli)
        assert p.returncode == 0, p.stderr
        d1 = digest_of(from_cli)
        assert ctr(srv.address, "content", "get", d1).stdout == from_cli
        assert dict(remote.info(d1).labels) == {"by": "cli"}
        with open(mount.blob(d1.split(":")[1]), "rb") as f:
            assert f.read() == from_cli

        # ctr over gRPC -> CLI and mount
        from_ctr = b"ingested by ctr\n"
        p = ctr(srv.address, "content", "ingest", "ctr-ref", input=from_ctr)
        assert p.returncode == 0, p.stderr
        d2 = digest_of(from_ctr)
        p = cli(root, "ls", "-q")
        assert sorted(p.stdout.decode().split()) == sorted([d1, d2])
        assert cli(root, "get", d2).stdout == from_ctr
        with open(mount.blob(d2.split(":")[1]), "rb") as f:
            assert f.read() == from_ctr

        # mount -> gRPC
        from_mount = b"ingested through the mount\n"
        with open(mount.ingest("mnt-ref"), "wb") as f:
            f.write(from_mount)
        d3 = digest_of(from_mount)
        os.rename(mount.ingest("mnt-ref"), mount.blob(d3.split(":")[1]))
        assert remote.reader_at(d3).read_at(100, 0) == from_mount

        # labels set over gRPC are seen by the CLI, and the other way round
        p = ctr(srv.address, "content", "label", d2, "team=infra")
        assert p.returncode == 0, p.stderr
        assert b"team=infra" in cli(root, "info", d2).stdout
        assert cli(root, "label", d2, "team=").returncode == 0
        assert dict(remote.info(d2).labels) == {}

        # a ref held over gRPC is Unavailable to the CLI and to the mount
        w = remote.writer("held-remotely")
        try:
            w.write(b"partial")
            p = cli(root, "ingest", "held-remotely", "-", data=b"other")
            assert p.returncode == EXIT_CODES[Unavailable], p.stderr
            assert b"ref held-remotely locked" in p.stderr
            try:
                with open(mount.ingest("held-remotely"), "ab") as f:
                    f.write(b"x")
                raise AssertionError("the mount opened a ref held over gRPC")
            except OSError as exc:
                assert exc.strerror == "Device or resource busy", exc
        finally:
            w.close()
        # ... and free again once the stream closed: the CLI resumes the ingest
        p = cli(root, "active", "--json")
        assert b'"offset": 7' in p.stdout
        # and a ref held by the CLI side (the store in another process) is Unavailable here
        with open(mount.ingest("held-by-mount"), "wb") as f:
            f.write(b"mount holds this")
            f.flush()
            try:
                remote.writer("held-by-mount").close()
                raise AssertionError("gRPC opened a ref held by the mount")
            except Unavailable:
                pass
        mount.unmount()
    finally:
        remote.close()
        mount.cleanup()
        rc = srv.stop()
    assert rc == 0, srv.stderr
