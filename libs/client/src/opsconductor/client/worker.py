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

from opsconductor.contract.errors import WorkerUnavailableError
from opsconductor.contract.metadata import REQUEST_ID_METADATA_KEY, current_request_id
from opsconductor.execution.v1 import types_pb2, worker_service_pb2, worker_service_pb2_grpc

from .errors import RpcError, map_rpc_error
from .tls import ClientTls, RotatingChannel

_CHANNEL_OPTIONS = [("grpc.lb_policy_name", "round_robin")]
# RESOURCE_EXHAUSTED: the worker's concurrent-RPC limit refused the call before it started.
_UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


class WorkerClient:
    """Calls ``WorkerService.RunImmediate`` on ``target`` over one reused channel.

    With ``tls`` the channel is TLS (mTLS when ``tls`` has a client certificate) and is replaced
    when the certificate files rotate (checked at most every ``tls_reload_check_s``); without,
    plaintext (``make run``). Build it inside the running event loop (gRPC channels bind to the
    loop that creates them).
    """

    def __init__(
        self, target: str, *, tls: ClientTls | None = None, tls_reload_check_s: float = 10.0
    ) -> None:
        # A target listing several workers (``ipv4:a:1,b:2``, or a DNS name with several
        # addresses) spreads calls over them and skips a dead one.
        self._channel = RotatingChannel(
            target, tls, check_interval_s=tls_reload_check_s, options=_CHANNEL_OPTIONS
        )
        self._bound: grpc.aio.Channel | None = None
        self._stub: worker_service_pb2_grpc.WorkerServiceStub | None = None

    def _current_stub(self) -> worker_service_pb2_grpc.WorkerServiceStub:
        channel = self._channel.current()
        if self._stub is None or channel is not self._bound:
            self._bound, self._stub = channel, worker_service_pb2_grpc.WorkerServiceStub(channel)
        return self._stub

    async def close(self) -> None:
        await self._channel.close()

    async def run_immediate(
        self, *, tenant_id: str, execution_id: UUID, token: str, timeout_s: float
    ) -> types_pb2.Execution:
        """Run the execution to its end on a worker (raises what the worker raised); returns
        the finished execution as the worker sent it."""
        request = worker_service_pb2.RunImmediateRequest(
            tenant_id=tenant_id, execution_id=str(execution_id)
        )
        metadata = [("authorization", f"Bearer {token}")]
        request_id = current_request_id()
        if request_id:
            metadata.append((REQUEST_ID_METADATA_KEY, request_id))
        try:
            response: worker_service_pb2.RunImmediateResponse = (
                await self._current_stub().RunImmediate(
                    request, metadata=metadata, timeout=timeout_s
                )
            )
        except grpc.aio.AioRpcError as exc:
            error = map_rpc_error(exc)
            if isinstance(error, RpcError) and exc.code() in _UNREACHABLE:
                raise WorkerUnavailableError(
                    "no worker could be reached; the execution was not started"
                ) from exc
            raise error from exc
        return response.execution
