"""``python -m opsconductor.approvals`` (``opsc-approvals``): serve ApprovalService over gRPC.

Start-up: settings from ``OPSC_*``, logging, then the shared bootstrap
(:func:`opsconductor.rpc.server.serve`): listen, open the database pool, connect to the
worker and the queue, report SERVING; SIGTERM/SIGINT: NOT_SERVING, drain in-flight RPCs, wait
(bounded) for the approved immediate executions it started, close everything, exit 0.
"""

from __future__ import annotations

import sys

import structlog

from opsconductor.approvals.app import ApprovalsApp
from opsconductor.approvals.servicers import register_services
from opsconductor.approvals.settings import ApprovalsSettings
from opsconductor.common.logconfig import configure_logging
from opsconductor.rpc.server import load_settings, run_server


def main() -> int:
    """Run the approvals service until SIGTERM/SIGINT; returns the exit status."""
    settings = load_settings(ApprovalsSettings)
    configure_logging(
        level=settings.log_level,
        json=settings.log_json,
        service=settings.service_name,
        file=settings.log_file,
    )
    structlog.get_logger(__name__).info("settings_loaded", **settings.startup_log_fields())
    app = ApprovalsApp(settings)
    return run_server(
        settings,
        lambda server: register_services(server, app),
        on_startup=[app.start],
        on_shutdown=[app.stop],
    )


if __name__ == "__main__":
    sys.exit(main())
