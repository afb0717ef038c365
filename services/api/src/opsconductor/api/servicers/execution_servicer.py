"""gRPC transport of ``ExecutionService``: submit, inspect, list, cancel and preview plans.

Servicers translate protobuf messages to and from domain values and call the service logic;
domain errors they let escape become gRPC statuses in the shared interceptor. RPCs whose logic
belongs to later work answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.common.errors import UnimplementedError
from opsconductor.common.rpc.resources import DatabasePool
from opsconductor.execution.v1 import execution_service_pb2, execution_service_pb2_grpc

SERVICE_NAME: str = execution_service_pb2.DESCRIPTOR.services_by_name["ExecutionService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class ExecutionServicer(execution_service_pb2_grpc.ExecutionServiceServicer):
    """``ExecutionService`` over gRPC."""

    def __init__(self, db: DatabasePool) -> None:
        self._db = db

    async def SubmitExecution(
        self, request: execution_service_pb2.SubmitExecutionRequest, context: _Context
    ) -> execution_service_pb2.SubmitExecutionResponse:
        raise UnimplementedError("SubmitExecution is not implemented yet", rpc="SubmitExecution")

    async def GetExecution(
        self, request: execution_service_pb2.GetExecutionRequest, context: _Context
    ) -> execution_service_pb2.GetExecutionResponse:
        raise UnimplementedError("GetExecution is not implemented yet", rpc="GetExecution")

    async def ListExecutions(
        self, request: execution_service_pb2.ListExecutionsRequest, context: _Context
    ) -> execution_service_pb2.ListExecutionsResponse:
        raise UnimplementedError("ListExecutions is not implemented yet", rpc="ListExecutions")

    async def CancelExecution(
        self, request: execution_service_pb2.CancelExecutionRequest, context: _Context
    ) -> execution_service_pb2.CancelExecutionResponse:
        raise UnimplementedError("CancelExecution is not implemented yet", rpc="CancelExecution")

    async def PreviewPlan(
        self, request: execution_service_pb2.PreviewPlanRequest, context: _Context
    ) -> execution_service_pb2.PreviewPlanResponse:
        raise UnimplementedError("PreviewPlan is not implemented yet", rpc="PreviewPlan")


def add_execution_servicer(server: grpc.aio.Server, db: DatabasePool) -> str:
    """Register ``ExecutionService`` on ``server``; returns its full name."""
    execution_service_pb2_grpc.add_ExecutionServiceServicer_to_server(ExecutionServicer(db), server)
    return SERVICE_NAME
