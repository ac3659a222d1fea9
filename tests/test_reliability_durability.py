"""Durability, observed with strace: commit fsyncs the data before the rename that
publishes the blob and fsyncs the blob directory after it, all before the command
returns; closing a writer fsyncs the bytes written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from .rel_util import CONTENTFS, PYTHON, payload, sha256


def _strace(log: str, *cmd: str) -> list[str]:
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: install the Debian package strace (scripts/setup)")
    proc = subprocess.run(
        [strace, "-f", "-y", "-o", log, "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
         *cmd], capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    with open(log) as f:
        # "<pid> call(args) = result"; unfinished/resumed pairs only occur across threads
        return [line.split(" ", 1)[1].strip() for line in f if " = " in line]


def _index(calls: list[str], pattern: str) -> int:
    for i, call in enumerate(calls):
        if re.search(pattern, call):
            return i
    raise AssertionError(f"no call matching {pattern!r} in:\n" + "\n".join(calls))


def test_commit_fsyncs_data_then_renames_then_fsyncs_dir(store_root: str, tmp_path: str) -> None:
    data = payload(1, 300_000)
    src = os.path.join(tmp_path, "in")
    with open(src, "wb") as f:
        f.write(data)
    hexd = sha256(data).split(":")[1]
    calls = _strace(os.path.join(tmp_path, "log"), CONTENTFS, "--root", store_root,
                    "ingest", "ref", src)
    data_sync = _index(calls, r"^f(data)?sync\(\d+<[^>]*/ingest/[0-9a-f]{64}/data>\)")
    publish = _index(calls, rf"^rename(at2?)?\(.*/ingest/[0-9a-f]{{64}}/data\".*"
                            rf"/blobs/sha256/{hexd}\"")
    dir_sync = _index(calls, rf"^f(data)?sync\(\d+<{re.escape(store_root)}/blobs/sha256>\)")
    assert data_sync < publish < dir_sync, calls


def test_close_fsyncs_written_bytes(store_root: str, tmp_path: str) -> None:
    """A writer closed without commit keeps its bytes for resuming, fsynced."""
    calls = _strace(os.path.join(tmp_path, "log"), PYTHON, "-c", _CLOSE_ONLY, store_root)
    _index(calls, r"^f(data)?sync\(\d+<[^>]*/ingest/[0-9a-f]{64}/data>\)")


_CLOSE_ONLY = """
import sys
from store import LocalStore
with LocalStore(sys.argv[1]) as s:
    w = s.writer("closing")
    w.write(b"x" * (1 << 20) + b"12345")
    w.close()
    assert s.status("closing").offset == (1 << 20) + 5
"""
