"""gRPC transport of ``ApprovalService``: approval requests and decisions.

Servicers translate protobuf messages to and from domain values and call the service logic;
domain errors they let escape become gRPC statuses in the shared interceptor. RPCs whose logic
belongs to later work answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.common.errors import UnimplementedError
from opsconductor.common.rpc.resources import DatabasePool
from opsconductor.execution.v1 import approval_service_pb2, approval_service_pb2_grpc

SERVICE_NAME: str = approval_service_pb2.DESCRIPTOR.services_by_name["ApprovalService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class ApprovalServicer(approval_service_pb2_grpc.ApprovalServiceServicer):
    """``ApprovalService`` over gRPC."""

    def __init__(self, db: DatabasePool) -> None:
        self._db = db

    async def GetApproval(
        self, request: approval_service_pb2.GetApprovalRequest, context: _Context
    ) -> approval_service_pb2.GetApprovalResponse:
        raise UnimplementedError("GetApproval is not implemented yet", rpc="GetApproval")

    async def ListPendingApprovals(
        self, request: approval_service_pb2.ListPendingApprovalsRequest, context: _Context
    ) -> approval_service_pb2.ListPendingApprovalsResponse:
        raise UnimplementedError(
            "ListPendingApprovals is not implemented yet", rpc="ListPendingApprovals"
        )

    async def Approve(
        self, request: approval_service_pb2.ApproveRequest, context: _Context
    ) -> approval_service_pb2.ApproveResponse:
        raise UnimplementedError("Approve is not implemented yet", rpc="Approve")

    async def Reject(
        self, request: approval_service_pb2.RejectRequest, context: _Context
    ) -> approval_service_pb2.RejectResponse:
        raise UnimplementedError("Reject is not implemented yet", rpc="Reject")

    async def ApproveStep(
        self, request: approval_service_pb2.ApproveStepRequest, context: _Context
    ) -> approval_service_pb2.ApproveStepResponse:
        raise UnimplementedError("ApproveStep is not implemented yet", rpc="ApproveStep")


def add_approval_servicer(server: grpc.aio.Server, db: DatabasePool) -> str:
    """Register ``ApprovalService`` on ``server``; returns its full name."""
    approval_service_pb2_grpc.add_ApprovalServiceServicer_to_server(ApprovalServicer(db), server)
    return SERVICE_NAME
