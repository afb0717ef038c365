"""Internal client of ``WorkerService`` for the services that hand executions to a worker.

The api (immediate submissions) and the approvals service (approved immediate executions) both
forward their *caller's* token: the worker re-authorizes it against Postgres, so no service
credential can start an execution on its own. Failures come back as the worker's domain
errors; a worker that cannot be reached at all is ``WorkerUnavailableError`` (the execution was
not started).
"""

from __future__ import annotations

from uuid import UUID

import grpc

from opsconductor.common.errors import WorkerUnavailableError
from opsconductor.common.rpc.metadata import REQUEST_ID_METADATA_KEY, current_request_id
from opsconductor.execution.v1 import worker_service_pb2, worker_service_pb2_grpc

from .errors import RpcError, map_rpc_error

_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class WorkerClient:
    """Calls ``WorkerService.RunImmediate`` on ``target`` over one reused channel.

    Build it inside the running event loop (gRPC channels bind to the loop that creates them).
    """

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = worker_service_pb2_grpc.WorkerServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def run_immediate(
        self, *, tenant_id: str, execution_id: UUID, token: str, timeout_s: float
    ) -> None:
        """Run the execution to its end on a worker (raises what the worker raised)."""
        request = worker_service_pb2.RunImmediateRequest(
            tenant_id=tenant_id, execution_id=str(execution_id)
        )
        metadata = [("authorization", f"Bearer {token}")]
        request_id = current_request_id()
        if request_id:
            metadata.append((REQUEST_ID_METADATA_KEY, request_id))
        try:
            await self._stub.RunImmediate(request, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            error = map_rpc_error(exc)
            if isinstance(error, RpcError) and exc.code() in _UNREACHABLE:
                raise WorkerUnavailableError(
                    "no worker could be reached; the execution was not started"
                ) from exc
            raise error from exc
