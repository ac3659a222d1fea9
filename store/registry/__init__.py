"""Registries: fetch images and objects into a store and push them back out, over the
OCI distribution API (``httpx``). Uses the store only through its public API (writer,
status, info, update, reader_at)."""

from .auth import Credentials, docker_config_credentials
from .client import RegistryClient
from .fetch import FetchResult, fetch_image, fetch_object, resolve
from .progress import TerminalProgress
from .push import PushResult, push_image, push_object
from .reference import Reference, parse_reference
from .transfer import BlobResult, Progress

__all__ = [
    "BlobResult",
    "Credentials",
    "FetchResult",
    "Progress",
    "PushResult",
    "Reference",
    "RegistryClient",
    "TerminalProgress",
    "docker_config_credentials",
    "fetch_image",
    "fetch_object",
    "parse_reference",
    "push_image",
    "push_object",
    "resolve",
]
