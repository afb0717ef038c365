"""Typed async client of ApprovalService (the approvals service has an address of its own).

    async with ApprovalClient("127.0.0.1:50053", token) as approvals:
        pending, _ = await approvals.list_pending_approvals(tenant_id="acme")
        await approvals.approve(pending[0].approval_id, tenant_id="acme", comment="LGTM")

Decisions raise the domain exceptions of :mod:`opsconductor.contract.errors`:
``SelfApprovalError`` (the requester deciding), ``ApprovalDecidedError`` (someone decided
first), ``ApprovalExpiredError``, ``ApprovalInvalidatedError`` (all ``FAILED_PRECONDITION``),
``PermissionDeniedError`` (also a ``PermissionError``) and ``NotFoundError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from opsconductor.contract.plan_codec import plan_from_proto
from opsconductor.execution.v1 import approval_service_pb2, approval_service_pb2_grpc, types_pb2

from .base import ChannelClient
from .models import enum_text


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=datetime.now().astimezone().tzinfo).astimezone()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Approval:
    """A request for a human decision, bound to one exact plan, and its decision if any.

    ``state`` is lower-case (``pending``, ``approved``, ``rejected``, ``invalidated``,
    ``expired``); ``step_id`` is set for a level-3 per-step approval; ``plan`` is the plan's
    JSON form; ``target_refs`` and ``actions`` what the approval covers.
    """

    approval_id: str
    tenant_id: str
    execution_id: str
    level: int
    state: str
    plan_hash: str
    plan_snapshot_hash: str
    requested_by: str
    decided_by: str | None
    auth_method: str | None
    source_ip: str | None
    decided_at: datetime | None
    comment: str
    created_at: datetime | None
    expires_at: datetime | None
    runbook_url: str | None
    step_id: str | None
    target_refs: tuple[str, ...]
    actions: tuple[str, ...]
    plan: dict[str, Any] | None

    @property
    def id(self) -> str:
        """The approval id (the spec's ``approval.id``)."""
        return self.approval_id

    @classmethod
    def from_proto(cls, m: types_pb2.Approval) -> Approval:
        plan = plan_from_proto(m.plan) if m.HasField("plan") else None
        return cls(
            approval_id=m.approval_id,
            tenant_id=m.tenant_id,
            execution_id=m.execution_id,
            level=m.level,
            state=enum_text(types_pb2.ApprovalState, m.state, "APPROVAL_STATE_"),
            plan_hash=m.plan_hash,
            plan_snapshot_hash=m.plan_snapshot_hash,
            requested_by=m.requested_by,
            decided_by=m.decided_by or None,
            auth_method=m.auth_method or None,
            source_ip=m.source_ip or None,
            decided_at=_time(m, "decided_at"),
            comment=m.comment,
            created_at=_time(m, "created_at"),
            expires_at=_time(m, "expires_at"),
            runbook_url=m.runbook_url or None,
            step_id=m.step_id or None,
            target_refs=tuple(m.target_refs),
            actions=tuple(m.actions),
            plan=plan,
        )


class ApprovalClient(ChannelClient):
    """Client of ApprovalService on one channel, acting with one bearer token."""

    def _bind(self, channel: grpc.aio.Channel) -> None:
        self._stub = approval_service_pb2_grpc.ApprovalServiceStub(channel)

    async def get_approval(self, approval_id: str, *, tenant_id: str) -> Approval:
        request = approval_service_pb2.GetApprovalRequest(
            tenant_id=tenant_id, approval_id=approval_id
        )
        response = await self._call(self._stub.GetApproval, request)
        return Approval.from_proto(response.approval)

    async def list_pending_approvals(
        self, *, tenant_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Approval], str]:
        """One page of undecided requests, oldest first, and the next page's token ("" at end)."""
        request = approval_service_pb2.ListPendingApprovalsRequest(
            tenant_id=tenant_id, page_size=page_size, page_token=page_token
        )
        response = await self._call(self._stub.ListPendingApprovals, request)
        return [Approval.from_proto(m) for m in response.approvals], response.next_page_token

    async def approve(self, approval_id: str, *, tenant_id: str, comment: str = "") -> Approval:
        """Grant a request; the execution proceeds without being submitted again."""
        request = approval_service_pb2.ApproveRequest(
            tenant_id=tenant_id, approval_id=approval_id, comment=comment
        )
        response = await self._call(self._stub.Approve, request)
        return Approval.from_proto(response.approval)

    async def reject(self, approval_id: str, *, tenant_id: str, comment: str = "") -> Approval:
        """Refuse a request; the execution ends ``rejected``."""
        request = approval_service_pb2.RejectRequest(
            tenant_id=tenant_id, approval_id=approval_id, comment=comment
        )
        response = await self._call(self._stub.Reject, request)
        return Approval.from_proto(response.approval)

    async def approve_step(
        self, execution_id: str, step_id: str, *, tenant_id: str, comment: str = ""
    ) -> Approval:
        """Grant one step of a level-3 execution; it runs that step, then waits again."""
        request = approval_service_pb2.ApproveStepRequest(
            tenant_id=tenant_id, execution_id=execution_id, step_id=step_id, comment=comment
        )
        response = await self._call(self._stub.ApproveStep, request)
        return Approval.from_proto(response.approval)
