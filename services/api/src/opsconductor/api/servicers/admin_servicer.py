"""gRPC transport of ``AdminService``: feature flags, the dead-letter queue and queue health.

Servicers translate protobuf messages to and from domain values and call the service logic;
domain errors they let escape become gRPC statuses in the shared interceptor. RPCs whose logic
belongs to later work answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.api.app import ApiApp
from opsconductor.common.errors import InvalidArgumentError, UnimplementedError
from opsconductor.common.rpc.auth import authenticate
from opsconductor.common.storage.flags import FeatureFlags
from opsconductor.execution.v1 import admin_service_pb2, admin_service_pb2_grpc

SERVICE_NAME: str = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """``AdminService`` over gRPC."""

    def __init__(self, app: ApiApp) -> None:
        self._app = app

    async def GetFeatureFlags(
        self, request: admin_service_pb2.GetFeatureFlagsRequest, context: _Context
    ) -> admin_service_pb2.GetFeatureFlagsResponse:
        principal, _ = authenticate(context, self._app.verifier)
        flags = await self._app.admin.get_flags(principal)
        return admin_service_pb2.GetFeatureFlagsResponse(flags=_flags_to_proto(flags))

    async def UpdateFeatureFlags(
        self, request: admin_service_pb2.UpdateFeatureFlagsRequest, context: _Context
    ) -> admin_service_pb2.UpdateFeatureFlagsResponse:
        principal, _ = authenticate(context, self._app.verifier)
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgumentError(
                "update_mask must name the flags to change", field="update_mask"
            )
        known = set(admin_service_pb2.FeatureFlags.DESCRIPTOR.fields_by_name)
        unknown = sorted(set(paths) - known)
        if unknown:
            raise InvalidArgumentError(
                f"update_mask names unknown flags {unknown}; known: {sorted(known)}",
                field="update_mask",
            )
        changes: dict[str, Any] = {}
        for path in paths:
            value = getattr(request.flags, path)
            changes[path] = list(value) if not isinstance(value, bool | int) else value
        flags = await self._app.admin.update_flags(principal, changes)
        return admin_service_pb2.UpdateFeatureFlagsResponse(flags=_flags_to_proto(flags))

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


def _flags_to_proto(flags: FeatureFlags) -> admin_service_pb2.FeatureFlags:
    return admin_service_pb2.FeatureFlags(
        stage_e_enabled=flags.stage_e_enabled,
        all_tenants_enabled=flags.all_tenants_enabled,
        enabled_tenants=sorted(flags.enabled_tenants),
        record_only_tenants=sorted(flags.record_only_tenants),
        max_approval_level=flags.max_approval_level,
        dispatch_paused=flags.dispatch_paused,
    )


def add_admin_servicer(server: grpc.aio.Server, app: ApiApp) -> str:
    """Register ``AdminService`` on ``server``; returns its full name."""
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), server)
    return SERVICE_NAME
