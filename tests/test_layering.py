"""The store is the bottom layer: importing it pulls in no adapter dependency, and its
public surface is a sorted ``__all__`` of importable names."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ("trio", "pyfuse3", "grpc", "google.protobuf", "click", "fusefs", "store.grpc")


def test_importing_store_imports_no_adapter() -> None:
    code = (
        "import json, sys\n"
        "import store, store.local, store.writer, store.filters, store.metadata\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    loaded = json.loads(proc.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], bad


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then functions, each alphabetical."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted_and_importable() -> None:
    names = store.__all__
    assert list(names) == sorted(names, key=_isort_key)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(store, name) is not None, name
    public = {n for n in vars(store) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(store, n)).__name__ == "module"}
    assert public - modules == set(names), sorted(public - modules ^ set(names))


def test_submodule_all_lists_are_importable() -> None:
    for mod in ("digest", "errors", "filters", "fsutil", "layout", "local", "locks",
                "metadata", "reader", "types", "writer"):
        module = importlib.import_module(f"store.{mod}")
        for name in getattr(module, "__all__", ()):
            assert hasattr(module, name), f"store.{mod}.{name}"


def test_error_hierarchy_is_closed() -> None:
    errors = [store.NotFound, store.AlreadyExists, store.InvalidArgument,
              store.FailedPrecondition, store.Unavailable, store.DataLoss,
              store.NotImplemented]
    assert {c for c in vars(store).values()
            if isinstance(c, type) and issubclass(c, store.StoreError)} == {
        store.StoreError, *errors, store.Unreachable}
    # the one refinement: a remote store that is gone, still of the Unavailable kind
    assert store.Unreachable.__mro__[1] is store.Unavailable
    assert store.Unreachable.kind == store.Unavailable.kind
    assert issubclass(store.NotFound, LookupError)
    assert issubclass(store.InvalidArgument, ValueError)
    assert str(store.NotFound("content sha256:ab")) == "content sha256:ab: not found"
    assert str(store.Unavailable("unavailable")) == "unavailable"
