"""``python -m opsconductor.api`` (``opsc-api``): serve ExecutionService and AdminService over gRPC.

Start-up: settings from ``OPSC_*``, logging, then the shared bootstrap
(:func:`opsconductor.rpc.server.serve`): listen, open the database pool, report SERVING;
SIGTERM/SIGINT: NOT_SERVING, drain in-flight RPCs, close the pool, exit 0.
"""

from __future__ import annotations

import sys

import structlog

from opsconductor.api.app import ApiApp
from opsconductor.api.servicers import register_services
from opsconductor.api.settings import ApiSettings
from opsconductor.common.logconfig import configure_logging
from opsconductor.rpc.server import load_settings, run_server


def main() -> int:
    """Run the api service until SIGTERM/SIGINT; returns the exit status."""
    settings = load_settings(ApiSettings)
    configure_logging(
        level=settings.log_level,
        json=settings.log_json,
        service=settings.service_name,
        file=settings.log_file,
    )
    structlog.get_logger(__name__).info("settings_loaded", **settings.startup_log_fields())
    app = ApiApp(settings)
    return run_server(
        settings,
        lambda server: register_services(server, app),
        on_startup=[app.start],
        on_shutdown=[app.stop],
    )


if __name__ == "__main__":
    sys.exit(main())
