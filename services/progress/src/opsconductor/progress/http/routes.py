"""The Starlette application of the progress service's HTTP side.

``/v1/…`` event transports (:mod:`.streams`) and stream tickets, ``/healthz``, the UI's static
files under ``/ui/`` and, for the browser, grpc-web (:mod:`.grpc_web`). No access log: paths
are logged by nobody with their query strings (tickets travel there).
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from opsconductor.common.errors import AuthenticationError
from opsconductor.progress.app import ProgressApp
from opsconductor.progress.http.context import HttpContext
from opsconductor.progress.http.errors import describe
from opsconductor.progress.http.streams import long_poll, sse, websocket_events
from opsconductor.progress.http.tickets import TicketIssuer

#: The UI: plain HTML/CSS/JS plus the committed grpc-web bundle (``make ui`` rebuilds it).
UI_DIR = Path(__file__).resolve().parent.parent / "ui"

_EVENTS = "/v1/tenants/{tenant_id}/executions/{execution_id}/events"


async def issue_ticket(request: Request) -> Response:
    """``POST /v1/tickets`` with ``Authorization: Bearer``: a short-lived stream ticket."""
    ctx = HttpContext.of(request)
    try:
        if "authorization" not in request.headers:
            raise AuthenticationError(
                "a stream ticket needs the header Authorization with the value Bearer and "
                "your token"
            )
        principal = await ctx.authenticate(request)
    except Exception as exc:  # noqa: BLE001 - the transport boundary: every error is answered
        status, body = describe(exc, route="tickets")
        return JSONResponse(body, status_code=status)
    return JSONResponse(
        {"ticket": ctx.tickets.issue(principal), "expires_in_s": ctx.tickets.ttl_s},
        headers={"Cache-Control": "no-store"},
    )


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def root(request: Request) -> Response:
    return RedirectResponse("/ui/")


def build_http_app(app: ProgressApp, *, extra_routes: list[BaseRoute] | None = None) -> Starlette:
    """The HTTP application, reading through ``app`` once it started."""
    key = app.settings.stream_ticket_key
    tickets = TicketIssuer(
        key.get_secret_value().encode() if key is not None else None,
        ttl_s=app.settings.stream_ticket_ttl_s,
    )
    routes: list[BaseRoute] = [
        Route("/", root),
        Route("/healthz", healthz),
        Route("/v1/tickets", issue_ticket, methods=["POST"]),
        Route(f"{_EVENTS}/sse", sse),
        Route(f"{_EVENTS}/poll", long_poll),
        WebSocketRoute(f"{_EVENTS}/ws", websocket_events),
        *(extra_routes or []),
        Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"),
    ]
    http = Starlette(routes=routes)
    http.state.ctx = HttpContext(app=app, tickets=tickets)
    return http
