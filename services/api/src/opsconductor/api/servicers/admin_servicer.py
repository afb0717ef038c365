"""gRPC transport of ``AdminService``: feature flags, the dead-letter queue and queue health.

Servicers translate protobuf messages to and from domain values and call the service logic;
domain errors they let escape become gRPC statuses in the shared interceptor.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import grpc.aio
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from opsconductor.api.app import ApiApp
from opsconductor.api.logic.admin import parse_dlq_id
from opsconductor.common.errors import InvalidArgumentError
from opsconductor.execution.v1 import admin_service_pb2, admin_service_pb2_grpc
from opsconductor.lifecycle.facade import DlqEntry
from opsconductor.lifecycle.storage.audit_chain import ChainProblem
from opsconductor.lifecycle.storage.flag_history import FlagChange
from opsconductor.lifecycle.storage.flags import FeatureFlags
from opsconductor.rpc.auth import authenticate
from opsconductor.rpc.metadata import current_request_id

SERVICE_NAME: str = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """``AdminService`` over gRPC."""

    def __init__(self, app: ApiApp) -> None:
        self._app = app

    async def GetFeatureFlags(
        self, request: admin_service_pb2.GetFeatureFlagsRequest, context: _Context
    ) -> admin_service_pb2.GetFeatureFlagsResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        flags = await self._app.admin.get_flags(principal)
        return admin_service_pb2.GetFeatureFlagsResponse(flags=_flags_to_proto(flags))

    async def UpdateFeatureFlags(
        self, request: admin_service_pb2.UpdateFeatureFlagsRequest, context: _Context
    ) -> admin_service_pb2.UpdateFeatureFlagsResponse:
        principal, _ = await authenticate(context, self._app.verifier)
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
        principal, _ = await authenticate(context, self._app.verifier)
        if request.page_size < 0:
            raise InvalidArgumentError("page_size must not be negative", field="page_size")
        entries, token = await self._app.admin.list_dlq(
            principal,
            tenant_id=request.tenant_id,
            error_class=request.error_class,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return admin_service_pb2.ListDlqEntriesResponse(
            entries=[_dlq_entry_to_proto(e) for e in entries], next_page_token=token or ""
        )

    async def RequeueDlqEntry(
        self, request: admin_service_pb2.RequeueDlqEntryRequest, context: _Context
    ) -> admin_service_pb2.RequeueDlqEntryResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        result = await self._app.admin.requeue_dlq(
            principal, parse_dlq_id(request.dlq_id), request_id=current_request_id()
        )
        return admin_service_pb2.RequeueDlqEntryResponse(
            entry=_dlq_entry_to_proto(result.entry),
            job_id=str(result.job_id),
            execution_id=str(result.execution.id),
        )

    async def GetQueueStats(
        self, request: admin_service_pb2.GetQueueStatsRequest, context: _Context
    ) -> admin_service_pb2.GetQueueStatsResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        overview = await self._app.admin.queue_stats(principal)
        stats = overview.stats
        return admin_service_pb2.GetQueueStatsResponse(
            priorities=[
                admin_service_pb2.PriorityQueueStats(priority=p, ready=n)
                for p, n in sorted(stats.ready_by_priority.items())
            ],
            leased=stats.leased,
            delayed=stats.delayed,
            dlq_size=overview.dlq_size,
            oldest_ready_age_seconds=stats.oldest_ready_age_s or 0.0,
            dispatch_paused=stats.paused,
        )

    async def SetDrain(
        self, request: admin_service_pb2.SetDrainRequest, context: _Context
    ) -> admin_service_pb2.SetDrainResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        paused = await self._app.admin.set_drain(principal, request.drain)
        return admin_service_pb2.SetDrainResponse(dispatch_paused=paused)

    async def ListFlagChanges(
        self, request: admin_service_pb2.ListFlagChangesRequest, context: _Context
    ) -> admin_service_pb2.ListFlagChangesResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        changes, token = await self._app.admin.flag_history(
            principal,
            flag=request.flag,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return admin_service_pb2.ListFlagChangesResponse(
            changes=[_flag_change_to_proto(c) for c in changes], next_page_token=token or ""
        )

    async def VerifyAuditChain(
        self, request: admin_service_pb2.VerifyAuditChainRequest, context: _Context
    ) -> admin_service_pb2.VerifyAuditChainResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        verdict = await self._app.admin.verify_audit_chain(
            principal, request.tenant_id, request.execution_id
        )
        return admin_service_pb2.VerifyAuditChainResponse(
            intact=verdict.intact,
            events_checked=verdict.events_checked,
            events_expected=verdict.events_expected,
            head_hash=verdict.head_hash,
            broken_seq=verdict.broken_seq or 0,
            problem=_PROBLEMS[verdict.problem],
            detail=verdict.detail,
        )


_PROBLEMS: Mapping[ChainProblem | None, admin_service_pb2.AuditChainProblem] = {
    None: admin_service_pb2.AUDIT_CHAIN_PROBLEM_UNSPECIFIED,
    ChainProblem.ALTERED: admin_service_pb2.AUDIT_CHAIN_PROBLEM_ALTERED,
    ChainProblem.MISSING: admin_service_pb2.AUDIT_CHAIN_PROBLEM_MISSING,
    ChainProblem.UNCHAINED: admin_service_pb2.AUDIT_CHAIN_PROBLEM_UNCHAINED,
}


def _stamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _struct(value: Any) -> struct_pb2.Struct | None:
    if not isinstance(value, Mapping):
        return None
    message = struct_pb2.Struct()
    json_format.ParseDict(dict(value), message)
    return message


def _dlq_entry_to_proto(entry: DlqEntry) -> admin_service_pb2.DlqEntry:
    return admin_service_pb2.DlqEntry(
        dlq_id=str(entry.id),
        execution_id=str(entry.execution_id),
        tenant_id=entry.tenant_id,
        attempts=entry.attempts,
        error_class=entry.error_class or "",
        error_message=entry.error_message or "",
        created_at=_stamp(entry.created_at),
        requeued_at=_stamp(entry.requeued_at),
        requeued_by=entry.requeued_by or "",
        last_error=_struct(entry.last_error),
    )


def _json_value(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message


def _flag_change_to_proto(change: FlagChange) -> admin_service_pb2.FlagChange:
    message = admin_service_pb2.FlagChange(
        change_id=str(change.id),
        flag=change.flag,
        changed_by=change.changed_by,
        changed_at=_stamp(change.changed_at),
    )
    if change.old_value is not None:
        message.old_value.CopyFrom(_json_value(change.old_value))
    if change.new_value is not None:
        message.new_value.CopyFrom(_json_value(change.new_value))
    return message


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
