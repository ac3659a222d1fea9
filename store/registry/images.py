"""OCI and Docker image media types, descriptors, children and containerd's labels.

Pure functions over parsed JSON: which descriptors a manifest or index references, which
ingest ref and which ``containerd.io/gc.ref.content.*`` label containerd gives each
(``remotes.MakeRefKey``, ``images.ChildGCLabels`` in containerd 1.6), platform matching.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..digest import Digest, parse_digest
from ..errors import InvalidArgument

__all__ = [
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "Descriptor",
    "child_labels",
    "children",
    "is_index",
    "is_manifest",
    "media_type_of",
    "platform_matches",
    "ref_key",
    "source_label",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
})
LAYER_PREFIXES = ("application/vnd.oci.image.layer.", "application/vnd.docker.image.rootfs.")

GC_PREFIX = "containerd.io/gc.ref.content."
SOURCE_PREFIX = "containerd.io/distribution.source."
GC_ROOT = "containerd.io/gc.root"


@dataclasses.dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


def is_layer(media_type: str) -> bool:
    return media_type.startswith(LAYER_PREFIXES)


def ref_key(desc: Descriptor) -> str:
    """The ingest ref containerd's fetch uses: ``layer-sha256:...`` and so on."""
    mt = desc.media_type
    if is_manifest(mt):
        kind = "manifest"
    elif is_index(mt):
        kind = "index"
    elif is_layer(mt):
        kind = "layer"
    elif mt in CONFIG_TYPES:
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


def _descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: descriptor is not an object")
    mt, dg, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(dg, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0:
        raise InvalidArgument(f"{where}: descriptor needs a digest and a size")
    platform = obj.get("platform")
    try:
        digest = parse_digest(dg)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None
    return Descriptor(mt if isinstance(mt, str) else "", digest, size,
                      platform if isinstance(platform, dict) else None)


def parse_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{where}: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where}: not a JSON object")
    return doc


def media_type_of(data: bytes, where: str, hint: str = "") -> str:
    """The media type of a manifest or index: its ``mediaType`` field, else the hint
    (Content-Type), else guessed from its fields as containerd does."""
    doc = parse_json(data, where)
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    hint = hint.split(";", 1)[0].strip()
    if hint in INDEX_TYPES or hint in MANIFEST_TYPES:
        return hint
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc or "layers" in doc:
        return OCI_MANIFEST
    raise InvalidArgument(f"{where}: not an image manifest or index")


def children(data: bytes, media_type: str, where: str) -> list[Descriptor]:
    """The descriptors a manifest (config, then layers) or an index (manifests)
    references, in order. InvalidArgument if ``data`` does not parse as one."""
    doc = parse_json(data, where)
    if is_index(media_type):
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise InvalidArgument(f"{where}: index without a manifests list")
        return [_descriptor(m, where) for m in items]
    if is_manifest(media_type):
        config = doc.get("config")
        layers = doc.get("layers", [])
        if config is None or not isinstance(layers, list):
            raise InvalidArgument(f"{where}: manifest without config or layers")
        return [_descriptor(config, where)] + [_descriptor(layer, where) for layer in layers]
    return []


def _gc_key(desc: Descriptor) -> str:
    mt = desc.media_type
    if mt in CONFIG_TYPES:
        return GC_PREFIX + "config"
    if is_manifest(mt):
        return GC_PREFIX + "m."
    if is_layer(mt):
        return GC_PREFIX + "l."
    return GC_PREFIX


def child_labels(kids: Sequence[Descriptor]) -> dict[str, str]:
    """containerd's children labels: ``...config``, ``...m.<n>``, ``...l.<n>``, counted
    per prefix in order (a fetch of one platform still labels every child of an index,
    as ``ctr content fetch --platform`` does)."""
    counts: dict[str, int] = {}
    out: dict[str, str] = {}
    for kid in kids:
        key = _gc_key(kid)
        if key.endswith("."):
            n = counts.get(key, 0)
            counts[key] = n + 1
            key = f"{key}{n}"
        out[key] = kid.digest
    return out


def source_label(hostname: str, repository: str, existing: str | None) -> tuple[str, str]:
    """(key, value) of the distribution source label, the repository merged into the
    comma-separated, sorted set already there."""
    repos = set(existing.split(",")) if existing else set()
    repos.discard("")
    repos.add(repository)
    return SOURCE_PREFIX + hostname, ",".join(sorted(repos))


def parse_platform(spec: str) -> tuple[str, str, str | None]:
    """``linux/arm64[/v8]`` -> (os, arch, variant)."""
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(f"platform {spec!r}: expected OS/ARCH[/VARIANT]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def platform_matches(desc: Descriptor, wanted: Sequence[tuple[str, str, str | None]]) -> bool:
    """True when no platform is wanted, the descriptor names none, or one matches."""
    if not wanted or not desc.platform:
        return True
    os_, arch = desc.platform.get("os"), desc.platform.get("architecture")
    variant = desc.platform.get("variant")
    return any(os_ == w_os and arch == w_arch and (w_var is None or variant == w_var)
               for w_os, w_arch, w_var in wanted)
