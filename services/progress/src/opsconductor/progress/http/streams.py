"""The three HTTP event transports: WebSocket, Server-Sent Events and long-poll.

All three open a :class:`~opsconductor.progress.logic.subscription.Subscription` through
:class:`~opsconductor.progress.logic.access.EventAccess` (same tenant rules, same audit as
gRPC) and send events as JSON objects with the fields of the protobuf ``ExecutionEvent``.

* **SSE** ``GET …/events/sse``: ``id:`` is the seq, so a browser's automatic reconnect sends
  ``Last-Event-ID`` and resumes exactly after it (``?after_seq=`` for the first connection);
  a comment line every ``sse_heartbeat_s`` keeps proxies from closing an idle stream; after
  ``execution_completed`` comes ``event: end`` and the stream closes (a reconnect after the end
  gets ``204``, which tells EventSource to stop). A subscriber cut off as too slow gets
  ``event: lagged`` with the seq to resume from.
* **WebSocket** ``…/events/ws?after_seq=``: messages ``{"event": …}``, ``{"heartbeat": true}``,
  ``{"lagged": {"after_seq": n}}`` (then close 1013), ``{"error": …}`` (then close 4000 + the
  HTTP status); closed 1000 after the terminal event.
* **Long-poll** ``GET …/events/poll?after_seq=&wait_s=``: answers as soon as anything newer than
  ``after_seq`` exists (at most ``wait_s``), with ``{"events": […], "after_seq": n,
  "completed": bool}``; the next poll passes the ``after_seq`` it got.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from opsconductor.common.errors import SubscriberLaggedError
from opsconductor.lifecycle.storage.paging import invalid_page_request
from opsconductor.progress.http.context import HttpContext
from opsconductor.progress.http.errors import WS_CLOSE_BASE, describe
from opsconductor.progress.http.event_frames import EventFrames
from opsconductor.progress.http.event_frames import dump_json as _json
from opsconductor.progress.logic.subscription import Subscription

#: Events one long-poll answer carries at most.
_POLL_BATCH = 500
#: SSE: events sent in one chunk at most (a subscriber catching up).
_SSE_BATCH = 64
#: SSE: how long a browser waits before reconnecting on its own.
_SSE_RETRY_MS = 2000


def _int_param(name: str, value: str | None) -> int:
    if value is None or value == "":
        return 0
    try:
        return int(value)
    except ValueError:
        raise invalid_page_request(name, "must be a whole number (a seq received)") from None


def _after_seq(connection: HTTPConnection) -> int:
    """``Last-Event-ID`` (an SSE reconnect) wins over ``?after_seq=``."""
    last_event_id = connection.headers.get("last-event-id")
    if last_event_id:
        return _int_param("Last-Event-ID", last_event_id)
    return _int_param("after_seq", connection.query_params.get("after_seq"))


async def _subscribe(connection: HTTPConnection, ctx: HttpContext, route: str) -> Subscription:
    principal = await ctx.authenticate(connection)
    return await ctx.access.subscribe(
        principal,
        connection.path_params["tenant_id"],
        connection.path_params["execution_id"],
        after_seq=_after_seq(connection),
        resource=f"http/{route}",
    )


def _error_response(exc: BaseException, route: str) -> JSONResponse:
    status, body = describe(exc, route=route)
    return JSONResponse(body, status_code=status)


async def sse(request: Request) -> Response:
    """Server-Sent Events (see the module docstring)."""
    ctx = HttpContext.of(request)
    try:
        subscription = await _subscribe(request, ctx, "sse")
    except Exception as exc:  # noqa: BLE001 - the transport boundary: every error is answered
        return _error_response(exc, "sse")
    if subscription.done:
        subscription.release()
        return Response(status_code=204)
    return StreamingResponse(
        _sse_body(subscription, ctx.frames, ctx.settings.sse_heartbeat_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse_body(
    subscription: Subscription, frames: EventFrames, heartbeat_s: float
) -> AsyncIterator[str | bytes]:
    try:
        yield f"retry: {_SSE_RETRY_MS}\n\n"
        while True:
            try:
                event = await subscription.next(wait_s=heartbeat_s)
            except SubscriberLaggedError as exc:
                yield f"event: lagged\ndata: {_json(exc.details)}\n\n"
                return
            if event is None:
                if subscription.done:
                    return
                yield ": heartbeat\n\n"
                continue
            # What else is buffered already goes out in the same chunk: one write, not many,
            # for a subscriber the fan-out left behind.
            batch = [frames.sse(event)]
            lagged = None
            while subscription.ready and len(batch) < _SSE_BATCH:
                try:
                    more = await subscription.next(wait_s=0)
                except SubscriberLaggedError as exc:
                    lagged = exc
                    break
                if more is None:
                    break
                batch.append(frames.sse(more))
            if subscription.done:
                batch.append(b"event: end\ndata: {}\n\n")
            elif lagged is not None:
                batch.append(f"event: lagged\ndata: {_json(lagged.details)}\n\n".encode())
            yield batch[0] if len(batch) == 1 else b"".join(batch)
            if subscription.done or lagged is not None:
                return
    finally:
        subscription.release()


async def websocket_events(websocket: WebSocket) -> None:
    """WebSocket (see the module docstring)."""
    ctx = HttpContext.of(websocket)
    await websocket.accept()
    try:
        subscription = await _subscribe(websocket, ctx, "ws")
    except Exception as exc:  # noqa: BLE001 - the transport boundary: every error is answered
        status, body = describe(exc, route="ws")
        await websocket.send_text(_json(body))
        await websocket.close(code=WS_CLOSE_BASE + status)
        return
    pump = asyncio.ensure_future(
        _ws_pump(websocket, subscription, ctx.frames, ctx.settings.sse_heartbeat_s)
    )
    # The client sends nothing; a receive returns when it goes away, which ends the pump.
    hangup = asyncio.ensure_future(_wait_hangup(websocket))
    try:
        await asyncio.wait({pump, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, hangup):
            task.cancel()
        for task in (pump, hangup):
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await task
        subscription.release()


async def _wait_hangup(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _ws_pump(
    websocket: WebSocket, subscription: Subscription, frames: EventFrames, heartbeat_s: float
) -> None:
    try:
        while True:
            event = await subscription.next(wait_s=heartbeat_s)
            if event is None:
                if subscription.done:
                    break
                await websocket.send_text('{"heartbeat":true}')
                continue
            await websocket.send_text(frames.websocket(event))
            if subscription.done:
                break
    except SubscriberLaggedError as exc:
        await websocket.send_text(_json({"lagged": exc.details}))
        await websocket.close(code=1013)  # "try again later": resume from after_seq
        return
    await websocket.close(code=1000)


async def long_poll(request: Request) -> Response:
    """Long-poll (see the module docstring)."""
    ctx = HttpContext.of(request)
    try:
        wait_s = _wait_s(request, ctx.settings.long_poll_max_wait_s)
        subscription = await _subscribe(request, ctx, "poll")
    except Exception as exc:  # noqa: BLE001 - the transport boundary: every error is answered
        return _error_response(exc, "poll")
    try:
        events = []
        if not subscription.done:
            first = await subscription.next(wait_s=wait_s)
            if first is not None:
                events.append(first)
            while first is not None and not subscription.done and len(events) < _POLL_BATCH:
                more = await subscription.next(wait_s=0)
                if more is None:
                    break
                events.append(more)
    except Exception as exc:  # noqa: BLE001 - the transport boundary: every error is answered
        return _error_response(exc, "poll")
    finally:
        subscription.release()
    return JSONResponse(
        {
            "events": [e.to_json_dict() for e in events],
            "after_seq": subscription.position,
            "completed": subscription.done,
        }
    )


def _wait_s(request: Request, max_wait_s: float) -> float:
    raw = request.query_params.get("wait_s")
    if raw is None or raw == "":
        return max_wait_s
    try:
        value = float(raw)
    except ValueError:
        raise invalid_page_request("wait_s", "must be a number of seconds") from None
    if not 0 <= value <= max_wait_s:
        raise invalid_page_request("wait_s", f"must be between 0 and {max_wait_s:g} seconds")
    return value
