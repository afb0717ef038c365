"""gRPC transport of ``ExecutionService``: protobuf in, use case call, protobuf out.

No business logic here: authenticate, translate, call ``ApiApp``'s use cases. Domain errors
escape to the shared interceptor, which turns them into statuses with an ``ErrorInfo`` reason.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.actions.planning import ExecutionMode
from opsconductor.api.app import ApiApp
from opsconductor.api.logic.submission import SubmitRequest
from opsconductor.common.errors import InvalidArgumentError, PlanValidationError
from opsconductor.common.fsm import ExecutionStatus
from opsconductor.execution.v1 import execution_service_pb2, execution_service_pb2_grpc, types_pb2
from opsconductor.rpc.auth import authenticate
from opsconductor.rpc.execution_codec import execution_to_proto
from opsconductor.rpc.metadata import current_request_id
from opsconductor.rpc.plan_codec import plan_from_proto

SERVICE_NAME: str = execution_service_pb2.DESCRIPTOR.services_by_name["ExecutionService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]

_MODES: dict[int, ExecutionMode | None] = {
    types_pb2.EXECUTION_MODE_UNSPECIFIED: None,
    types_pb2.EXECUTION_MODE_IMMEDIATE: ExecutionMode.IMMEDIATE,
    types_pb2.EXECUTION_MODE_BACKGROUND: ExecutionMode.BACKGROUND,
}
_ACTION_CLASSES = {
    "read": types_pb2.ACTION_CLASS_READ,
    "modify": types_pb2.ACTION_CLASS_MODIFY,
    "deploy": types_pb2.ACTION_CLASS_DEPLOY,
}


def _mode(value: int, field: str) -> ExecutionMode | None:
    if value not in _MODES:
        raise PlanValidationError.for_field(field, f"unknown execution mode {value}")
    return _MODES[value]


def _statuses(values: Any) -> list[ExecutionStatus]:
    statuses = []
    for value in values:
        try:
            name = types_pb2.ExecutionStatus.Name(value)
        except ValueError:
            raise PlanValidationError.for_field("statuses", f"unknown status {value}") from None
        if value == types_pb2.EXECUTION_STATUS_UNSPECIFIED:
            raise PlanValidationError.for_field("statuses", "EXECUTION_STATUS_UNSPECIFIED")
        statuses.append(ExecutionStatus(name.removeprefix("EXECUTION_STATUS_").lower()))
    return statuses


class ExecutionServicer(execution_service_pb2_grpc.ExecutionServiceServicer):
    """``ExecutionService`` over gRPC."""

    def __init__(self, app: ApiApp) -> None:
        self._app = app

    async def SubmitExecution(
        self, request: execution_service_pb2.SubmitExecutionRequest, context: _Context
    ) -> execution_service_pb2.SubmitExecutionResponse:
        principal, token = await authenticate(context, self._app.verifier)
        priority = request.priority if request.HasField("priority") else None
        if priority is not None and not 0 <= priority <= 100:
            raise PlanValidationError.for_field(
                "priority", "must be 0 (urgent) to 100 (bulk); 50 is normal"
            )
        result = await self._app.submissions.submit(
            principal,
            token,
            SubmitRequest(
                tenant_id=request.tenant_id,
                plan=plan_from_proto(request.plan),
                requested_mode=_mode(request.requested_mode, "requested_mode"),
                priority=priority,
                approval_id=request.approval_id or None,
                request_id=current_request_id(),
            ),
        )
        if isinstance(result.worker_answer, types_pb2.Execution):
            # The worker's answer as is: the finished execution, no second read.
            answer = types_pb2.Execution()
            answer.CopyFrom(result.worker_answer)
            answer.deduplicated = result.deduplicated
            return execution_service_pb2.SubmitExecutionResponse(execution=answer)
        return execution_service_pb2.SubmitExecutionResponse(
            execution=execution_to_proto(
                result.execution,
                deduplicated=result.deduplicated,
                job_id=str(result.job_id) if result.job_id else None,
            )
        )

    async def GetExecution(
        self, request: execution_service_pb2.GetExecutionRequest, context: _Context
    ) -> execution_service_pb2.GetExecutionResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        record = await self._app.queries.get(principal, request.tenant_id, request.execution_id)
        return execution_service_pb2.GetExecutionResponse(execution=execution_to_proto(record))

    async def ListExecutions(
        self, request: execution_service_pb2.ListExecutionsRequest, context: _Context
    ) -> execution_service_pb2.ListExecutionsResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        if request.page_size < 0:
            raise InvalidArgumentError("page_size must not be negative", field="page_size")
        mode = _mode(request.execution_mode, "execution_mode")
        records, token = await self._app.queries.list(
            principal,
            request.tenant_id,
            statuses=_statuses(request.statuses),
            mode=None if mode is None else str(mode),
            page_size=request.page_size,
            page_token=request.page_token or None,
        )
        return execution_service_pb2.ListExecutionsResponse(
            executions=[execution_to_proto(r, include_plan=False) for r in records],
            next_page_token=token or "",
        )

    async def CancelExecution(
        self, request: execution_service_pb2.CancelExecutionRequest, context: _Context
    ) -> execution_service_pb2.CancelExecutionResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        record = await self._app.queries.cancel(
            principal, request.tenant_id, request.execution_id, request.reason
        )
        return execution_service_pb2.CancelExecutionResponse(execution=execution_to_proto(record))

    async def PreviewPlan(
        self, request: execution_service_pb2.PreviewPlanRequest, context: _Context
    ) -> execution_service_pb2.PreviewPlanResponse:
        principal, _ = await authenticate(context, self._app.verifier)
        decision = await self._app.submissions.preview(
            principal,
            request.tenant_id,
            plan_from_proto(request.plan),
            _mode(request.requested_mode, "requested_mode"),
        )
        response = execution_service_pb2.PreviewPlanResponse(
            approval_level=decision.approval_level,
            timeout_policy_id=decision.policy.id,
            plan_hash=decision.plan_hash,
            idempotency_key=decision.idempotency_key,
            estimated_duration_ms=decision.estimate.wall_ms,
            can_parallelize=decision.estimate.parallel,
            execution_timeout_ms=decision.policy.execution_timeout_ms,
            step_timeout_ms=decision.policy.step_timeout_ms,
        )
        response.execution_mode = (
            types_pb2.EXECUTION_MODE_IMMEDIATE
            if decision.mode is ExecutionMode.IMMEDIATE
            else types_pb2.EXECUTION_MODE_BACKGROUND
        )
        response.action_class = _ACTION_CLASSES[str(decision.plan.action_class)]
        return response


def add_execution_servicer(server: grpc.aio.Server, app: ApiApp) -> str:
    """Register ``ExecutionService`` on ``server``; returns its full name."""
    execution_service_pb2_grpc.add_ExecutionServiceServicer_to_server(
        ExecutionServicer(app), server
    )
    return SERVICE_NAME
