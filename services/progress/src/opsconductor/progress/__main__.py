"""``python -m opsconductor.progress`` (``opsc-progress``): ProgressService over gRPC, plus HTTP.

Start-up: settings from ``OPSC_*``, logging, then the shared bootstrap
(:func:`opsconductor.rpc.server.serve`): listen, open the database pool and the one
LISTEN connection, start the HTTP server (WebSocket, SSE, long-poll, grpc-web, the UI), report
SERVING. SIGTERM/SIGINT: NOT_SERVING, cut every live subscriber off with its position (it
resumes on another replica), stop HTTP, drain in-flight RPCs, close the pool, exit 0.

The event loop is uvloop's unless ``OPSC_EVENT_LOOP=asyncio``: fan-out to many subscribers is
bound by per-message event-loop work, which uvloop makes cheaper.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import structlog
import uvloop

from opsconductor.common.logconfig import configure_logging
from opsconductor.progress.app import ProgressApp
from opsconductor.progress.http.grpc_web import GrpcWebGateway
from opsconductor.progress.http.routes import build_http_app
from opsconductor.progress.http.server import HttpServer
from opsconductor.progress.servicers import register_services
from opsconductor.progress.settings import ProgressSettings
from opsconductor.rpc.server import load_settings, run_server


def loop_factory(settings: ProgressSettings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``settings.event_loop`` names; None: the standard library's."""
    return uvloop.new_event_loop if settings.event_loop == "uvloop" else None


def main() -> int:
    """Run the progress service until SIGTERM/SIGINT; returns the exit status."""
    settings = load_settings(ProgressSettings)
    configure_logging(
        level=settings.log_level,
        json=settings.log_json,
        service=settings.service_name,
        file=settings.log_file,
    )
    structlog.get_logger(__name__).info("settings_loaded", **settings.startup_log_fields())
    app = ProgressApp(settings)
    gateway = GrpcWebGateway(app, build_http_app(app))
    http = HttpServer(
        gateway,
        host=settings.http_host,
        port=settings.http_port,
        port_file=settings.http_port_file,
        grace_s=settings.shutdown_grace_s,
    )

    async def stop_streams() -> None:
        if app.started:
            app.hub.disconnect_all()
        await http.stop()
        await gateway.close()

    return run_server(
        settings,
        lambda server: register_services(server, app),
        on_startup=[app.start, http.start],
        on_stopping=[stop_streams],
        on_shutdown=[app.stop],
        loop_factory=loop_factory(settings),
    )


if __name__ == "__main__":
    sys.exit(main())
