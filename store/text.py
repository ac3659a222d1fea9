"""Text that may travel: refs and labels must be valid UTF-8 to cross protobuf and SQLite;
and byte counts as people read them (``human_size``).

Names from FUSE and argv arrive as bytes decoded with ``surrogateescape``: bytes that are
not UTF-8 become lone surrogates, which protobuf and SQLite cannot carry.
"""

from __future__ import annotations

__all__ = ["human_size", "is_text", "printable_ref"]


def is_text(text: str) -> bool:
    """True if ``text`` is valid Unicode (no lone surrogates), so it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_ref(ref: str) -> str:
    """``ref`` with bytes that are not UTF-8 shown as ``\\xNN`` (for messages and
    listings; only a legacy ingest has such a ref, see ``LocalStore.writer``)."""
    if is_text(ref):
        return ref
    return ref.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def human_size(n: float) -> str:
    """``n`` bytes in binary units, as listings and progress lines show them:
    ``512 B``, ``1.5 KiB`` ... ``2.0 TiB`` (TiB is the largest unit)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
