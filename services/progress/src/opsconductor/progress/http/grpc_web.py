"""grpc-web for the browser in local runs, served by the progress process (connectrpc's ASGI
runtime; Envoy's ``grpc_web`` filter plays this part in Kubernetes).

Three services answer under their gRPC paths (``/opsconductor.execution.v1.<Service>/<Method>``):

* ``ProgressService`` calls this process's own :class:`~opsconductor.progress.logic.access.
  EventAccess`, the logic the gRPC servicer uses (not a fork of it);
* ``ExecutionService`` and ``ApprovalService`` are bridged to the api and approvals services
  over gRPC, as Envoy would: the caller's ``Authorization`` header travels on, the caller's
  address goes in ``X-Forwarded-For``, and those services authorize and audit as for any
  caller. A refusal comes back with their status code and message ("you cannot approve your
  own request"), the ``ErrorInfo`` reason in the details.

connectrpc also speaks the Connect protocol and plain gRPC on the same paths; the UI uses
grpc-web (``@connectrpc/connect-web``'s ``createGrpcWebTransport``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import grpc.aio
import structlog
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import descriptor, message_factory
from google.rpc import error_details_pb2, status_pb2
from protobuf.wkt import Any as WireAny
from starlette.types import ASGIApp, Receive, Scope, Send

from opsconductor.client.tls import ClientTls, open_channel
from opsconductor.common.auth import Principal, bearer_from_metadata
from opsconductor.execution.v1 import (
    approval_service_pb2,
    execution_service_pb2,
    progress_service_pb2,
)
from opsconductor.lifecycle.storage.event_reads import EventRecord
from opsconductor.progress.app import ProgressApp
from opsconductor.progress.logic.access import EventQuery
from opsconductor.progress.servicers.event_codec import event_to_proto
from opsconductor.rpc.status import describe_exception, is_expected

log = structlog.get_logger(__name__)

_PREFIX = "/opsconductor.execution.v1."
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
_CODES = {code.name: code for code in Code}
_CODES["CANCELLED"] = Code.CANCELED
_BRIDGED_METADATA = ("authorization", "x-request-id")


def _connect_code(code: grpc.StatusCode) -> Code:
    return _CODES.get(code.name, Code.UNKNOWN)


def _detail(type_url: str, value: bytes) -> ErrorDetail:
    return ErrorDetail(WireAny(type_url=type_url, value=value))


def _connect_error(exc: BaseException, method: str) -> ConnectError:
    """A domain error of our own logic as the browser sees it (same as on gRPC)."""
    described = describe_exception(exc, request_id="")
    if not is_expected(exc):
        log.error("grpc_web_call_failed", method=method, exc_info=exc)
    info = error_details_pb2.ErrorInfo(
        reason=described.reason, domain="execution.opsconductor.io", metadata=described.metadata
    )
    return ConnectError(
        _connect_code(described.code),
        described.message,
        details=[_detail(_ERROR_INFO_TYPE, info.SerializeToString())],
    )


def _bridged_error(error: grpc.aio.AioRpcError) -> ConnectError:
    """A status of the api or approvals service, passed on with its rich details."""
    details: list[ErrorDetail] = []
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            details = [_detail(d.type_url, d.value) for d in status.details]
    return ConnectError(_connect_code(error.code()), error.details() or "", details=details)


class _ServiceApplication(ConnectASGIApplication[object]):
    """One service's endpoints over connectrpc, with google.protobuf messages."""

    def __init__(self, service_name: str, endpoints: Mapping[str, Any]) -> None:
        self._path = f"/{service_name}"
        super().__init__(
            service=object(),
            endpoints=lambda _svc: endpoints,
            codecs=google_protobuf_codecs(),
        )

    @property
    def path(self) -> str:
        return self._path


def _method_info(method: descriptor.MethodDescriptor) -> MethodInfo[Any, Any]:
    return MethodInfo(
        name=method.name,
        service_name=method.containing_service.full_name,
        input=message_factory.GetMessageClass(method.input_type),
        output=message_factory.GetMessageClass(method.output_type),
        idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=StreamType.SERVER_STREAM if method.server_streaming else StreamType.UNARY,
    )


class _Forwarder:
    """Unary calls of one service relayed to its gRPC server."""

    def __init__(self, channel: Callable[[], grpc.aio.Channel]) -> None:
        self._channel = channel

    def endpoints(self, service: descriptor.ServiceDescriptor) -> dict[str, Endpoint[Any, Any]]:
        endpoints: dict[str, Endpoint[Any, Any]] = {}
        for method in service.methods:
            if method.client_streaming or method.server_streaming:
                continue  # none of the bridged services has one
            endpoints[f"/{service.full_name}/{method.name}"] = Endpoint.unary(
                method=_method_info(method), function=self._relay(method)
            )
        return endpoints

    def _relay(
        self, method: descriptor.MethodDescriptor
    ) -> Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        output = message_factory.GetMessageClass(method.output_type)

        async def relay(request: Any, ctx: RequestContext[Any, Any]) -> Any:
            call = self._channel().unary_unary(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=output.FromString,
            )
            metadata = [
                (name, value)
                for name in _BRIDGED_METADATA
                if (value := ctx.request_headers.get(name))
            ]
            client = ctx.client_address
            if client:
                metadata.append(("x-forwarded-for", client.rsplit(":", 1)[0]))
            try:
                return await call(request, metadata=metadata, timeout=60)
            except grpc.aio.AioRpcError as exc:
                raise _bridged_error(exc) from None

        return relay


class _ProgressEndpoints:
    """``ProgressService`` over grpc-web: the same EventAccess calls as the gRPC servicer."""

    def __init__(self, app: ProgressApp) -> None:
        self._app = app

    async def _principal(self, ctx: RequestContext[Any, Any]) -> Principal:
        token = bearer_from_metadata(
            [("authorization", ctx.request_headers.get("authorization", ""))]
        )
        return await self._app.verifier.verify_async(token)

    async def stream_events(
        self, request: progress_service_pb2.StreamEventsRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[progress_service_pb2.StreamEventsResponse]:
        try:
            subscription = await self._app.access.subscribe(
                await self._principal(ctx),
                request.tenant_id,
                request.execution_id,
                after_seq=request.after_seq,
                resource="grpc-web/StreamEvents",
            )
        except Exception as exc:  # noqa: BLE001 - the transport boundary: every error is answered
            raise _connect_error(exc, "StreamEvents") from None
        try:
            while True:
                try:
                    event: EventRecord | None = await subscription.next()
                except Exception as exc:  # noqa: BLE001 - lagged, storage: answered as status
                    raise _connect_error(exc, "StreamEvents") from None
                if event is None:
                    return
                yield progress_service_pb2.StreamEventsResponse(event=event_to_proto(event))
        finally:
            subscription.release()

    async def list_events(
        self, request: progress_service_pb2.ListEventsRequest, ctx: RequestContext[Any, Any]
    ) -> progress_service_pb2.ListEventsResponse:
        try:
            events, token = await self._app.access.list(
                await self._principal(ctx),
                request.tenant_id,
                EventQuery(
                    execution_id=request.execution_id,
                    types=tuple(request.types),
                    actor_id=request.actor_id,
                    after_seq=request.after_seq,
                    page_size=request.page_size,
                    page_token=request.page_token,
                ),
                resource="grpc-web/ListEvents",
            )
        except Exception as exc:  # noqa: BLE001 - the transport boundary: every error is answered
            raise _connect_error(exc, "ListEvents") from None
        return progress_service_pb2.ListEventsResponse(
            events=[event_to_proto(e) for e in events], next_page_token=token or ""
        )

    def endpoints(self) -> dict[str, Endpoint[Any, Any]]:
        service = progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"]
        methods = service.methods_by_name
        return {
            f"/{service.full_name}/StreamEvents": Endpoint.server_stream(
                method=_method_info(methods["StreamEvents"]), function=self.stream_events
            ),
            f"/{service.full_name}/ListEvents": Endpoint.unary(
                method=_method_info(methods["ListEvents"]), function=self.list_events
            ),
        }


class GrpcWebGateway:
    """ASGI: requests under ``/opsconductor.execution.v1.`` go to grpc-web, the rest to ``inner``.

    The gRPC channels to the api and approvals services are opened on first use (they bind to
    the running loop) and closed by :meth:`close`.
    """

    def __init__(self, app: ProgressApp, inner: ASGIApp) -> None:
        self._inner = inner
        self._settings = app.settings
        self._channels: dict[str, grpc.aio.Channel] = {}
        services = {
            "ExecutionService": (execution_service_pb2, self._settings.api_target),
            "ApprovalService": (approval_service_pb2, self._settings.approvals_target),
        }
        self._apps: dict[str, ASGIApp] = {}
        for name, (module, target) in services.items():
            service = module.DESCRIPTOR.services_by_name[name]
            forwarder = _Forwarder(lambda target=target: self._channel(target))  # type: ignore[misc]
            self._apps[f"/{service.full_name}/"] = _ServiceApplication(
                service.full_name, forwarder.endpoints(service)
            )
        progress = progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"]
        self._apps[f"/{progress.full_name}/"] = _ServiceApplication(
            progress.full_name, _ProgressEndpoints(app).endpoints()
        )

    def _channel(self, target: str) -> grpc.aio.Channel:
        channel = self._channels.get(target)
        if channel is None:
            tls = ClientTls.from_settings(self._settings)
            channel = self._channels[target] = open_channel(target, tls)
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(_PREFIX):
            for prefix, service_app in self._apps.items():
                if path.startswith(prefix):
                    await service_app(scope, receive, send)
                    return
        await self._inner(scope, receive, send)
