"""gRPC transport of ``ApprovalService``: approval requests and decisions.

Protobuf in, use case call, protobuf out: authenticate, work out the caller's source address,
translate, call :class:`~opsconductor.approvals.logic.decisions.ApprovalDecisions`. Domain errors
escape to the shared interceptor, which turns them into statuses with an ``ErrorInfo`` reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc.aio
from google.protobuf import timestamp_pb2

from opsconductor.approvals.logic.decisions import Caller, covered_scope
from opsconductor.approvals.servicers.client_address import source_ip
from opsconductor.common.errors import InvalidArgumentError
from opsconductor.execution.v1 import approval_service_pb2, approval_service_pb2_grpc, types_pb2
from opsconductor.lifecycle.approval_port import ApprovalRecord
from opsconductor.rpc.auth import authenticate
from opsconductor.rpc.plan_codec import plan_to_proto

if TYPE_CHECKING:
    from opsconductor.approvals.app import ApprovalsApp

SERVICE_NAME: str = approval_service_pb2.DESCRIPTOR.services_by_name["ApprovalService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


def _stamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def approval_to_proto(approval: ApprovalRecord) -> types_pb2.Approval:
    """The ``Approval`` message: the decision record, the plan, and the targets and actions it
    covers (one step's for a level-3 step approval)."""
    targets, actions = covered_scope(approval)
    message = types_pb2.Approval(
        approval_id=str(approval.id),
        tenant_id=approval.tenant_id,
        execution_id=str(approval.execution_id),
        level=approval.level,
        plan_hash=approval.plan_hash,
        plan_snapshot_hash=approval.plan_snapshot_hash,
        requested_by=approval.requested_by,
        decided_by=approval.decided_by or "",
        auth_method=approval.auth_method or "",
        source_ip=approval.source_ip or "",
        decided_at=_stamp(approval.decided_at),
        comment=approval.comment or "",
        created_at=_stamp(approval.created_at),
        expires_at=_stamp(approval.expires_at),
        runbook_url=approval.runbook_url or "",
        step_id=approval.step_id or "",
        target_refs=targets,
        actions=actions,
    )
    message.state = types_pb2.ApprovalState.Value(  # type: ignore[assignment]
        "APPROVAL_STATE_" + approval.state.value.upper()
    )
    if approval.plan is not None:
        message.plan.CopyFrom(plan_to_proto(approval.plan))
    return message


class ApprovalServicer(approval_service_pb2_grpc.ApprovalServiceServicer):
    """``ApprovalService`` over gRPC."""

    def __init__(self, app: ApprovalsApp) -> None:
        self._app = app

    async def _caller(self, context: _Context) -> Caller:
        principal, token = await authenticate(context, self._app.verifier)
        return Caller(
            principal=principal,
            token=token,
            source_ip=source_ip(context, self._app.settings.trusted_proxy_networks),
        )

    async def GetApproval(
        self, request: approval_service_pb2.GetApprovalRequest, context: _Context
    ) -> approval_service_pb2.GetApprovalResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        approval = await self._app.decisions.get(principal, request.tenant_id, request.approval_id)
        return approval_service_pb2.GetApprovalResponse(approval=approval_to_proto(approval))

    async def ListPendingApprovals(
        self, request: approval_service_pb2.ListPendingApprovalsRequest, context: _Context
    ) -> approval_service_pb2.ListPendingApprovalsResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        if request.page_size < 0:
            raise InvalidArgumentError("page_size must not be negative", field="page_size")
        approvals, token = await self._app.decisions.list_pending(
            principal,
            request.tenant_id,
            page_size=request.page_size,
            page_token=request.page_token or None,
        )
        return approval_service_pb2.ListPendingApprovalsResponse(
            approvals=[approval_to_proto(a) for a in approvals], next_page_token=token or ""
        )

    async def Approve(
        self, request: approval_service_pb2.ApproveRequest, context: _Context
    ) -> approval_service_pb2.ApproveResponse:
        caller = await self._caller(context)  # authenticate before anything else
        approval = await self._app.decisions.approve(
            caller, request.tenant_id, request.approval_id, request.comment
        )
        return approval_service_pb2.ApproveResponse(approval=approval_to_proto(approval))

    async def Reject(
        self, request: approval_service_pb2.RejectRequest, context: _Context
    ) -> approval_service_pb2.RejectResponse:
        caller = await self._caller(context)  # authenticate before anything else
        approval = await self._app.decisions.reject(
            caller, request.tenant_id, request.approval_id, request.comment
        )
        return approval_service_pb2.RejectResponse(approval=approval_to_proto(approval))

    async def ApproveStep(
        self, request: approval_service_pb2.ApproveStepRequest, context: _Context
    ) -> approval_service_pb2.ApproveStepResponse:
        caller = await self._caller(context)  # authenticate before anything else
        approval = await self._app.decisions.approve_step(
            caller,
            request.tenant_id,
            request.execution_id,
            request.step_id,
            request.comment,
        )
        return approval_service_pb2.ApproveStepResponse(approval=approval_to_proto(approval))


def add_approval_servicer(server: grpc.aio.Server, app: ApprovalsApp) -> str:
    """Register ``ApprovalService`` on ``server``; returns its full name."""
    approval_service_pb2_grpc.add_ApprovalServiceServicer_to_server(ApprovalServicer(app), server)
    return SERVICE_NAME
