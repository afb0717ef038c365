"""gRPC transport of ``WorkerService``: the api hands immediate executions over here."""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc
from opsconductor.lifecycle.storage.execution_reads import as_execution_id
from opsconductor.rpc.auth import authenticate
from opsconductor.rpc.execution_codec import execution_to_proto
from opsconductor.worker.app import WorkerApp

SERVICE_NAME: str = worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class WorkerServicer(worker_service_pb2_grpc.WorkerServiceServicer):
    """``WorkerService`` over gRPC."""

    def __init__(self, app: WorkerApp) -> None:
        self._app = app

    async def RunImmediate(
        self, request: worker_service_pb2.RunImmediateRequest, context: _Context
    ) -> worker_service_pb2.RunImmediateResponse:
        caller, _ = await authenticate(context, self._app.verifier)
        record = await self._app.immediate.run(
            caller, tenant_id=request.tenant_id, execution_id=as_execution_id(request.execution_id)
        )
        return worker_service_pb2.RunImmediateResponse(execution=execution_to_proto(record))


def add_worker_servicer(server: grpc.aio.Server, app: WorkerApp) -> str:
    """Register ``WorkerService`` on ``server``; returns its full name."""
    worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(app), server)
    return SERVICE_NAME
