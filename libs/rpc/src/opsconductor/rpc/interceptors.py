"""The server interceptor every service runs: request id, error mapping, access log, metrics.

For each RPC it

* refuses a request that cannot be decoded, or holds NUL characters in a text field, as
  ``INVALID_ARGUMENT`` (:mod:`.decoding`) instead of grpcio's ``UNKNOWN`` naming a class;
* takes the request id from the ``x-request-id`` metadata (or makes one), puts it in a
  ``ContextVar`` and binds it to structlog's context, so every log line of the RPC carries it;
* turns a domain error escaping the servicer into its gRPC status (:mod:`.status`), so
  servicers just ``raise``; anything unexpected becomes ``INTERNAL`` and is logged with its
  traceback (the log sink masks it);
* emits one canonical ``rpc_completed`` line (method, code, duration, request id, peer) and the
  ``opsc_grpc_requests_total`` / ``opsc_grpc_request_duration_seconds`` metrics.

It wraps all four handler kinds; a response-streaming handler is an async generator (and so is
its wrapper, which an outer interceptor such as OpenTelemetry's iterates).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, cast

import grpc
import grpc.aio
import structlog
from prometheus_client import Counter, Histogram

from opsconductor.common.errors import InvalidArgumentError
from opsconductor.rpc.decoding import (
    UndecodableRequest,
    check_text_fields,
    tolerant_deserializer,
)
from opsconductor.rpc.metadata import (
    REQUEST_ID_METADATA_KEY,
    current_request_id,
    request_id_from_metadata,
    reset_request_id,
    set_request_id,
)
from opsconductor.rpc.status import abort_with_status, is_expected, status_for_exception

log = structlog.get_logger(__name__)

GRPC_REQUESTS = Counter(
    "opsc_grpc_requests",
    "gRPC requests served, by service, method and status code.",
    ["service", "method", "code"],
)
GRPC_REQUEST_DURATION = Histogram(
    "opsc_grpc_request_duration_seconds",
    "Time to serve a gRPC request, from the handler's start to its status.",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)

# Probes poll these every few seconds: their access lines go to DEBUG to keep INFO readable.
_QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

_Behavior = Callable[..., Any]
_Context = grpc.aio.ServicerContext[Any, Any]


class _RpcState:
    """What one RPC's wrapper learned, for the access log and metrics."""

    __slots__ = ("code", "peer", "request_id")

    def __init__(self, request_id: str, peer: str) -> None:
        self.request_id = request_id
        self.peer = peer
        self.code: grpc.StatusCode | None = None


class ServerObservabilityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Request id, domain-error mapping, canonical access log and metrics for every RPC."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # None for a method no servicer registered (grpc-stubs says otherwise).
        handler = cast(
            "grpc.RpcMethodHandler[Any, Any] | None", await continuation(handler_call_details)
        )
        if handler is None:
            # grpc answers UNIMPLEMENTED itself.
            return cast("grpc.RpcMethodHandler[Any, Any]", None)
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        return _wrap_handler(handler, method, metadata)


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or full_method


def _wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], full_method: str, metadata: Any
) -> grpc.RpcMethodHandler[Any, Any]:
    request_stream = handler.request_streaming
    response_stream = handler.response_streaming
    behavior: _Behavior | None
    if request_stream and response_stream:
        behavior = handler.stream_stream
        factory: Callable[..., grpc.RpcMethodHandler[Any, Any]] = (
            grpc.stream_stream_rpc_method_handler
        )
    elif request_stream:
        behavior = handler.stream_unary
        factory = grpc.stream_unary_rpc_method_handler
    elif response_stream:
        behavior = handler.unary_stream
        factory = grpc.unary_stream_rpc_method_handler
    else:
        behavior = handler.unary_unary
        factory = grpc.unary_unary_rpc_method_handler
    if behavior is None:  # pragma: no cover - grpc always fills the handler of its kind
        return handler
    wrapped = _observed(behavior, full_method, metadata, streaming=response_stream)
    return factory(
        wrapped,
        request_deserializer=tolerant_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _observed(
    behavior: _Behavior, full_method: str, metadata: Any, *, streaming: bool
) -> _Behavior:
    service, method = split_method(full_method)

    def call(request: Any, context: _Context) -> Any:
        # A request the edge refuses never reaches the servicer.
        if isinstance(request, UndecodableRequest):
            return _refuse(request.error())
        try:
            check_text_fields(request)
        except InvalidArgumentError as exc:
            return _refuse(exc)
        return behavior(request, context)

    async def unary_response(request: Any, context: _Context) -> Any:
        async with _observe(context, service, method, metadata) as state:
            return await _guard(call(request, context), context, state)

    async def stream_response(request: Any, context: _Context) -> AsyncIterator[Any]:
        # An async generator itself, not a coroutine writing with context.write: an outer
        # interceptor (OpenTelemetry's) iterates the behaviour it wraps.
        async with _observe(context, service, method, metadata) as state:
            result = call(request, context)
            if not inspect.isasyncgen(result):
                if inspect.isawaitable(result):
                    await _guard(result, context, state)
                return
            try:
                while (response := await _guard(_next(result), context, state)) is not _END:
                    try:
                        yield response
                    except GeneratorExit:  # the caller went away mid-stream
                        state.code = grpc.StatusCode.CANCELLED
                        raise
            finally:
                await result.aclose()  # the servicer's own clean-up runs now, not at GC

    return stream_response if streaming else unary_response


_END: Final = object()


async def _next(responses: AsyncIterator[Any]) -> Any:
    """The stream's next response, or ``_END`` (not an exception for :func:`_guard` to map)."""
    try:
        return await anext(responses)
    except StopAsyncIteration:
        return _END


async def _refuse(error: InvalidArgumentError) -> None:
    raise error


async def _guard(work: Awaitable[Any], context: _Context, state: _RpcState) -> Any:
    """Await the servicer's work; map what escapes it to a status and abort with that."""
    try:
        result = await work
    except grpc.aio.AbortError:
        # The servicer aborted with a status of its own choosing; grpc sends it.
        state.code = _context_code(context)
        raise
    except asyncio.CancelledError:
        state.code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:
        status = status_for_exception(exc, request_id=state.request_id)
        state.code = status.code
        if not is_expected(exc):
            log.exception("rpc_failed", error_type=type(exc).__name__)
        await abort_with_status(context, status)
    state.code = _context_code(context)
    return result


@asynccontextmanager
async def _observe(
    context: _Context, service: str, method: str, metadata: Any
) -> AsyncIterator[_RpcState]:
    """Bind the request id for the RPC and record its outcome when it ends."""
    # The peer is read now: a streaming call's wrapper may be finalised after grpc freed the call,
    # and context.peer() on a freed call dereferences NULL (a segfault, seen under the edge fuzz).
    state = _RpcState(request_id_from_metadata(metadata), context.peer())
    started = time.perf_counter()
    token = set_request_id(state.request_id)
    try:
        with structlog.contextvars.bound_contextvars(
            request_id=state.request_id, rpc_method=f"{service}/{method}"
        ):
            # Echo the id so a caller can quote it; an abort's status repeats it in its trailers.
            context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, state.request_id),))
            try:
                yield state
            except BaseException:
                if state.code is None:
                    state.code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                _record(context, service, method, state, time.perf_counter() - started)
    finally:
        # ValueError when finalised outside the RPC's context: grpc dropped a streaming wrapper
        # suspended at a yield (the caller left) and the event loop closes it in a task of its
        # own, whose context copy the token does not belong to; that copy dies with the task.
        with contextlib.suppress(ValueError):
            reset_request_id(token)


def _record(
    context: _Context, service: str, method: str, state: _RpcState, duration: float
) -> None:
    code_name = (state.code or grpc.StatusCode.OK).name
    GRPC_REQUESTS.labels(service, method, code_name).inc()
    GRPC_REQUEST_DURATION.labels(service, method).observe(duration)
    emit = log.debug if service in _QUIET_SERVICES else log.info
    ids = {"request_id": state.request_id}
    # Outside the RPC's own context (a wrapper finalised by the event loop) the bound ids are
    # another task's: only the call's own id is known then.
    own_context = current_request_id() == state.request_id
    bound = structlog.contextvars.get_contextvars().get("request_id") if own_context else None
    if bound and bound != state.request_id:
        # The call served an execution, which bound its submit's request id (an approval, a
        # worker run the approvals service started): that id correlates, the call's own next to it.
        ids = {"request_id": bound, "rpc_request_id": state.request_id}
    emit(
        "rpc_completed",
        method=f"{service}/{method}",
        code=code_name,
        duration_ms=round(duration * 1000, 3),
        peer=state.peer,
        **ids,
    )


def _context_code(context: _Context) -> grpc.StatusCode:
    # None until the servicer sets a code or aborts (grpc-stubs types it as never None).
    code = cast("grpc.StatusCode | None", context.code())
    return code or grpc.StatusCode.OK
