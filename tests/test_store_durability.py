"""Durability, watched with strace: a commit fsyncs the data before the rename into
``blobs/`` and the blob directory after it, all before the digest is reported; a close
fsyncs the data it wrote."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from store import digest_of

CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
_CALL = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")


def traced(tmp: str, *cmd: str, cwd: str | None = None) -> list[tuple[str, str]]:
    """Run ``cmd`` under strace; return (syscall, arguments with fd paths) in order."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (apt-get install strace)"
    out = os.path.join(tmp, "trace")
    subprocess.run(
        [strace, "-f", "-y", "-qq", "-s", "200", "-o", out,
         "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,write,pwrite64", *cmd],
        check=True, capture_output=True, timeout=120, cwd=cwd,
    )
    calls = []
    with open(out) as f:
        for line in f:
            m = _CALL.match(line)
            if m and int(m.group(3)) >= 0:
                calls.append((m.group(1), m.group(2)))
    return calls


def index(calls: list[tuple[str, str]], name: str, needle: str) -> int:
    for i, (call, args) in enumerate(calls):
        if call == name and needle in args:
            return i
    raise AssertionError(f"no {name}(...{needle}...) in {calls}")


def test_commit_fsyncs_data_then_renames_then_fsyncs_the_directory(
    store_root: str, tmp_path: os.PathLike[str]
) -> None:
    tmp = os.fspath(tmp_path)
    src = os.path.join(tmp, "src")
    data = os.urandom(100_000)
    with open(src, "wb") as f:
        f.write(data)
    dgst = digest_of(data)
    calls = traced(tmp, CONTENTFS, "--root", store_root, "ingest", "r", src)
    hexpart = dgst.split(":")[1]
    blob_dir = os.path.join(store_root, "blobs", "sha256")
    last_data_write = max(i for i, (c, a) in enumerate(calls)
                          if c in ("write", "pwrite64") and a.split(">")[0].endswith("/data"))
    fsync_data = index(calls, "fsync", "/data>")
    rename = index(calls, "rename", f"blobs/sha256/{hexpart}")
    fsync_dir = index(calls, "fsync", f"<{blob_dir}>")
    printed = index(calls, "write", dgst[:20])
    assert last_data_write < fsync_data < rename < fsync_dir < printed, calls


def test_close_fsyncs_written_data(store_root: str, tmp_path: os.PathLike[str]) -> None:
    code = (
        "import sys\nfrom store import LocalStore\n"
        "with LocalStore(sys.argv[1]) as s:\n"
        "    w = s.writer('r')\n    w.write(b'x' * 5000)\n    w.close()\n"
        "    print('closed', flush=True)\n"
    )
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    calls = traced(os.fspath(tmp_path), sys.executable, "-c", code, store_root, cwd=cwd)
    wrote = index(calls, "pwrite64", "/data>")
    fsync_data = index(calls, "fsync", "/data>")
    printed = index(calls, "write", "closed")
    assert wrote < fsync_data < printed, calls
