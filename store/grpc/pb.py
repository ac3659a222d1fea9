"""The generated protobuf modules, generated first if needed (see ``codegen``)."""

from __future__ import annotations

from .codegen import ensure_generated

ensure_generated()

from .gen import content_pb2, introspection_pb2, leases_pb2, version_pb2  # noqa: E402

__all__ = ["content_pb2", "introspection_pb2", "leases_pb2", "version_pb2"]
