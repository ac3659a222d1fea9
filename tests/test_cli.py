"""The ``contentfs`` command line, run through the installed entry point in a subprocess
(and click's CliRunner for the error-code table): every store command, --root in both
places and $CONTENTFS_ROOT, JSON field names, one-line errors with stable exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from click.testing import CliRunner

from fusefs.cli import cli, default_root
from fusefs.exits import EXIT_CODES
from store import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    LocalStore,
    NotFound,
    Unavailable,
    digest_of,
)

CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
STORE_COMMANDS = ["ls", "info", "get", "ingest", "active", "abort", "rm", "label", "verify"]


class Run:
    """The result of one ``contentfs`` run."""

    def __init__(self, proc: subprocess.CompletedProcess[bytes]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr.decode()

    @property
    def text(self) -> str:
        return self.out.decode()

    def error_line(self) -> str:
        """The single stderr line of a store error (no traceback)."""
        assert "Traceback" not in self.err, self.err
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("contentfs: "), self.err
        return lines[0]


def run(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> Run:
    assert os.path.exists(CONTENTFS), f"entry point {CONTENTFS} missing: pip install -e ."
    full_env = {k: v for k, v in os.environ.items() if k != "CONTENTFS_ROOT"}
    full_env.update(env or {})
    proc = subprocess.run([CONTENTFS, *args], input=stdin, capture_output=True,
                          env=full_env, timeout=120)
    return Run(proc)


@pytest.fixture
def cf(store_root: str) -> Callable[..., Run]:
    """``contentfs --root ROOT ...`` for this test's store."""

    def call(*args: str, stdin: bytes | None = None) -> Run:
        return run("--root", store_root, *args, stdin=stdin)

    return call


def ok(r: Run) -> Run:
    assert r.code == 0, (r.code, r.err)
    return r


# help and version ----------------------------------------------------------------------


def test_help_texts() -> None:
    top = ok(run("--help")).text
    for name in [*STORE_COMMANDS, "mount", "umount", "serve"]:
        assert name in top
    for name in STORE_COMMANDS:
        text = ok(run(name, "--help")).text
        assert text.startswith(f"Usage: contentfs {name}"), text
        assert "--root" in text
        body = text.split("\n\n")[1].strip()
        assert len(body) > 20, f"{name}: no description"
    assert ok(run("--version")).text.startswith("contentfs")


# ingest --------------------------------------------------------------------------------


def test_ingest_file_stdin_and_dash(cf: Callable[..., Run], tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "file")
    data = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.write(data)
    dgst = digest_of(data)
    assert ok(cf("ingest", "from-file", path)).text == dgst + "\n"
    assert ok(cf("get", dgst)).out == data
    small = b"from stdin\n"
    assert ok(cf("ingest", "from-stdin", stdin=small)).text == digest_of(small) + "\n"
    dash = b"from dash"
    assert ok(cf("ingest", "from-dash", "-", stdin=dash)).text == digest_of(dash) + "\n"
    empty = ok(cf("ingest", "empty", stdin=b"")).text.strip()
    assert empty == digest_of(b"")
    assert ok(cf("active")).text.splitlines()[1:] == []


def test_ingest_expectations_and_exit_codes(cf: Callable[..., Run], store_root: str) -> None:
    data = b"expected content"
    dgst = digest_of(data)
    r = cf("ingest", "r", "--expected-digest", digest_of(b"other"), stdin=data)
    assert r.code == EXIT_CODES[FailedPrecondition]
    assert "unexpected commit digest" in r.error_line()
    with LocalStore(store_root) as s:
        assert s.status("r").offset == len(data)  # kept, resumable
    r = cf("ingest", "r", "--expected-size", "99", stdin=data)
    assert r.code == EXIT_CODES[FailedPrecondition], r.err
    assert "size" in r.error_line()
    r = cf("ingest", "r", "--expected-digest", "sha256:nothex", stdin=data)
    assert r.code == EXIT_CODES[InvalidArgument]
    r.error_line()
    # the kept ingest resumes: the bytes already stored are skipped in the input
    out = ok(cf("ingest", "r", "--expected-digest", dgst, "--expected-size", str(len(data)),
                stdin=data))
    assert out.text == dgst + "\n"
    assert ok(cf("active", "--json")).text.strip() == "[]"


def test_ingest_existing_content_is_success(cf: Callable[..., Run]) -> None:
    data = b"same bytes"
    dgst = digest_of(data)
    ok(cf("ingest", "first", "--label", "a=1", stdin=data))
    # the bytes turn out to exist at commit
    assert ok(cf("ingest", "second", "--label", "b=2", stdin=data)).text == dgst + "\n"
    # the expected digest exists before anything is written
    assert ok(cf("ingest", "third", "--expected-digest", dgst, "--label", "c=3",
                 stdin=data)).text == dgst + "\n"
    assert ok(cf("active", "--json")).text.strip() == "[]"
    labels = json.loads(ok(cf("info", dgst, "--json")).text)["labels"]
    assert labels == {"a": "1", "b": "2", "c": "3"}


def test_ingest_labels(cf: Callable[..., Run]) -> None:
    data = b"labelled"
    dgst = ok(cf("ingest", "r", "--label", "containerd.io/gc.root=now", "--label", "k=a=b",
                 stdin=data)).text.strip()
    assert json.loads(ok(cf("info", "--json", dgst)).text)["labels"] == {
        "containerd.io/gc.root": "now", "k": "a=b"}
    r = cf("ingest", "r2", "--label", "novalue", stdin=data)
    assert r.code == EXIT_CODES[InvalidArgument]
    r.error_line()
    r = cf("ingest", "r3", "--label", "k=" + "v" * 5000, stdin=b"other")
    assert r.code == EXIT_CODES[InvalidArgument]
    assert "greater than maximum size" in r.error_line()


def _wait_for_offset(root: str, ref: str, offset: int) -> None:
    with LocalStore(root) as s:
        for _ in range(600):
            try:
                if s.status(ref).offset >= offset:
                    return
            except NotFound:
                pass
            time.sleep(0.05)
    raise AssertionError(f"ingest {ref} never reached {offset} bytes")


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_ingest_resumes_after_interruption(
    cf: Callable[..., Run], store_root: str, tmp_path: os.PathLike[str], source: str
) -> None:
    data = os.urandom(5 << 20)
    dgst = digest_of(data)
    first = 2 << 20
    env = {k: v for k, v in os.environ.items() if k != "CONTENTFS_ROOT"}
    proc = subprocess.Popen([CONTENTFS, "--root", store_root, "ingest", "big"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdin is not None
        proc.stdin.write(data[:first])
        proc.stdin.flush()
        _wait_for_offset(store_root, "big", first)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    active = json.loads(ok(cf("active", "--json")).text)
    assert [(a["ref"], a["offset"]) for a in active] == [("big", first)]
    if source == "file":
        path = os.path.join(os.fspath(tmp_path), "big")
        with open(path, "wb") as f:
            f.write(data)
        out = cf("ingest", "big", path, "--expected-digest", dgst)
    else:
        out = cf("ingest", "big", "--expected-digest", dgst, stdin=data)
    assert ok(out).text == dgst + "\n"
    assert ok(cf("get", dgst)).out == data


def test_ingest_resume_checks_the_stored_prefix(cf: Callable[..., Run], store_root: str,
                                               tmp_path: os.PathLike[str]) -> None:
    """Resuming with other input never commits a mix of the two: a file restarts the
    ingest, a stream that differs is refused with the ingest left as it was."""
    with LocalStore(store_root) as s:
        w = s.writer("r")
        w.write(b"A" * 1000)
        w.close()
    other = os.urandom(5000)
    r = cf("ingest", "r", stdin=other)
    assert r.code == EXIT_CODES[FailedPrecondition]
    assert "differs from the 1000 bytes already" in r.error_line()
    with LocalStore(store_root) as s:
        assert s.status("r").offset == 1000
    path = os.path.join(os.fspath(tmp_path), "other")
    with open(path, "wb") as f:
        f.write(other)
    assert ok(cf("ingest", "r", path)).text == digest_of(other) + "\n"
    # a file shorter than what is stored restarts too
    with LocalStore(store_root) as s:
        w = s.writer("r2")
        w.write(b"B" * 1000)
        w.close()
    with open(path, "wb") as f:
        f.write(b"B" * 10)
    assert ok(cf("ingest", "r2", path)).text == digest_of(b"B" * 10) + "\n"
    # the same bytes resume (and are not rewritten)
    with LocalStore(store_root) as s:
        w = s.writer("r3")
        w.write(other[:3000])
        w.close()
    assert ok(cf("ingest", "r3", stdin=other)).text == digest_of(other) + "\n"


def test_ingest_short_input_on_resume(cf: Callable[..., Run], store_root: str) -> None:
    with LocalStore(store_root) as s:
        w = s.writer("r")
        w.write(b"0123456789")
        w.close()
    r = cf("ingest", "r", stdin=b"0123")
    assert r.code == EXIT_CODES[FailedPrecondition]
    assert "shorter" in r.error_line()


def test_ingest_on_locked_ref(cf: Callable[..., Run], store_root: str) -> None:
    with LocalStore(store_root) as s:
        w = s.writer("busy")
        r = cf("ingest", "busy", stdin=b"x")
        w.close()
    assert r.code == EXIT_CODES[Unavailable]
    assert r.error_line().startswith("contentfs: ref busy locked for ")


# ls, info, get -----------------------------------------------------------------------


@pytest.fixture
def populated(store_root: str) -> dict[str, str]:
    """Three blobs with labels; returns name -> digest."""
    out: dict[str, str] = {}
    with LocalStore(store_root) as s:
        for name, labels in (("a", {"team": "infra", "containerd.io/gc.root": "x"}),
                             ("b", {"team": "web"}), ("c", {})):
            w = s.writer(name)
            w.write(name.encode() * 1000)
            out[name] = w.commit(labels=labels)
    return out


def test_ls(cf: Callable[..., Run], populated: dict[str, str]) -> None:
    all_digests = sorted(populated.values())
    assert ok(cf("ls", "-q")).text.split() == all_digests
    assert ok(cf("ls", "--quiet")).text.split() == all_digests
    table = ok(cf("ls")).text.splitlines()
    assert table[0].split() == ["DIGEST", "SIZE", "AGE", "LABELS"]
    assert [line.split()[0] for line in table[1:]] == all_digests
    row_a = next(line for line in table if line.startswith(populated["a"]))
    assert "containerd.io/gc.root=x,team=infra" in row_a
    assert ok(cf("ls", "-q", "labels.team==infra")).text.split() == [populated["a"]]
    assert ok(cf("ls", "-q", 'labels."containerd.io/gc.root"')).text.split() == [populated["a"]]
    assert sorted(ok(cf("ls", "-q", "labels.team==infra", "labels.team==web")).text.split()) == \
        sorted([populated["a"], populated["b"]])
    assert ok(cf("ls", "-q", "labels.team!=infra,labels.team!=web")).text.split() == \
        [populated["c"]]
    r = cf("ls", "labels.team=infra")
    assert r.code == EXIT_CODES[InvalidArgument]
    assert ">|=|<" in r.error_line()


def test_json_field_names(cf: Callable[..., Run], populated: dict[str, str],
                          store_root: str) -> None:
    items = json.loads(ok(cf("ls", "--json")).text)
    assert isinstance(items, list) and len(items) == 3
    for item in items:
        assert list(item) == ["digest", "size", "created_at", "updated_at", "labels"]
        assert item["size"] == 1000
        for key in ("created_at", "updated_at"):
            assert item[key].endswith("Z")
            when = dt.datetime.fromisoformat(item[key])
            assert abs(dt.datetime.now(dt.UTC) - when) < dt.timedelta(hours=1)
    info = json.loads(ok(cf("info", populated["a"], "--json")).text)
    assert info == next(i for i in items if i["digest"] == populated["a"])
    assert info["labels"] == {"containerd.io/gc.root": "x", "team": "infra"}
    assert json.loads(ok(cf("ls", "--json", "labels.nope")).text) == []

    with LocalStore(store_root) as s:
        s.writer("layer-1", total=10).close()
        w = s.writer("config-1")
        w.write(b"abc")
        w.close()
        s.set_ingest_hints("config-1", expected=digest_of(b"abcdef"))
    active = json.loads(ok(cf("active", "--json")).text)
    assert [list(a) for a in active] == [
        ["ref", "offset", "total", "expected", "started_at", "updated_at"]] * 2
    assert [(a["ref"], a["offset"], a["total"], a["expected"]) for a in active] == [
        ("config-1", 3, 0, digest_of(b"abcdef")), ("layer-1", 0, 10, "")]
    for a in active:
        dt.datetime.fromisoformat(a["started_at"])
        dt.datetime.fromisoformat(a["updated_at"])
    assert [a["ref"] for a in json.loads(ok(cf("active", "--json", "ref~=^layer-")).text)] == \
        ["layer-1"]
    text = ok(cf("active")).text.splitlines()
    assert text[0].split() == ["REF", "SIZE", "TOTAL", "AGE"]
    assert [line.split()[0] for line in text[1:]] == ["config-1", "layer-1"]


def test_info_text_and_errors(cf: Callable[..., Run], populated: dict[str, str]) -> None:
    text = ok(cf("info", populated["a"])).text
    assert f"digest:     {populated['a']}" in text
    assert "size:       1000" in text
    assert "label:      team=infra" in text
    missing = digest_of(b"missing")
    r = cf("info", missing)
    assert r.code == EXIT_CODES[NotFound]
    assert r.error_line() == f"contentfs: content {missing}: not found"
    r = cf("info", "sha256:abc")
    assert r.code == EXIT_CODES[InvalidArgument]
    r.error_line()


def test_get_large_blob_byte_exact(cf: Callable[..., Run], store_root: str,
                                   tmp_path: os.PathLike[str]) -> None:
    data = os.urandom(24 << 20) + b"tail"
    with LocalStore(store_root) as s:
        w = s.writer("big")
        w.write(data)
        dgst = w.commit()
    assert ok(cf("get", dgst)).out == data
    # to a file, as `contentfs get D > file` does
    out = os.path.join(os.fspath(tmp_path), "out")
    with open(out, "wb") as f:
        proc = subprocess.run([CONTENTFS, "--root", store_root, "get", dgst], stdout=f,
                              stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(out, "rb") as f:
        assert f.read() == data
    # a reader that goes away early is not an error report
    proc = subprocess.run(f"'{CONTENTFS}' --root '{store_root}' get {dgst} | head -c 10",
                          shell=True, capture_output=True, timeout=120)
    assert proc.stdout == data[:10]
    assert b"Traceback" not in proc.stderr
    r = cf("get", digest_of(b"missing"))
    assert r.code == EXIT_CODES[NotFound]
    r.error_line()


# abort, rm, label, verify --------------------------------------------------------------


def test_abort(cf: Callable[..., Run], store_root: str) -> None:
    with LocalStore(store_root) as s:
        for ref in ("r1", "r2"):
            w = s.writer(ref)
            w.write(b"partial")
            w.close()
    ok(cf("abort", "r1"))
    assert [a["ref"] for a in json.loads(ok(cf("active", "--json")).text)] == ["r2"]
    r = cf("abort", "r1")
    assert r.code == EXIT_CODES[NotFound]
    assert r.error_line() == "contentfs: ingest r1: not found"
    ok(cf("abort", "r2"))
    assert json.loads(ok(cf("active", "--json")).text) == []


def test_rm(cf: Callable[..., Run], populated: dict[str, str]) -> None:
    assert ok(cf("rm", populated["a"], populated["b"])).text.split() == \
        [populated["a"], populated["b"]]
    assert ok(cf("ls", "-q")).text.split() == [populated["c"]]
    missing = digest_of(b"missing")
    r = cf("rm", missing, populated["c"])
    assert r.code == EXIT_CODES[NotFound]
    assert r.error_line() == f"contentfs: content {missing}: not found"
    assert r.text.split() == [populated["c"]]  # the others are still deleted
    assert ok(cf("ls", "-q")).text == ""


def test_label(cf: Callable[..., Run], populated: dict[str, str]) -> None:
    a = populated["a"]
    assert ok(cf("label", a)).text.strip() == "containerd.io/gc.root=x,team=infra"
    assert ok(cf("label", a, "team=ops", "new=1")).text.strip() == \
        "containerd.io/gc.root=x,new=1,team=ops"
    assert ok(cf("label", a, "containerd.io/gc.root=", "new=")).text.strip() == "team=ops"
    assert json.loads(ok(cf("info", a, "--json")).text)["labels"] == {"team": "ops"}
    r = cf("label", a, "=v")
    assert r.code == EXIT_CODES[InvalidArgument]
    r.error_line()
    r = cf("label", digest_of(b"missing"), "k=v")
    assert r.code == EXIT_CODES[NotFound]
    r.error_line()


def test_verify(cf: Callable[..., Run], populated: dict[str, str], store_root: str) -> None:
    out = ok(cf("verify")).text.splitlines()
    assert sorted(out) == sorted(f"{d}: OK" for d in populated.values())
    bad = populated["b"]
    path = os.path.join(store_root, "blobs", "sha256", bad.split(":")[1])
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"X")
    r = cf("verify")
    assert r.code == EXIT_CODES[DataLoss]
    lines = r.text.splitlines()
    assert f"{populated['a']}: OK" in lines
    assert any(line.startswith(f"{bad}: FAILED") for line in lines), lines
    assert r.error_line() == "contentfs: 1 of 3 blobs failed verification"
    ok(cf("verify", populated["a"], populated["c"]))
    r = cf("verify", bad)
    assert r.code == EXIT_CODES[DataLoss]
    missing = digest_of(b"missing")
    r = cf("verify", missing)
    assert r.code == EXIT_CODES[NotFound]
    assert f"{missing}: FAILED" in r.text


def test_verify_many_in_order(cf: Callable[..., Run], store_root: str) -> None:
    """Blobs are hashed on several threads, but the report follows the order asked for
    (a large blob first, small ones after it, finish in another order), every blob is
    reported once, and corruption at the start, middle or end of a multi-chunk blob is
    found."""
    store = LocalStore(store_root)
    sizes = [9 << 20, 1, 0, 5 << 20, 3, 4 << 20, 100, 8 << 20 | 1, 2, 7]
    digests = []
    try:
        for i, size in enumerate(sizes):
            data = (b"%08d" % i * (size // 8 + 1))[:size]
            w = store.writer(f"many-{i}")
            w.write(data)
            digests.append(str(w.commit()))
    finally:
        store.close()
    corrupt = {digests[0]: 0, digests[3]: (5 << 20) - 1, digests[7]: 4 << 20}
    for d, offset in corrupt.items():
        path = os.path.join(store_root, "blobs", "sha256", d.split(":")[1])
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\xff")
    asked = digests + [digests[2]]  # one twice
    r = cf("verify", *asked)
    assert r.code == EXIT_CODES[DataLoss]
    lines = r.text.splitlines()
    assert [ln.split(": ")[0] for ln in lines] == asked
    for d, ln in zip(asked, lines, strict=True):
        assert ln.startswith(f"{d}: FAILED (") if d in corrupt else ln == f"{d}: OK", ln
    assert r.error_line() == f"contentfs: 3 of {len(asked)} blobs failed verification"
    # the full run reports them in name order
    r = cf("verify")
    assert [ln.split(": ")[0] for ln in r.text.splitlines()] == sorted(digests)


# choosing the store --------------------------------------------------------------------


def test_root_before_after_and_env(store_root: str, tmp_path: os.PathLike[str]) -> None:
    data = b"where am I"
    dgst = digest_of(data)
    ok(run("--root", store_root, "ingest", "r", stdin=data))
    assert ok(run("ls", "-q", "--root", store_root)).text.split() == [dgst]
    assert ok(run("ls", "-q", env={"CONTENTFS_ROOT": store_root})).text.split() == [dgst]
    other = os.path.join(os.fspath(tmp_path), "other")
    os.mkdir(other)
    # an explicit --root wins over the environment, in either place
    assert ok(run("--root", other, "ls", "-q", env={"CONTENTFS_ROOT": store_root})).text == ""
    assert ok(run("ls", "-q", "--root", other, env={"CONTENTFS_ROOT": store_root})).text == ""
    # the one after the command wins over the one before
    assert ok(run("--root", other, "ls", "-q", "--root", store_root)).text.split() == [dgst]
    missing = os.path.join(os.fspath(tmp_path), "missing")
    r = run("--root", missing, "ls")
    assert r.code == EXIT_CODES[NotFound]
    assert r.error_line() == f"contentfs: no store at {missing}"
    assert not os.path.exists(missing)
    r = run("ls", env={"CONTENTFS_ROOT": missing})
    assert r.code == EXIT_CODES[NotFound]


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("CONTENTFS_ROOT", "/some/where")
    assert default_root() == "/some/where"
    monkeypatch.delenv("CONTENTFS_ROOT")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", os.fspath(tmp_path))
    assert default_root() == os.path.join(os.fspath(tmp_path), "contentfs")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_root() == "/home/u/.local/share/contentfs"


# the exit-code table, through click's runner -------------------------------------------


def test_exit_codes_are_stable() -> None:
    assert {cls.__name__: code for cls, code in EXIT_CODES.items()} == {
        "InvalidArgument": 3, "NotFound": 4, "AlreadyExists": 5, "FailedPrecondition": 6,
        "Unavailable": 7, "DataLoss": 8, "NotImplemented": 9,
    }
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert AlreadyExists in EXIT_CODES


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["info", "sha256:" + "0" * 64], 4, "content sha256:" + "0" * 64 + ": not found"),
        (["info", "md5:00"], 3, "unsupported digest algorithm"),
        (["ls", "labels.a=="], 3, "filters: parse error"),
        (["active", "ref="], 3, "unsupported operator"),
        (["abort", "nope"], 4, "ingest nope: not found"),
        (["rm", "sha256:" + "1" * 64], 4, "not found"),
        (["label", "sha256:" + "2" * 64, "a=b"], 4, "not found"),
        (["label", "sha256:" + "2" * 64, "ab"], 3, "expected KEY=VALUE"),
        (["verify", "sha256:x"], 3, "invalid"),
        (["get", "sha512:" + "3" * 128], 4, "not found"),
    ],
)
def test_errors_through_cli_runner(store_root: str, args: list[str], code: int,
                                   message: str) -> None:
    result = CliRunner().invoke(cli, ["--root", store_root, *args])
    assert result.exit_code == code, (result.output, result.exception)
    assert message in result.output
    assert "Traceback" not in result.output


def test_progress_bar_only_on_a_terminal(cf: Callable[..., Run], store_root: str,
                                         tmp_path: os.PathLike[str]) -> None:
    data = os.urandom(3 << 20)
    path = os.path.join(os.fspath(tmp_path), "f")
    with open(path, "wb") as f:
        f.write(data)
    r = ok(cf("ingest", "quiet", path))
    assert r.err == ""  # not a terminal: no progress output
    cf("rm", digest_of(data))
    script = "/usr/bin/script"
    assert os.path.exists(script), "script(1) is needed (apt-get install bsdutils)"
    cmd = f"'{CONTENTFS}' --root '{store_root}' ingest tty '{path}'"
    proc = subprocess.run([script, "-qec", cmd, "/dev/null"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    out = proc.stdout.decode(errors="replace")
    assert "ingesting" in out and "100%" in out, out
    assert out.rstrip().endswith(digest_of(data)), out[-200:]
    # from a pipe the size is unknown: bytes so far, not a percentage
    cf("rm", digest_of(data))
    cmd = f"cat '{path}' | '{CONTENTFS}' --root '{store_root}' ingest tty-pipe"
    proc = subprocess.run([script, "-qec", cmd, "/dev/null"], capture_output=True, timeout=120)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "ingesting" in out, out
    assert out.rstrip().endswith(digest_of(data)), out[-200:]


def test_read_commands_on_read_only_media(tmp_path: os.PathLike[str]) -> None:
    """ls, info, get, active and verify work on a store on a read-only filesystem (an OCI
    layout made by umoci here); a command that writes fails with one line."""
    base = os.fspath(tmp_path)
    layout = os.path.join(base, "image")
    subprocess.run(["umoci", "init", "--layout", layout], check=True, capture_output=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:latest"], check=True,
                   capture_output=True)
    blobs = sorted("sha256:" + n for n in os.listdir(os.path.join(layout, "blobs", "sha256")))
    ro = os.path.join(base, "ro")
    os.mkdir(ro)
    subprocess.run(["mount", "--bind", "-o", "ro", layout, ro], check=True, capture_output=True)
    try:
        assert ok(run("--root", ro, "ls", "-q")).text.split() == blobs
        assert json.loads(ok(run("--root", ro, "info", "--json", blobs[0])).text)["digest"] \
            == blobs[0]
        with open(os.path.join(layout, "blobs", "sha256", blobs[0].split(":")[1]), "rb") as f:
            assert ok(run("--root", ro, "get", blobs[0])).out == f.read()
        assert json.loads(ok(run("--root", ro, "active", "--json")).text) == []
        assert len(ok(run("--root", ro, "verify")).text.splitlines()) == len(blobs)
        r = run("--root", ro, "ingest", "r", stdin=b"data")
        assert r.code != 0
        assert "Read-only file system" in r.error_line()
    finally:
        subprocess.run(["umount", ro], check=True, capture_output=True)
    assert not os.path.exists(os.path.join(layout, ".contentfs"))
