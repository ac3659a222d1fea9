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
    """Every module of the store core (all of store/ but the gRPC and registry
    adapters) imports without trio, pyfuse3 or grpc."""
    core = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "store"))
                  if n.endswith(".py") and n != "__init__.py")
    code = (
        "import json, sys\n"
        "import store\n"
        + "".join(f"import store.{m}\n" for m in core)
        + "print(json.dumps(sorted(sys.modules)))\n"
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
    for mod in ("api", "changes", "digest", "errors", "filters", "fsutil", "hashcache",
                "labels", "layout", "local", "locks", "metadata", "ondisk", "reader", "types",
                "writer"):
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


# -- structure: no import cycles, no reaching into other modules' private names ----------

import ast  # noqa: E402

PACKAGES = ("store", "fusefs")
#: Private names of other projects used on purpose, each with its reason.
ALLOWED_PRIVATE = {
    "hashlib._Hash": "the type of hashlib objects (typeshed names it only so)",
    "grpc._cython": "store/grpc/fastread.py's Read lane; grpcio is pinned to tested versions",
}


def _modules() -> dict[str, str]:
    """Every module of our packages: dotted name -> path (generated code left out)."""
    out: dict[str, str] = {}
    for pkg in PACKAGES:
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            if "gen" in os.path.relpath(dirpath, ROOT).split(os.sep):
                continue
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3]
                    parts = rel.split(os.sep)
                    if parts[-1] == "__init__":
                        parts.pop()
                    out[".".join(parts)] = os.path.join(dirpath, name)
    return out


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """The modules of ours that ``module`` imports (anywhere in it)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif target in known:
                    out.add(target)
    out.discard(module)
    return out


def test_no_import_cycles() -> None:
    """Modules import each other in one direction only (a package's ``__init__`` counts
    as a module): a cycle means two concerns that should be one, or a missing layer."""
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    # a package imports its own modules to re-export them: that edge is not a layer
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not (d.startswith(m + ".") and m in PACKAGES)}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == [], cycles


def _private_uses(path: str) -> list[str]:
    """``x._name`` where ``x`` is not self/cls and ``_name`` is not defined in this file,
    and ``from m import _name`` / ``import m._name``: reaching into another module."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
        elif isinstance(node, ast.alias) and node.asname:
            own.add(node.asname)
    if isinstance(tree, ast.Module):
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:  # __slots__ names
                    if isinstance(item, ast.Assign) and any(
                            isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets):
                        own.update(c.value for c in ast.walk(item.value)
                                   if isinstance(c, ast.Constant) and isinstance(c.value, str))

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    bad: list[str] = []
    for node in ast.walk(tree):
        where = f"{os.path.relpath(path, ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
            base = ast.unparse(node.value)
            if base in ("self", "cls") or f"{base}.{node.attr}" in ALLOWED_PRIVATE:
                continue
            bad.append(f"{where}: {base}.{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod in ALLOWED_PRIVATE or mod == "__future__":
                continue
            if any(private(p) for p in mod.split(".")):
                bad.append(f"{where}: from {mod} import ...")
            bad += [f"{where}: from {mod} import {a.name}" for a in node.names
                    if private(a.name) and f"{mod}.{a.name}" not in ALLOWED_PRIVATE]
        elif isinstance(node, ast.Import):
            bad += [f"{where}: import {a.name}" for a in node.names
                    if any(private(p) for p in a.name.split("."))
                    and a.name not in ALLOWED_PRIVATE]
    return bad


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """A module uses another's public names only: what it needs of a store is in
    store/api.py, of a module in that module's ``__all__`` or public methods."""
    bad = [b for path in _modules().values() for b in _private_uses(path)]
    assert bad == [], "\n".join(bad)


def test_adapters_take_the_store_interface() -> None:
    """The gRPC service and the FUSE view are typed against store.api, not LocalStore
    (only the CLI and the mount's entry point choose a concrete store)."""
    for rel in ("store/grpc/service.py", "store/grpc/fastread.py", "fusefs/ops.py",
                "fusefs/blobcache.py", "fusefs/ingests.py", "fusefs/xattrs.py",
                "fusefs/handles.py", "fusefs/watch.py", "fusefs/kernel.py", "fusefs/view.py"):
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        assert "LocalStore" not in text and "LocalWriter" not in text, rel
