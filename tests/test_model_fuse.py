"""A hypothesis state machine drives a live mount with file operations (open, write,
close, ftruncate, setfattr/mv commits, rm, rename, labels as xattrs) against an
in-memory model, and checks the mount and the model agree after every step.

``REL_NO_SHRINK=1`` skips shrinking: against a live mount it can take many minutes."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.fuse_util import Mount, require_fuse

REFS = ["a", "b", "c/d"]
KEYS = ["user.k1", "user.containerd.io/gc.root"]
chunks = st.one_of(st.binary(max_size=32), st.integers(0, 2).map(lambda i: b"z" * (70_000 + i)))


def _name(ref: str) -> str:
    return ref.replace("%", "%25").replace("/", "%2F")


def _hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _errno(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    return 0


class FuseMachine(RuleBasedStateMachine):
    mount: Mount  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        m = self.mount
        self.sha = os.path.join(m.path, "blobs", "sha256")
        for name in os.listdir(m.ingest("")):
            os.unlink(m.ingest(name))
        if os.path.isdir(self.sha):
            for name in os.listdir(self.sha):
                os.unlink(os.path.join(self.sha, name))
        self.blobs: dict[str, bytes] = {}  # hex -> bytes
        self.labels: dict[str, dict[str, bytes]] = {}
        self.ingests: dict[str, bytearray] = {}
        self.fds: dict[str, int] = {}

    def teardown(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def _path(self, ref: str) -> str:
        return self.mount.ingest(_name(ref))

    def _closed_refs(self) -> list[str]:
        return sorted(r for r in self.ingests if r not in self.fds)

    # writing -------------------------------------------------------------------------

    @rule(ref=st.sampled_from(REFS), trunc=st.booleans())
    def open_writer(self, ref: str, trunc: bool) -> None:
        if ref in self.fds:
            return  # a second writer waits about a second for EBUSY: not modelled here
        # always O_APPEND: a plain fd writes at its own position, which ftruncate does
        # not move (a write there after a zero-extend is ESPIPE, tested elsewhere)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if trunc else 0)
        self.fds[ref] = os.open(self._path(ref), flags)
        if trunc:
            self.ingests[ref] = bytearray()
        else:
            self.ingests.setdefault(ref, bytearray())
        assert os.fstat(self.fds[ref]).st_size == len(self.ingests[ref])

    @precondition(lambda self: bool(self.fds))
    @rule(data=st.data(), chunk=chunks)
    def write(self, data: st.DataObject, chunk: bytes) -> None:
        ref = data.draw(st.sampled_from(sorted(self.fds)))
        assert os.write(self.fds[ref], chunk) == len(chunk)
        self.ingests[ref] += chunk

    @precondition(lambda self: bool(self.fds))
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        ref = data.draw(st.sampled_from(sorted(self.fds)))
        os.close(self.fds.pop(ref))

    @precondition(lambda self: bool(self.fds))
    @rule(data=st.data(), size=st.sampled_from([0, 1, "same", "more"]))
    def truncate(self, data: st.DataObject, size: object) -> None:
        ref = data.draw(st.sampled_from(sorted(self.fds)))
        have = len(self.ingests[ref])
        n = have if size == "same" else have + 10 if size == "more" else int(size)  # type: ignore[call-overload]
        got = _errno(os.ftruncate, self.fds[ref], n)
        if n == 0:
            assert got == 0
            self.ingests[ref] = bytearray()
        elif n == have:
            assert got == 0
        elif n > have:
            assert got == 0
            self.ingests[ref] += bytes(n - have)
        else:
            assert got == errno.EINVAL

    # committing ----------------------------------------------------------------------

    @precondition(lambda self: bool(self.ingests))
    @rule(data=st.data(), how=st.sampled_from(["xattr", "xattr-plain", "mv"]),
          right=st.booleans())
    def commit(self, data: st.DataObject, how: str, right: bool) -> None:
        ref = data.draw(st.sampled_from(sorted(self.ingests)))
        content = bytes(self.ingests[ref])
        hexd = _hex(content) if right or how == "xattr-plain" else _hex(content + b"!")
        if how == "mv":
            got = _errno(os.rename, self._path(ref), os.path.join(self.sha, hexd))
        else:
            value = b"" if how == "xattr-plain" else f"sha256:{hexd}".encode()
            got = _errno(os.setxattr, self._path(ref), "user.contentfs.commit", value)
        if ref in self.fds:
            assert got == errno.EBUSY
        elif hexd != _hex(content):
            assert got == errno.EBADMSG
        else:
            assert got == 0
            del self.ingests[ref]
            if hexd not in self.blobs:
                self.blobs[hexd] = content
                self.labels[hexd] = {}

    # removing and renaming -----------------------------------------------------------

    @rule(ref=st.sampled_from(REFS))
    def abort(self, ref: str) -> None:
        if ref in self.fds:
            return
        got = _errno(os.unlink, self._path(ref))
        if ref in self.ingests:
            assert got == 0
            del self.ingests[ref]
        else:
            assert got == errno.ENOENT

    @precondition(lambda self: bool(self._closed_refs()))
    @rule(data=st.data(), new=st.sampled_from(REFS))
    def rename(self, data: st.DataObject, new: str) -> None:
        ref = data.draw(st.sampled_from(self._closed_refs()))
        if new in self.fds:
            return
        os.rename(self._path(ref), self._path(new))
        self.ingests[new] = self.ingests.pop(ref)

    @precondition(lambda self: bool(self.blobs))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        hexd = data.draw(st.sampled_from(sorted(self.blobs)))
        os.unlink(os.path.join(self.sha, hexd))
        del self.blobs[hexd]
        del self.labels[hexd]

    @precondition(lambda self: bool(self.blobs))
    @rule(data=st.data(), key=st.sampled_from(KEYS), value=st.sampled_from([b"v", b"w", None]))
    def label(self, data: st.DataObject, key: str, value: bytes | None) -> None:
        hexd = data.draw(st.sampled_from(sorted(self.blobs)))
        path = os.path.join(self.sha, hexd)
        if value is None:
            got = _errno(os.removexattr, path, key)
            assert got == (0 if key in self.labels[hexd] else errno.ENODATA)
            self.labels[hexd].pop(key, None)
        else:
            os.setxattr(path, key, value)
            self.labels[hexd][key] = value

    # invariants ----------------------------------------------------------------------

    @invariant()
    def blobs_agree(self) -> None:
        names = sorted(os.listdir(self.sha)) if os.path.isdir(self.sha) else []
        assert names == sorted(self.blobs)
        for hexd, content in self.blobs.items():
            path = os.path.join(self.sha, hexd)
            with open(path, "rb") as f:
                assert f.read() == content
            assert os.stat(path).st_size == len(content)
            assert sorted(os.listxattr(path)) == sorted(self.labels[hexd])
            for k, v in self.labels[hexd].items():
                assert os.getxattr(path, k) == v

    @invariant()
    def ingests_agree(self) -> None:
        assert sorted(os.listdir(self.mount.ingest(""))) == sorted(map(_name, self.ingests))
        for ref, content in self.ingests.items():
            assert os.stat(self._path(ref)).st_size == len(content)
            if ref not in self.fds:
                with open(self._path(ref), "rb") as f:
                    assert f.read() == content


@pytest.fixture
def mount(tmp_path: str) -> Iterator[Mount]:
    require_fuse()
    base = os.fspath(tmp_path)
    root, path = os.path.join(base, "root"), os.path.join(base, "mnt")
    os.makedirs(root)
    os.makedirs(path)
    m = Mount(root, path, (), os.path.join(base, "mount.log"))
    try:
        yield m.start()
        m.unmount()  # exits 0 with no error in its log
    finally:
        m.cleanup()


@pytest.mark.timeout(1800)  # the --soak run is long
def test_fuse_model(mount: Mount, soak: bool) -> None:
    FuseMachine.mount = mount
    run_state_machine_as_test(
        FuseMachine,
        settings=settings(
            max_examples=150 if soak else 15,
            stateful_step_count=30,
            deadline=None,
            phases=[Phase.explicit, Phase.reuse, Phase.generate]
            if os.environ.get("REL_NO_SHRINK") else list(Phase),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
