"""Image references as ``ctr`` and docker spell them: ``[HOST[:PORT]/]REPO[:TAG][@DIGEST]``.

A name without a host is Docker Hub's (``docker.io``, ``library/`` added to a one-part
repository), as containerd's reference docker normalisation does.
"""

from __future__ import annotations

import dataclasses
import re

from ..digest import Digest, parse_digest
from ..errors import InvalidArgument

__all__ = ["Reference", "parse_reference"]

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*"
                   r"|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@dataclasses.dataclass(frozen=True)
class Reference:
    """A parsed reference. ``object`` is what the registry is asked for: the digest when
    there is one, else the tag (``latest`` when neither was given)."""

    host: str
    repository: str
    tag: str | None
    digest: Digest | None

    @property
    def object(self) -> str:
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        """Where the API is served (Docker Hub's API is not on docker.io itself)."""
        return "registry-1.docker.io" if self.host == "docker.io" else self.host

    @property
    def hostname(self) -> str:
        """The host without its port: containerd keys its distribution source labels by
        it (``containerd.io/distribution.source.127.0.0.1``)."""
        if self.host.startswith("["):
            return self.host[: self.host.index("]") + 1]
        return self.host.rsplit(":", 1)[0] if ":" in self.host else self.host

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    def with_object(self, obj: str) -> Reference:
        """The same repository at another tag or digest."""
        if obj.startswith(("sha256:", "sha384:", "sha512:")):
            return dataclasses.replace(self, digest=parse_digest(obj))
        if not _TAG.match(obj):
            raise InvalidArgument(f"tag {obj!r}: invalid")
        return dataclasses.replace(self, tag=obj, digest=None)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(ref: str) -> Reference:
    """Parse ``ref``; InvalidArgument if it is not a valid image reference."""
    rest = ref.strip()
    if not rest or rest != ref:
        raise InvalidArgument(f"reference {ref!r}: invalid")
    digest: Digest | None = None
    if "@" in rest:
        rest, _, dg = rest.partition("@")
        try:
            digest = parse_digest(dg)
        except InvalidArgument:
            raise InvalidArgument(f"reference {ref!r}: invalid digest {dg!r}") from None
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, path = first, remainder
        if not _HOST.match(host):
            raise InvalidArgument(f"reference {ref!r}: invalid host {host!r}")
    else:
        host, path = "docker.io", rest
    tag: str | None = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG.match(tag):
            raise InvalidArgument(f"reference {ref!r}: invalid tag {tag!r}")
    if host == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if not _REPO.match(path):
        raise InvalidArgument(f"reference {ref!r}: invalid repository {path!r}"
                              " (lowercase letters, digits and separators)")
    return Reference(host, path, tag, digest)
