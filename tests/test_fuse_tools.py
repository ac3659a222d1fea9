"""Standard tools against a real mount (fuse-anchors.md §2.1, DESIGN §2): each row run
with the real tool, outcome checked by content, digest and xattrs."""

from __future__ import annotations

import os
import subprocess

from store import LocalStore
from tests import fuse_util
from tests.fuse_util import CONTENTFS, Mount, read_bytes, run, sha256, src_file
from tests.rel_util import wait_for

mounter = fuse_util.mounter
mnt = fuse_util.mnt

DATA = os.urandom(3 * 1024 * 1024 + 12345)
HEX = sha256(DATA)


def _src(tmp_path: os.PathLike[str], data: bytes = DATA, name: str = "src") -> str:
    return src_file(tmp_path, data, name)


_read = read_bytes


def _commit(m: Mount, name: str) -> None:
    run("setfattr", "-n", "user.contentfs.commit", m.ingest(name))


def test_read_blob_with_cat_dd_sha256sum_cp(mnt: Mount, tmp_path: os.PathLike[str]) -> None:
    digest = run(CONTENTFS, "--root", mnt.root, "ingest", "r",
                 _src(tmp_path)).stdout.decode().strip()
    assert digest == f"sha256:{HEX}"
    blob = mnt.blob(HEX)
    assert run("cat", blob).stdout == DATA
    assert run("sha256sum", blob).stdout.decode().split()[0] == HEX
    assert run("dd", f"if={blob}", "bs=1M", "status=none").stdout == DATA
    assert run("dd", f"if={blob}", "bs=4096", "skip=3", "count=2", "status=none").stdout == \
        DATA[3 * 4096:5 * 4096]
    out = os.path.join(os.fspath(tmp_path), "out")
    run("cp", blob, out)
    assert _read(out) == DATA
    st = os.stat(blob)
    assert st.st_size == len(DATA)
    assert st.st_blksize == 1 << 20
    assert st.st_blocks * 512 >= len(DATA)
    assert run("du", "-k", blob).stdout.split()[0] == run(
        "du", "-k", os.path.join(mnt.root, "blobs", "sha256", HEX)).stdout.split()[0]


def test_cp_new_and_existing_then_mv_commit(mnt: Mount, tmp_path: os.PathLike[str]) -> None:
    src = _src(tmp_path)
    run("cp", src, mnt.ingest("layer"))
    assert _read(mnt.ingest("layer")) == DATA
    run("cp", src, mnt.ingest("layer"))  # O_TRUNC on the existing ingest restarts it
    assert os.stat(mnt.ingest("layer")).st_size == len(DATA)
    run("mv", mnt.ingest("layer"), mnt.blob(HEX))
    assert not os.path.exists(mnt.ingest("layer"))
    assert _read(mnt.blob(HEX)) == DATA
    assert os.listdir(os.path.join(mnt.path, "ingest")) == []


def test_cp_p_touch_install_keep_metadata_on_ingests(mnt: Mount,
                                                     tmp_path: os.PathLike[str]) -> None:
    src = _src(tmp_path, b"metadata\n")
    os.utime(src, (1_600_000_000, 1_600_000_000))
    run("cp", "-p", src, mnt.ingest("p"))
    st = os.stat(mnt.ingest("p"))
    assert int(st.st_mtime) == 1_600_000_000
    run("touch", mnt.ingest("t"))
    assert os.path.exists(mnt.ingest("t"))
    run("touch", "-d", "2020-01-01", mnt.ingest("p"))
    run("chmod", "600", mnt.ingest("p"))
    assert os.stat(mnt.ingest("p")).st_mode & 0o777 == 0o600
    run("install", "-m", "644", src, mnt.ingest("inst"))
    assert _read(mnt.ingest("inst")) == b"metadata\n"
    _commit(mnt, "inst")
    assert _read(mnt.blob(sha256(b"metadata\n"))) == b"metadata\n"


def test_append_after_another_process_extended_the_ingest(mnt: Mount) -> None:
    """An ingest extended by another process (the store API here; gRPC and the CLI
    alike) shows its new size through the mount once the attribute timeout passes, and
    a shell append through the mount lands after those bytes. (The kernel's writeback
    cache would break both: it trusts its own i_size of a cached regular file, so the
    mount kept showing 3 bytes and ``printf 9 >>`` wrote back "1239" at offset 0.)"""
    ing = mnt.ingest("faces")
    run("sh", "-c", f"printf 123 > {ing}")
    assert os.stat(ing).st_size == 3
    with LocalStore(mnt.root).writer("faces") as w:  # waits for the shell's RELEASE
        w.write(b"45678")
    wait_for(lambda: os.stat(ing).st_size == 8, timeout=30,
             what="the size written by the other process")
    run("sh", "-c", f"printf 9 >> {ing}")
    assert _read(ing) == b"123456789"
    assert os.stat(ing).st_size == 9


def test_shell_redirection_append_and_small_writes(mnt: Mount) -> None:
    ing = mnt.ingest("shell")
    run("sh", "-c", f"cat /etc/os-release > {ing}")
    expected = _read("/etc/os-release")
    assert _read(ing) == expected
    run("sh", "-c", f"echo one >> {ing}; echo two >> {ing}; echo three >> {ing}")
    expected += b"one\ntwo\nthree\n"
    assert _read(ing) == expected
    # back-to-back appends from separate processes never hit EBUSY
    for i in range(30):
        run("sh", "-c", f"echo {i} >> {ing}")
        expected += f"{i}\n".encode()
    assert _read(ing) == expected
    run("sh", "-c", f"printf new > {ing}")  # > restarts
    assert _read(ing) == b"new"
    # curl-sized (16 KiB) writes through tee and dd
    data = os.urandom(40 * 16384 + 7)
    run("tee", mnt.ingest("tee"), stdin=data)
    run("dd", f"of={mnt.ingest('dd16')}", "bs=16k", "status=none", stdin=data)
    assert _read(mnt.ingest("tee")) == data == _read(mnt.ingest("dd16"))
    assert run("getfattr", "--only-values", "-n", "user.contentfs.digest",
               mnt.ingest("dd16")).stdout.decode() == f"sha256:{sha256(data)}"


def test_dd_seek_conv_notrunc_and_sparse_cp(mnt: Mount, tmp_path: os.PathLike[str]) -> None:
    ing = mnt.ingest("dd")
    run("dd", "if=/dev/zero", f"of={ing}", "bs=4k", "count=2", "status=none")
    run("dd", f"of={ing}", "bs=4k", "seek=4", "conv=notrunc", "status=none", stdin=b"x" * 10)
    assert _read(ing) == bytes(16384) + b"x" * 10
    sparse = os.path.join(os.fspath(tmp_path), "sparse")
    with open(sparse, "wb") as f:
        f.write(b"head")
        f.truncate(5 << 20)
    run("cp", "--sparse=always", sparse, mnt.ingest("sparse"))
    _commit(mnt, "sparse")
    assert os.path.exists(mnt.blob(sha256(_read(sparse))))


def test_truncate_tool(mnt: Mount) -> None:
    ing = mnt.ingest("trunc")
    run("sh", "-c", f"printf abc > {ing}")
    run("truncate", "-s", "3", ing)
    run("truncate", "-s", "5", ing)
    assert _read(ing) == b"abc\0\0"
    proc = run("truncate", "-s", "2", ing, check=False)
    assert proc.returncode != 0 and b"Invalid argument" in proc.stderr
    run("truncate", "-s", "0", ing)
    assert _read(ing) == b""


def test_rsync_plain_archive_and_inplace(mnt: Mount, tmp_path: os.PathLike[str]) -> None:
    src_dir = os.path.join(os.fspath(tmp_path), "tree")
    os.mkdir(src_dir)
    files = {f"f{i}": os.urandom(100_000 + i) for i in range(3)}
    for name, data in files.items():
        with open(os.path.join(src_dir, name), "wb") as f:
            f.write(data)
    ingest_dir = os.path.join(mnt.path, "ingest") + "/"
    run("rsync", os.path.join(src_dir, "f0"), ingest_dir)
    run("rsync", "-a", src_dir + "/", ingest_dir)
    for name, data in files.items():
        assert _read(mnt.ingest(name)) == data
    assert sorted(os.listdir(ingest_dir)) == sorted(files)  # no temp files left behind
    # --inplace ends with ftruncate(current size): a no-op. (Re-running it over an existing
    # ingest rewrites bytes before the end: ESPIPE, by design.)
    run("rsync", "--inplace", os.path.join(src_dir, "f1"), mnt.ingest("inplace"))
    assert _read(mnt.ingest("inplace")) == files["f1"]
    for name in files:
        run("mv", mnt.ingest(name), mnt.blob(sha256(files[name])))
    # labels travel in with rsync -X (set on the temp file, kept by the rename)
    labelled = os.path.join(src_dir, "f0")
    run("setfattr", "-n", "user.origin", "-v", "rsync", labelled)
    run("rsync", "-aX", labelled, mnt.ingest("withx"))
    assert run("getfattr", "--only-values", "-n", "user.origin",
               mnt.ingest("withx")).stdout == b"rsync"
    # and out again, with the labels as xattrs
    blob = mnt.blob(sha256(files["f2"]))
    run("setfattr", "-n", "user.team", "-v", "infra", blob)
    out = os.path.join(os.fspath(tmp_path), "out")
    run("rsync", "-X", blob, out)
    assert _read(out) == files["f2"]
    assert run("getfattr", "--only-values", "-n", "user.team", out).stdout == b"infra"


def test_mv_from_other_fs_into_ingest(mnt: Mount, tmp_path: os.PathLike[str]) -> None:
    src = _src(tmp_path, b"moved in\n", "mvsrc")
    run("setfattr", "-n", "user.origin", "-v", "tmp", src)
    run("mv", src, mnt.ingest("moved"))
    assert not os.path.exists(src)
    assert _read(mnt.ingest("moved")) == b"moved in\n"
    assert run("getfattr", "--only-values", "-n", "user.origin",
               mnt.ingest("moved")).stdout == b"tmp"
    _commit(mnt, "moved")
    assert run("getfattr", "--only-values", "-n", "user.origin",
               mnt.blob(sha256(b"moved in\n"))).stdout == b"tmp"


def test_setfattr_commit_with_hints_and_labels(mnt: Mount) -> None:
    ing = mnt.ingest("hinted")
    data = b"hinted content\n"
    run("sh", "-c", f"printf 'hinted content\\n' > {ing}")
    run("setfattr", "-n", "user.contentfs.expected", "-v", f"sha256:{sha256(data)}", ing)
    run("setfattr", "-n", "user.contentfs.total", "-v", str(len(data)), ing)
    run("setfattr", "-n", "user.containerd.io/gc.root", "-v", "2026-01-01", ing)
    assert run("getfattr", "--only-values", "-n", "user.contentfs.total",
               ing).stdout == str(len(data)).encode()
    run("setfattr", "-n", "user.contentfs.commit", ing)
    assert not os.path.exists(ing)
    blob = mnt.blob(sha256(data))
    dump = run("getfattr", "-d", blob).stdout.decode()
    assert 'user.containerd.io/gc.root="2026-01-01"' in dump
    assert "contentfs" not in dump  # reserved names are readable but never listed
    assert run("getfattr", "--only-values", "-n", "user.contentfs.digest",
               blob).stdout == f"sha256:{sha256(data)}".encode()
    # commit with an explicit digest via -v
    run("sh", "-c", f"printf second > {mnt.ingest('second')}")
    run("setfattr", "-n", "user.contentfs.commit", "-v", f"sha256:{sha256(b'second')}",
        mnt.ingest("second"))
    assert _read(mnt.blob(sha256(b"second"))) == b"second"


def test_existing_content_commit_succeeds_and_removes_ingest(mnt: Mount) -> None:
    for name in ("a", "b"):
        run("sh", "-c", f"printf same > {mnt.ingest(name)}")
    run("mv", mnt.ingest("a"), mnt.blob(sha256(b"same")))
    run("mv", mnt.ingest("b"), mnt.blob(sha256(b"same")))  # NOREPLACE: EEXIST, retry ok
    run("sh", "-c", f"printf same > {mnt.ingest('c')}")
    _commit(mnt, "c")
    assert os.listdir(os.path.join(mnt.path, "ingest")) == []
    assert _read(mnt.blob(sha256(b"same"))) == b"same"


def test_labels_getfattr_setfattr_and_cp_preserve_xattr(mnt: Mount,
                                                         tmp_path: os.PathLike[str]) -> None:
    run("sh", "-c", f"printf labelled > {mnt.ingest('l')}")
    _commit(mnt, "l")
    blob = mnt.blob(sha256(b"labelled"))
    run("setfattr", "-n", "user.a", "-v", "1", blob)
    run("setfattr", "-n", "user.b.c/d", "-v", "two words", blob)
    dump = run("getfattr", "-d", blob).stdout.decode()
    assert 'user.a="1"' in dump and 'user.b.c/d="two words"' in dump
    run("setfattr", "-x", "user.a", blob)
    assert "user.a" not in run("getfattr", "-d", blob).stdout.decode()
    out = os.path.join(os.fspath(tmp_path), "copy")
    run("cp", "--preserve=xattr", blob, out)
    assert run("getfattr", "--only-values", "-n", "user.b.c/d", out).stdout == b"two words"
    assert b"contentfs" not in run("getfattr", "-d", out).stdout
    run("cp", "--preserve=xattr", out, mnt.ingest("back"))
    assert run("getfattr", "--only-values", "-n", "user.b.c/d",
               mnt.ingest("back")).stdout == b"two words"
    # cp -a of a blob: the reserved names never travel, and copies back in round-trip
    run("cp", "-a", blob, mnt.ingest("back2"))
    _commit(mnt, "back2")


def test_rm_blob_and_ingest(mnt: Mount) -> None:
    run("sh", "-c", f"printf gone > {mnt.ingest('x')}")
    run("rm", mnt.ingest("x"))
    assert not os.path.exists(mnt.ingest("x"))
    assert not os.listdir(os.path.join(mnt.root, "ingest"))
    run("sh", "-c", f"printf gone > {mnt.ingest('y')}")
    _commit(mnt, "y")
    blob = mnt.blob(sha256(b"gone"))
    with open(blob, "rb") as reader:
        run("rm", blob)
        assert not os.path.exists(blob)
        assert reader.read() == b"gone"  # an open reader keeps reading
    assert not os.path.exists(os.path.join(mnt.root, "blobs", "sha256", sha256(b"gone")))


def test_ls_l_and_refs_with_slashes(mnt: Mount) -> None:
    name = "docker.io%2Flibrary%2Fbusybox%25x"
    run("sh", "-c", f"printf abc > {mnt.ingest(name)}")
    out = run("ls", "-l", os.path.join(mnt.path, "ingest")).stdout.decode()
    assert name in out and " 3 " in out
    active = run(CONTENTFS, "--root", mnt.root, "active", "--json").stdout
    assert b'"ref": "docker.io/library/busybox%x"' in active
    proc = subprocess.run(["sh", "-c", f"printf x > {mnt.ingest('bad%zz')}"],
                          capture_output=True, check=False)
    assert proc.returncode != 0


def test_mv_blob_out_deletes_it_and_df_is_the_backing_fs(mnt: Mount,
                                                          tmp_path: os.PathLike[str]) -> None:
    run("sh", "-c", f"printf outbound > {mnt.ingest('o')}")
    _commit(mnt, "o")
    blob = mnt.blob(sha256(b"outbound"))
    run("setfattr", "-n", "user.note", "-v", "travels", blob)
    out = os.path.join(os.fspath(tmp_path), "outbound")
    run("mv", blob, out)  # EXDEV: mv copies (with user.* labels) and removes the blob
    assert _read(out) == b"outbound"
    assert run("getfattr", "--only-values", "-n", "user.note", out).stdout == b"travels"
    assert not os.path.exists(blob)
    ours, backing = os.statvfs(mnt.path), os.statvfs(mnt.root)
    assert ours.f_bsize == ours.f_frsize == backing.f_frsize
    assert ours.f_blocks == backing.f_blocks
    assert f" {mnt.path}" in run("df", mnt.path).stdout.decode()
