"""The conformance suite (tests/suite.py) once more, through RemoteStore and a server on
the same kind of root: every case, layout ones included (the server's root is on disk)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.suite")

from store import LocalStore  # noqa: E402
from store.grpc.client import RemoteStore  # noqa: E402
from tests.grpc_util import InProcessServer  # noqa: E402
from tests.suite import ALL_CAPS, CASES, Target  # noqa: E402


@pytest.fixture
def grpc_target(tmp_path: Any) -> Iterator[Target]:
    root = os.path.join(tmp_path, "root")
    os.mkdir(root)
    store = LocalStore(root)
    srv = InProcessServer(store, os.path.join(tmp_path, "s.sock")).start()
    remote = RemoteStore(srv.address)
    try:
        # timestamps cross the wire as protobuf Timestamps: microseconds survive
        yield Target(remote, ALL_CAPS, root=root, slack=dt.timedelta(milliseconds=1))
    finally:
        remote.close()
        srv.stop()
        store.close()


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_conformance_over_grpc(grpc_target: Target, case_name: str) -> None:
    CASES[case_name](grpc_target)
