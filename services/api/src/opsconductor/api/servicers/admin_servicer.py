"""gRPC transport of ``AdminService``: feature flags, the dead-letter queue and queue health.

Servicers translate protobuf messages to and from domain values and call the service logic;
domain errors they let escape become gRPC statuses in the shared interceptor. RPCs whose logic
belongs to later work answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.common.errors import UnimplementedError
from opsconductor.common.rpc.resources import DatabasePool
from opsconductor.execution.v1 import admin_service_pb2, admin_service_pb2_grpc

SERVICE_NAME: str = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """``AdminService`` over gRPC."""

    def __init__(self, db: DatabasePool) -> None:
        self._db = db

    async def GetFeatureFlags(
        self, request: admin_service_pb2.GetFeatureFlagsRequest, context: _Context
    ) -> admin_service_pb2.GetFeatureFlagsResponse:
        raise UnimplementedError("GetFeatureFlags is not implemented yet", rpc="GetFeatureFlags")

    async def UpdateFeatureFlags(
        self, request: admin_service_pb2.UpdateFeatureFlagsRequest, context: _Context
    ) -> admin_service_pb2.UpdateFeatureFlagsResponse:
        raise UnimplementedError(
            "UpdateFeatureFlags is not implemented yet", rpc="UpdateFeatureFlags"
        )

    async def ListDlqEntries(
        self, request: admin_service_pb2.ListDlqEntriesRequest, context: _Context
    ) -> admin_service_pb2.ListDlqEntriesResponse:
        raise UnimplementedError("ListDlqEntries is not implemented yet", rpc="ListDlqEntries")

    async def RequeueDlqEntry(
        self, request: admin_service_pb2.RequeueDlqEntryRequest, context: _Context
    ) -> admin_service_pb2.RequeueDlqEntryResponse:
        raise UnimplementedError("RequeueDlqEntry is not implemented yet", rpc="RequeueDlqEntry")

    async def GetQueueStats(
        self, request: admin_service_pb2.GetQueueStatsRequest, context: _Context
    ) -> admin_service_pb2.GetQueueStatsResponse:
        raise UnimplementedError("GetQueueStats is not implemented yet", rpc="GetQueueStats")

    async def SetDrain(
        self, request: admin_service_pb2.SetDrainRequest, context: _Context
    ) -> admin_service_pb2.SetDrainResponse:
        raise UnimplementedError("SetDrain is not implemented yet", rpc="SetDrain")


def add_admin_servicer(server: grpc.aio.Server, db: DatabasePool) -> str:
    """Register ``AdminService`` on ``server``; returns its full name."""
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(db), server)
    return SERVICE_NAME
