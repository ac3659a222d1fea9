"""Shared fixtures. Feature-specific helpers live in their own modules
(tests/fuse_util.py, tests/grpc_util.py, ...)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from store import LocalStore

# The longest test files (measured in three runs under ``-n 4``, slowest first) run
# first, so that with parallel workers (pyproject's addopts: ``-n 4 --dist loadfile``)
# none of them starts last and holds up the end of the run; the other files keep their
# order. Only the order changes: every test still runs.
SLOW_FIRST = (
    "test_bench_smoke.py", "test_store_model.py", "test_model_store.py",
    "test_fuse_remote.py", "test_registry_fetch.py", "test_model_fuse.py",
    "test_reliability_faults.py", "test_cli_remote.py", "test_cli.py",
    "test_reliability_mount.py", "test_reliability_crash.py", "test_fuse_suite.py",
    "test_reliability_crossface.py", "test_registry_push.py", "test_gc.py",
    "test_badinput_store.py", "test_namespaces.py", "test_go_suite.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable


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
