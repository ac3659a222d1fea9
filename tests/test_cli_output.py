"""What the CLI prints (issue 9's rough edges): bad filters fail before any listing,
``ls --json -q`` is a usage error, tables escape and shorten long fields (JSON keeps them
whole), and progress bars appear on a terminal only (checked through a real pty with
``script``)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from store import LocalStore

from .rel_util import CONTENTFS, assert_clean_error, run_cli

LONG_REF = "r" * 4000 + "-tail"
NL_REF = "line1\nline2\x1b[31m"


def _in_pty(command: str) -> bytes:
    """What a terminal shows when ``command`` (a shell line) runs on it."""
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


@pytest.mark.parametrize("args", [("ls", "digest~=("), ("ls", "-q", "labels.a~=x(", "digest"),
                                  ("active", "ref~=("), ("ls", "labels.a>b")])
def test_bad_filter_fails_once_before_listing(store: LocalStore, args: tuple[str, ...]) -> None:
    for i in range(3):
        with store.writer(f"ref-{i}") as w:
            w.write(b"x" * i)
            if i:
                w.commit(0, None)
    proc = run_cli(store.root, *args)
    err = assert_clean_error(proc, 3)
    assert proc.stdout == b""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("contentfs: filters: parse error: [") and " >|" in err, err


def test_json_and_quiet_are_refused_together(store: LocalStore) -> None:
    proc = run_cli(store.root, "ls", "--json", "-q")
    assert proc.returncode == 2, proc.stderr
    assert b"cannot be used together" in proc.stderr and b"Traceback" not in proc.stderr


def test_tables_escape_and_shorten(store: LocalStore) -> None:
    for ref in (LONG_REF, NL_REF, "short"):
        with store.writer(ref) as w:
            w.write(b"abc")
    with store.writer("blob") as w:
        w.write(b"blob")
        digest = w.commit(0, None, labels={"note": "a\nb", "long": "v" * 3000})
    table = run_cli(store.root, "active")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert len(lines) == 4, lines  # header and one line per ingest
    assert all(len(line) < 120 for line in lines), [len(line) for line in lines]
    text = "\n".join(lines)
    assert "r\u2026r" in text and "r-tail  3" in text
    assert "line1\\nline2\\x1b[31m" in text and "\x1b" not in text
    listed = json.loads(run_cli(store.root, "active", "--json").stdout)
    assert sorted(s["ref"] for s in listed) == sorted([LONG_REF, NL_REF, "short"])

    blobs = run_cli(store.root, "ls")
    assert blobs.returncode == 0, blobs.stderr
    lines = blobs.stdout.decode().splitlines()
    assert len(lines) == 2 and len(lines[1]) < 250, lines
    assert digest in lines[1] and "\u2026" in lines[1] and "note=a\\nb" in lines[1]
    full = json.loads(run_cli(store.root, "ls", "--json").stdout)
    assert full[0]["labels"] == {"note": "a\nb", "long": "v" * 3000}


def test_progress_on_a_terminal_only(store: LocalStore, tmp_path: os.PathLike[str]) -> None:
    base = os.fspath(tmp_path)
    src = os.path.join(base, "src")
    data = os.urandom(3 << 20)
    with open(src, "wb") as f:
        f.write(data)
    cf = f"{shlex.quote(CONTENTFS)} --root {shlex.quote(store.root)}"
    out = os.path.join(base, "out")

    shown = _in_pty(f"{cf} ingest one {src}")
    assert b"\ringesting [" in shown and b"100%" in shown, shown
    digest = shown.strip().splitlines()[-1].decode().strip()
    assert digest.startswith("sha256:"), shown
    shown = _in_pty(f"{cf} ingest two < {src}")  # stdin of known size: a bar
    assert b"\ringesting [" in shown and b"100%" in shown, shown
    shown = _in_pty(f"cat {src} | {cf} ingest three")  # a pipe: bytes so far
    assert b"\ringesting  3.0 MiB" in shown, shown
    for command in (f"{cf} get {digest} > {out}", f"{cf} get -o {out} {digest}"):
        os.unlink(out) if os.path.exists(out) else None
        shown = _in_pty(command)
        assert b"\rreading [" in shown and b"100%" in shown, shown
        with open(out, "rb") as f:
            assert f.read() == data
    shown = _in_pty(f"{cf} verify")
    assert b"\rverifying [" in shown and b"100%" in shown, shown
    assert shown.count(b": OK") == 1, shown

    # not a terminal: no progress at all
    for args in (("ingest", "four", src), ("get", "-o", out, digest), ("verify",)):
        proc = run_cli(store.root, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == b"", proc.stderr
    proc = run_cli(store.root, "get", digest)
    assert proc.stdout == data and proc.stderr == b""


def test_age_reads_as_ctr() -> None:
    """The AGE column: singular for one unit ("1 seconds" before), ctr's words under 1 s."""
    import datetime as dt

    from fusefs.cli import age

    now = dt.datetime.now(dt.UTC)
    ago = [age(now + dt.timedelta(seconds=5))] + [
        age(now - dt.timedelta(seconds=s)) for s in (0.2, 1, 2, 60, 150, 3600, 86400, 3 * 86400)]
    assert ago == ["Less than a second", "Less than a second", "1 second", "2 seconds",
                   "1 minute", "2 minutes", "1 hour", "1 day", "3 days"]
