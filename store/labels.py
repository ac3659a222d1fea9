"""Label rules shared by every face: containerd's limit on a label's size, and UTF-8."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import InvalidArgument
from .text import is_text, printable_ref

__all__ = ["MAX_LABEL_SIZE", "label_size", "validate_labels"]

#: Largest key plus value of one label, in UTF-8 bytes (containerd's ``labels.Validate``).
MAX_LABEL_SIZE = 4096


def label_size(key: str, value: str) -> int:
    """The size containerd counts for a label: UTF-8 bytes of key plus value."""
    return len(key.encode("utf-8", "surrogateescape")) + len(
        value.encode("utf-8", "surrogateescape")
    )


def validate_labels(labels: Mapping[str, str]) -> None:
    """Raise InvalidArgument for an empty key, a key or value that is not valid UTF-8,
    or key plus value over 4096 UTF-8 bytes."""
    for key, value in labels.items():
        if not key:
            raise InvalidArgument("label key must not be empty")
        if not (is_text(key) and is_text(value)):
            raise InvalidArgument(
                f"label {printable_ref(key)[:64]}: key and value must be valid UTF-8"
            )
        size = label_size(key, value)
        if size > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value length ({size} bytes) greater than maximum size"
                f" ({MAX_LABEL_SIZE} bytes), key: {key[:64]}"
            )
