"""Runs the conformance suite (tests/suite.py) against every registered store factory.

To add a factory, see the docstring of tests/suite.py: a fixture yielding a ``Target`` for a
fresh empty store, and one ``STORE_FACTORIES`` line naming it, its capabilities and the
cases it cannot express (with a reason).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("tests.suite")

from store import LocalStore  # noqa: E402
from tests.suite import ALL_CAPS, CASES, Target  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Factory:
    """A store factory: the fixture yielding its Target, its capabilities, and the cases
    it cannot express mapped to why (those must be exactly the ones ``caps`` excludes)."""

    fixture: str
    caps: frozenset[str] = ALL_CAPS
    unsupported: tuple[tuple[str, str], ...] = ()


STORE_FACTORIES: dict[str, Factory] = {
    "local": Factory("local_target"),
}


@pytest.fixture
def local_target(store_root: str) -> Iterator[Target]:
    store = LocalStore(store_root)
    try:
        yield Target(store, ALL_CAPS, root=store_root)
    finally:
        store.close()


def _params() -> list[object]:
    out: list[object] = []
    for fname, factory in STORE_FACTORIES.items():
        for name, case in CASES.items():
            if case.requires <= factory.caps:
                out.append(pytest.param(fname, name, id=f"{fname}-{name}"))
    return out


@pytest.mark.parametrize(("factory_name", "case_name"), _params())
def test_conformance(request: pytest.FixtureRequest, factory_name: str, case_name: str) -> None:
    target = request.getfixturevalue(STORE_FACTORIES[factory_name].fixture)
    CASES[case_name](target)


@pytest.mark.parametrize("factory_name", list(STORE_FACTORIES))
def test_unsupported_cases_are_declared(factory_name: str) -> None:
    """A case a factory cannot run is named, with a reason, in its declaration."""
    factory = STORE_FACTORIES[factory_name]
    excluded = {n for n, c in CASES.items() if not c.requires <= factory.caps}
    declared = {name for name, reason in factory.unsupported if reason}
    assert excluded == declared, (
        f"{factory_name}: cases not run {sorted(excluded)}, declared {sorted(declared)}"
    )


def test_local_runs_every_case() -> None:
    """The reference implementation runs the whole suite."""
    assert STORE_FACTORIES["local"].caps == ALL_CAPS
    assert len(CASES) >= 17
