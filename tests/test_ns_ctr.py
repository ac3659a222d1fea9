"""Namespaces, leases and gc side by side with a real containerd 1.6: the same scripted
``ctr`` sequence in several namespaces against ``contentfs serve`` and against
containerd gives the same ``ctr -n NS content ls`` and the same exit codes."""

from __future__ import annotations

import re

import pytest

from store import digest_of

from .grpc_util import Containerd, ServeProcess, containerd_daemon, ctr, serve_process

serve = pytest.fixture(serve_process)

A = b"shared by two namespaces\n"
B = b"only ns1, unrooted\n"
C = b"ns2 child of a root\n"
D = b"ns2 root\n"
UNKNOWN = "sha256:" + "0" * 64


containerd = pytest.fixture(containerd_daemon)


def _sorted_labels(text: str) -> str:
    """Labels as ctr prints them (k=v,k=v in Go's random map order), sorted."""
    return ",".join(sorted(text.split(","))) if "=" in text else text


def script(address: str) -> list[tuple[str, int, str]]:
    """Run the sequence; return (step, exit code, normalised output) for each step."""
    out: list[tuple[str, int, str]] = []

    def step(ns: str, *args: str, data: bytes | None = None, keep: bool = False) -> None:
        p = ctr(address, *args, input=data, namespace=ns)
        text = _sorted_labels(p.stdout.decode().strip()) if keep else ""
        out.append((f"{ns}: {' '.join(args)}", p.returncode, text))

    da, db, dc, dd = (digest_of(x) for x in (A, B, C, D))
    step("ns1", "content", "ingest", "a", data=A)
    step("ns1", "content", "label", da, "containerd.io/gc.root=yes", keep=True)
    step("ns1", "content", "ingest", "b", data=B)
    step("ns2", "content", "ingest", "a-again", data=A)
    step("ns2", "content", "ingest", "c", data=C)
    step("ns2", "content", "ingest", "d", data=D)
    step("ns2", "content", "label", dd, "containerd.io/gc.root=yes",
         f"containerd.io/gc.ref.content.l.0={dc}", keep=True)
    step("ns2", "leases", "create", "--id", "held")
    step("ns2", "leases", "create", "--id", "held")  # exists
    step("ns2", "leases", "create", "--id", "bad id!")
    step("ns2", "leases", "ls", "-q", keep=True)
    step("ns1", "content", "rm", db, keep=True)
    step("ns1", "content", "rm", UNKNOWN)
    step("ns1", "content", "ingest", "b2", data=B)
    step("ns2", "leases", "rm", "held")
    step("ns2", "leases", "rm", "held")  # gone
    step("ns2", "leases", "ls", "-q", keep=True)
    step("ns1", "content", "prune", "references")
    for ns in ("ns1", "ns2", "default"):
        p = ctr(address, "content", "ls", namespace=ns)
        # ctr aligns its columns with tabs (text/tabwriter): how many depends on the
        # widths of the AGE cells ("Less than a second" or "2 seconds"), so a run of
        # tabs is one separator (no cell is empty: no labels prints "-")
        rows = sorted(
            "\t".join(_sorted_labels(f) for i, f in enumerate(re.split("\t+", line))
                      if i != 2)  # not AGE
            for line in p.stdout.decode().splitlines()[1:]
        )
        out.append((f"{ns}: content ls", p.returncode, "\n".join(rows)))
    _ = db
    return out


def test_ctr_sequence_matches_containerd(serve: ServeProcess, containerd: Containerd) -> None:
    ours = script(serve.address)
    theirs = script(containerd.address)
    for mine, ref in zip(ours, theirs, strict=True):
        assert mine == ref, f"contentfs {mine} vs containerd {ref}"
    listing = dict((s, o) for s, _, o in ours)
    assert digest_of(A) in listing["ns1: content ls"]  # rooted in ns1
    assert digest_of(B) not in listing["ns1: content ls"]  # collected by prune
    assert digest_of(C) in listing["ns2: content ls"]  # kept by the gc.ref edge


def lease_script(address: str) -> list[tuple[str, int, str]]:
    """Writes under the ``containerd-lease`` header are held by that lease: prune keeps
    them, a synchronous ``leases rm`` lets them go."""
    from store.grpc.client import RemoteStore

    out: list[tuple[str, int, str]] = []

    def ls(step: str) -> None:
        p = ctr(address, "content", "ls", "-q", namespace="lz")
        out.append((step, p.returncode, "\n".join(sorted(p.stdout.decode().split()))))

    held, loose = b"held by lease L1\n", b"no lease\n"
    with RemoteStore(address, namespace="lz", lease="L1") as leased:
        w = leased.writer("held")
        w.write(held)
        w.commit(len(held), digest_of(held))
    with RemoteStore(address, namespace="lz") as plain:
        w = plain.writer("loose")
        w.write(loose)
        w.commit(len(loose), digest_of(loose))
    ls("before prune")
    p = ctr(address, "content", "prune", "references", namespace="lz")
    out.append(("prune", p.returncode, ""))
    ls("after prune")
    p = ctr(address, "leases", "ls", "-q", namespace="lz")
    out.append(("leases ls", p.returncode, p.stdout.decode().strip()))
    p = ctr(address, "leases", "rm", "--sync", "L1", namespace="lz")
    out.append(("leases rm --sync", p.returncode, ""))
    ls("after lease rm")
    return out


def test_lease_header_matches_containerd(serve: ServeProcess, containerd: Containerd) -> None:
    ours = lease_script(serve.address)
    theirs = lease_script(containerd.address)
    assert ours == theirs
    listing = dict((s, o) for s, _, o in ours)
    assert listing["after prune"] == digest_of(b"held by lease L1\n")
    assert listing["after lease rm"] == ""
