"""containerd 1.6's own content test suite (``content/testsuite``, ContentSuite: 12 cases)
against ``contentfs serve``, through containerd's ``content/proxy`` client, as containerd
drives a content proxy plugin (no namespace header; close-then-reopen without waiting).

The Go harness is ``tests/gosuite/suite_test.go``, built once per session with Debian's
Go in GOPATH mode from Debian's containerd source (``/usr/share/gocode``), offline. The
build output goes to a temporary directory of the session; Go's build cache is the
user's (``go env GOCACHE``), so only a first build on a machine is slow (measured: about
35-75 s cold on 2 shared cores, a few seconds warm; the 12 cases run in about 30 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
GO = shutil.which("go") or "/usr/bin/go"
GOPATH = "/usr/share/gocode"
SUITE_SRC = os.path.join(GOPATH, "src/github.com/containerd/containerd/content/testsuite")
CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
CASES = [
    "Writer", "UpdateStatus", "CommitExists", "Resume", "ResumeTruncate", "ResumeDiscard",
    "ResumeCopy", "ResumeCopySeeker", "ResumeCopyReaderAt", "SmallBlob", "Labels",
    "CommitErrorState",
]
_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): TestContentSuite/(\w+) \(([\d.]+)s\)", re.M)


def _go_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(GOPATH=GOPATH, GO111MODULE="off", GOFLAGS="", GOPROXY="off", CGO_ENABLED="0")
    if "HOME" not in env and "XDG_CACHE_HOME" not in env:
        env["GOCACHE"] = "/tmp/contentfs-go-cache"
    return env


@pytest.fixture(scope="session")
def go_suite_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build the harness and run it once; the per-case results and the full output."""
    if not os.access(GO, os.X_OK):
        pytest.fail(f"go not found at {GO}: install the Debian package golang-go")
    if not os.path.isdir(SUITE_SRC):
        pytest.fail(f"{SUITE_SRC} missing: install golang-github-containerd-containerd-dev")
    out = os.path.join(tmp_path_factory.mktemp("gosuite"), "gosuite.test")
    started = time.monotonic()
    build = subprocess.run(
        [GO, "test", "-c", "-o", out, "."], cwd=os.path.join(HERE, "gosuite"),
        env=_go_env(), capture_output=True, text=True, timeout=900, check=False,
    )
    build_seconds = time.monotonic() - started
    if build.returncode != 0:
        pytest.fail(f"building the Go suite failed:\n{build.stdout}{build.stderr}")
    started = time.monotonic()
    run = subprocess.run(
        [out, "-test.v", "-test.timeout", "15m"],
        env={**os.environ, "CONTENTFS_BIN": CONTENTFS}, capture_output=True, text=True,
        timeout=1000, check=False,
    )
    results = {m.group(2): m.group(1) for m in _RESULT.finditer(run.stdout)}
    print(f"go suite: build {build_seconds:.1f} s, run {time.monotonic() - started:.1f} s")
    return {"results": results, "output": run.stdout + run.stderr, "code": run.returncode}


@pytest.mark.timeout(900)
def test_all_cases_ran(go_suite_run: dict[str, Any]) -> None:
    """Exactly the suite's 12 cases ran (none skipped or missing), and the run passed."""
    assert sorted(go_suite_run["results"]) == sorted(CASES), go_suite_run["output"][-5000:]
    assert go_suite_run["code"] == 0, go_suite_run["output"][-5000:]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", CASES)
def test_content_suite_case(go_suite_run: dict[str, Any], case: str) -> None:
    result = go_suite_run["results"].get(case)
    if result != "PASS":
        out = go_suite_run["output"]
        mine = [line for line in out.splitlines() if f"/{case}" in line or "Error" in line]
        pytest.fail(f"{case}: {result}\n" + "\n".join(mine[-40:]) + "\n" + out[-3000:])
