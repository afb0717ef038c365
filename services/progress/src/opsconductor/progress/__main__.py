"""``python -m opsconductor.progress`` (``opsc-progress``): serve ProgressService over gRPC.

Start-up: settings from ``OPSC_*``, logging, then the shared bootstrap
(:func:`opsconductor.common.rpc.server.serve`): listen, open the database pool, report SERVING;
SIGTERM/SIGINT: NOT_SERVING, drain in-flight RPCs, close the pool, exit 0.
"""

from __future__ import annotations

import sys

import structlog

from opsconductor.common.logconfig import configure_logging
from opsconductor.common.rpc.resources import DatabasePool
from opsconductor.common.rpc.server import load_settings, run_server
from opsconductor.progress.servicers import register_services
from opsconductor.progress.settings import ProgressSettings


def main() -> int:
    """Run the progress service until SIGTERM/SIGINT; returns the exit status."""
    settings = load_settings(ProgressSettings)
    configure_logging(
        level=settings.log_level, json=settings.log_json, service=settings.service_name
    )
    structlog.get_logger(__name__).info("settings_loaded", **settings.startup_log_fields())
    db = DatabasePool(settings.database_url)
    return run_server(
        settings,
        lambda server: register_services(server, db),
        on_startup=[db.open],
        on_shutdown=[db.close],
    )


if __name__ == "__main__":
    sys.exit(main())
