"""Algorithms written against the store interface (containerd's ``content/helpers.go``):
they work on any :class:`store.api.Store` and use a capability when the store has it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from .api import Ingester, IngestManager, Writer, WriterOpener
from .digest import parse_digest
from .errors import Unavailable
from .labels import validate_labels

__all__ = ["open_writer", "updated_hints"]

_RETRY = 0.01  # seconds between tries for a held ref


class _Opener(Ingester, IngestManager, Protocol):
    """What :func:`open_writer` needs of a store."""


def open_writer(
    store: _Opener, ref: str, *, total: int = 0, expected: str | None = None,
    create: bool = True, wait: float = 0.0,
) -> Writer:
    """Open the writer for ``ref``, waiting up to ``wait`` seconds while another writer
    holds it (then Unavailable, as containerd's ``OpenWriter`` retries). ``create=False``
    only resumes an existing ingest: NotFound if there is none. A store with
    :class:`~store.api.WriterOpener` decides both under the ref's lock; on others the
    check comes just before the open (an abort in between starts a fresh ingest)."""
    if isinstance(store, WriterOpener):
        return store.open_writer(ref, total=total, expected=expected, create=create,
                                 wait=wait)
    deadline = time.monotonic() + wait
    while True:
        if not create:
            store.status(ref)  # NotFound if it is gone
        try:
            return store.writer(ref, total=total, expected=expected)
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
        time.sleep(_RETRY)


def updated_hints(
    old_expected: str | None, old_labels: Mapping[str, str], *,
    expected: str | None = None, labels: Mapping[str, str] | None = None,
    clear_expected: bool = False,
) -> tuple[str | None, dict[str, str]]:
    """An ingest's hints after :meth:`~store.api.IngestHints.set_ingest_hints`:
    ``expected`` replaces the expected digest (InvalidArgument if it is not one),
    ``clear_expected`` forgets it, ``labels`` replace the labels (validated)."""
    if expected is not None:
        old_expected = parse_digest(expected)
    if clear_expected:
        old_expected = None
    if labels is not None:
        validate_labels(labels)
        old_labels = labels
    return old_expected, dict(old_labels)
