"""gRPC transport of ``ProgressService``: replay and follow execution events.

Servicers translate protobuf messages to and from domain values and call the service logic;
domain errors they let escape become gRPC statuses in the shared interceptor. RPCs whose logic
belongs to later work answer ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

import grpc.aio

from opsconductor.common.errors import UnimplementedError
from opsconductor.common.rpc.resources import DatabasePool
from opsconductor.execution.v1 import progress_service_pb2, progress_service_pb2_grpc

SERVICE_NAME: str = progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"].full_name

_Context = grpc.aio.ServicerContext[Any, Any]


class ProgressServicer(progress_service_pb2_grpc.ProgressServiceServicer):
    """``ProgressService`` over gRPC."""

    def __init__(self, db: DatabasePool) -> None:
        self._db = db

    async def StreamEvents(
        self, request: progress_service_pb2.StreamEventsRequest, context: _Context
    ) -> None:
        # Server-streaming: an async generator of responses once built.
        raise UnimplementedError("StreamEvents is not implemented yet", rpc="StreamEvents")

    async def ListEvents(
        self, request: progress_service_pb2.ListEventsRequest, context: _Context
    ) -> progress_service_pb2.ListEventsResponse:
        raise UnimplementedError("ListEvents is not implemented yet", rpc="ListEvents")


def add_progress_servicer(server: grpc.aio.Server, db: DatabasePool) -> str:
    """Register ``ProgressService`` on ``server``; returns its full name."""
    progress_service_pb2_grpc.add_ProgressServiceServicer_to_server(ProgressServicer(db), server)
    return SERVICE_NAME
