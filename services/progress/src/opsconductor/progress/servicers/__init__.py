"""gRPC transport of the progress service: ``ProgressService``.

Protobuf in, domain calls, protobuf out; no business logic here.
"""

from __future__ import annotations

import grpc.aio

from opsconductor.progress.app import ProgressApp
from opsconductor.progress.servicers.progress_servicer import add_progress_servicer


def register_services(server: grpc.aio.Server, app: ProgressApp) -> list[str]:
    """Add every servicer of the progress service to ``server``; returns the full service names."""
    return [add_progress_servicer(server, app)]
