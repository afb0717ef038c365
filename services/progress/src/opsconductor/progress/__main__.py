"""``python -m opsconductor.progress`` (``opsc-progress``): ProgressService over gRPC, plus HTTP.

Start-up: settings from ``OPSC_*``, logging, then the shared bootstrap
(:func:`opsconductor.common.rpc.server.serve`): listen, open the database pool and the one
LISTEN connection, report SERVING; SIGTERM/SIGINT: NOT_SERVING, end the live subscriptions,
drain in-flight RPCs, close the pool, exit 0.
"""

from __future__ import annotations

import sys

import structlog

from opsconductor.common.logconfig import configure_logging
from opsconductor.common.rpc.server import load_settings, run_server
from opsconductor.progress.app import ProgressApp
from opsconductor.progress.servicers import register_services
from opsconductor.progress.settings import ProgressSettings


def main() -> int:
    """Run the progress service until SIGTERM/SIGINT; returns the exit status."""
    settings = load_settings(ProgressSettings)
    configure_logging(
        level=settings.log_level, json=settings.log_json, service=settings.service_name
    )
    structlog.get_logger(__name__).info("settings_loaded", **settings.startup_log_fields())
    app = ProgressApp(settings)
    return run_server(
        settings,
        lambda server: register_services(server, app),
        on_startup=[app.start],
        on_shutdown=[app.stop],
    )


if __name__ == "__main__":
    sys.exit(main())
