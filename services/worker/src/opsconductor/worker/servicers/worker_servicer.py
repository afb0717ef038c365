"""gRPC transport of ``WorkerService``: internal RPC the api uses to run immediate executions.

Servicers translate protobuf messages to and from domain values and call the service logic;
domain errors they let escape become gRPC statuses in the shared interceptor. RPCs whose logic
belongs to later work answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.common.errors import UnimplementedError
from opsconductor.common.rpc.resources import DatabasePool
from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc

SERVICE_NAME: str = worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    """``WorkerService`` over gRPC."""

    def __init__(self, db: DatabasePool) -> None:
        self._db = db

    async def RunImmediate(
        self, request: worker_service_pb2.RunImmediateRequest, context: _Context
    ) -> worker_service_pb2.RunImmediateResponse:
        raise UnimplementedError("RunImmediate is not implemented yet", rpc="RunImmediate")


def add_worker_servicer(server: grpc.aio.Server, db: DatabasePool) -> str:
    """Register ``WorkerService`` on ``server``; returns its full name."""
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(db), server)
    return SERVICE_NAME
