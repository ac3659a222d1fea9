"""The store conformance suite (tests/suite.py) run through a real mount with FuseStore:
every case, since the mount's backing directory is the store root (``layout``) and
FuseStore matches filters itself with the store's filter language."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from tests import fuse_util
from tests.fuse_util import FuseStore

pytest.register_assert_rewrite("tests.suite")

from tests.suite import ALL_CAPS, CASES, Target  # noqa: E402

mounter = fuse_util.mounter


@pytest.fixture
def fuse_target(mounter: fuse_util.MountFactory) -> Iterator[Target]:
    m = mounter()
    yield Target(FuseStore(m.path), ALL_CAPS, root=m.root, slack=dt.timedelta(milliseconds=1))


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_conformance_through_mount(fuse_target: Target, case_name: str) -> None:
    CASES[case_name](fuse_target)
