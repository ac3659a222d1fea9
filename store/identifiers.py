"""containerd's identifiers (namespaces, lease ids): ``identifiers/validate.go`` rules."""

from __future__ import annotations

import re

from .errors import InvalidArgument

__all__ = ["DEFAULT_NAMESPACE", "IDENTIFIER_MAX", "IDENTIFIER_RE", "validate_identifier"]

#: The namespace of every face when none is given (as ``ctr``).
DEFAULT_NAMESPACE = "default"
IDENTIFIER_MAX = 76
#: Alphanumeric runs joined by single ``.``, ``_`` or ``-``.
IDENTIFIER_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$")


def validate_identifier(what: str, ident: str) -> str:
    """Return ``ident`` if it is a valid containerd identifier, else InvalidArgument
    with containerd's message (``<what> validation: identifier ...``)."""
    if not ident:
        raise InvalidArgument(f"{what} validation: identifier must not be empty")
    if len(ident) > IDENTIFIER_MAX:
        raise InvalidArgument(
            f'{what} validation: identifier "{ident}" greater than maximum length'
            f" ({IDENTIFIER_MAX} characters)"
        )
    if not IDENTIFIER_RE.fullmatch(ident):
        raise InvalidArgument(
            f'{what} validation: identifier "{ident}" must match {IDENTIFIER_RE.pattern}'
        )
    return ident
