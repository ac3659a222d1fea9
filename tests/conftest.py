"""Shared fixtures. Feature-specific helpers live in their own modules
(tests/fuse_util.py, tests/grpc_util.py, ...)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from store import LocalStore


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long variants of stress tests")


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


@pytest.fixture
def store_root(tmp_path: os.PathLike[str]) -> str:
    root = os.path.join(os.fspath(tmp_path), "root")
    os.mkdir(root)
    return root


@pytest.fixture
def store(store_root: str) -> Iterator[LocalStore]:
    s = LocalStore(store_root)
    yield s
    s.close()
