"""Typed async client for OpsConductor Execution.

Wraps the generated stubs: takes plans as dicts (the JSON form) or any model with a pydantic-style
``model_dump(mode="json")`` such as the servers' ``opsconductor.common.plan.Plan``, returns
the dataclasses of ``models``, and raises the domain exceptions of ``errors`` instead of raw
``grpc.aio.AioRpcError``. One client holds one channel and one bearer token;
``with_token`` makes a client for another principal on the same channel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import grpc
from google.protobuf import field_mask_pb2

from opsconductor.contract.plan_codec import plan_to_proto
from opsconductor.execution.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    execution_service_pb2,
    execution_service_pb2_grpc,
    progress_service_pb2,
    progress_service_pb2_grpc,
    types_pb2,
)

from .base import ChannelClient
from .errors import map_rpc_error
from .models import (
    AuditChainVerdict,
    DlqEntry,
    DlqRequeue,
    Execution,
    ExecutionEvent,
    FeatureFlags,
    FlagChange,
    Preview,
    QueueStats,
)

T = TypeVar("T")


_MODES = {
    None: types_pb2.EXECUTION_MODE_UNSPECIFIED,
    "immediate": types_pb2.EXECUTION_MODE_IMMEDIATE,
    "background": types_pb2.EXECUTION_MODE_BACKGROUND,
}


@dataclass(frozen=True)
class ExecutionContext:
    """Who asks and how: the tenant, plus optional overrides of the client's defaults."""

    tenant_id: str
    token: str | None = None
    requested_mode: str | None = None
    priority: int | None = None
    approval_id: str | None = None


@runtime_checkable
class PlanModel(Protocol):
    """A plan object that dumps to the plan's JSON form (``opsconductor.common.plan.Plan``).

    The client accepts it without importing the servers' library: only its JSON form travels.
    """

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


PlanLike = PlanModel | Mapping[str, Any]


def _plan_message(plan: PlanLike) -> types_pb2.Plan:
    return plan_to_proto(plan if isinstance(plan, Mapping) else plan.model_dump(mode="json"))


def _status_value(status: str) -> int:
    return int(types_pb2.ExecutionStatus.Value("EXECUTION_STATUS_" + status.upper()))


class ExecutionClient(ChannelClient):
    """Client of ExecutionService, AdminService and ProgressService on one channel."""

    def _bind(self, channel: grpc.aio.Channel) -> None:
        self._executions = execution_service_pb2_grpc.ExecutionServiceStub(channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        self._progress = progress_service_pb2_grpc.ProgressServiceStub(channel)

    # -- executions -------------------------------------------------------------------------

    async def submit(
        self,
        plan: PlanLike,
        *,
        tenant_id: str,
        requested_mode: str | None = None,
        priority: int | None = None,
        approval_id: str | None = None,
        token: str | None = None,
    ) -> Execution:
        """Submit a plan. Immediate plans return finished; others return queued or awaiting."""
        request = execution_service_pb2.SubmitExecutionRequest(
            tenant_id=tenant_id,
            plan=_plan_message(plan),
            requested_mode=_MODES[requested_mode],
            approval_id=approval_id or "",
        )
        if priority is not None:
            request.priority = priority
        response = await self._call(self._executions.SubmitExecution, request, token=token)
        return Execution.from_proto(response.execution)

    async def execute(self, plan: PlanLike, context: ExecutionContext) -> Execution:
        """``submit`` with the request details taken from ``context`` (the spec's shape)."""
        return await self.submit(
            plan,
            tenant_id=context.tenant_id,
            requested_mode=context.requested_mode,
            priority=context.priority,
            approval_id=context.approval_id,
            token=context.token,
        )

    async def get(self, execution_id: str, *, tenant_id: str) -> Execution:
        request = execution_service_pb2.GetExecutionRequest(
            tenant_id=tenant_id, execution_id=execution_id
        )
        response = await self._call(self._executions.GetExecution, request)
        return Execution.from_proto(response.execution)

    async def list_executions(
        self,
        *,
        tenant_id: str,
        statuses: Iterable[str] = (),
        execution_mode: str | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[Execution], str]:
        """One page of executions, newest first, and the token of the next page ("" at the end)."""
        request = execution_service_pb2.ListExecutionsRequest(
            tenant_id=tenant_id,
            statuses=[_status_value(s) for s in statuses],  # type: ignore[misc]
            execution_mode=_MODES[execution_mode],
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(self._executions.ListExecutions, request)
        return [Execution.from_proto(m) for m in response.executions], response.next_page_token

    async def iter_executions(
        self,
        *,
        tenant_id: str,
        statuses: Iterable[str] = (),
        execution_mode: str | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[Execution]:
        """Every matching execution, newest first, fetched page by page."""
        wanted = tuple(statuses)
        token = ""
        while True:
            page, token = await self.list_executions(
                tenant_id=tenant_id,
                statuses=wanted,
                execution_mode=execution_mode,
                page_size=page_size,
                page_token=token,
            )
            for execution in page:
                yield execution
            if not token:
                return

    async def cancel(self, execution_id: str, *, tenant_id: str, reason: str = "") -> Execution:
        """Request cancellation (idempotent); returns the execution as it is now."""
        request = execution_service_pb2.CancelExecutionRequest(
            tenant_id=tenant_id, execution_id=execution_id, reason=reason
        )
        response = await self._call(self._executions.CancelExecution, request)
        return Execution.from_proto(response.execution)

    async def preview(
        self,
        plan: PlanLike,
        *,
        tenant_id: str,
        requested_mode: str | None = None,
    ) -> Preview:
        request = execution_service_pb2.PreviewPlanRequest(
            tenant_id=tenant_id, plan=_plan_message(plan), requested_mode=_MODES[requested_mode]
        )
        return Preview.from_proto(await self._call(self._executions.PreviewPlan, request))

    # -- events -----------------------------------------------------------------------------

    async def list_events(
        self,
        *,
        tenant_id: str,
        execution_id: str = "",
        types: Sequence[str] = (),
        actor_id: str = "",
        after_seq: int = 0,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[ExecutionEvent], str]:
        """Events of one execution, or audit events of a tenant (e.g. ``rbac_violation``)."""
        request = progress_service_pb2.ListEventsRequest(
            tenant_id=tenant_id,
            execution_id=execution_id,
            types=list(types),
            actor_id=actor_id,
            after_seq=after_seq,
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(self._progress.ListEvents, request)
        return [ExecutionEvent.from_proto(m) for m in response.events], response.next_page_token

    async def stream_events(
        self, execution_id: str, *, tenant_id: str, after_seq: int = 0
    ) -> AsyncIterator[ExecutionEvent]:
        """Replay events after ``after_seq`` and follow live until ``execution_completed``."""
        request = progress_service_pb2.StreamEventsRequest(
            tenant_id=tenant_id, execution_id=execution_id, after_seq=after_seq
        )
        call = self._progress.StreamEvents(request, metadata=self._metadata(), timeout=None)
        try:
            async for response in call:
                yield ExecutionEvent.from_proto(response.event)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc) from exc

    # -- admin ------------------------------------------------------------------------------

    async def get_feature_flags(self) -> FeatureFlags:
        request = admin_service_pb2.GetFeatureFlagsRequest()
        response = await self._call(self._admin.GetFeatureFlags, request)
        return FeatureFlags.from_proto(response.flags)

    async def update_feature_flags(self, **changes: Any) -> FeatureFlags:
        """Set the named flags (``stage_e_enabled=True``, ``enabled_tenants=[...]``, ...)."""
        request = admin_service_pb2.UpdateFeatureFlagsRequest(
            flags=admin_service_pb2.FeatureFlags(**changes),
            update_mask=field_mask_pb2.FieldMask(paths=sorted(changes)),
        )
        response = await self._call(self._admin.UpdateFeatureFlags, request)
        return FeatureFlags.from_proto(response.flags)

    async def list_flag_changes(
        self, *, flag: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[FlagChange], str]:
        """One page of feature-flag changes, newest first, and the next page's token."""
        request = admin_service_pb2.ListFlagChangesRequest(
            flag=flag, page_size=page_size, page_token=page_token
        )
        response = await self._call(self._admin.ListFlagChanges, request)
        return [FlagChange.from_proto(m) for m in response.changes], response.next_page_token

    async def list_dlq_entries(
        self,
        *,
        tenant_id: str = "",
        error_class: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[DlqEntry], str]:
        """One page of open dead-letter entries, newest first, and the next page's token.

        A system admin may leave ``tenant_id`` empty (every tenant); a tenant admin must name
        their own tenant.
        """
        request = admin_service_pb2.ListDlqEntriesRequest(
            tenant_id=tenant_id, error_class=error_class, page_size=page_size, page_token=page_token
        )
        response = await self._call(self._admin.ListDlqEntries, request)
        return [DlqEntry.from_proto(m) for m in response.entries], response.next_page_token

    async def requeue_dlq_entry(self, dlq_id: str) -> DlqRequeue:
        """Re-run a dead-lettered execution as a new execution with a fresh attempt budget."""
        request = admin_service_pb2.RequeueDlqEntryRequest(dlq_id=dlq_id)
        return DlqRequeue.from_proto(await self._call(self._admin.RequeueDlqEntry, request))

    async def get_queue_stats(self) -> QueueStats:
        request = admin_service_pb2.GetQueueStatsRequest()
        return QueueStats.from_proto(await self._call(self._admin.GetQueueStats, request))

    async def verify_audit_chain(self, execution_id: str, *, tenant_id: str) -> AuditChainVerdict:
        """Recompute an execution's tamper-evident event chain; names the first broken link."""
        request = admin_service_pb2.VerifyAuditChainRequest(
            tenant_id=tenant_id, execution_id=execution_id
        )
        return AuditChainVerdict.from_proto(await self._call(self._admin.VerifyAuditChain, request))

    async def set_drain(self, drain: bool) -> bool:
        """Stop (True) or resume (False) dispatching queued jobs; returns whether paused."""
        request = admin_service_pb2.SetDrainRequest(drain=drain)
        response = await self._call(self._admin.SetDrain, request)
        return bool(response.dispatch_paused)
