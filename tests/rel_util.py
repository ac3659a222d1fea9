"""Helpers for the reliability, model, bad-input and security tests.

Also a driver script (``python tests/rel_util.py MODE ...``) that a test starts as a
subprocess and SIGKILLs while it is paused at a chosen point:

    writer ROOT REF SEED SIZE PAUSE   ingest SIZE bytes of payload(SEED) with a Python
                                      store writer, pausing at PAUSE
    cli PAUSE ARGS...                 run ``contentfs ARGS...`` with the pause hooks set

PAUSE is ``none``, ``open`` (writer open, nothing written), ``offset:N`` (N bytes
written, writer still open), ``closed`` (all written, writer closed), or a commit stage:
``commit-start``, ``before-rename``, ``after-rename``, ``before-db``, ``before-cleanup``,
``mid-cleanup``. Pausing writes the stage name to the file named by ``$REL_PAUSE_FILE``
and sleeps until killed.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
_PROJECT = os.path.dirname(_HERE)
if _PROJECT not in sys.path:  # when run as a script
    sys.path.insert(0, _PROJECT)

from store import LocalStore  # noqa: E402
from store.digest import ALGORITHMS  # noqa: E402

PYTHON = sys.executable
CONTENTFS = os.path.join(os.path.dirname(sys.executable), "contentfs")
DRIVER = os.path.abspath(__file__)
COMMIT_STAGES = (
    "commit-start",
    "before-rename",
    "after-rename",
    "before-db",
    "before-cleanup",
    "mid-cleanup",
)


# payloads --------------------------------------------------------------------------


def payload(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes (the same for the same seed and size)."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# running the CLI -------------------------------------------------------------------


def run_cli(
    root: str, *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run ``contentfs --root ROOT ARGS...`` to completion."""
    return subprocess.run(
        [CONTENTFS, "--root", root, *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def assert_clean_error(proc: subprocess.CompletedProcess[bytes], code: int) -> str:
    """The command failed with exit ``code`` and one ``contentfs: ...`` line, no traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("contentfs: "), err
    return err


def assert_no_traceback(proc: subprocess.CompletedProcess[bytes]) -> None:
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err


# processes -------------------------------------------------------------------------


def start_driver(
    args: list[str], pause_file: str, *, stdin: int | None = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """Start ``rel_util.py ARGS...`` with ``$REL_PAUSE_FILE`` set."""
    env = dict(os.environ, REL_PAUSE_FILE=pause_file)
    return subprocess.Popen(
        [PYTHON, DRIVER, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes] | None = None,
             timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``cond`` until true; fail if ``proc`` exits first or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"process exited ({proc.returncode}) before {what}: {out!r} {err.decode()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_paused(proc: subprocess.Popen[bytes], pause_file: str, stage: str) -> None:
    def paused() -> bool:
        try:
            with open(pause_file) as f:
                return f.read() == stage
        except FileNotFoundError:
            return False

    wait_for(paused, proc, what=f"pause at {stage}")


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` (if still running) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


# store invariants ------------------------------------------------------------------


def blob_files(root: str) -> Iterator[tuple[str, str]]:
    """(algorithm, path) of every directory entry under ``blobs/<alg>/``."""
    blobs = os.path.join(root, "blobs")
    if not os.path.isdir(blobs):
        return
    for alg in sorted(os.listdir(blobs)):
        d = os.path.join(blobs, alg)
        if alg in ALGORITHMS and os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                yield alg, os.path.join(d, name)


def check_blobs(root: str) -> dict[str, bytes]:
    """Every entry under ``blobs/<alg>/`` is a complete blob named by its digest.

    Returns digest -> bytes. Also checks the store lists exactly those blobs."""
    found: dict[str, bytes] = {}
    for alg, path in blob_files(root):
        name = os.path.basename(path)
        assert len(name) == ALGORITHMS[alg] and not name.strip("0123456789abcdef"), (
            f"stray file under blobs/: {path}"
        )
        assert os.path.isfile(path) and not os.path.islink(path), path
        with open(path, "rb") as f:
            data = f.read()
        assert hashlib.new(alg, data).hexdigest() == name, f"partial or corrupt blob {path}"
        found[f"{alg}:{name}"] = data
    with LocalStore(root) as s:
        listed = {i.digest: i.size for i in s.list()}
        for dgst in found:
            assert s.verify(dgst).digest == dgst
    assert listed == {d: len(b) for d, b in found.items()}
    return found


def check_ingests(root: str, inputs: Mapping[str, bytes]) -> dict[str, int]:
    """Every active ingest of a known ref holds a true prefix of its input, and its
    listed offset is its data size. Returns ref -> offset."""
    out: dict[str, int] = {}
    with LocalStore(root) as s:
        for st in s.list_statuses():
            with open(s.ingest_data_path(st.ref), "rb") as f:
                data = f.read()
            assert st.offset == len(data), (st, len(data))
            if st.ref in inputs:
                want = inputs[st.ref]
                assert st.offset <= len(want), (st.ref, st.offset, len(want))
                assert data == want[: st.offset], f"ingest {st.ref}: not a true prefix"
            out[st.ref] = st.offset
    return out


# the driver ------------------------------------------------------------------------


def _pause(stage: str) -> None:
    path = os.environ["REL_PAUSE_FILE"]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(stage)
    os.replace(tmp, path)
    while True:
        time.sleep(3600)


def _install_commit_hooks(stage: str) -> None:
    """Make a commit pause at ``stage`` (one of COMMIT_STAGES)."""
    import store.writer as writer_mod
    from store.metadata import MetadataDB

    def before(owner: Any, name: str, when: str) -> None:
        orig = getattr(owner, name)

        def hooked(*a: Any, **kw: Any) -> Any:
            if stage == when:
                _pause(stage)
            return orig(*a, **kw)

        setattr(owner, name, hooked)

    before(writer_mod.LocalWriter, "commit", "commit-start")
    before(writer_mod.LocalWriter, "_publish", "before-rename")
    before(writer_mod, "fsync_dir", "after-rename")
    before(MetadataDB, "put_blob", "before-db")
    before(writer_mod.LocalWriter, "_remove_ingest", "before-cleanup")
    if stage == "mid-cleanup":
        orig_remove = writer_mod.LocalWriter._remove_ingest

        def half_removed(self: Any) -> None:
            for name in ("ref", "startedat"):
                try:
                    os.unlink(os.path.join(self._path, name))
                except FileNotFoundError:
                    pass
            _pause(stage)
            orig_remove(self)

        writer_mod.LocalWriter._remove_ingest = half_removed  # type: ignore[method-assign]


def _writer_main(root: str, ref: str, seed: int, size: int, pause: str) -> None:
    data = payload(seed, size)
    if pause in COMMIT_STAGES:
        _install_commit_hooks(pause)
    stop_at = int(pause.split(":", 1)[1]) if pause.startswith("offset:") else None
    with LocalStore(root) as s:
        w = s.writer(ref, total=size)
        if pause == "open":
            _pause(pause)
        off = w.offset
        assert data[:off] == open(s.ingest_data_path(ref), "rb").read()[:off]
        while off < size:
            end = min(size, off + (1 << 20))
            if stop_at is not None and off < stop_at <= end:
                end = stop_at
            w.write(data[off:end])
            off = end
            if stop_at is not None and off == stop_at:
                _pause(pause)
        if pause == "closed":
            w.close()
            _pause(pause)
        print(w.commit(size, sha256(data), labels={"crash": "test"}), flush=True)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "writer":
        root, ref, seed, size, pause = argv[1:6]
        _writer_main(root, ref, int(seed), int(size), pause)
    elif mode == "cli":
        pause = argv[1]
        if pause in COMMIT_STAGES:
            _install_commit_hooks(pause)
        from fusefs.cli import main as cli_main

        cli_main(argv[2:])
    else:
        raise SystemExit(f"rel_util: unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
