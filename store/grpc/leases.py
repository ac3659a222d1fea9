"""containerd's Leases service (``containerd.services.leases.v1.Leases``, reference §8.8)
over a store's namespaces: the six RPCs, wire-compatible with containerd 1.6, so ``ctr
leases create|ls|rm`` and ``ctr content prune references`` (a synchronous Delete, which
runs gc) work. Every call needs the ``containerd-namespace`` header (FailedPrecondition
without one, as containerd: the raw store has no leases)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from store.api import LeaseManager, Namespaced, Store
from store.types import Lease

from .errors import GrpcError
from .pb import leases_pb2 as lpb
from .service import check_namespace, timestamp

__all__ = ["LEASES", "LeasesService"]

log = logging.getLogger(__name__)

LEASES = "containerd.services.leases.v1.Leases"


def lease_to_pb(lease: Lease) -> lpb.Lease:
    return lpb.Lease(id=lease.id, created_at=timestamp(lease.created_at),
                     labels=dict(lease.labels))


class LeasesService:
    """The six Leases RPCs over one store (plain methods; ``server`` binds them)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _view(self, metadata: Sequence[tuple[str, str]]) -> LeaseManager:
        ns = check_namespace(metadata)
        if ns is None:
            raise GrpcError(grpc.StatusCode.FAILED_PRECONDITION,
                            "namespace is required: failed precondition")
        if isinstance(self.store, Namespaced):
            view = self.store.namespace(ns)
            if isinstance(view, LeaseManager):
                return view
        raise GrpcError(grpc.StatusCode.UNIMPLEMENTED, "this store has no leases")

    def create(self, req: lpb.CreateRequest, md: Sequence[tuple[str, str]]) -> lpb.CreateResponse:
        lease = self._view(md).create_lease(req.id or None, dict(req.labels))
        return lpb.CreateResponse(lease=lease_to_pb(lease))

    def delete(self, req: lpb.DeleteRequest, md: Sequence[tuple[str, str]]) -> None:
        result = self._view(md).delete_lease(req.id, sync=req.sync)
        if result is not None:
            log.info("gc after lease %s: %d blobs, %d bytes freed, writers held %.3f s",
                     req.id, len(result.removed), result.bytes_freed, result.held_s)

    def list(self, req: lpb.ListRequest, md: Sequence[tuple[str, str]]) -> lpb.ListResponse:
        leases = self._view(md).leases(*req.filters)
        return lpb.ListResponse(leases=[lease_to_pb(lease) for lease in leases])

    def add_resource(self, req: lpb.AddResourceRequest, md: Sequence[tuple[str, str]]) -> None:
        self._view(md).add_lease_resource(req.id, req.resource.type, req.resource.id)

    def delete_resource(
        self, req: lpb.DeleteResourceRequest, md: Sequence[tuple[str, str]]
    ) -> None:
        self._view(md).delete_lease_resource(req.id, req.resource.type, req.resource.id)

    def list_resources(
        self, req: lpb.ListResourcesRequest, md: Sequence[tuple[str, str]]
    ) -> lpb.ListResourcesResponse:
        resources = self._view(md).lease_resources(req.id)
        return lpb.ListResourcesResponse(
            resources=[lpb.Resource(id=rid, type=rtype) for rtype, rid in resources])
